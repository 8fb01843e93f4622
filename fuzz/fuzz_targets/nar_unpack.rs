//! Fuzzes NAR parsing and unpacking: see `nix_formats::nar::fuzzing::check_unpack` for the
//! invariant (parser and unpacker agree; accepted NARs re-dump byte-identically; refused ones
//! leave nothing; nothing is written outside the destination).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use nix_formats::nar::fuzzing::BOUND;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| std::env::temp_dir().join(format!("nar-unpack-fuzz-{}", std::process::id())))
}

fn body(data: &[u8]) {
    let dir = scratch();
    // Recreated every time, so that nothing outside can break the run by removing it.
    std::fs::create_dir_all(dir).expect("scratch directory");
    if let Err(violation) = nix_formats::nar::fuzzing::check_unpack(data, dir) {
        panic!("{violation}");
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| vouch_fuzz::run("nar_unpack", data, BOUND, body));
