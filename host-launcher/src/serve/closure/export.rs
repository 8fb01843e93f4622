//! A derivation's `.drv` closure (the `.drv` files and their input sources, as the client
//! uploaded them) from the content store, as a `file://` binary cache that
//! `nix copy --no-check-sigs --from file://DIR --to local?root=…` reads: for each path its
//! narinfo (`StorePath`, `URL`, `Compression: none`, `NarHash`, `NarSize`, `References` and
//! its content address, `CA`) and its NAR. Nix's `nix-store --import` would drop the content
//! addresses, and then a builder sent a source by this Nix could no longer tell (or prove in
//! its statement) that the source is content-addressed.
//!
//! Nix registers each path after hashing its NAR, and (for `.drv` files) checks the
//! derivation's output paths as `checkDerivationOutputs` does: a forged input-addressed `.drv`
//! is refused by the private store too.
//!
//! What is not here: running `nix copy` (`super::nix`).

use std::collections::BTreeSet;
use std::io;
use std::path::Path;

use nix_formats::StorePath;

use crate::core::path_info::ValidPathInfo;
use crate::store::{StoreError, StoreView};

/// Why the closure could not be exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The content store.
    #[error("reading the content store")]
    Store(#[source] StoreError),
    /// A path of the closure is gone.
    #[error("{0} is no longer in the content store")]
    Missing(StorePath),
    /// Writing the cache.
    #[error("writing {0}")]
    Write(std::path::PathBuf, #[source] io::Error),
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

/// The narinfo of `p`, its NAR at `nar/<hash part>.nar`.
fn narinfo(p: &ValidPathInfo) -> String {
    let refs: Vec<&str> = p.info.references.iter().map(|r| r.base_name()).collect();
    let mut t = format!(
        "StorePath: {}\nURL: nar/{}.nar\nCompression: none\nNarHash: {}\nNarSize: {}\nReferences: {}\n",
        p.path,
        p.path.hash_part(),
        p.info.nar_hash,
        p.info.nar_size,
        refs.join(" ")
    );
    if let Some(ca) = &p.info.ca {
        t.push_str(&format!("CA: {ca}\n"));
    }
    t
}

/// Write `paths` from `view` into the binary cache directory `dir` (what is there already is
/// kept: a path's files never change).
pub fn write_cache(
    view: StoreView<'_>,
    paths: &[ValidPathInfo],
    dir: &Path,
) -> Result<(), ExportError> {
    let werr = |p: &Path| {
        let p = p.to_owned();
        move |e| ExportError::Write(p, e)
    };
    let nar_dir = dir.join("nar");
    std::fs::create_dir_all(&nar_dir).map_err(werr(&nar_dir))?;
    let info = dir.join("nix-cache-info");
    std::fs::write(&info, "StoreDir: /nix/store\n").map_err(werr(&info))?;
    for p in paths {
        let ni = dir.join(format!("{}.narinfo", p.path.hash_part()));
        if ni.exists() {
            continue;
        }
        let (_, mut nar) = view
            .open_nar(&p.path)
            .map_err(ExportError::Store)?
            .ok_or_else(|| ExportError::Missing(p.path.clone()))?;
        let file = nar_dir.join(format!("{}.nar", p.path.hash_part()));
        let mut out = std::fs::File::create(&file).map_err(werr(&file))?;
        io::copy(&mut nar, &mut out).map_err(werr(&file))?;
        out.sync_all().map_err(werr(&file))?;
        build_trace::store::write_atomic(&ni, narinfo(p).as_bytes()).map_err(werr(&ni))?;
    }
    Ok(())
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_narinfo_keeps_the_content_address_and_names_references_by_base_name() {
        let src = StorePath::parse("/nix/store/6i90bck613i3fcw2fwzgv6w1j9fpm80a-busybox").unwrap();
        let drv = StorePath::parse("/nix/store/rl1694k7d7d1yp59yl3y2rbf654716n7-x-a.drv").unwrap();
        let p = ValidPathInfo {
            path: drv.clone(),
            info: build_trace::PathInfo {
                nar_hash: build_trace::job::NarHash([0; 32]),
                nar_size: 352,
                references: [src].into(),
                ca: Some("text:sha256:abc".into()),
            },
            deriver: None,
            registration_time: 0,
            ultimate: false,
            sigs: Default::default(),
        };
        let t = narinfo(&p);
        assert!(t.starts_with(&format!("StorePath: {drv}\nURL: nar/{}.nar\n", drv.hash_part())));
        assert!(t.contains("\nNarSize: 352\n") && t.contains("\nCompression: none\n"), "{t}");
        assert!(t.contains("\nReferences: 6i90bck613i3fcw2fwzgv6w1j9fpm80a-busybox\n"), "{t}");
        assert!(t.ends_with("\nCA: text:sha256:abc\n"), "{t}");
        let parsed = nix_formats::narinfo::NarInfo::parse(&t);
        assert!(parsed.is_ok(), "Nix's narinfo format: {t}");
    }
}
