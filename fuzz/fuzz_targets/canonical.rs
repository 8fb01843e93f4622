//! build-trace's `canonical` decoder (body: `build_trace::fuzzing::canonical`).
#![no_main]

use build_trace::fuzzing::{canonical, BOUND};

libfuzzer_sys::fuzz_target!(|data: &[u8]| vouch_fuzz::run("canonical", data, BOUND, canonical));
