//! A trace source seen through a transparency log: the verifier's entries count only when the
//! log includes them, proven against a checkpoint the trust policy accepts.
//!
//! An entry of the underlying store is kept when the log indexes its statement's entry id below
//! the checkpoint's size, the leaf there has an inclusion proof to the signed root, and the
//! logged entry names the same derivation, statement (full SHA-256), evidence and outputs (path,
//! NAR hash, size). Every other entry is left out, with the reason remembered for messages
//! ([`TraceSource::describe`] lists them), so a step that has no logged entry is the verifier's
//! usual "no trace" broken link, explained.

use std::sync::Mutex;

use nix_formats::StorePath;
use sha2::{Digest, Sha256};

use super::proof::LogView;
use crate::store::{StoreError, TraceEntry, TraceSource};

/// A trace source whose entries must be in a log.
#[derive(Debug)]
pub struct LoggedTraces<'a> {
    inner: &'a dyn TraceSource,
    view: LogView<'a>,
    left_out: Mutex<Vec<String>>,
}

impl<'a> LoggedTraces<'a> {
    /// `inner`'s entries that `view`'s log includes.
    pub fn new(inner: &'a dyn TraceSource, view: LogView<'a>) -> LoggedTraces<'a> {
        LoggedTraces { inner, view, left_out: Mutex::new(Vec::new()) }
    }

    /// The entries left out so far, each with why.
    pub fn left_out(&self) -> Vec<String> {
        self.left_out.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Why `e` does not count (`None`: it is in the log).
    fn check(&self, e: &TraceEntry) -> Result<Option<String>, StoreError> {
        let digest: [u8; 32] = Sha256::digest(&e.statement).into();
        let id = hex::encode(&digest[..16]);
        let cp = self.view.checkpoint();
        let (i, logged) = match self.view.find(&id) {
            Ok(Some(found)) => found,
            Ok(None) => {
                return Ok(Some(format!("not in log {} at size {}", cp.origin, cp.size)));
            }
            Err(err) => return Ok(Some(crate::error_chain(&err))),
        };
        let st = match e.parse_statement() {
            Ok(st) => st,
            Err(err) => return Ok(Some(format!("statement: {err}"))),
        };
        let ev = e.evidence.as_deref().map(|b| <[u8; 32]>::from(Sha256::digest(b)));
        let outputs_match = logged.outputs.len() == st.outputs.len()
            && st.outputs.iter().all(|(n, o)| {
                logged.outputs.get(n).is_some_and(|l| {
                    l.path == o.path && l.nar_hash == o.nar_hash && l.nar_size == o.nar_size
                })
            });
        let problem = if logged.statement != digest {
            Some("the statement")
        } else if logged.drv != e.drv_path || logged.drv != st.job.drv_path {
            Some("the derivation")
        } else if logged.evidence != ev {
            Some("the evidence")
        } else if !outputs_match {
            Some("the outputs")
        } else {
            None
        };
        Ok(problem.map(|p| format!("leaf {i} of log {} logs another {p}", cp.origin)))
    }

    fn keep(&self, entries: Vec<TraceEntry>) -> Result<Vec<TraceEntry>, StoreError> {
        let mut kept = Vec::new();
        for e in entries {
            match self.check(&e)? {
                None => kept.push(e),
                Some(why) => {
                    tracing::info!(entry = %e.location, "left out: {why}");
                    let mut l = self.left_out.lock().unwrap_or_else(|e| e.into_inner());
                    l.push(format!("{}: {why}", e.location));
                }
            }
        }
        Ok(kept)
    }
}

impl TraceSource for LoggedTraces<'_> {
    fn entries(&self, drv_path: &StorePath) -> Result<Vec<TraceEntry>, StoreError> {
        self.keep(self.inner.entries(drv_path)?)
    }

    fn entries_for_output(&self, out_path: &StorePath) -> Result<Vec<TraceEntry>, StoreError> {
        self.keep(self.inner.entries_for_output(out_path)?)
    }

    fn describe(&self) -> String {
        let cp = self.view.checkpoint();
        let mut s = format!(
            "{} through log {} at size {} (cosigned by {:?})",
            self.inner.describe(),
            cp.origin,
            cp.size,
            cp.cosigned_by.keys().collect::<Vec<_>>()
        );
        let left = self.left_out();
        if !left.is_empty() {
            s.push_str(&format!("; entries left out: {}", left.join("; ")));
        }
        s
    }
}
