//! The cache entries of a step that [`TraceStore::put_step_as`] writes after the step
//! directory: by-output markers, laut's signature index, Nix realisations and narinfos. An
//! existing realisation or narinfo that another build published for the same output is kept,
//! and the difference recorded as a [`Divergence`].

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use nix_formats::narinfo::NarInfo;
use nix_formats::StorePath;

use super::{
    io_err, laut_index, write_atomic, write_new, Divergence, StoreError, TraceStore, VOUCH_DIR,
};
use crate::job::NarHash;
use crate::sign;
use crate::statement::Statement;

impl TraceStore {
    /// The by-output markers (output → step entry) and laut's signature index of the step.
    pub(super) fn put_markers(
        &self,
        st: &Statement,
        step_dir: &Path,
        entry: &str,
    ) -> Result<(), StoreError> {
        let drv_base = st.job.drv_path.base_name();
        for out in st.outputs.values() {
            let hash_part = out.path.hash_part();
            let d = self.root.join(VOUCH_DIR).join("by-output").join(hash_part).join(drv_base);
            fs::create_dir_all(&d).map_err(io_err("create", &d))?;
            let marker = d.join(entry);
            if !marker.exists() {
                write_atomic(&marker, b"").map_err(io_err("write", &marker))?;
            }
        }
        laut_index::refresh(&self.root, step_dir, st.job.drv_path.hash_part())
    }

    /// The Nix realisations of a content-addressed step (both formats). An existing one for
    /// another output path is kept and recorded in `diverged`.
    pub(super) fn put_realisations(
        &self,
        st: &Statement,
        records: &sign::StepRecords,
        diverged: &mut BTreeMap<String, Divergence>,
    ) -> Result<(), StoreError> {
        for (name, rec) in records {
            let out_base = st.outputs[name].path.base_name();
            let mut files = Vec::new();
            if let Some(b) = &rec.build_trace {
                files.push((self.root.join(b.cache_path()), b.value_json()));
            }
            if let Some(l) = &rec.legacy {
                files.push((
                    self.root.join("realisations").join(format!("{}.doi", l.id)),
                    l.to_json(),
                ));
            }
            for (path, body) in files {
                if let Some(dir) = path.parent() {
                    fs::create_dir_all(dir).map_err(io_err("create", dir))?;
                }
                if write_new(&path, body.as_bytes()).map_err(io_err("write", &path))? {
                    continue;
                }
                let existing = fs::read(&path).map_err(io_err("read", &path))?;
                let v: serde_json::Value = serde_json::from_slice(&existing).unwrap_or_default();
                let kept_out = v.get("outPath").and_then(|p| p.as_str());
                if kept_out != Some(out_base) {
                    let d = divergence(diverged, name, st.outputs[name].nar_hash);
                    d.published_path = kept_out.and_then(|b| StorePath::from_base_name(b).ok());
                    d.kept.push(self.relative(&path));
                }
            }
        }
        Ok(())
    }

    /// The narinfos of the step's outputs. An existing one with another NAR hash is kept and
    /// recorded in `diverged`.
    pub(super) fn put_narinfos(
        &self,
        st: &Statement,
        records: &sign::StepRecords,
        nar_files: &BTreeMap<String, (NarHash, u64)>,
        diverged: &mut BTreeMap<String, Divergence>,
    ) -> Result<(), StoreError> {
        for (name, rec) in records {
            let (file_hash, file_size) = nar_files[name];
            let mut info = rec.narinfo.clone();
            info.url = format!("nar/{}.nar", nix_formats::base32::encode(&file_hash.0));
            info.file_hash = Some(nix_formats::Hash::sha256(file_hash.0));
            info.file_size = Some(file_size);
            let path = self.root.join(format!("{}.narinfo", info.store_path.hash_part()));
            if write_new(&path, info.to_text().as_bytes()).map_err(io_err("write", &path))? {
                continue;
            }
            let existing = fs::read_to_string(&path).map_err(io_err("read", &path))?;
            let kept_hash = NarInfo::parse(&existing).ok().map(|e| e.nar_hash);
            if kept_hash.as_ref() != Some(&info.nar_hash) {
                let d = divergence(diverged, name, st.outputs[name].nar_hash);
                d.published_nar_hash = kept_hash.and_then(|h| h.sha256_bytes().ok()).map(NarHash);
                d.kept.push(self.relative(&path));
            }
        }
        Ok(())
    }
}

/// The divergence of output `name` (whose own NAR hash is `nar_hash`), made on first use.
pub(super) fn divergence<'a>(
    map: &'a mut BTreeMap<String, Divergence>,
    name: &str,
    nar_hash: NarHash,
) -> &'a mut Divergence {
    map.entry(name.to_owned()).or_insert_with(|| Divergence {
        nar_hash,
        kept: Vec::new(),
        published_nar_hash: None,
        published_path: None,
    })
}
