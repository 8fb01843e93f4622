//! ATerm `.drv` parsing (body: `nix_formats::fuzzing::aterm`).
#![no_main]

use nix_formats::fuzzing::{aterm, TEXT_BOUND};

libfuzzer_sys::fuzz_target!(|data: &[u8]| vouch_fuzz::run("aterm", data, TEXT_BOUND, aterm));
