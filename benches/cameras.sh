#!/usr/bin/env bash
# How one engine scales over cameras: 1, 2, 4 and 8 test cameras (640x480
# RGB test patterns at 15 fps each) on one labelcast process, the demo
# model on tract, one inference thread, labels to stdout. Prints, per
# count and fit, the frames classified per second per camera (mean, min and
# max over the cameras: the fair scheduler keeps them equal) and the
# process's RSS at the end and its peak.
#
#   bash benches/cameras.sh            (builds the release binary first)
#   CAMERAS_SECONDS=30 bash benches/cameras.sh
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
cargo build --release --quiet
bin=$target/release/labelcast
seconds=${CAMERAS_SECONDS:-20}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

printf '%-12s %7s %12s %12s %12s %8s %8s\n' fit cameras "fps/camera" "min" "max" "RSS MB" "peak MB"
for fit in center-crop tiles; do
  for n in 1 2 4 8; do
    config=$work/cameras-$fit-$n.toml
    {
      printf '[output]\nmode = "stdout"\n[service]\nhttp_listen = "off"\n[model]\nresize = "%s"\n' "$fit"
      for i in $(seq "$n"); do
        printf '[[camera]]\nid = "cam%d"\nsource = "test://pattern?width=640&height=480&fps=15"\n' "$i"
      done
    } > "$config"
    "$bin" --log-level warn run --config "$config" > "$work/out-$fit-$n.jsonl" 2> "$work/err-$fit-$n.log" &
    pid=$!
    # The figures count from the first label on, not from the model load.
    until [ -s "$work/out-$fit-$n.jsonl" ]; do sleep 0.1; done
    start_lines=$(wc -l < "$work/out-$fit-$n.jsonl")
    sleep "$seconds"
    end_lines=$(wc -l < "$work/out-$fit-$n.jsonl")
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
    peak=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
    kill -TERM "$pid"; wait "$pid" || true
    python3 - "$work/out-$fit-$n.jsonl" "$start_lines" "$end_lines" "$seconds" "$n" "$fit" "$rss" "$peak" <<'PY'
import collections, json, sys
path, start, end, seconds, n, fit, rss, peak = sys.argv[1:]
lines = open(path).read().splitlines()[int(start):int(end)]
per = collections.Counter(json.loads(l)["camera"] for l in lines)
rates = [per.get(f"cam{i}", 0) / float(seconds) for i in range(1, int(n) + 1)]
print(f"{fit:<12} {n:>7} {sum(rates) / len(rates):>12.2f} {min(rates):>12.2f} {max(rates):>12.2f} "
      f"{int(rss) / 1024:>8.1f} {int(peak) / 1024:>8.1f}")
PY
  done
done
