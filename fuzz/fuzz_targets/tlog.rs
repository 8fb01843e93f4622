//! build-trace's `tlog` parsers (body: `build_trace::fuzzing::tlog::tlog`).
#![no_main]

use build_trace::fuzzing::tlog::tlog;
use build_trace::fuzzing::BOUND;

libfuzzer_sys::fuzz_target!(|data: &[u8]| vouch_fuzz::run("tlog", data, BOUND, tlog));
