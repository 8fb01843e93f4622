//! The log entry of one published step: a strict, line-based text, one encoding per value.
//!
//! ```text
//! vouch-step/v1
//! drv /nix/store/<hash>-<name>.drv
//! statement <64 hex: SHA-256 of statement.json>
//! evidence <64 hex: SHA-256 of evidence.json> | none
//! jws <64 hex: SHA-256 of the publisher's compact JWS> | none
//! out <output name> /nix/store/<output path> sha256:<nix32 NAR hash> <NAR size>
//! ```
//!
//! One `out` line per output, sorted by name; every line ends in `\n`. `drv` is the step's key
//! (the resolved derivation for content-addressed steps), the one a verifier looks up. The
//! statement's entry id (the trace store's directory name) is the first 32 hex digits of the
//! `statement` hash. An entry is at most 65 535 bytes (entry bundles prefix each entry with a
//! 16-bit length).

use std::collections::BTreeMap;

use nix_formats::StorePath;
use sha2::{Digest, Sha256};

use super::TlogError;
use crate::job::NarHash;
use crate::statement::Statement;

/// The first line of every entry.
pub const ENTRY_HEADER: &str = "vouch-step/v1";
/// The largest entry an entry bundle can hold.
pub const MAX_ENTRY: usize = u16::MAX as usize;

/// One output as the log names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LoggedOutput {
    /// The output's store path.
    pub path: StorePath,
    /// Its NAR hash.
    pub nar_hash: NarHash,
    /// Its NAR size.
    pub nar_size: u64,
}

/// A log entry (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// The step's drv path.
    pub drv: StorePath,
    /// SHA-256 of the statement's canonical bytes.
    pub statement: [u8; 32],
    /// SHA-256 of the evidence bundle as stored.
    pub evidence: Option<[u8; 32]>,
    /// SHA-256 of the publisher's JWS.
    pub jws: Option<[u8; 32]>,
    /// Outputs by name.
    pub outputs: BTreeMap<String, LoggedOutput>,
}

fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

impl LogEntry {
    /// The entry of a step as the trace store writes it.
    pub fn for_step(
        st: &Statement,
        statement_bytes: &[u8],
        evidence: Option<&[u8]>,
        jws: Option<&str>,
    ) -> LogEntry {
        LogEntry {
            drv: st.job.drv_path.clone(),
            statement: sha256(statement_bytes),
            evidence: evidence.map(sha256),
            jws: jws.map(|j| sha256(j.as_bytes())),
            outputs: st
                .outputs
                .iter()
                .map(|(n, o)| {
                    let out = LoggedOutput {
                        path: o.path.clone(),
                        nar_hash: o.nar_hash,
                        nar_size: o.nar_size,
                    };
                    (n.clone(), out)
                })
                .collect(),
        }
    }

    /// The statement's entry id (the trace store's directory name of the step's entry).
    pub fn entry_id(&self) -> String {
        hex::encode(&self.statement[..16])
    }

    /// The canonical bytes; an error if they would not fit an entry bundle or a field would
    /// break the line format.
    pub fn to_bytes(&self) -> Result<Vec<u8>, TlogError> {
        let opt = |h: &Option<[u8; 32]>| h.map(hex::encode).unwrap_or_else(|| "none".into());
        let mut s = format!(
            "{ENTRY_HEADER}\ndrv {}\nstatement {}\nevidence {}\njws {}\n",
            self.drv,
            hex::encode(self.statement),
            opt(&self.evidence),
            opt(&self.jws)
        );
        for (name, o) in &self.outputs {
            s.push_str(&format!("out {name} {} {} {}\n", o.path, o.nar_hash, o.nar_size));
        }
        let plain = |f: &str| !f.is_empty() && !f.contains(|c: char| c.is_whitespace());
        if self.outputs.iter().any(|(n, _)| !plain(n)) || self.outputs.is_empty() {
            return Err(TlogError::Entry(format!(
                "step {} has an empty name or one with whitespace, or no outputs",
                self.drv
            )));
        }
        if s.len() > MAX_ENTRY {
            return Err(TlogError::Entry(format!(
                "the entry of {} is {} bytes, more than an entry bundle holds ({MAX_ENTRY})",
                self.drv,
                s.len()
            )));
        }
        Ok(s.into_bytes())
    }

