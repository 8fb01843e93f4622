//! One Nix protocol record, decoded and re-encoded (body: `host_launcher::nixproto::fuzzing::records`).
#![no_main]

use host_launcher::nixproto::fuzzing::{records, BOUND};

libfuzzer_sys::fuzz_target!(|data: &[u8]| vouch_fuzz::run(
    "nixproto_records",
    data,
    BOUND,
    records
));
