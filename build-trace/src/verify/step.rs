//! Checking one trace entry of one step: statement, derivation, output addresses, evidence and
//! signatures (which give the entry's signers), then the input links.
//! Not here: computing the step from the derivation graph, or pooling signers across entries
//! and applying the trust model (both in the parent module).

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use nix_formats::StorePath;

use super::launches::LaunchSeen;
use super::links::{check_links, Admitted, Facts};
use super::outcome::{BrokenLink, LinkCheck};
use crate::error_chain;
use crate::evidence::{EvidenceBundle, Expected, Verifier};
use crate::job::{BasicDerivation, StepKind};
use crate::jws;
use crate::statement::Statement;
use crate::store::TraceEntry;
use crate::trust::{PreparedPolicy, Signers};

/// What the verifier computed for a step, to hold each entry against.
#[derive(Debug)]
pub(crate) struct Expectation<'a> {
    /// The lookup key (drv path the statement must carry).
    pub key: &'a StorePath,
    /// The basic derivation the statement must carry.
    pub drv: &'a BasicDerivation,
    /// The step kind.
    pub kind: StepKind,
    /// The direct inputs (roots of the input closure).
    pub direct: &'a BTreeSet<StorePath>,
}

/// One output as an accepted entry describes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct OutputClaim {
    pub path: StorePath,
    pub facts: Facts,
}

/// An entry that passed every check.
#[derive(Debug)]
pub(crate) struct EntryOk {
    pub outputs: BTreeMap<String, OutputClaim>,
    pub signers: Signers,
    pub simulated: bool,
    /// The statement's launch (version 2 on).
    pub launch: Option<LaunchSeen>,
}

/// Everything the entry checks need besides the entry.
#[derive(Debug)]
pub(crate) struct Checker<'a> {
    pub policy: &'a PreparedPolicy,
    pub evidence: &'a Verifier,
    pub now: SystemTime,
}

/// The checks of one entry that depend on nothing but the entry, the policy and the time:
/// statement parsing, output addresses and signers (evidence, JWS). They are most of the work,
/// so the verifier may run them on other threads ahead of the ordered pass.
#[derive(Debug)]
pub(crate) struct Prechecked {
    statement: Result<Statement, Box<BrokenLink>>,
    /// `None` when the statement did not parse.
    addresses: Option<Result<(), Box<BrokenLink>>>,
    signers: Option<Result<(Signers, bool), Box<BrokenLink>>>,
}

