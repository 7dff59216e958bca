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

. tests/as-root.sh
packages=(libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev libgstrtspserver-1.0-dev
          gstreamer1.0-plugins-base gstreamer1.0-plugins-good libclang-dev mosquitto)
apt_install_missing "${packages[@]}"

cargo clippy --all-targets --locked --features rtsp-test-server -- -D warnings
cargo test --locked --features rtsp-test-server --lib source::
cargo test --locked --features rtsp-test-server --test gstreamer
