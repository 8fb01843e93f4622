//! What `vouch evidence check` prints: every check of the evidence algorithm (`docs/evidence.md`)
//! with its mark — `[ ok ]` checked and held, `[ -- ]` not checked (nothing to compare against,
//! not applicable) or not reached, `[FAIL]` — the report's values, the verdict, and the Milan
//! caveat when Milan evidence passes; or all of it as one JSON object.
//!
//! Also here: reading the `evidence.json` bundle vouch stores with each step, and the REPORT_DATA
//! and HOST_DATA its `statement.json` demands.

use std::path::{Path, PathBuf};

use build_trace::evidence::report::Product;
use build_trace::evidence::{Check, EvidenceBundle, EvidenceError, Report, VerifiedEvidence};
use serde::Serialize;

/// The caveat `docs/evidence.md` ("Milan caveat") attaches to Milan evidence.
pub const MILAN_CAVEAT: &str = "Milan caveat (docs/evidence.md): a May-2026 paper (arXiv \
    2605.12990) reports extracting the Milan VCEK root seed in software, which would allow \
    forging Milan reports for any firmware version. Until AMD responds with a fix and a TCB to \
    require, treat Milan evidence as weaker: products = [\"Genoa\", \"Turin\"] for \
    high-assurance policies.";

/// How one check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mark {
    /// Checked and held.
    Ok,
    /// Passed over: nothing to compare against, or not applicable.
    NotChecked,
    /// The check that failed.
    Fail,
    /// After the failure: not run.
    NotReached,
}

impl Mark {
    fn tag(self) -> &'static str {
        match self {
            Mark::Ok => "[ ok ]",
            Mark::NotChecked | Mark::NotReached => "[ -- ]",
            Mark::Fail => "[FAIL]",
        }
    }
}

/// One line of the check list.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    pub check: &'static str,
    pub status: Mark,
    pub detail: String,
}

/// The mark of a check the verifier passed, from its description: the verifier reports
/// conditional checks it had nothing to compare against as "not checked", "no minimum set" or
/// "not applicable" (`build_trace::evidence::verify`).
pub fn passed(check: Check, detail: String) -> Line {
    let skipped = detail.contains("not checked")
        || detail.starts_with("no minimum set")
        || detail.starts_with("not applicable");
    Line { check: check.name(), status: if skipped { Mark::NotChecked } else { Mark::Ok }, detail }
}

/// The whole answer.
#[derive(Debug, Serialize)]
pub struct Answer {
    /// What was checked (a report file, or a stored bundle).
    pub evidence: String,
    /// Where the expected REPORT_DATA and HOST_DATA came from, if from a statement.
    pub statement: Option<String>,
    pub checks: Vec<Line>,
    pub measurement: Option<String>,
    pub host_data: Option<String>,
    pub report_data: Option<String>,
    /// `pass` or `fail`.
    pub result: &'static str,
    pub simulated: bool,
    pub root: Option<String>,
    pub signer: Option<String>,
    pub error: Option<String>,
    /// Caveats of a pass (the Milan caveat).
    pub caveats: Vec<&'static str>,
}

impl Answer {
    /// The answer for `result`, with the checks that passed in `lines` and the rest of `all`.
    pub fn new(
        evidence: String,
        statement: Option<String>,
        mut checks: Vec<Line>,
        all: &[Check],
        bundle: &EvidenceBundle,
        result: &Result<VerifiedEvidence, EvidenceError>,
    ) -> Answer {
        let report = Report::parse(&bundle.report).ok();
        let field = |f: fn(&Report) -> String| report.as_ref().map(f);
        let mut a = Answer {
            evidence,
            statement,
            checks: Vec::new(),
            measurement: field(|r| hex::encode(r.measurement())),
            host_data: field(|r| hex::encode(r.host_data())),
            report_data: field(|r| hex::encode(r.report_data())),
            result: if result.is_ok() { "pass" } else { "fail" },
            simulated: false,
            root: None,
            signer: None,
            error: None,
            caveats: Vec::new(),
        };
        match result {
            Ok(v) => {
                a.simulated = v.is_simulated();
                a.root = Some(v.root.to_string());
                a.signer = Some(v.signer.to_string());
                if v.product() == Some(Product::Milan) {
                    a.caveats.push(MILAN_CAVEAT);
                }
            }
            Err(e) => {
                let failed = e.check();
                let seen: Vec<&str> = checks.iter().map(|l| l.check).collect();
                let rest: Vec<Line> = all
                    .iter()
                    .filter(|c| **c != failed && !seen.contains(&c.name()))
                    .map(|c| Line {
                        check: c.name(),
                        status: Mark::NotReached,
                        detail: "not reached".into(),
                    })
                    .collect();
                checks.push(Line {
                    check: failed.name(),
                    status: Mark::Fail,
                    detail: e.to_string(),
                });
                checks.extend(rest);
                a.error = Some(e.to_string());
            }
        }
        a.checks = checks;
        a
    }

    /// Print for people.
    pub fn print(&self) {
        println!("checking {}", self.evidence);
        if let Some(st) = &self.statement {
            println!("(REPORT_DATA and HOST_DATA expected from {st})");
        }
        for l in &self.checks {
            println!("  {} {:<24} {}", l.status.tag(), l.check, l.detail);
        }
        for (name, v) in [
            ("MEASUREMENT: ", &self.measurement),
            ("HOST_DATA:   ", &self.host_data),
            ("REPORT_DATA: ", &self.report_data),
        ] {
            if let Some(v) = v {
                println!("{name}{v}");
            }
        }
        let root = self.root.as_deref().unwrap_or_default();
        match (&self.error, self.simulated) {
            (Some(e), _) => {
                let failed = self.checks.iter().find(|l| l.status == Mark::Fail);
                println!("result: FAIL ({}): {e}", failed.map_or("", |l| l.check));
            }
            (None, true) => {
                println!(
                    "result: PASS: SIMULATED evidence ({root}); it proves nothing about hardware"
                )
            }
            (None, false) => println!(
                "result: PASS: AMD SEV-SNP evidence, {root}, signed by {}",
                self.signer.as_deref().unwrap_or_default()
            ),
        }
        for c in &self.caveats {
            println!("caveat: {c}");
        }
    }
}

/// A stored bundle: `evidence.json`, or a trace entry directory holding it, and the
/// `statement.json` beside it if there is one.
pub fn stored_bundle(path: &Path) -> (PathBuf, Option<PathBuf>) {
    let file = if path.is_dir() { path.join("evidence.json") } else { path.to_owned() };
    let statement = file.parent().map(|d| d.join("statement.json")).filter(|s| s.is_file());
    (file, statement)
}
