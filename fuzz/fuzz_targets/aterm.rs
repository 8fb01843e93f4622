//! Fuzz target: ATerm `.drv` parsing (body: `nix_formats::fuzzing::aterm`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nix_formats::fuzzing::aterm(data));
