//! A derivation's `.drv` closure (the `.drv` files and their input sources, as the client
//! uploaded them) from the content store, in the format `nix-store --import` reads (Nix's
//! `exportPath`): for each path, references first, `1`, its NAR, the magic `0x4558494e`, the
//! path, its references, its deriver (empty), `0`; then `0`. Numbers are 64-bit little-endian,
//! strings a length and their bytes padded to 8.
//!
//! Nix registers each path with the NAR's hash as it computes it, and (for `.drv` files)
//! checks the derivation's output paths as `checkDerivationOutputs` does: a forged
//! input-addressed `.drv` is refused by the private store too.
//!
//! What is not here: running `nix-store --import` (`super::nix`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};

use nix_formats::StorePath;

use crate::core::path_info::ValidPathInfo;
use crate::store::{StoreError, StoreView};

/// The export format's magic after each NAR.
const EXPORT_MAGIC: u64 = 0x4558_494e;

/// Why the closure could not be exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The content store.
    #[error("reading the content store")]
    Store(#[source] StoreError),
    /// A path of the closure is gone.
    #[error("{0} is no longer in the content store")]
    Missing(StorePath),
    /// Writing the stream.
    #[error("writing to nix-store --import")]
    Write(#[source] io::Error),
}

/// The closure of `roots` in `view`, references before the paths that refer to them.
pub fn closure_in_order(
    view: StoreView<'_>,
    roots: &BTreeSet<StorePath>,
) -> Result<Vec<ValidPathInfo>, ExportError> {
    let all = view.closure(roots).map_err(ExportError::Store)?;
    let mut order = Vec::with_capacity(all.len());
    let mut done = BTreeSet::new();
    for root in all.keys() {
        let mut stack = vec![(root.clone(), false)];
        while let Some((p, refs_done)) = stack.pop() {
            if refs_done {
                if done.insert(p.clone()) {
                    order.push(all[&p].clone());
                }
                continue;
            }
            if done.contains(&p) {
                continue;
            }
            stack.push((p.clone(), true));
            let refs = &all[&p].info.references;
            stack.extend(
                refs.iter().filter(|r| **r != p && !done.contains(*r)).map(|r| (r.clone(), false)),
            );
        }
    }
    Ok(order)
}

fn num(w: &mut dyn Write, n: u64) -> io::Result<()> {
    w.write_all(&n.to_le_bytes())
}

fn string(w: &mut dyn Write, s: &[u8]) -> io::Result<()> {
    num(w, s.len() as u64)?;
    w.write_all(s)?;
    let pad = (8 - s.len() % 8) % 8;
    w.write_all(&[0u8; 8][..pad])
}

/// Write `paths` (in order) from `view` as `nix-store --export` would.
pub fn write_export(
    view: StoreView<'_>,
    paths: &[ValidPathInfo],
    w: &mut dyn Write,
) -> Result<(), ExportError> {
    let werr = ExportError::Write;
    for p in paths {
        let (_, mut nar) = view
            .open_nar(&p.path)
            .map_err(ExportError::Store)?
            .ok_or_else(|| ExportError::Missing(p.path.clone()))?;
        num(w, 1).map_err(werr)?;
        io::copy(&mut nar, w).map_err(werr)?;
        num(w, EXPORT_MAGIC).map_err(werr)?;
        string(w, p.path.to_string().as_bytes()).map_err(werr)?;
        let refs: BTreeMap<String, ()> =
            p.info.references.iter().map(|r| (r.to_string(), ())).collect();
        num(w, refs.len() as u64).map_err(werr)?;
        for r in refs.keys() {
            string(w, r.as_bytes()).map_err(werr)?;
        }
        string(w, b"").map_err(werr)?;
        num(w, 0).map_err(werr)?;
    }
    num(w, 0).map_err(werr)?;
    w.flush().map_err(werr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_padded_to_eight_bytes() {
        let mut v = Vec::new();
        string(&mut v, b"abc").unwrap();
        assert_eq!(v.len(), 16);
        assert_eq!(&v[..8], &3u64.to_le_bytes());
        assert_eq!(&v[8..11], b"abc");
        assert_eq!(&v[11..], &[0; 5]);
        let mut v = Vec::new();
        string(&mut v, b"12345678").unwrap();
        assert_eq!(v.len(), 16);
    }
}
