//! `.narinfo` text (body: `nix_formats::fuzzing::narinfo`).
#![no_main]

use nix_formats::fuzzing::{narinfo, TEXT_BOUND};

libfuzzer_sys::fuzz_target!(|data: &[u8]| vouch_fuzz::run("narinfo", data, TEXT_BOUND, narinfo));
