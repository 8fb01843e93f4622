//! laut's signature index: `traces/<hash part of the step's drv path>` holding
//! `{"signatures":["<compact JWS>", …]}` — every JWS of every entry of that step, the object
//! laut's verifier fetches for a resolved derivation (`laut verify --cache file://DIR`, or over
//! HTTP from `vouch serve`). The name is the JWS's own `in.rdrv_aterm_ca`.
//!
//! The index is derived data: it is rebuilt from the step directory after every write, never
//! edited in place. Without a lock: a writer lists the step's JWS, writes the index atomically,
//! then lists again and writes again if the listing changed meanwhile. The last index written
//! therefore lists every JWS whose entry was in place before that writer's final listing — and
//! an entry landing after it is listed by its own writer afterwards, which then writes the index
//! unless it already lists that entry.
//!
//! What is not here: judging the signatures (readers verify them; an entry's JWS is already
//! checked against its statement by the verifier).

use std::fs;
use std::path::Path;

use super::reader::read_dir_sorted;
use super::{io_err, write_atomic, StoreError};

/// The index's directory under the store root.
pub const DIR: &str = "traces";

/// Every JWS of every entry in `step_dir`, in entry then file order, without repeats. An entry
/// or file that cannot be read (damaged, not ours) is left out with a warning, so it cannot keep
/// the step's other signatures from being published; readers judge what is listed anyway.
fn signatures(step_dir: &Path) -> Result<Vec<String>, StoreError> {
    let mut out: Vec<String> = Vec::new();
    for entry in read_dir_sorted(step_dir)? {
        let jws_dir = step_dir.join(entry).join("jws");
        let names = match read_dir_sorted(&jws_dir) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("laut index: skipping {}: {e}", jws_dir.display());
                continue;
            }
        };
        for name in names {
            let p = jws_dir.join(name);
            match fs::read_to_string(&p) {
                Ok(text) => {
                    let jws = text.trim().to_string();
                    if !out.contains(&jws) {
                        out.push(jws);
                    }
                }
                Err(e) => tracing::warn!("laut index: skipping {}: {e}", p.display()),
            }
        }
    }
    Ok(out)
}

/// Rewrite `traces/<hash_part>` from the entries in `step_dir` until it is current.
pub(super) fn refresh(root: &Path, step_dir: &Path, hash_part: &str) -> Result<(), StoreError> {
    let dir = root.join(DIR);
    fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
    let path = dir.join(hash_part);
    let mut listed = signatures(step_dir)?;
    loop {
        let body = serde_json::json!({ "signatures": listed }).to_string();
        if fs::read(&path).ok().as_deref() != Some(body.as_bytes()) {
            write_atomic(&path, body.as_bytes()).map_err(io_err("write", &path))?;
        }
        let now = signatures(step_dir)?;
        if now == listed {
            return Ok(());
        }
        listed = now;
    }
}

/// Rebuild the index of every step in the store (`vouch trace reindex`: stores written before
/// the index existed, or a write that failed after its step directory landed); how many steps.
pub(super) fn rebuild_all(root: &Path, steps: &Path) -> Result<usize, StoreError> {
    let mut n = 0;
    for base in read_dir_sorted(steps)? {
        // Only step directories named after a drv path (`<32 nix32 chars>-<name>.drv`).
        let drv = format!("{}/{base}", nix_formats::STORE_DIR);
        match nix_formats::StorePath::parse(&drv) {
            Ok(p) if p.is_derivation() => {
                refresh(root, &steps.join(&base), p.hash_part())?;
                n += 1;
            }
            _ => tracing::warn!("laut index: skipping {}: not a step", steps.join(&base).display()),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_or_damaged_index_is_rewritten_from_the_entries() {
        let dir = tempfile::tempdir().unwrap();
        let step = dir.path().join("step");
        for (entry, sig) in [("a", "h.p.s1"), ("b", "h.p.s2")] {
            fs::create_dir_all(step.join(entry).join("jws")).unwrap();
            fs::write(step.join(entry).join("jws").join("k.jws"), format!("{sig}\n")).unwrap();
        }
        // The same JWS under two entries is listed once; what cannot be read is left out.
        fs::write(step.join("b").join("jws").join("j.jws"), "h.p.s1").unwrap();
        fs::write(step.join("b").join("jws").join("x.jws"), [0xff, 0xfe]).unwrap();
        fs::write(step.join("stray-file"), "not an entry").unwrap();
        let index = dir.path().join(DIR).join("hash");
        let want = r#"{"signatures":["h.p.s1","h.p.s2"]}"#;
        for stale in ["", r#"{"signatures":["h.p.s1"]}"#, "not json"] {
            fs::create_dir_all(index.parent().unwrap()).unwrap();
            fs::write(&index, stale).unwrap();
            refresh(dir.path(), &step, "hash").unwrap();
            assert_eq!(fs::read_to_string(&index).unwrap(), want);
        }
    }
}