impl Checker<'_> {
    /// The context-free checks of `entry`, all of them (errors are not yet located).
    pub(crate) fn precheck(&self, entry: &TraceEntry) -> Prechecked {
        let statement = entry
            .parse_statement()
            .map_err(|e| BrokenLink::new(LinkCheck::Statement, error_chain(&e)));
        let (addresses, signers) = match &statement {
            Ok(st) => (Some(check_output_addresses(st)), Some(self.signers(st, entry))),
            Err(_) => (None, None),
        };
        Prechecked { statement, addresses, signers }
    }

    /// Check `entry` against the step; `pre` holds its context-free checks when they were run
    /// ahead (the result is the same either way: the first check that fails, in this order).
    pub(crate) fn check_entry(
        &self,
        want: &Expectation<'_>,
        entry: &TraceEntry,
        known: &Admitted<'_>,
        pre: Option<&Prechecked>,
    ) -> Result<EntryOk, Box<BrokenLink>> {
        let located = |mut b: Box<BrokenLink>| {
            b.entry = Some(entry.location.clone());
            b
        };
        let parsed;
        let st = match pre {
            Some(p) => p.statement.as_ref().map_err(|b| located(b.clone()))?,
            None => {
                parsed = entry
                    .parse_statement()
                    .map_err(|e| located(BrokenLink::new(LinkCheck::Statement, error_chain(&e))))?;
                &parsed
            }
        };
        check_derivation(want, st).map_err(located)?;
        match pre.and_then(|p| p.addresses.clone()) {
            Some(r) => r,
            None => check_output_addresses(st),
        }
        .map_err(located)?;
        let (signers, simulated) = match pre.and_then(|p| p.signers.clone()) {
            Some(r) => r,
            None => self.signers(st, entry),
        }
        .map_err(located)?;
        check_links(st, want.direct, known, self.policy.policy.fixed_output.allow_weak_hashes)
            .map_err(located)?;
        let outputs = outputs_of(st);
        let launch = st.launch_nonce().map(|nonce| LaunchSeen {
            nonce,
            report_data: crate::statement::report_data_of(&entry.statement),
        });
        Ok(EntryOk { outputs, signers, simulated, launch })
    }

    /// The entry's signers: chips whose evidence passes a builder rule, and policy keys with a
    /// valid JWS describing this statement. No signer at all is an error naming why.
    fn signers(
        &self,
        st: &Statement,
        entry: &TraceEntry,
    ) -> Result<(Signers, bool), Box<BrokenLink>> {
        let mut signers = Signers::default();
        let mut simulated = false;
        let mut first_err: Option<Box<BrokenLink>> = None;
        if let Some(bundle) = entry.parse_evidence() {
            let bundle: EvidenceBundle = bundle.map_err(|e| {
                BrokenLink::new(
                    LinkCheck::Evidence,
                    format!("the evidence bundle does not parse: {e}"),
                )
            })?;
            // The entry's bytes were checked to be canonical when the statement was parsed;
            // HOST_DATA is its launch's hash (version 1: its job's digest).
            let host_data = crate::statement::host_data_of(&entry.statement).ok_or_else(|| {
                BrokenLink::new(LinkCheck::Statement, "the statement has no launch member")
            })?;
            let expected = Expected {
                host_data: Some(host_data),
                report_data: Some(crate::statement::report_data_of(&entry.statement)),
            };
            for (rule, policy) in &self.policy.rules {
                match self.evidence.verify_at(&bundle, policy, &expected, self.now) {
                    Ok(v) if v.measurement.0 != st.measurement.0 => {
                        first_err.get_or_insert(
                            BrokenLink::new(
                                LinkCheck::Measurement,
                                "the statement claims another launch measurement than its report shows",
                            )
                            .expected(v.measurement, st.measurement),
                        );
                    }
                    Ok(v) => {
                        simulated |= v.is_simulated();
                        signers.add_evidence(rule, &v);
                    }
                    Err(e) => {
                        first_err.get_or_insert(BrokenLink::new(
                            LinkCheck::Evidence,
                            format!(
                                "builder rule `{rule}`: {} check failed: {}",
                                e.check(),
                                error_chain(&e)
                            ),
                        ));
                    }
                }
            }
        }
        if !entry.jws.is_empty() {
            let statement_bytes = &entry.statement;
            for compact in &entry.jws {
                let checked = jws::verify_with(compact, &self.policy.jws_keys).and_then(|v| {
                    v.check_statement(st, statement_bytes)?;
                    Ok(v)
                });
                match checked {
                    Ok(v) => {
                        signers.keys.insert(v.key_name);
                    }
                    // A signature by a key the policy does not name is not an error: it just
                    // does not count.
                    Err(jws::JwsError::UnknownKey(_)) => {}
                    Err(e) => {
                        first_err
                            .get_or_insert(BrokenLink::new(LinkCheck::Signature, error_chain(&e)));
                    }
                }
            }
        }
        if signers.is_empty() {
            return Err(first_err.unwrap_or_else(|| {
                BrokenLink::new(
                    LinkCheck::NoTrustedSigner,
                    "the trace has no evidence or signature from anyone the policy names",
                )
            }));
        }
        Ok((signers, simulated))
    }
}

/// What `entry` says the step's outputs are, when it carries exactly the derivation computed for
/// the step, its output addresses hold and its inputs link to `known`; its signers are not
/// asked. With the CA rule it was built under: a rebuild's prediction (`super::plan`).
pub(crate) fn described_outputs(
    want: &Expectation<'_>,
    entry: &TraceEntry,
    known: &Admitted<'_>,
    allow_weak_hashes: bool,
) -> Option<(BTreeMap<String, OutputClaim>, crate::job::CaRule)> {
    let st = entry.parse_statement().ok()?;
    check_derivation(want, &st).ok()?;
    check_output_addresses(&st).ok()?;
    check_links(&st, want.direct, known, allow_weak_hashes).ok()?;
    Some((outputs_of(&st), st.job.ca_rule))
}

/// The statement's outputs as claims.
fn outputs_of(st: &Statement) -> BTreeMap<String, OutputClaim> {
    st.outputs
        .iter()
        .map(|(n, o)| {
            let facts = Facts {
                nar_hash: o.nar_hash,
                nar_size: o.nar_size,
                references: o.references.clone(),
            };
            (n.clone(), OutputClaim { path: o.path.clone(), facts })
        })
        .collect()
}

