//! Auditing a trace store (`vouch cache audit`): is every signed record one that an accepted
//! statement of the same store produced? Stores written before vouch checked output ownership
//! may hold narinfos for paths a client chose; this finds them and, asked to, withdraws them.
//!
//! # Algorithm ([`TraceStore::audit`])
//!
//! 1. Every entry `vouch/v1/steps/<drv>/<entry>/statement.json` is read. It is **accepted** when
//!    its bytes are a canonical, self-consistent statement, its entry id is their hash, it is
//!    filed under its own drv path, and it owns the output paths it claims
//!    ([`crate::ownership`]; a deferred input-addressed step named by its unresolved
//!    derivation is resolved against the outputs this store accepted: its published
//!    build-trace entries, [`TraceStore::published_output`]). It is **unverifiable** when
//!    ownership needs an unresolved derivation the caller cannot supply, or an accepted output
//!    of a content-addressed input this store has none of; otherwise it is **not owned** or
//!    **corrupt**.
//! 2. Every record is held against the records the accepted statements produce
//!    ([`crate::sign::unsigned_step_records`]):
//!    - `<hash>.narinfo`: the same `StorePath`, `NarHash`, `NarSize`, `References` and `CA`;
//!    - `realisations/<id>.doi`: the same id and `outPath`;
//!    - `build-trace-v2/<drv>/<output>.doi`: the same key and `outPath`.
//!
//!    A record that only an unverifiable statement produces is reported as unverifiable; one
//!    that no readable statement produces is **unproduced**.
//! 3. With `fix`, every record with a finding, and every entry that is not owned or corrupt
//!    (with its `by-output` markers), is moved — never deleted — to
//!    `vouch/v1/withdrawn/<unix time>-<pid>/` under the same relative path, and laut's index of
//!    each touched step is rebuilt. Unverifiable entries and records are withdrawn only with
//!    `strict`.
//!
//! Signatures are not re-checked (the store's own key made them all; what matters is what they
//! vouch for), nor are NAR files re-hashed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use nix_formats::derivation::Derivation;
use nix_formats::narinfo::NarInfo;
use nix_formats::StorePath;

use super::reader::read_dir_sorted;
use super::{entry_id, io_err, laut_index, StoreError, TraceStore, VOUCH_DIR};
use crate::ownership::{check_outputs, OwnershipError};
use crate::statement::Statement;

/// What was wrong with a record or an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Problem {
    /// A step entry claims output paths its derivation does not give.
    NotOwned,
    /// A step entry, or a record only such entries produce, whose ownership needs a derivation
    /// that was not available.
    Unverifiable,
    /// A record that no accepted statement of the store produced.
    Unproduced,
    /// A file that does not parse, or is filed under the wrong name.
    Corrupt,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Problem::NotOwned => "not-owned",
            Problem::Unverifiable => "unverifiable",
            Problem::Unproduced => "unproduced",
            Problem::Corrupt => "corrupt",
        })
    }
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    /// The record or entry, relative to the store root.
    pub path: String,
    /// What is wrong.
    pub problem: Problem,
    /// Why, in words.
    pub detail: String,
    /// Whether it was moved to the withdrawn area.
    pub withdrawn: bool,
}

/// What an audit found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AuditReport {
    /// Step entries read.
    pub entries: usize,
    /// Entries accepted.
    pub accepted: usize,
    /// Records (narinfos, realisations, build-trace entries) checked.
    pub records: usize,
    /// Findings, entries first.
    pub findings: Vec<Finding>,
    /// Where withdrawn files went (only when something was withdrawn).
    pub withdrawn_to: Option<PathBuf>,
}

/// How to audit.
#[derive(Debug, Clone, Copy, Default)]
pub struct AuditOptions {
    /// Withdraw what has a finding.
    pub fix: bool,
    /// Treat unverifiable as not accepted (withdraw it too with `fix`).
    pub strict: bool,
}

/// Whether a statement's records count, and why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    Accepted,
    Unverifiable,
}

/// What the readable statements produce: record path (relative) → the produced content and
/// the producer's standing.
#[derive(Debug, Default)]
struct Produced {
    narinfos: BTreeMap<String, Vec<(NarInfo, Standing)>>,
    /// realisations and build-trace entries: relative path → (output base name, standing).
    realisations: BTreeMap<String, Vec<(String, Standing)>>,
}

