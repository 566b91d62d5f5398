#!/usr/bin/env bash
# The long fuzz run: every target of fuzz/ for SECONDS_PER_TARGET seconds (default 60), then
# each target's execution count and the total. Exits non-zero if a target crashed; the
# crashing input is then under fuzz/artifacts/<target>/ (see fuzz/README.md).
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET]
#
# Environment:
#   FUZZ_JOBS       targets run at once, one core each (default 1)
#   FUZZ_TARGETS    the targets to run, space-separated (default: all)
#   FUZZ_SANITIZER  cargo fuzz --sanitizer: none (default; the code under test is safe Rust,
#                   and this runs several times faster), address, memory, thread, leak
#
# Targets are built with debug assertions and overflow checks (cargo fuzz -a), so an
# arithmetic overflow is a crash too. The corpus starts from the smoke test's valid messages
# (tests/fuzz_smoke.rs) and grows in fuzz/corpus/<target>/ from run to run.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

seconds=${1:-60}
parallel=${FUZZ_JOBS:-1}
sanitizer=${FUZZ_SANITIZER:-none}
read -r -a targets <<<"${FUZZ_TARGETS:-request_framer newstyle_server client_handshake structured_replies control_request handoff_messages}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
# cargo-fuzz passes nightly-only flags; this lets a stable toolchain take them.
export RUSTC_BOOTSTRAP=1

echo "Seeding fuzz/corpus from tests/fuzz_smoke.rs"
FLEXNBD_FUZZ_SEEDS="$root/fuzz/corpus" cargo test --quiet --test fuzz_smoke >/dev/null

cd "$root/fuzz"
# The fuzz workspace builds in its own fuzz/target, whatever the main workspace uses.
unset CARGO_TARGET_DIR
flags=(--sanitizer "$sanitizer" --debug-assertions)
echo "Building the fuzz targets (${flags[*]})"
cargo fuzz build "${flags[@]}"

logs="$root/fuzz/target/fuzz-logs"
mkdir -p "$logs"
run_target() {
    local t=$1
    local rc=0
    cargo fuzz run "${flags[@]}" "$t" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
        >"$logs/$t.log" 2>&1 || rc=$?
    echo "$rc" >"$logs/$t.rc"
}

echo "Running ${#targets[@]} targets for ${seconds}s each, $parallel at a time (logs in fuzz/target/fuzz-logs/)"
for t in "${targets[@]}"; do
    while (($(jobs -rp | wc -l) >= parallel)); do
        wait -n || true
    done
    echo "  $t"
    run_target "$t" &
done
wait

total=0
failed=0
printf '%-20s %15s  %s\n' target executions result
for t in "${targets[@]}"; do
    # No stats line (the build failed, say): 0 executions.
    execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$logs/$t.log" | tail -n 1 | awk '{print $2}' || true)
    execs=${execs:-0}
    total=$((total + execs))
    rc=$(cat "$logs/$t.rc")
    if [ "$rc" = 0 ]; then
        result=ok
    else
        failed=1
        artifact=$(grep -o 'Test unit written to [^ ]*' "$logs/$t.log" | tail -n 1 | cut -d' ' -f5 || true)
        result="FAILED (exit $rc) ${artifact:-see fuzz/target/fuzz-logs/$t.log}"
    fi
    printf '%-20s %15s  %s\n' "$t" "$execs" "$result"
done
printf '%-20s %15s\n' total "$total"
exit "$failed"
