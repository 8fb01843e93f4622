//! What a remote trace store answers (body: `build_trace::fuzzing::source::trace_source`).
#![no_main]

use build_trace::fuzzing::source::trace_source;
use build_trace::fuzzing::BOUND;

libfuzzer_sys::fuzz_target!(|data: &[u8]| vouch_fuzz::run(
    "trace_source",
    data,
    BOUND,
    trace_source
));
