//! build-trace's `job` decoder (body: `build_trace::fuzzing::job`).
#![no_main]

use build_trace::fuzzing::{job, BOUND};

libfuzzer_sys::fuzz_target!(|data: &[u8]| vouch_fuzz::run("job", data, BOUND, job));
