//! build-trace's `trust_policy` parsers (body: `build_trace::fuzzing::tlog::trust_policy`).
#![no_main]

use build_trace::fuzzing::tlog::trust_policy;
use build_trace::fuzzing::TOML_BOUND;

libfuzzer_sys::fuzz_target!(|data: &[u8]| vouch_fuzz::run(
    "trust_policy",
    data,
    TOML_BOUND,
    trust_policy
));
