//! build-trace's `cert_table` decoder (body: `build_trace::fuzzing::cert_table`).
#![no_main]

use build_trace::fuzzing::{cert_table, BOUND};

libfuzzer_sys::fuzz_target!(|data: &[u8]| vouch_fuzz::run("cert_table", data, BOUND, cert_table));
