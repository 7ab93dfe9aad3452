#!/usr/bin/env bash
# Cached blob throughput: clyde's mirror vs nginx serving a hard link of the very same file,
# two ways (sendfile; sendfile off with 1 MiB output buffers, the faster one on loopback),
# alternating, one curl at a time. Usage: bench/serve-vs-nginx.sh [SIZE_MIB=1024] [ROUNDS=7]
# Prints each round, the medians, and clyde over the better nginx (target: >= 0.9).
set -euo pipefail
size_mib=${1:-1024}
rounds=${2:-7}
work=$(mktemp -d /tmp/clyde-bench.XXXXXX)
source "$(dirname "$0")/lib.sh"
serve_cached_blob "$size_mib"
curl -sf -o /dev/null "$nginx_url"  # warm the page cache (one file for both)

speed() { curl -sf -o /dev/null -w '%{speed_download}\n' "$1"; }
c=(); n=(); b=()
mib() { echo "$1/1048576" | bc -l; }
for i in $(seq "$rounds"); do
  cs=$(speed "$clyde_url"); ns=$(speed "$nginx_url"); bs=$(speed "$nginx_buffered_url")
  c+=("$cs"); n+=("$ns"); b+=("$bs")
  printf 'round %d: clyde %.0f MiB/s, nginx sendfile %.0f MiB/s, nginx buffered %.0f MiB/s\n' \
    "$i" "$(mib "$cs")" "$(mib "$ns")" "$(mib "$bs")"
done
cm=$(median "${c[@]}"); nm=$(median "${n[@]}"); bm=$(median "${b[@]}")
best=$(printf '%s\n%s\n' "$nm" "$bm" | sort -g | tail -1)
printf 'median: clyde %.0f MiB/s, nginx sendfile %.0f MiB/s, nginx buffered %.0f MiB/s; clyde/sendfile %.3f, clyde/buffered %.3f, clyde/better nginx %.3f (size %d MiB, %d rounds)\n' \
  "$(mib "$cm")" "$(mib "$nm")" "$(mib "$bm")" "$(echo "$cm/$nm" | bc -l)" "$(echo "$cm/$bm" | bc -l)" \
  "$(echo "$cm/$best" | bc -l)" "$size_mib" "$rounds"
