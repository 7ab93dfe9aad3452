#!/usr/bin/env bash
# Peak RSS of `clyde serve` while 8 clients download one cached blob at once, next to the
# same 8 downloads from nginx. Usage: bench/rss-8-clients.sh [SIZE_MIB=1024] [CLIENTS=8]
# Target: clyde's peak RSS <= 96 MiB.
set -euo pipefail
size_mib=${1:-1024}
clients=${2:-8}
work=$(mktemp -d /tmp/clyde-bench.XXXXXX)
source "$(dirname "$0")/lib.sh"
serve_cached_blob "$size_mib"
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$clyde_pid/status"; }
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$clyde_pid/status"; }
before=$(rss_kib)
time_of() {
  local start end
  start=$(date +%s.%N)
  for _ in $(seq "$clients"); do curl -sf -o /dev/null "$1" & done
  wait
  end=$(date +%s.%N)
  echo "$end - $start" | bc -l
}
ct=$(time_of "$clyde_url")
nt=$(time_of "$nginx_url")
printf 'clyde: RSS before %d KiB, peak %d KiB (%.1f MiB) serving %d x %d MiB in %.2f s; nginx took %.2f s (time ratio nginx/clyde %.3f)\n' \
  "$before" "$(hwm_kib)" "$(echo "$(hwm_kib)/1024" | bc -l)" "$clients" "$size_mib" "$ct" "$nt" "$(echo "$nt/$ct" | bc -l)"