    /// Parse an entry; only the canonical encoding is accepted.
    pub fn parse(bytes: &[u8]) -> Result<LogEntry, TlogError> {
        let bad = |what: &str| TlogError::Entry(format!("malformed entry: {what}"));
        let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8"))?;
        let body = text.strip_suffix('\n').ok_or_else(|| bad("no final newline"))?;
        let mut lines = body.split('\n');
        if lines.next() != Some(ENTRY_HEADER) {
            return Err(bad(&format!("the first line is not `{ENTRY_HEADER}`")));
        }
        let mut field = |key: &str| -> Result<String, TlogError> {
            lines
                .next()
                .and_then(|l| l.strip_prefix(key))
                .and_then(|l| l.strip_prefix(' '))
                .map(str::to_owned)
                .ok_or_else(|| bad(&format!("no `{key}` line")))
        };
        let drv = StorePath::parse(&field("drv")?).map_err(|e| bad(&format!("drv: {e}")))?;
        let hash = |v: &str, what: &str| -> Result<[u8; 32], TlogError> {
            let mut h = [0u8; 32];
            hex::decode_to_slice(v, &mut h).map_err(|_| bad(&format!("{what} is not 64 hex")))?;
            Ok(h)
        };
        let statement = hash(&field("statement")?, "statement")?;
        let optional = |v: String, what: &str| -> Result<Option<[u8; 32]>, TlogError> {
            if v == "none" {
                Ok(None)
            } else {
                hash(&v, what).map(Some)
            }
        };
        let evidence = optional(field("evidence")?, "evidence")?;
        let jws = optional(field("jws")?, "jws")?;
        let mut outputs = BTreeMap::new();
        for line in lines {
            let parts: Vec<&str> = line.split(' ').collect();
            let ["out", name, path, nar_hash, size] = parts[..] else {
                return Err(bad(&format!("unexpected line {line:?}")));
            };
            let path = StorePath::parse(path).map_err(|e| bad(&format!("output path: {e}")))?;
            let out = LoggedOutput {
                path,
                nar_hash: nar_hash.parse().map_err(|e: String| bad(&e))?,
                nar_size: size.parse().map_err(|_| bad("NAR size"))?,
            };
            outputs.insert(name.to_owned(), out);
        }
        let e = LogEntry { drv, statement, evidence, jws, outputs };
        if e.to_bytes()? != bytes {
            return Err(bad("not in canonical form"));
        }
        Ok(e)
    }

    /// The outputs as one comparable value: what a monitor compares between entries of one
    /// derivation.
    pub fn output_map(&self) -> Vec<(&str, &LoggedOutput)> {
        self.outputs.iter().map(|(n, o)| (n.as_str(), o)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> LogEntry {
        LogEntry {
            drv: StorePath::parse("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-a.drv").unwrap(),
            statement: [1; 32],
            evidence: Some([2; 32]),
            jws: None,
            outputs: BTreeMap::from([(
                "out".to_string(),
                LoggedOutput {
                    path: StorePath::parse("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-a")
                        .unwrap(),
                    nar_hash: NarHash([3; 32]),
                    nar_size: 120,
                },
            )]),
        }
    }

    #[test]
    fn round_trips_and_refuses_other_encodings() {
        let e = sample();
        let b = e.to_bytes().unwrap();
        assert_eq!(LogEntry::parse(&b).unwrap(), e);
        assert_eq!(e.entry_id(), "01".repeat(16));
        let text = String::from_utf8(b.clone()).unwrap();
        assert!(text.starts_with("vouch-step/v1\ndrv /nix/store/"), "{text}");
        assert!(text.contains("\njws none\nout out /nix/store/"), "{text}");
        for bad in [
            text.replace("vouch-step/v1", "vouch-step/v2"),
            text.replace("statement 01", "statement 1"),
            text.replace(" 120\n", " 0120\n"),
            text.replace("\njws none", "\njws  none"),
            text.trim_end().to_string(),
            format!("{text}out x /nix/store/0123456789abcdfghijklmnpqrsvwxyz-a sha256:0 1\n"),
        ] {
            assert!(LogEntry::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn refuses_entries_a_bundle_cannot_hold() {
        let mut e = sample();
        let o = e.outputs["out"].clone();
        for i in 0..1000 {
            e.outputs.insert(format!("o{i:04}"), o.clone());
        }
        let err = e.to_bytes().unwrap_err().to_string();
        assert!(err.contains("more than an entry bundle holds"), "{err}");
    }
}
