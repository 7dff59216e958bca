#!/usr/bin/env bash
# Installs, from Debian 12's own packages, what building and testing the
# aarch64 binary on an x86-64 machine needs (CI has no container engine, so
# `cross` itself cannot run there):
#   rustc-web + cargo-web  Rust 1.96 from bookworm-security, as /usr/bin/rustc
#                          and /usr/bin/cargo (bookworm main has 1.85 only;
#                          tract 0.23 needs >= 1.91)
#   libstd-rust-web-dev:arm64  the aarch64 standard library for that compiler
#   gcc-aarch64-linux-gnu, libc6-dev-arm64-cross  the linker and C runtime
#   linux-libc-dev-arm64-cross, libclang-dev  headers and libclang for bindgen
#   make                   builds jemalloc (the allocator) for aarch64
#   qemu-user              runs the aarch64 test binaries (qemu-aarch64 -L /)
#   libc6:arm64            the aarch64 glibc that `-L /` finds
# Then cargo-zigbuild and zig (PyPI's ziglang), which link against glibc
# 2.31 so the binary starts on JetPack 5.
#
#   sudo bash cross/setup-debian.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. tests/as-root.sh

if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  as_root dpkg --add-architecture arm64
fi
packages=(rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross
          linux-libc-dev-arm64-cross libclang-dev qemu-user libc6:arm64 libgcc-s1:arm64 python3-venv
          mosquitto mosquitto-clients binutils-aarch64-linux-gnu make)
apt_install_missing "${packages[@]}"
/usr/bin/rustc --version

# zig for cargo-zigbuild, from PyPI, in the repo's tooling venv.
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check 'ziglang==0.14.1'
if ! command -v cargo-zigbuild >/dev/null 2>&1; then
  cargo install --locked cargo-zigbuild@0.20.1
fi
echo "aarch64 toolchain ready"
