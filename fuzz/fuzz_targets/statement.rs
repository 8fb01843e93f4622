//! build-trace's `statement` decoder (body: `build_trace::fuzzing::statement`).
#![no_main]

use build_trace::fuzzing::{statement, BOUND};

libfuzzer_sys::fuzz_target!(|data: &[u8]| vouch_fuzz::run("statement", data, BOUND, statement));
