#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and property tests, and the end-to-end
# tests that drive the real binary with real NBD clients on loopback.
#
# Every step runs even when an earlier one failed (and every test binary, with
# --no-fail-fast), so one run shows every failure; the last line sums up the `test result:`
# lines of all test binaries, and the exit status is non-zero if anything failed.
set -uo pipefail
cd "$(dirname "$0")/.."

start=$SECONDS
failed_steps=()
log=$(mktemp)
trap 'rm -f "$log"' EXIT

bash scripts/install-deps.sh || failed_steps+=("install-deps")
cargo fmt --all -- --check || failed_steps+=("fmt")
cargo clippy --all-targets -- -D warnings || failed_steps+=("clippy")
# Only stdout goes through tee (the test binaries' results); cargo's own progress stays on
# stderr, and both are shown as they come.
cargo test --all-targets --no-fail-fast | tee "$log"
status=${PIPESTATUS[0]}
[ "$status" = 0 ] || failed_steps+=("cargo test (exit $status)")

# test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.5s
read -r passed failed ignored binaries < <(awk '
    /^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i + 1) ~ /^passed/) p += $i
            if ($(i + 1) ~ /^failed/) f += $i
            if ($(i + 1) ~ /^ignored/) g += $i
        }
        n++
    }
    END { printf "%d %d %d %d\n", p, f, g, n }' "$log")
elapsed=$((SECONDS - start))
summary="TOTAL: $passed passed, $failed failed, $ignored ignored ($binaries test binaries) in $((elapsed / 60))m$(printf %02d $((elapsed % 60)))s"
if [ ${#failed_steps[@]} -gt 0 ]; then
    echo "$summary; FAILED: ${failed_steps[*]}"
    exit 1
fi
echo "$summary"
