#!/usr/bin/env bash
# What the status page and snapshots cost: one 1280x720 test camera at
# 15 fps, the demo model on tract (one thread, tiles), measured on the
# labelcast process alone (the browser's own CPU is not counted) over
# STATUS_SECONDS per phase:
#   1. no page open (frames are not copied, nothing is encoded);
#   2. the page open in headless chromium (frames copied at most 5 a second,
#      one preview JPEG per copied frame);
#   3. the page closed again (copying stops within 3 s);
#   4. no page, snapshots on (every frame downscaled for a snapshot that
#      may be asked for), on the embedded broker.
# Prints CPU (percent of one core), RSS at the end and the preview JPEGs
# encoded per second.
#
#   bash benches/status_page.sh        (builds the release binary first; needs chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
cargo build --release --quiet
bin=$target/release/labelcast
seconds=${STATUS_SECONDS:-20}
chromium=${LABELCAST_CHROMIUM:-/usr/bin/chromium}
work=$(mktemp -d)
browser=
daemon=
cleanup() {
  [ -n "$browser" ] && kill "$browser" 2>/dev/null || true
  [ -n "$daemon" ] && kill "$daemon" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http_port=$(free_port)
mqtt_port=$(free_port)
ticks=$(getconf CLK_TCK)

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
metric() { curl -s "http://127.0.0.1:$http_port/metrics" | awk -v m="$1" '$1 == m {print $2}'; }

# measure NAME: CPU, RSS and previews over $seconds.
measure() {
  local t0 c0 p0 t1 c1 p1 rss
  t0=$(date +%s.%N); c0=$(cpu_ticks "$daemon"); p0=$(metric labelcast_previews_encoded_total)
  sleep "$seconds"
  t1=$(date +%s.%N); c1=$(cpu_ticks "$daemon"); p1=$(metric labelcast_previews_encoded_total)
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$daemon/status")
  python3 - "$1" "$t0" "$t1" "$c0" "$c1" "$ticks" "$rss" "$p0" "$p1" <<'PY'
import sys
name, t0, t1, c0, c1, ticks, rss, p0, p1 = sys.argv[1:]
wall = float(t1) - float(t0)
cpu = (int(c1) - int(c0)) / int(ticks) / wall * 100
print(f"{name:<34} {cpu:7.1f} {int(rss) / 1024:9.1f} {(float(p1 or 0) - float(p0 or 0)) / wall:11.2f}")
PY
}

start_daemon() {
  "$bin" --log-level warn run --config "$1" > /dev/null 2> "$work/daemon.log" &
  daemon=$!
  local waited=0
  until curl -sf "http://127.0.0.1:$http_port/healthz" > /dev/null; do
    sleep 0.2
    waited=$((waited + 1))
    if ((waited > 300)) || ! kill -0 "$daemon" 2>/dev/null; then
      echo "labelcast did not become healthy within 60 s:" >&2
      cat "$work/daemon.log" >&2
      exit 1
    fi
  done
  sleep 5
}

camera='[[camera]]
id = "cam"
source = "test://pattern?width=1280&height=720&fps=15"'
printf '[output]\nmode = "stdout"\n[service]\nhttp_listen = "127.0.0.1:%s"\n%s\n' "$http_port" "$camera" > "$work/page.toml"
printf '[mqtt]\nembedded_listen = "127.0.0.1:%s"\n[service]\nhttp_listen = "127.0.0.1:%s"\n[snapshots]\nenabled = true\n%s\n' \
  "$mqtt_port" "$http_port" "$camera" > "$work/snapshots.toml"

printf '%-34s %7s %9s %11s\n' phase "CPU %" "RSS MB" "previews/s"
start_daemon "$work/page.toml"
measure "1. no page open"
"$chromium" --headless=new --no-sandbox --disable-gpu --user-data-dir="$work/chromium" \
  "http://127.0.0.1:$http_port/" > /dev/null 2>&1 &
browser=$!
sleep 5
measure "2. page open (chromium)"
kill "$browser"; wait "$browser" 2>/dev/null || true; browser=
sleep 5
measure "3. page closed again"
kill -TERM "$daemon"; wait "$daemon" || true; daemon=
start_daemon "$work/snapshots.toml"
measure "4. no page, snapshots on"
