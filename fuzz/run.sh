#!/usr/bin/env bash
# Builds the fuzz targets with cargo-fuzz (libFuzzer, AddressSanitizer) and
# runs each for a bounded time from its committed corpus (fuzz/corpus/<target>).
#
#   bash fuzz/run.sh                         # every target, 60 s each
#   FUZZ_SECONDS=600 bash fuzz/run.sh model_file
#
# A crash, a panic outside the code paths that catch them, a hang (-timeout)
# or runaway memory (-rss_limit_mb) fails the run; the input that did it is
# left in fuzz/artifacts/<target>/ and printed as hex. New inputs that reach
# new code are added to the corpus folder (commit them after `cargo fuzz cmin`).
set -euo pipefail
cd "$(dirname "$0")"
seconds=${FUZZ_SECONDS:-60}
targets=("$@")
((${#targets[@]})) || targets=(config model_file frame_decode mqtt_payload)
started=$SECONDS

# cargo-fuzz from crates.io, pinned.
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz --version 0.13.1
fi
# The sanitizer flags cargo-fuzz passes are unstable options: use a nightly
# toolchain when rustup has one, else let the stable compiler accept them.
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=(+nightly)
else
  toolchain=()
  export RUSTC_BOOTSTRAP=1
fi
# Apart from the main build: the instrumented dependencies never mix with it.
target_dir="${CARGO_TARGET_DIR:-$PWD/../target}/fuzz"

cargo "${toolchain[@]}" fuzz build --target-dir "$target_dir"
printf '=== fuzz targets built (%ds)\n' $((SECONDS - started))
for target in "${targets[@]}"; do
  printf '\n=== fuzz %s for %ss (%ds so far)\n' "$target" "$seconds" $((SECONDS - started))
  if ! cargo "${toolchain[@]}" fuzz run --target-dir "$target_dir" "$target" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 2>"$target_dir/$target.log"; then
    tail -n 60 "$target_dir/$target.log"
    for artifact in artifacts/"$target"/*; do
      [ -f "$artifact" ] && { echo "failing input $artifact:"; od -A x -t x1z "$artifact" | head -n 40; }
    done
    echo "fuzz: $target FAILED" >&2
    exit 1
  fi
  grep -E '^(#[0-9]+ *DONE|stat::number_of_executed_units|stat::new_units_added)' "$target_dir/$target.log" || true
done
echo "fuzz: every target ran ${seconds}s without a failure ($((SECONDS - started))s)"
