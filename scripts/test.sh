#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and property tests, and the end-to-end
# tests that drive the real binary with real NBD clients on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
