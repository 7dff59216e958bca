#!/usr/bin/env bash
# End-to-end: labelcast against the Python pipeline a user would write
# instead (benches/baseline/pipeline.py), back to back on the same machine,
# the same model files, the same JPEG frames (E2E_FRAMES, 60 by default, at
# 640x480 and as many at 1280x720, made from the shipped photos, as a camera
# would send MJPEG), the
# same thread counts (1 and 2) and the same broker (mosquitto on loopback).
# Prints one table: frames/s, p50/p99 per-frame latency (capture to scores,
# from each message's frame_ms), mean time per stage, peak RSS, time from
# process start to the first label on the broker; then the ratios.
#
#   bash benches/e2e.sh          (needs ONNX Runtime: the .venv tests/run.sh makes)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
bin=$target/release/labelcast
[ -x "$bin" ] || cargo build --release --locked
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r models/requirements-ci.txt -r benches/baseline/requirements.txt
py=$repo/.venv/bin/python
ORT_DYLIB_PATH=$("$py" -c 'import glob, os, onnxruntime; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))[0])')
export ORT_DYLIB_PATH
# Each engine runs the demo file quantised for it (what labelcast picks when
# model.path is unset): uint8 activations for ONNX Runtime's CPU provider
# (labelcast and the Python baseline alike), the default file for tract.
model_cpu=$repo/models/demo/labelcast-demo-int8-cpu.onnx
model_tract=$repo/models/demo/labelcast-demo-int8.onnx
# At 300-400 frames/s 60 frames last 0.2 s, so a row's first frames (thread
# pools starting, pages first touched) weigh on its throughput; E2E_FRAMES=300
# measures longer.
frames_per_row=${E2E_FRAMES:-60}
work=$target/bench-e2e
rm -rf "$work" && mkdir -p "$work"

"$py" - "$work" "$frames_per_row" <<'PY'
import os, sys
from PIL import Image, ImageOps
work, count = sys.argv[1], int(sys.argv[2])
photos = sorted(p for p in os.listdir("calibration/images") if p.endswith(".jpg"))
for w, h in [(640, 480), (1280, 720)]:
    folder = os.path.join(work, f"frames-{w}x{h}")
    os.makedirs(folder)
    for i in range(count):
        image = Image.open(os.path.join("calibration/images", photos[i % len(photos)])).convert("RGB")
        ImageOps.fit(image, (w, h), Image.BILINEAR).save(os.path.join(folder, f"{i:03d}.jpg"), quality=85)
PY

port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 10000\n' "$port" > "$work/mosquitto.conf"
/usr/sbin/mosquitto -c "$work/mosquitto.conf" >/dev/null 2>&1 &
broker=$!
trap 'kill $broker 2>/dev/null || true' EXIT
sleep 1

results=$work/results.jsonl
run_row() {  # name engine threads resolution topic command...
  local name=$1 engine=$2 threads=$3 res=$4 topic=$5
  shift 5
  local ready=$work/ready-$RANDOM
  "$py" benches/baseline/listen.py --mqtt "127.0.0.1:$port" --topic "$topic" --count "$frames_per_row" --ready-file "$ready" > "$work/listen.json" &
  local listener=$!
  while [ ! -e "$ready" ]; do sleep 0.05; done
  local start
  start=$("$py" -c 'import time; print(time.time())')
  /usr/bin/time -f '%M' -o "$work/rss" "$@" > "$work/out" 2> "$work/err" || { cat "$work/err"; exit 1; }
  wait "$listener"
  "$py" - "$name" "$engine" "$threads" "$res" "$start" "$work" >> "$results" <<'PY'
import json, re, sys
name, engine, threads, res, start, work = sys.argv[1:]
listen = json.load(open(f"{work}/listen.json"))
rss_kib = int(open(f"{work}/rss").read().split()[-1])
if name == "labelcast":
    log = re.sub(r"\x1b\[[0-9;]*m", "", open(f"{work}/err").read())
    stats = json.loads(log[log.rindex("stats=") + 6:].splitlines()[0])
    stages = {"decode": stats["decode_ms_mean"], "preprocess": stats["preprocess_ms_mean"],
              "infer": stats["inference_ms_mean"], "publish": stats["publish_ms_mean"]}
else:
    summary = json.loads(open(f"{work}/out").read().strip().splitlines()[-1])
    stages = {"decode": summary["decode"], "preprocess": summary["preprocess"], "infer": summary["infer"],
              "publish": summary["publish"], "read": summary["read"]}
frame_ms = sorted(listen["frame_ms"])
pct = lambda p: frame_ms[min(len(frame_ms) - 1, int(round(p / 100 * len(frame_ms) + 0.5)) - 1)]
fps = (listen["count"] - 1) / (listen["last"] - listen["first"])
print(json.dumps({"name": name, "engine": engine, "threads": int(threads), "res": res, "count": listen["count"],
                  "fps": fps, "p50": pct(50), "p99": pct(99), "stages": stages, "rss_mb": rss_kib / 1024,
                  "first_label_s": listen["first"] - float(start)}))
PY
}