impl Produced {
    fn add(&mut self, st: &Statement, standing: Standing) -> Result<(), String> {
        let records = crate::sign::unsigned_step_records(st).map_err(|e| crate::error_chain(&e))?;
        for (name, rec) in records {
            let out = &st.outputs[&name];
            let base = out.path.base_name().to_owned();
            let hash = rec.narinfo.store_path.hash_part().to_owned();
            self.narinfos
                .entry(format!("{hash}.narinfo"))
                .or_default()
                .push((rec.narinfo, standing));
            if let Some(l) = rec.legacy {
                let rel = format!("realisations/{}.doi", l.id);
                self.realisations.entry(rel).or_default().push((base.clone(), standing));
            }
            if let Some(b) = rec.build_trace {
                self.realisations.entry(b.cache_path()).or_default().push((base, standing));
            }
        }
        Ok(())
    }
}

fn same_narinfo(a: &NarInfo, b: &NarInfo) -> bool {
    a.store_path == b.store_path
        && a.nar_hash == b.nar_hash
        && a.nar_size == b.nar_size
        && a.references == b.references
        && a.ca == b.ca
}

/// The best standing among the producers that `matches`.
fn standing_of<T>(
    list: Option<&Vec<(T, Standing)>>,
    matches: impl Fn(&T) -> bool,
) -> Option<Standing> {
    let mut best = None;
    for (v, s) in list.into_iter().flatten() {
        if matches(v) {
            if *s == Standing::Accepted {
                return Some(Standing::Accepted);
            }
            best = Some(*s);
        }
    }
    best
}

impl TraceStore {
    /// Audit the store (see the module docs). `drvs` returns unresolved derivations by path
    /// where ownership needs them.
    pub fn audit(
        &self,
        opts: AuditOptions,
        drvs: &mut dyn FnMut(&StorePath) -> Option<Derivation>,
    ) -> Result<AuditReport, StoreError> {
        let mut report = AuditReport::default();
        let mut produced = Produced::default();
        // (relative entry dir, drv base, output hash parts) of entries to withdraw.
        let mut bad_entries: Vec<(String, String, Vec<String>)> = Vec::new();
        let steps = self.root.join(VOUCH_DIR).join("steps");
        for drv_base in read_dir_sorted(&steps)? {
            for entry in read_dir_sorted(&steps.join(&drv_base))? {
                report.entries += 1;
                let rel = format!("{VOUCH_DIR}/steps/{drv_base}/{entry}");
                let judged = self.judge_entry(&rel, &drv_base, &entry);
                let (problem, detail, outs) = match judged {
                    Ok(st) => {
                        let outs = out_hash_parts(&st);
                        let mut accepted = |d: &StorePath, o: &str| self.published_output(d, o);
                        match check_outputs(&st, drvs, &mut accepted) {
                            Ok(()) => {
                                report.accepted += 1;
                                if let Err(e) = produced.add(&st, Standing::Accepted) {
                                    report.findings.push(finding(&rel, Problem::Corrupt, e));
                                }
                                continue;
                            }
                            Err(
                                e @ (OwnershipError::NeedsDerivation(_)
                                | OwnershipError::NotAccepted { .. }),
                            ) => {
                                let _ = produced.add(&st, Standing::Unverifiable);
                                (Problem::Unverifiable, crate::error_chain(&e), outs)
                            }
                            Err(e) => (Problem::NotOwned, crate::error_chain(&e), outs),
                        }
                    }
                    Err(detail) => (Problem::Corrupt, detail, Vec::new()),
                };
                if problem != Problem::Unverifiable || opts.strict {
                    bad_entries.push((rel.clone(), drv_base.clone(), outs));
                }
                report.findings.push(finding(&rel, problem, detail));
            }
        }
        let bad_records = self.audit_records(&produced, &mut report, opts.strict)?;
        if opts.fix {
            self.withdraw(&mut report, &bad_entries, &bad_records)?;
        }
        Ok(report)
    }

    /// Read and check one entry's statement: canonical, valid, filed under its id and drv.
    fn judge_entry(&self, rel: &str, drv_base: &str, entry: &str) -> Result<Statement, String> {
        let p = self.root.join(rel).join("statement.json");
        let bytes = fs::read(&p).map_err(|e| format!("reading {}: {e}", p.display()))?;
        let st = Statement::from_canonical_bytes(&bytes)
            .and_then(|st| st.validate().map(|()| st))
            .map_err(|e| crate::error_chain(&e))?;
        if entry_id(&bytes) != entry {
            return Err(format!("its statement's entry id is {}", entry_id(&bytes)));
        }
        if st.job.drv_path.base_name() != drv_base {
            return Err(format!("its statement is about {}", st.job.drv_path));
        }
        Ok(st)
    }

