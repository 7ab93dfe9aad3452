#!/usr/bin/env bash
# Cached blob throughput: clyde's mirror vs nginx serving a hard link of the very same file,
# alternating, one curl at a time. Usage: bench/serve-vs-nginx.sh [SIZE_MIB=1024] [ROUNDS=7]
# Prints each round, the medians, and clyde/nginx (target: >= 0.9).
set -euo pipefail
size_mib=${1:-1024}
rounds=${2:-7}
work=$(mktemp -d /tmp/clyde-bench.XXXXXX)
source "$(dirname "$0")/lib.sh"
serve_cached_blob "$size_mib"
curl -sf -o /dev/null "$nginx_url"  # warm the page cache (one file for both)

speed() { curl -sf -o /dev/null -w '%{speed_download}\n' "$1"; }
c=(); n=()
for i in $(seq "$rounds"); do
  cs=$(speed "$clyde_url"); ns=$(speed "$nginx_url")
  c+=("$cs"); n+=("$ns")
  printf 'round %d: clyde %.0f MiB/s, nginx %.0f MiB/s\n' "$i" "$(echo "$cs/1048576" | bc -l)" "$(echo "$ns/1048576" | bc -l)"
done
cm=$(median "${c[@]}"); nm=$(median "${n[@]}")
printf 'median: clyde %.0f MiB/s, nginx %.0f MiB/s, ratio clyde/nginx %.3f (size %d MiB, %d rounds)\n' \
  "$(echo "$cm/1048576" | bc -l)" "$(echo "$nm/1048576" | bc -l)" "$(echo "$cm/$nm" | bc -l)" "$size_mib" "$rounds"
