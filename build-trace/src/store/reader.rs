//! Reading traces: the [`TraceSource`] seam the verifier looks steps up through, implemented
//! by the trace store directory and by an in-memory map (benchmarks, tests of the verifier).
//!
//! A source returns raw bytes; parsing and judging them is the verifier's job, so one corrupt
//! entry becomes an explained failure of that entry, not of the whole lookup.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use nix_formats::StorePath;

use super::{io_err, StoreError, TraceStore, VOUCH_DIR};
use crate::evidence::EvidenceBundle;
use crate::statement::{Statement, StatementError};

/// One stored trace of a step: a statement with its evidence and signatures, as bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEntry {
    /// Where it came from (for messages).
    pub location: String,
    /// The step's drv path (the lookup key).
    pub drv_path: StorePath,
    /// The statement's canonical bytes.
    pub statement: Vec<u8>,
    /// The evidence bundle JSON, if any.
    pub evidence: Option<Vec<u8>>,
    /// Compact JWS signatures.
    pub jws: Vec<String>,
}

impl TraceEntry {
    /// Parse the statement (canonical bytes only).
    pub fn parse_statement(&self) -> Result<Statement, StatementError> {
        Statement::from_canonical_bytes(&self.statement)
    }

    /// Parse the evidence bundle.
    pub fn parse_evidence(&self) -> Option<Result<EvidenceBundle, serde_json::Error>> {
        self.evidence.as_ref().map(|b| serde_json::from_slice(b))
    }
}

/// Where the verifier finds traces.
pub trait TraceSource: std::fmt::Debug + Sync {
    /// Every stored trace of the step with this drv path (resolved drv for CA steps).
    fn entries(&self, drv_path: &StorePath) -> Result<Vec<TraceEntry>, StoreError>;
    /// Every stored trace that produced this output path.
    fn entries_for_output(&self, out_path: &StorePath) -> Result<Vec<TraceEntry>, StoreError>;
    /// A short name for messages.
    fn describe(&self) -> String;
}

pub(super) fn read_dir_sorted(dir: &Path) -> Result<Vec<String>, StoreError> {
    let mut names = Vec::new();
    match fs::read_dir(dir) {
        Ok(it) => {
            for e in it {
                let e = e.map_err(io_err("list", dir))?;
                let name = e.file_name().to_string_lossy().into_owned();
                if !name.starts_with('.') {
                    names.push(name);
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("list", dir)(e)),
    }
    names.sort();
    Ok(names)
}

impl TraceStore {
    fn read_entry(&self, drv_path: &StorePath, dir: &Path) -> Result<TraceEntry, StoreError> {
        let st = dir.join("statement.json");
        let statement = fs::read(&st).map_err(io_err("read", &st))?;
        let ev = dir.join("evidence.json");
        let evidence = match fs::read(&ev) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("read", &ev)(e)),
        };
        let jws_dir = dir.join("jws");
        let mut jws = Vec::new();
        for name in read_dir_sorted(&jws_dir)? {
            let p = jws_dir.join(name);
            jws.push(fs::read_to_string(&p).map_err(io_err("read", &p))?.trim().to_string());
        }
        Ok(TraceEntry {
            location: dir.display().to_string(),
            drv_path: drv_path.clone(),
            statement,
            evidence,
            jws,
        })
    }
}

impl TraceSource for TraceStore {
    fn entries(&self, drv_path: &StorePath) -> Result<Vec<TraceEntry>, StoreError> {
        let dir = self.step_dir(drv_path);
        read_dir_sorted(&dir)?
            .into_iter()
            .map(|e| self.read_entry(drv_path, &dir.join(e)))
            .collect()
    }

    fn entries_for_output(&self, out_path: &StorePath) -> Result<Vec<TraceEntry>, StoreError> {
        let index = self.root.join(VOUCH_DIR).join("by-output").join(out_path.hash_part());
        let mut out = Vec::new();
        for drv_base in read_dir_sorted(&index)? {
            // A directory name: text from the filesystem, parsed here.
            let drv_path = StorePath::from_base_name(&drv_base).map_err(|e| {
                StoreError::Corrupt { path: index.join(&drv_base), problem: e.to_string() }
            })?;
            for entry in read_dir_sorted(&index.join(&drv_base))? {
                let dir = self.step_dir(&drv_path).join(entry);
                let e = self.read_entry(&drv_path, &dir)?;
                // The marker is only an index: keep entries whose statement really has the path.
                let produced = e
                    .parse_statement()
                    .map(|s| s.outputs.values().any(|o| o.path == *out_path))
                    .unwrap_or(true);
                if produced {
                    out.push(e);
                }
            }
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        format!("trace store {}", self.root.display())
    }
}

/// Traces held in memory, keyed by drv path (benchmarks and verifier tests).
#[derive(Debug, Default, Clone)]
pub struct MemoryTraces {
    by_drv: HashMap<StorePath, Vec<TraceEntry>>,
}

impl MemoryTraces {
    /// Add an entry.
    pub fn insert(&mut self, entry: TraceEntry) {
        self.by_drv.entry(entry.drv_path.clone()).or_default().push(entry);
    }
}

impl TraceSource for MemoryTraces {
    fn entries(&self, drv_path: &StorePath) -> Result<Vec<TraceEntry>, StoreError> {
        Ok(self.by_drv.get(drv_path).cloned().unwrap_or_default())
    }

    fn entries_for_output(&self, out_path: &StorePath) -> Result<Vec<TraceEntry>, StoreError> {
        Ok(self
            .by_drv
            .values()
            .flatten()
            .filter(|e| {
                e.parse_statement().is_ok_and(|s| s.outputs.values().any(|o| o.path == *out_path))
            })
            .cloned()
            .collect())
    }

    fn describe(&self) -> String {
        "in-memory traces".into()
    }
}
