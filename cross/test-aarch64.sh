#!/usr/bin/env bash
# Builds labelcast for aarch64, linked by cargo-zigbuild against glibc 2.31
# so it starts on JetPack 5, and proves it on this x86-64 machine under
# qemu-user:
#   1. the highest GLIBC_x.y symbol it needs (fails above 2.31) and its
#      stripped size;
#   2. it starts against Debian bullseye's arm64 glibc 2.31 (JetPack 5's) and
#      loads the demo model;
#   3. the library's unit tests (config, labels, QDQ repair, preprocessing,
#      payloads...) under qemu;
#   4. its scores on shipped photos equal the x86-64 build's within 1e-4;
#   5. end to end: the aarch64 daemon under qemu publishes to a native
#      mosquitto on loopback and label/cat turns ON;
#   6. the arm64 .deb: built, installed with dpkg -i (multiarch), the
#      installed binary checks the installed config under qemu, purged.
# CI builds the `release` profile: the shipped `edge` profile (fat LTO) takes
# another ~15 minutes of linking on two cores; LABELCAST_AARCH64_PROFILE=edge
# builds that instead. qemu runs an inference in about 6 s, so the photo
# comparison uses three photos and the conformance suite stays on x86-64.
# Run cross/setup-debian.sh first. Prints how long each step took.
set -euo pipefail
cd "$(dirname "$0")/.."
. tests/as-root.sh
repo=$(pwd)
started=$SECONDS
step() { printf '\n=== aarch64: %s (%ds so far)\n' "$1" $((SECONDS - started)); }

# Where the x86-64 build the scores are compared with lives: the caller's
# target directory (read before it is pointed at the aarch64 one below).
host_target=${LABELCAST_HOST_TARGET_DIR:-${CARGO_TARGET_DIR:-$repo/target}}
export PATH="$repo/.venv/bin:$PATH" RUSTC=/usr/bin/rustc
export CARGO_TARGET_DIR=${LABELCAST_AARCH64_TARGET_DIR:-$repo/target/aarch64}
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /"
# The v4l crate runs bindgen on <linux/videodev2.h>. cargo-zigbuild points
# clang at zig's glibc 2.31 headers, which have no V4L2 header; Debian's
# arm64 kernel headers (linux-libc-dev-arm64-cross) fill in after them.
export BINDGEN_EXTRA_CLANG_ARGS="-idirafter /usr/aarch64-linux-gnu/include"
triple=aarch64-unknown-linux-gnu
zig_target=$triple.2.31
profile=${LABELCAST_AARCH64_PROFILE:-release}
bin=$CARGO_TARGET_DIR/$triple/$profile/labelcast

step "build (profile $profile, glibc 2.31 via cargo-zigbuild)"
cargo zigbuild --locked --profile "$profile" --target "$zig_target" --bin labelcast

step "glibc symbols and size"
glibc=$(aarch64-linux-gnu-objdump -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sort -u -V | tail -1)
aarch64-linux-gnu-strip -o "$bin.stripped" "$bin"
size=$(stat -c %s "$bin.stripped")
echo "aarch64 binary: $bin (profile $profile)"
echo "highest glibc symbol version needed: $glibc (JetPack 5 has 2.31)"
awk -v s="$size" 'BEGIN { printf "stripped size: %d bytes (%.1f MB)\n", s, s / 1e6 }'
newest=$(printf '%s\nGLIBC_2.31\n' "$glibc" | sort -V | tail -1)
[ "$newest" = "GLIBC_2.31" ] || { echo "needs $glibc, newer than JetPack 5's 2.31" >&2; exit 1; }

step "start against glibc 2.31 (Debian bullseye arm64 libc6)"
sysroot=$CARGO_TARGET_DIR/bullseye-arm64
if [ ! -e "$sysroot/lib/aarch64-linux-gnu/libc.so.6" ]; then
  mkdir -p "$sysroot/debs"
  curl -fsS --retry 3 -o "$sysroot/debs/Packages.xz" http://deb.debian.org/debian/dists/bullseye/main/binary-arm64/Packages.xz
  xz -dcf "$sysroot/debs/Packages.xz" > "$sysroot/debs/Packages"
  for package in libc6 libgcc-s1; do
    file=$(awk -v p="$package" '$0 == "Package: " p {f=1} f && /^Filename:/ {print $2; exit}' "$sysroot/debs/Packages")
    curl -fsS --retry 3 -o "$sysroot/debs/$package.deb" "http://deb.debian.org/debian/$file"
    dpkg-deb -x "$sysroot/debs/$package.deb" "$sysroot"
  done
fi
qemu-aarch64 -L "$sysroot" "$sysroot/lib/aarch64-linux-gnu/libc.so.6" | head -1
qemu-aarch64 -L "$sysroot" "$bin" --version
qemu-aarch64 -L "$sysroot" "$bin" --log-level warn model-info models/demo/labelcast-demo-int8.onnx | grep -E '^(input|output|int8|engine)'

step "unit tests under qemu"
cargo-zigbuild test --locked --profile "$profile" --target "$zig_target" --lib