# The Python baseline classifies the centre crop of each frame, once:
# labelcast does the same here (its default, `tiles`, covers the whole
# frame in two inferences on these 4:3 and 16:9 frames).
centre=$work/centre-crop.toml
printf '[model]\nresize = "center-crop"\n' > "$centre"

# A shared VM's neighbours move single runs by 20-30%: every row runs once
# per round, rounds interleaved, and the table shows each row's median.
rounds=${E2E_ROUNDS:-3}
for round in $(seq "$rounds"); do
  echo "round $round of $rounds" >&2
  for res in 640x480 1280x720; do
    frames=$work/frames-$res
    for threads in 1 2; do
      for engine in onnxruntime tract; do
        model=$model_tract
        [ "$engine" = onnxruntime ] && model=$model_cpu
        run_row labelcast "$engine" "$threads" "$res" labelcast/bench/labels \
          "$bin" --log-level info run --config "$centre" --device-id bench --engine "$engine" --threads "$threads" --http-listen off \
          --source "file://$frames?fps=0" --mqtt "mqtt://127.0.0.1:$port" --model "$model"
      done
      run_row baseline onnxruntime "$threads" "$res" baseline/bench/labels \
        "$py" benches/baseline/pipeline.py --model "$model_cpu" --frames "$frames" --mqtt "127.0.0.1:$port" --threads "$threads"
    done
  done
done

"$py" - "$results" "$rounds" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
rounds = int(sys.argv[2])
key = lambda r: (r["name"], r["engine"], r["threads"], r["res"])
groups = {}
for r in runs:
    groups.setdefault(key(r), []).append(r)
med = lambda rs, f: statistics.median(f(r) for r in rs)
rows = []
for k, rs in groups.items():
    row = {"name": k[0], "engine": k[1], "threads": k[2], "res": k[3], "runs": rs}
    for field in ("fps", "p50", "p99", "rss_mb", "first_label_s"):
        row[field] = med(rs, lambda r: r[field])
    row["stages"] = {s: med(rs, lambda r: r["stages"][s]) for s in ("decode", "preprocess", "infer", "publish")}
    rows.append(row)
print(f"median of {rounds} round(s) per row")
print(f"{'run':<10} {'engine':<12} {'thr':>3} {'frames':<9} {'fps':>7} {'p50 ms':>7} {'p99 ms':>7} {'decode':>7} {'prep':>6} {'infer':>7} {'publish':>7} {'RSS MB':>7} {'1st label s':>11}")
for r in rows:
    s = r["stages"]
    print(f"{r['name']:<10} {r['engine']:<12} {r['threads']:>3} {r['res']:<9} {r['fps']:>7.1f} {r['p50']:>7.1f} {r['p99']:>7.1f} "
          f"{s['decode']:>7.2f} {s['preprocess']:>6.2f} {s['infer']:>7.2f} {s['publish']:>7.3f} {r['rss_mb']:>7.1f} {r['first_label_s']:>11.2f}")
print("\nratios of the medians (same resolution and threads; labelcast on the onnxruntime engine unless said);")
print("fps lc/py per round: the same ratio within each round, lowest to highest")
print(f"{'frames':<9} {'thr':>3} {'fps lc/py':>9} {'per round':>12} {'RSS lc/py':>9} {'1st label lc/py':>15} {'lc per-frame / bare infer':>26} {'tract fps / py':>14}")
for res in dict.fromkeys(r["res"] for r in rows):
    for threads in (1, 2):
        pick = lambda name, engine: next(r for r in rows if r["name"] == name and r["engine"] == engine and r["res"] == res and r["threads"] == threads)
        lc, tr, py = pick("labelcast", "onnxruntime"), pick("labelcast", "tract"), pick("baseline", "onnxruntime")
        per_round = sorted(a["fps"] / b["fps"] for a, b in zip(lc["runs"], py["runs"]))
        spread = f"{per_round[0]:.2f}-{per_round[-1]:.2f}"
        per_frame = 1000 / lc["fps"]
        print(f"{res:<9} {threads:>3} {lc['fps'] / py['fps']:>9.2f} {spread:>12} {lc['rss_mb'] / py['rss_mb']:>9.2f} "
              f"{lc['first_label_s'] / py['first_label_s']:>15.2f} {per_frame / lc['stages']['infer']:>26.2f} {tr['fps'] / py['fps']:>14.2f}")
PY
