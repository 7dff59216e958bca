#!/usr/bin/env bash
# The GStreamer sources (csi://, rtsp://, gst://), which the default build
# leaves out: installs GStreamer's development files and the base/good
# plugins from Debian, then lints and tests the `gstreamer` feature,
# including an RTSP camera served by gst-rtsp-server on loopback
# (tests/gstreamer.rs, feature `rtsp-test-server`).
#
#   bash tests/run-gstreamer.sh
#
# Needs root or sudo for apt-get the first time; mosquitto must be installed
# (tests/run.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
packages=(libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev libgstrtspserver-1.0-dev
          gstreamer1.0-plugins-base gstreamer1.0-plugins-good libclang-dev mosquitto)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

cargo clippy --all-targets --locked --features rtsp-test-server -- -D warnings
cargo test --locked --features rtsp-test-server --lib source::
cargo test --locked --features rtsp-test-server --test gstreamer