    /// Check narinfos, realisations and build-trace entries; the relative paths to withdraw.
    fn audit_records(
        &self,
        produced: &Produced,
        report: &mut AuditReport,
        strict: bool,
    ) -> Result<Vec<String>, StoreError> {
        let mut bad = Vec::new();
        let mut judge = |report: &mut AuditReport,
                         rel: String,
                         s: Result<Option<Standing>, String>| {
            report.records += 1;
            let (problem, detail) = match s {
                Ok(Some(Standing::Accepted)) => return,
                Ok(Some(Standing::Unverifiable)) => {
                    (Problem::Unverifiable, "only unverifiable statements produce it".to_owned())
                }
                Ok(None) => (
                    Problem::Unproduced,
                    "no accepted statement of this store produces it".to_owned(),
                ),
                Err(e) => (Problem::Corrupt, e),
            };
            if problem != Problem::Unverifiable || strict {
                bad.push(rel.clone());
            }
            report.findings.push(finding(&rel, problem, detail));
        };
        for name in read_dir_sorted(&self.root)? {
            if !name.ends_with(".narinfo") {
                continue;
            }
            let p = self.root.join(&name);
            let s = fs::read_to_string(&p)
                .map_err(|e| e.to_string())
                .and_then(|t| NarInfo::parse(&t).map_err(|e| crate::error_chain(&e)))
                .map(|info| standing_of(produced.narinfos.get(&name), |e| same_narinfo(e, &info)));
            judge(report, name, s);
        }
        let mut files = Vec::new();
        for name in read_dir_sorted(&self.root.join("realisations"))? {
            files.push(format!("realisations/{name}"));
        }
        let bt = self.root.join("build-trace-v2");
        for drv in read_dir_sorted(&bt)? {
            for out in read_dir_sorted(&bt.join(&drv))? {
                files.push(format!("build-trace-v2/{drv}/{out}"));
            }
        }
        for rel in files {
            let p = self.root.join(&rel);
            let s = fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    serde_json::from_slice::<serde_json::Value>(&b).map_err(|e| e.to_string())
                })
                .and_then(|v| {
                    v.get("outPath")
                        .and_then(|o| o.as_str())
                        .map(str::to_owned)
                        .ok_or_else(|| "no outPath".to_owned())
                })
                .map(|out| standing_of(produced.realisations.get(&rel), |b| *b == out));
            judge(report, rel, s);
        }
        Ok(bad)
    }

    /// Move the bad entries (with their markers) and records to the withdrawn area.
    fn withdraw(
        &self,
        report: &mut AuditReport,
        entries: &[(String, String, Vec<String>)],
        records: &[String],
    ) -> Result<(), StoreError> {
        if entries.is_empty() && records.is_empty() {
            return Ok(());
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let area = self
            .root
            .join(VOUCH_DIR)
            .join("withdrawn")
            .join(format!("{stamp}-{}", std::process::id()));
        let mut moved: BTreeSet<String> = BTreeSet::new();
        let mut touched_steps = BTreeSet::new();
        let mut move_rel = |rel: &str| -> Result<(), StoreError> {
            let from = self.root.join(rel);
            let to = area.join(rel);
            if let Some(dir) = to.parent() {
                fs::create_dir_all(dir).map_err(io_err("create", dir))?;
            }
            match fs::rename(&from, &to) {
                Ok(()) => {
                    moved.insert(rel.to_owned());
                    Ok(())
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_err("withdraw", &from)(e)),
            }
        };
        for (rel, drv_base, outs) in entries {
            let entry = rel.rsplit('/').next().unwrap_or_default();
            for h in outs {
                move_rel(&format!("{VOUCH_DIR}/by-output/{h}/{drv_base}/{entry}"))?;
            }
            move_rel(rel)?;
            touched_steps.insert(drv_base.clone());
        }
        for rel in records {
            move_rel(rel)?;
        }
        for f in &mut report.findings {
            f.withdrawn = moved.contains(&f.path);
        }
        let steps = self.root.join(VOUCH_DIR).join("steps");
        for drv_base in touched_steps {
            if drv_base.len() >= 32 {
                laut_index::refresh(&self.root, &steps.join(&drv_base), &drv_base[..32])?;
            }
        }
        sync_tree(&area);
        report.withdrawn_to = Some(area);
        Ok(())
    }
}

fn finding(path: &str, problem: Problem, detail: String) -> Finding {
    Finding { path: path.to_owned(), problem, detail, withdrawn: false }
}

fn out_hash_parts(st: &Statement) -> Vec<String> {
    st.outputs.values().map(|o| o.path.hash_part().to_owned()).collect()
}

/// Best-effort fsync of the withdrawn area's directories (the renames are what matter).
fn sync_tree(dir: &Path) {
    if let Ok(f) = fs::File::open(dir) {
        let _ = f.sync_all();
    }
}
