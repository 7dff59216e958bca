#!/usr/bin/env bash
# Builds the amd64 .deb from the already-built binary, installs it with
# dpkg -i, and checks what a user gets: the binary, the unit, the user in
# the video group, the example config as a conffile that passes
# `labelcast check-config` from the installed paths. Purges it afterwards.
#
#   bash tests/deb-install.sh            (needs root or sudo, and cargo-deb)
#
# CI packs the dev-profile binary the tests already built (cargo-deb warns
# about it) so tract is not compiled a second time; releases use
# `cargo deb --profile edge` (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
. tests/as-root.sh
profile=${LABELCAST_DEB_PROFILE:-dev}
command -v cargo-deb >/dev/null 2>&1 || cargo install --locked cargo-deb@3.7.0
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cargo deb --profile "$profile" --no-build --deb-revision="" -o "$out/" 2>&1 | grep -v "dev profile is not supported\|To enable debug symbols" || true
deb=$(ls "$out"/labelcast_*_amd64.deb)
echo "built $(basename "$deb") ($(du -h "$deb" | cut -f1))"
as_root dpkg -i "$deb"
fail() { echo "deb-install: $*" >&2; exit 1; }
[ -x /usr/bin/labelcast ] || fail "/usr/bin/labelcast missing"
[ -f /lib/systemd/system/labelcast.service ] || [ -f /usr/lib/systemd/system/labelcast.service ] || fail "unit missing"
dpkg-query -W -f='${Conffiles}\n' labelcast | grep -q /etc/labelcast/config.toml || fail "config is not a conffile"
id -nG labelcast | grep -qw video || fail "user labelcast is not in the video group"
# From the installed paths only: the data dir is found next to the binary.
(cd / && env -u LABELCAST_DATA_DIR /usr/bin/labelcast check-config /etc/labelcast/config.toml)
(cd / && env -u LABELCAST_DATA_DIR /usr/bin/labelcast --log-level warn classify /usr/share/labelcast/calibration/images/chelsea.jpg) | grep -q "cat " \
  || fail "the installed binary does not see the cat in the installed photo"
as_root dpkg --purge labelcast
[ ! -e /usr/bin/labelcast ] || fail "purge left /usr/bin/labelcast"
echo "deb-install: OK"
