#!/bin/bash
# Memory and speed of two labelcast binaries side by side, alternated, on
# this machine: built with jemalloc (the default) and without it (glibc's
# malloc), or any other pair.
#
#   cargo build --release && cp target/release/labelcast /tmp/lc-jemalloc
#   cargo build --release --no-default-features --features onnxruntime,tract-threads \
#     && cp target/release/labelcast /tmp/lc-glibc
#   bash benches/allocator.sh /tmp/lc-glibc /tmp/lc-jemalloc
#
# Per binary and round: the daemon on its embedded model (tract, tiles)
# looping over the shipped photos at 10 fps to stdout for SECONDS (60), RSS
# sampled every 5 s after the first 10 (steady = median of the samples, peak
# = VmHWM), then `labelcast bench --engines tract` p50s. The first binary is
# the baseline of the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
base=$1; other=$2; seconds=${SECONDS_PER_RUN:-60}; rounds=${ROUNDS:-2}
daemon() {
  "$1" run --source "file://calibration/images?fps=10&loop=true" --output stdout --http-listen off \
    --log-level warn > /dev/null 2>&1 &
  local pid=$! samples=()
  sleep 10
  for _ in $(seq 5 5 $((seconds - 10))); do
    sleep 5
    samples+=("$(awk '/^VmRSS/{print $2}' /proc/$pid/status)")
  done
  local peak; peak=$(awk '/^VmHWM/{print $2}' /proc/$pid/status)
  kill -INT $pid; wait $pid || true
  printf '%s\n' "${samples[@]}" | sort -n | awk -v peak="$peak" '{a[NR]=$1} END {printf "%.1f %.1f %.1f %.1f\n", a[int((NR+1)/2)]/1024, a[1]/1024, a[NR]/1024, peak/1024}'
}
p50() { "$1" bench --engines tract --threads 1 --iterations 60 --rounds 1 2>/dev/null | awk -v m="$2" '$1=="tract" && $3==m {print $5}'; }
printf '%-6s %-28s %9s %13s %8s %10s %10s\n' round binary "steady MB" "min-max MB" "peak MB" "fp32 p50" "w-o p50"
for round in $(seq 1 "$rounds"); do
  for bin in "$base" "$other"; do
    read -r steady low high peak < <(daemon "$bin")
    fp32=$(p50 "$bin" float); wo=$(p50 "$bin" weights-only)
    printf '%-6s %-28s %9s %13s %8s %10s %10s\n' "$round" "$(basename "$bin")" "$steady" "$low-$high" "$peak" "$fp32" "$wo"
  done
done
