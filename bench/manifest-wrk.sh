#!/usr/bin/env bash
# Cached manifest rate: `wrk` GETs one manifest by digest from clyde, and the same bytes from
# nginx as a static file, same run. (wrk cannot read answers to HEAD that carry
# Content-Length, so GET by digest stands in for containerd's HEAD.)
# Usage: bench/manifest-wrk.sh [SECONDS=10] [CONNECTIONS=16]   Target: >= 20,000 req/s, p99 <= 2 ms.
set -euo pipefail
secs=${1:-10}
conns=${2:-16}
work=$(mktemp -d /tmp/clyde-bench.XXXXXX)
source "$(dirname "$0")/lib.sh"
command -v docker-registry >/dev/null || { echo "install docker-registry" >&2; exit 1; }
command -v wrk >/dev/null || { echo "install wrk" >&2; exit 1; }

# A real upstream holding one small image, pushed with plain HTTP uploads.
rport=$(free_port)
cat >"$work/registry.yml" <<CONF
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: 127.0.0.1:$rport}
CONF
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
pids+=($!)
wait_url "http://127.0.0.1:$rport/v2/"
upload() { # file -> digest (POST for an upload location, then PUT the bytes)
  local d location
  d="sha256:$(sha256sum "$1" | cut -d' ' -f1)"
  location=$(curl -sf -o /dev/null -D - -X POST "http://127.0.0.1:$rport/v2/bench/app/blobs/uploads/" |
    awk 'tolower($1)=="location:" {print $2}' | tr -d '\r')
  case "$location" in http*) ;; *) location="http://127.0.0.1:$rport$location" ;; esac
  curl -sf -o /dev/null -X PUT --data-binary "@$1" -H 'Content-Type: application/octet-stream' "$location&digest=$d"
  echo "$d"
}
printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}' >"$work/config.json"
head -c 1024 /dev/urandom >"$work/layer"
cfg=$(upload "$work/config.json"); layer=$(upload "$work/layer")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":1024}]}' \
  "$cfg" "$(stat -c %s "$work/config.json")" "$layer" >"$work/manifest.json"
mdigest="sha256:$(sha256sum "$work/manifest.json" | cut -d' ' -f1)"
curl -sf -o /dev/null -X PUT --data-binary "@$work/manifest.json" -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
  "http://127.0.0.1:$rport/v2/bench/app/manifests/v1"

mkdir -p "$work/data" "$work/www"
cp "$work/manifest.json" "$work/www/blob"
start_clyde
start_nginx
url="http://127.0.0.1:$cport/v2/bench/app/manifests/$mdigest?ns=127.0.0.1:$rport"
curl -sf -o /dev/null "$url" || { echo "clyde could not fetch the manifest:"; curl -s "$url"; curl -s -H "Accept: application/vnd.oci.image.manifest.v1+json" "http://127.0.0.1:$rport/v2/bench/app/manifests/$mdigest"; cat "$work/registry.log" | tail -5; exit 1; }   # cache it
kill "${pids[0]}"              # the upstream is gone: every answer below is local
run_wrk() {
  wrk -t1 -c"$conns" -d"${secs}s" --latency "$1" | tee "$work/wrk.out" >&2
  awk '/Requests\/sec/ {print $2}' "$work/wrk.out"
}
echo "--- clyde" >&2; cr=$(run_wrk "$url")
echo "--- nginx" >&2; nr=$(run_wrk "http://127.0.0.1:$nport/blob")
printf 'manifest GET by digest: clyde %.0f req/s, nginx %.0f req/s, ratio clyde/nginx %.3f (%d connections, %d s)\n' \
  "$cr" "$nr" "$(echo "$cr/$nr" | bc -l)" "$conns" "$secs"
