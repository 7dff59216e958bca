#!/usr/bin/env bash
# Checks systemd/labelcast.service the way CI does: `systemd-analyze verify`
# (syntax, directives, the ExecStart binary) and the offline security
# exposure score, which must stay at or below 2.5.
#
#   bash systemd/check-unit.sh [path/to/labelcast]   (default: target/release/labelcast, else target/debug)
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
binary=${1:-}
if [ -z "$binary" ]; then
  for candidate in "$target/release/labelcast" "$target/debug/labelcast"; do
    if [ -x "$candidate" ]; then binary=$candidate; break; fi
  done
fi
[ -x "$binary" ] || { echo "check-unit: no labelcast binary; build first (cargo build)" >&2; exit 1; }
binary=$(realpath "$binary")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# verify wants the binary the unit names to exist: point it at the built one.
sed "s#/usr/bin/labelcast#$binary#g" systemd/labelcast.service > "$work/labelcast.service"
systemd-analyze verify "$work/labelcast.service"
report=$(systemd-analyze security --offline=yes --no-pager "$work/labelcast.service" 2>&1)
score=$(printf '%s\n' "$report" | sed -n 's/.*Overall exposure level for labelcast.service: \([0-9.]*\).*/\1/p')
[ -n "$score" ] || { printf '%s\n' "$report"; echo "check-unit: no exposure score found" >&2; exit 1; }
echo "systemd-analyze verify: OK; exposure score: $score (limit 2.5)"
awk -v s="$score" 'BEGIN { exit !(s <= 2.5) }' || {
  printf '%s\n' "$report" | grep '✗' || true
  echo "check-unit: exposure score $score is above 2.5" >&2
  exit 1
}
