//! Store paths, hashes, nix32 and signatures (body: `nix_formats::fuzzing::store_path`).
#![no_main]

use nix_formats::fuzzing::{store_path, TEXT_BOUND};

libfuzzer_sys::fuzz_target!(|data: &[u8]| vouch_fuzz::run(
    "store_path",
    data,
    TEXT_BOUND,
    store_path
));