/// The statement must be about exactly the step the verifier computed.
fn check_derivation(want: &Expectation<'_>, st: &Statement) -> Result<(), Box<BrokenLink>> {
    let mismatch = |what: &str, exp: String, got: String| {
        BrokenLink::new(
            LinkCheck::DerivationMismatch,
            format!("the statement's {what} differs from the derivation the verifier computed"),
        )
        .expected(exp, got)
    };
    if st.job.drv_path != *want.key {
        return Err(mismatch("drv path", want.key.to_string(), st.job.drv_path.to_string()));
    }
    let got = &st.job.drv;
    if got == want.drv {
        return Ok(());
    }
    let mut exp = want.drv.clone();
    // An input-addressed step arrives as Nix's build hook sends it: input sources = the whole
    // input closure. Accept that form when it is exactly the statement's closure.
    if want.kind == StepKind::InputAddressed && got.input_srcs != exp.input_srcs {
        let closure: BTreeSet<StorePath> = st.job.closure.keys().cloned().collect();
        if got.input_srcs == closure && exp.input_srcs.is_subset(&closure) {
            exp.input_srcs = closure;
        }
    }
    if *got == exp {
        return Ok(());
    }
    let fmt = |v: &dyn std::fmt::Debug| format!("{v:?}");
    Err(if got.name != exp.name {
        mismatch("name", exp.name, got.name.clone())
    } else if got.outputs != exp.outputs {
        mismatch("outputs", fmt(&exp.outputs), fmt(&got.outputs))
    } else if got.input_srcs != exp.input_srcs {
        let missing: Vec<_> = exp.input_srcs.difference(&got.input_srcs).collect();
        let extra: Vec<_> = got.input_srcs.difference(&exp.input_srcs).collect();
        mismatch("input sources", format!("also {missing:?}"), format!("also {extra:?}"))
    } else if got.system != exp.system {
        mismatch("system", exp.system, got.system.clone())
    } else if got.builder != exp.builder {
        mismatch("builder", exp.builder, got.builder.clone())
    } else if got.args != exp.args {
        mismatch("arguments", fmt(&exp.args), fmt(&got.args))
    } else {
        let key = exp
            .env
            .iter()
            .find(|(k, v)| got.env.get(*k) != Some(v))
            .map(|(k, _)| k.clone())
            .or_else(|| got.env.keys().find(|k| !exp.env.contains_key(*k)).cloned())
            .unwrap_or_default();
        mismatch(
            &format!("environment variable `{key}`"),
            fmt(&exp.env.get(&key)),
            fmt(&got.env.get(&key)),
        )
    })
}

/// Each content-addressed output's path must follow from its `ca`, name and references.
fn check_output_addresses(st: &Statement) -> Result<(), Box<BrokenLink>> {
    for (name, out) in &st.outputs {
        let Some(ca) = &out.ca else { continue };
        let bad = |msg: String| BrokenLink::new(LinkCheck::OutputAddress, msg);
        let want = crate::ownership::content_addressed_path(&out.path, ca, &out.references)
            .map_err(|e| bad(format!("output `{name}`: {e}")))?;
        if want != out.path {
            return Err(bad(format!(
                "output `{name}`'s content address does not produce its path"
            ))
            .expected(want, &out.path));
        }
    }
    Ok(())
}

/// A trace entry verified on its own under a policy, without its closure: what may be exported
/// and how to label it ([`check_entry_alone`]).
#[derive(Debug)]
pub struct EntryVerdict {
    /// The statement.
    pub statement: Statement,
    /// `sev-snp` (evidence verified under an AMD root), `simulated` (under a simulated root the
    /// policy names) or `unattested` (policy keys only).
    pub kind: &'static str,
    /// Who vouched for it, as the closure verifier names them.
    pub accepted_by: Vec<String>,
    /// The policy's builder rules whose evidence counted (sorted).
    pub rules: Vec<String>,
    /// The policy keys whose signatures counted (sorted).
    pub keys: Vec<String>,
}

/// Check one trace entry under `policy`: its statement parses and is self-consistent, its
/// content-addressed outputs' paths follow from their `ca`, its evidence and signatures give
/// signers that satisfy the policy. Not checked (it needs the derivation graph and the traces of
/// the inputs: `vouch verify`): that the statement's derivation is the one its path names, and
/// the links of its inputs.
pub fn check_entry_alone(
    policy: &PreparedPolicy,
    evidence: &Verifier,
    entry: &TraceEntry,
    now: SystemTime,
) -> Result<EntryVerdict, Box<BrokenLink>> {
    let checker = Checker { policy, evidence, now };
    let located = |mut b: Box<BrokenLink>| {
        b.entry = Some(entry.location.clone());
        b.key = Some(entry.drv_path.to_string());
        b
    };
    let statement = entry
        .parse_statement()
        .map_err(|e| located(BrokenLink::new(LinkCheck::Statement, error_chain(&e))))?;
    check_output_addresses(&statement).map_err(located)?;
    let (signers, simulated) = checker.signers(&statement, entry).map_err(located)?;
    if !policy.accepts(&signers) {
        return Err(located(BrokenLink::new(
            LinkCheck::Policy,
            "the valid signers of this trace do not satisfy the trust policy",
        )));
    }
    let mut accepted_by: Vec<String> = signers.keys.iter().map(|k| format!("key {k}")).collect();
    for (rule, chips) in &signers.chips {
        accepted_by.extend(chips.iter().map(|c| format!("{c} (rule {rule})")));
    }
    let kind = if signers.chips.values().all(BTreeSet::is_empty) {
        "unattested"
    } else if simulated {
        "simulated"
    } else {
        "sev-snp"
    };
    let rules =
        signers.chips.iter().filter(|(_, c)| !c.is_empty()).map(|(r, _)| r.clone()).collect();
    let keys = signers.keys.iter().map(|k| k.to_string()).collect();
    Ok(EntryVerdict { statement, kind, accepted_by, rules, keys })
}
