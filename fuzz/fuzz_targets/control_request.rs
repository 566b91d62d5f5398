//! libFuzzer entry point of `flexnbd::fuzzing::control_request`.
//!
//! The harness, its input layout and the invariants it asserts are documented in
//! `src/fuzzing.rs`; `tests/fuzz_smoke.rs` runs it on fixed inputs in every test run.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| flexnbd::fuzzing::control_request(data));
