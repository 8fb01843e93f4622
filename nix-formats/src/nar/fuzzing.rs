//! The invariant the `nar_unpack` fuzz target checks, as a plain function so that ordinary tests
//! run it over a seed corpus too.
//!
//! For any input bytes: the parser and the unpacker agree on accepting it; an accepted NAR
//! unpacks to a tree whose `nix-store --dump` is byte-identical to the input; a refused one leaves
//! nothing behind; and nothing is ever created outside the destination. What is not here: the
//! seed corpus (see the tests and the repository's `fuzz/`).

use std::path::Path;

use super::dump::dump_path;
use super::reader::{NarLimits, NarReader};
use super::unpack::{unpack, UnpackError, UnpackOptions};

/// The heap bound of the `nar_unpack` target: the unpacker's fixed 128 KiB copy buffer, and
/// tokens no longer than the input.
pub const BOUND: crate::fuzzing::AllocBound =
    crate::fuzzing::AllocBound { per_byte: 64, base: 256 << 10 };

/// Limits small enough for fuzzing speed.
pub fn fuzz_limits() -> NarLimits {
    NarLimits {
        max_file_size: 1 << 20,
        max_total_size: 4 << 20,
        max_entries: 256,
        max_name_len: 255,
        max_depth: 32,
        max_symlink_target_len: 4095,
    }
}

/// Checks the invariant on `data`, using the empty directory `scratch` (left empty again).
/// Returns whether the NAR was accepted; `Err` describes a violated invariant.
pub fn check_unpack(data: &[u8], scratch: &Path) -> Result<bool, String> {
    let limits = fuzz_limits();
    let parsed = NarReader::new(data, limits.clone()).validate_to_end();
    let dest = scratch.join("out");
    let unpacked = unpack(data, &dest, &UnpackOptions { limits, canonical: false });
    let listing = |p: &Path| -> Vec<std::ffi::OsString> {
        std::fs::read_dir(p)
            .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default()
    };
    let accepted = match (&parsed, &unpacked) {
        (Ok(size), Ok(stats)) => {
            if *size != data.len() as u64 || stats.nar_size != *size {
                return Err(format!(
                    "sizes disagree: input {}, parsed {size}, unpacked {}",
                    data.len(),
                    stats.nar_size
                ));
            }
            let mut again = Vec::new();
            dump_path(&dest, &mut again)
                .map_err(|e| format!("re-dumping the unpacked tree: {e}"))?;
            if again != data {
                return Err("re-dumped tree differs from the accepted NAR".into());
            }
            true
        }
        (Err(_), Err(UnpackError::Nar(_))) => {
            if std::fs::symlink_metadata(&dest).is_ok() {
                return Err("a refused NAR left its destination behind".into());
            }
            false
        }
        (p, u) => return Err(format!("parser and unpacker disagree: {p:?} vs {u:?}")),
    };
    let others: Vec<_> = listing(scratch).into_iter().filter(|n| n != "out").collect();
    if !others.is_empty() {
        return Err(format!("unpacking created {others:?} outside its destination"));
    }
    if accepted {
        remove_all(&dest);
    }
    Ok(accepted)
}

fn remove_all(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(md) if md.is_dir() => {
            let _ = std::fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}
