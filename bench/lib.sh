# Shared helpers of the benchmark scripts: free ports, a cached blob, clyde and nginx on it.
# Sourced; expects `work` (a temp dir) and appends started pids to `pids`.

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
clyde=${CLYDE_BIN:-$here/target/release/clyde}
[ -x "$clyde" ] || { echo "build first: cargo build --release (or set CLYDE_BIN)" >&2; exit 1; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_url() {
  for _ in $(seq 200); do curl -sf -o /dev/null -r 0-0 "$1" && return 0; sleep 0.05; done
  echo "timed out waiting for $1" >&2; exit 1
}

# make_cached_blob MIB: a random blob placed in clyde's store as a complete blob; sets `hex`.
make_cached_blob() {
  mkdir -p "$work/data/blobs/sha256" "$work/www"
  head -c $(($1 * 1024 * 1024)) /dev/urandom >"$work/blob"
  hex=$(sha256sum "$work/blob" | cut -d' ' -f1)
  mv "$work/blob" "$work/data/blobs/sha256/$hex"
  ln "$work/data/blobs/sha256/$hex" "$work/www/blob"
}

# start_clyde: clyde serve on the data dir, every port a free one on 127.0.0.1 (the
# defaults would collide with another agent); sets `cport` and `clyde_pid`.
start_clyde() {
  cport=$(free_port)
  "$clyde" serve --data-dir "$work/data" --mirror-addr "127.0.0.1:$cport" \
    --peer-addr "127.0.0.1:$(free_port)" --p2p-addr "/ip4/127.0.0.1/tcp/$(free_port)" \
    --metrics-addr "127.0.0.1:$(free_port)" --containerd-socket "" --log-level warn "$@" &
  clyde_pid=$!
  pids+=("$clyde_pid")
  wait_url "http://127.0.0.1:$cport/v2/"
}

# start_nginx [MODE]: nginx serving $work/www, one worker; sets `nport`. MODE `sendfile`
# (default: zero-copy) or `buffered` (sendfile off, 1 MiB output buffers: faster on
# loopback, where sendfile gains nothing over large copies).
start_nginx() {
  command -v nginx >/dev/null || { echo "install nginx-light" >&2; exit 1; }
  local mode=${1:-sendfile} io
  case "$mode" in
    sendfile) io="sendfile on; tcp_nopush on;" ;;
    buffered) io="sendfile off; output_buffers 1 1m;" ;;
    *) echo "start_nginx: unknown mode $mode" >&2; exit 1 ;;
  esac
  nport=$(free_port)
  cat >"$work/nginx-$mode.conf" <<CONF
user root;
worker_processes 1;
pid $work/nginx-$mode.pid;
error_log $work/nginx-$mode.err;
events { worker_connections 64; }
http {
  $io access_log off;
  server { listen 127.0.0.1:$nport; root $work/www; }
}
CONF
  nginx -c "$work/nginx-$mode.conf" -g 'daemon off;' &
  pids+=($!)
  wait_url "http://127.0.0.1:$nport/blob"
}

# serve_cached_blob MIB: one cached blob served by clyde and, as the same file, by nginx
# with sendfile and by nginx buffered; sets `clyde_url`, `nginx_url` (sendfile) and
# `nginx_buffered_url` (and what the helpers above set).
serve_cached_blob() {
  make_cached_blob "$1"
  start_clyde
  start_nginx buffered
  nginx_buffered_url="http://127.0.0.1:$nport/blob"
  start_nginx sendfile
  clyde_url="http://127.0.0.1:$cport/v2/bench/blobs/sha256:$hex?ns=127.0.0.1:1"
  nginx_url="http://127.0.0.1:$nport/blob"
}

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
