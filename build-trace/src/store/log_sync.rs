//! Bringing the attached transparency log up to date with the store: every step entry not in
//! the log yet is appended (a store written before it had a log, or a write that stopped between
//! a step's directory and its log entry). Appending is idempotent per entry id, so running it
//! again appends nothing.

use super::reader::read_dir_sorted;
use super::{StoreError, TraceSource, TraceStore, VOUCH_DIR};
use crate::tlog::{LogEntry, TlogError};

impl TraceStore {
    /// Append every step entry that is not in the attached log; how many were appended.
    /// Entries whose statement does not parse are left out with a warning (`vouch cache audit`
    /// reports them).
    pub fn log_missing(&self) -> Result<usize, StoreError> {
        let log = self.log.as_ref().ok_or_else(|| {
            StoreError::Log(TlogError::Missing(format!(
                "a log attached to {}",
                self.root.display()
            )))
        })?;
        let mut entries = Vec::new();
        for drv_base in read_dir_sorted(&self.root.join(VOUCH_DIR).join("steps"))? {
            let Ok(drv_path) =
                nix_formats::StorePath::parse(&format!("{}/{drv_base}", nix_formats::STORE_DIR))
            else {
                tracing::warn!(step = %drv_base, "not logged: not a store path");
                continue;
            };
            for e in self.entries(&drv_path)? {
                match e.parse_statement() {
                    Ok(st) => entries.push(LogEntry::for_step(
                        &st,
                        &e.statement,
                        e.evidence.as_deref(),
                        e.jws.first().map(String::as_str),
                    )),
                    Err(err) => tracing::warn!(entry = %e.location, "not logged: {err}"),
                }
            }
        }
        let done = log.append(&entries).map_err(StoreError::Log)?;
        Ok(done.iter().filter(|r| r.appended).count())
    }
}