step "same scores as the x86-64 build on the shipped photos"
host_bin=$host_target/debug/labelcast
[ -x "$host_bin" ] || host_bin=$host_target/release/labelcast
[ -x "$host_bin" ] || { echo "no x86-64 labelcast in $host_target (run the tests first)" >&2; exit 1; }
photos=(calibration/images/chelsea.jpg calibration/images/coffee.jpg calibration/images/china.jpg)
# aarch64 runs the INT8 model's 1x1 convolutions with float activations
# (tract's NEON product); x86-64 with AVX-512 VNNI quantises them to 8 bits
# per position (src/engine/pointwise.rs). Compared at 1e-4 with the x86-64
# build's float activations (LABELCAST_TRACT_POINTWISE=int8-weights), and
# its default within 0.03 with the same labels on.
LABELCAST_TRACT_POINTWISE=int8-weights "$host_bin" --log-level warn classify --json "${photos[@]}" > "$CARGO_TARGET_DIR/scores-x86_64.jsonl"
"$host_bin" --log-level warn classify --json "${photos[@]}" > "$CARGO_TARGET_DIR/scores-x86_64-default.jsonl"
qemu-aarch64 -L / "$bin" --log-level warn classify --json "${photos[@]}" > "$CARGO_TARGET_DIR/scores-aarch64.jsonl"
for compared in "scores-x86_64.jsonl 1e-4" "scores-x86_64-default.jsonl 0.03"; do
  set -- $compared
  python3 - "$CARGO_TARGET_DIR/$1" "$CARGO_TARGET_DIR/scores-aarch64.jsonl" "$2" <<'PY'
import json, sys
x86 = [json.loads(l) for l in open(sys.argv[1])]
arm = [json.loads(l) for l in open(sys.argv[2])]
tolerance = float(sys.argv[3])
assert len(x86) == len(arm) == 3, (len(x86), len(arm))
worst = 0.0
for a, b in zip(x86, arm):
    assert a["active"] == b["active"], (a["origin"], a["active"], b["active"])
    for label, v in a["labels"].items():
        worst = max(worst, abs(v["score"] - b["labels"][label]["score"]))
print(f"{sys.argv[1].rsplit('/', 1)[-1]}: 3 photos x 12 labels: same active labels; largest score difference {worst:.6f} (tolerance {tolerance:g})")
print("active:", [b["active"] for b in arm])
assert worst <= tolerance, worst
PY
done

step "end to end: aarch64 daemon under qemu -> native mosquitto"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
work=$(mktemp -d)
mkdir "$work/photos" && cp calibration/images/chelsea.jpg "$work/photos/"
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$port" > "$work/mosquitto.conf"
/usr/sbin/mosquitto -c "$work/mosquitto.conf" >/dev/null 2>&1 &
broker=$!
cleanup() { kill "${daemon:-}" "$broker" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
sleep 1
qemu-aarch64 -L / "$bin" run --device-id arm --mqtt "mqtt://127.0.0.1:$port" --http-listen off \
  --source "file://$work/photos?fps=1&loop=true" > "$work/daemon.log" 2>&1 &
daemon=$!
mosquitto_sub -h 127.0.0.1 -p "$port" -t labelcast/arm/label/cat -W 600 > "$work/cat.txt" 2>/dev/null &
subscriber=$!
for _ in $(seq 1 300); do
  grep -qx ON "$work/cat.txt" && break
  kill -0 "$daemon" 2>/dev/null || break
  sleep 1
done
kill "$subscriber" 2>/dev/null || true
if grep -qx ON "$work/cat.txt"; then
  echo "label/cat ON received from the aarch64 daemon"
else
  cat "$work/daemon.log"; echo "no label/cat ON from the aarch64 daemon within 300 s" >&2; exit 1
fi
kill -TERM "$daemon"; wait "$daemon" || { cat "$work/daemon.log"; echo "the daemon did not exit cleanly" >&2; exit 1; }
grep -q "labelcast stopped" "$work/daemon.log"

step "arm64 .deb: build, dpkg -i, check-config from the installed paths under qemu"
# The glibc231 variant states the dependency the glibc check above proves
# (libc6 >= 2.31) instead of what dpkg-shlibdeps reads off this machine.
command -v cargo-deb >/dev/null 2>&1 || cargo install --locked cargo-deb@3.7.0
debs=$CARGO_TARGET_DIR/debian-arm64
rm -rf "$debs"
cargo deb --target "$triple" --variant glibc231 --profile "$profile" --no-build --deb-revision="" -o "$debs/" >/dev/null
deb=$(ls "$debs"/labelcast_*_arm64.deb)
dpkg-deb -f "$deb" Package Architecture Depends
dpkg-deb -f "$deb" Depends | grep -q 'libc6 (>= 2.31)' || { echo "the arm64 .deb does not depend on libc6 >= 2.31" >&2; exit 1; }
echo "$(basename "$deb"): $(du -h "$deb" | cut -f1)"
as_root dpkg -i "$deb" >/dev/null
aarch64-linux-gnu-readelf -h /usr/bin/labelcast | grep -q AArch64 || { echo "/usr/bin/labelcast from the arm64 .deb is not an aarch64 binary" >&2; exit 1; }
(cd / && env -u LABELCAST_DATA_DIR qemu-aarch64 -L / /usr/bin/labelcast --log-level warn check-config /etc/labelcast/config.toml)
as_root dpkg --purge labelcast >/dev/null
[ ! -e /usr/bin/labelcast ] || { echo "purging the arm64 .deb left /usr/bin/labelcast" >&2; exit 1; }

step "done"
echo "aarch64 stage passed in $((SECONDS - started)) s; binary $glibc, $size bytes"
