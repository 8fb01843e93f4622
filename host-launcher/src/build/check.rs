//! The host's checks of what a VM returned, before anything becomes visible.
//!
//! Algorithm ([`check_outcome`]), each step its own [`CheckError`]:
//! 1. The statement bytes decode as a canonical, self-consistent statement
//!    (`Statement::from_canonical_bytes`, version 2) whose launch is the one we launched the VM
//!    with and whose job is the one we sent (`verify_against`; so its HOST_DATA is ours and the
//!    launch admits the job); a fixed output's `ca` is exactly its declared hash
//!    (`super::policy::check_fixed_output_result`).
//! 2. The evidence: SNP mode — the report with this host's VCEK (`read_vcek`: configured, else
//!    cached for the report's chip and TCB, else from the host's certificate table) and AMD's
//!    built-in ASK/ARK;
//!    otherwise — the report under this host's simulated root (and only that root). Verified by
//!    `build_trace`'s verifier with our own expectations: MEASUREMENT = the image manifest's
//!    (the expected SNP launch digest for the launch's vCPU count and model, or the simulated
//!    measurement), HOST_DATA = SHA-256 of our launch document, REPORT_DATA = SHA-512 of the
//!    received statement. The statement's own `measurement` must be the report's.
//! 3. The outputs: exactly the statement's output paths arrived; each received NAR has the
//!    statement's SHA-256 and size; a content-addressed output's `ca`, references and path are
//!    recomputed from the bytes that arrived (`nix_formats::content_address::verify`, under the
//!    job's self-reference rule).
//!
//! What is not here: the trust policy of a verifier (this is the launcher's own acceptance).

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use build_trace::evidence::{
    EvidenceBundle, EvidenceError, EvidencePolicy, Expected, Hex, VerifiedEvidence,
};
use build_trace::job::Job;
use build_trace::launch::Launch;
use build_trace::statement::{Statement, StatementError, STATEMENT_VERSION};
use channel::messages::Outcome;
use nix_formats::content_address::ContentAddress;
use nix_formats::nar::NarLimits;
use nix_formats::StorePath;

use super::host::ReceivedNar;
use super::launch::BootContext;
use super::{LauncherConfig, ReceivedOutput};
use crate::vm::Mode;

/// Why a result was rejected.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The statement is malformed or inconsistent.
    #[error("the statement is invalid")]
    Statement(#[source] StatementError),
    /// The statement is about another job or launch.
    #[error("the statement is not for the launch and job this VM was given")]
    OtherJob(#[source] StatementError),
    /// The statement is of an older version than the agents of this launcher write.
    #[error("the agent wrote a version {0} statement; this launcher's agents write version {STATEMENT_VERSION} (rebuild the image)")]
    OldStatement(u64),
    /// The report is not base64.
    #[error("the attestation report is not base64")]
    ReportEncoding(#[source] base64::DecodeError),
    /// SNP mode without the host's VCEK.
    #[error("SNP evidence needs this host's VCEK certificate (`vouch snp certs fetch`, or --snp-vcek / $VOUCH_SNP_VCEK): {0}")]
    NoVcek(String),
    /// The VCEK does not select a built-in chain.
    #[error("choosing the AMD chain for the VCEK")]
    Chain(#[source] build_trace::evidence::BuiltinChainError),
    /// The manifest has no measurement for this mode or VM shape.
    #[error("no expected measurement: {0}")]
    NoMeasurement(String),
    /// The evidence does not verify.
    #[error("the evidence does not verify")]
    Evidence(#[source] EvidenceError),
    /// The statement's measurement is not the report's.
    #[error("the statement claims measurement {claimed}, the report has {report}")]
    MeasurementClaim {
        /// Statement.
        claimed: String,
        /// Report.
        report: String,
    },
    /// An output of the statement did not arrive.
    #[error("output {0} of the statement was not sent")]
    MissingOutput(StorePath),
    /// A NAR arrived that the statement does not name.
    #[error("the guest sent {0}, which the statement does not name")]
    UnexpectedOutput(StorePath),
    /// NAR hash or size differ.
    #[error("output {path}: the statement says {claimed}, the NAR that arrived has {got}")]
    NarMismatch {
        /// Path.
        path: StorePath,
        /// Statement's hash/size.
        claimed: String,
        /// Received.
        got: String,
    },
    /// A content address does not hold for the bytes that arrived.
    #[error("output {0}: its content address does not match what arrived")]
    Ca(String, #[source] nix_formats::content_address::VerifyError),
    /// Something in the statement does not parse.
    #[error("output {0}: {1}")]
    Bad(String, String),
    /// Reading a received NAR.
    #[error("reading {0}")]
    Io(String, #[source] std::io::Error),
    /// A fixed output whose content address is not the declared one.
    #[error(transparent)]
    FixedOutput(#[from] super::policy::FixedOutputError),
}

/// What passed.
#[derive(Debug)]
pub struct Checked {
    /// The statement.
    pub statement: Statement,
    /// The evidence bundle.
    pub evidence: EvidenceBundle,
    /// What verified it.
    pub verified: VerifiedEvidence,
    /// Outputs by name.
    pub outputs: BTreeMap<String, ReceivedOutput>,
}

/// This host's VCEK for `report`: `--snp-vcek` / `$VOUCH_SNP_VCEK` if set, else the certificate
/// cache entry for the report's chip and REPORTED_TCB (`vouch snp certs fetch`), else the
/// endorsement key of the certificate table the host attached to the report, else the legacy
/// `<state>/snp/vcek.der`. Whichever it is, the evidence verifier checks it against AMD's
/// pinned roots and binds it to the report.
fn read_vcek(
    cfg: &LauncherConfig,
    report: &[u8],
    certs: Option<&str>,
) -> Result<Vec<u8>, CheckError> {
    let configured =
        cfg.snp_vcek.clone().or_else(|| std::env::var_os("VOUCH_SNP_VCEK").map(Into::into));
    let cache = crate::snp::certs::CertCache::new(&cfg.state_dir);
    let identity = crate::snp::platform::HostIdentity::from_report(
        report,
        crate::snp::platform::host_product(),
    );
    let path = match (configured, &identity) {
        (Some(p), _) => p,
        (None, Ok(id)) if cache.lookup(id).is_some() => cache.vcek_file(id),
        (None, _) => {
            if let Some(vek) = certs.and_then(table_vek) {
                return Ok(vek);
            }
            let legacy = cfg.state_dir.join("snp/vcek.der");
            if !legacy.is_file() {
                let wanted = match &identity {
                    Ok(id) => cache.vcek_file(id).display().to_string(),
                    Err(e) => e.clone(),
                };
                return Err(CheckError::NoVcek(format!(
                    "none cached for this report ({wanted}); run `vouch snp certs fetch`"
                )));
            }
            legacy
        }
    };
    let bytes =
        std::fs::read(&path).map_err(|e| CheckError::NoVcek(format!("{}: {e}", path.display())))?;
    if bytes.starts_with(b"-----BEGIN") {
        let certs = build_trace::evidence::certs::load_certificates(&bytes)
            .map_err(|e| CheckError::NoVcek(format!("{}: {e}", path.display())))?;
        return certs
            .into_iter()
            .next()
            .ok_or_else(|| CheckError::NoVcek(format!("{}: no certificate", path.display())));
    }
    Ok(bytes)
}

/// The VCEK (else VLEK) of a base64 GHCB certificate table from the guest.
fn table_vek(b64: &str) -> Option<Vec<u8>> {
    let table = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    let entries = build_trace::evidence::cert_table::parse(&table).ok()?;
    build_trace::evidence::cert_table::endorsement_key(&entries).map(|e| e.data.clone())
}

/// Run the checks of the module doc.
pub fn check_outcome(
    launch: &Launch,
    job: &Job,
    outcome: &Outcome,
    nars: &BTreeMap<StorePath, ReceivedNar>,
    ctx: &BootContext,
    cfg: &LauncherConfig,
) -> Result<Checked, CheckError> {
    // 1. statement
    let st = Statement::from_canonical_bytes(outcome.statement.as_bytes())
        .map_err(CheckError::Statement)?;
    if st.v != STATEMENT_VERSION {
        return Err(CheckError::OldStatement(st.v));
    }
    st.verify_against(launch, job).map_err(CheckError::OtherJob)?;
    // A fixed output is accepted by its declared hash only (its bytes are checked against that
    // address in step 3).
    super::policy::check_fixed_output_result(job, &st.outputs)?;

    // 2. evidence
    let report = base64::engine::general_purpose::STANDARD
        .decode(&outcome.report)
        .map_err(CheckError::ReportEncoding)?;
    let expected_m =
        ctx.expected_measurement(launch).map_err(|e| CheckError::NoMeasurement(e.to_string()))?;
    let (bundle, mut policy) = match (ctx.mode, &ctx.sim_root) {
        (Mode::Snp, _) => {
            let vcek = read_vcek(cfg, &report, outcome.certs.as_deref())?;
            let bundle =
                EvidenceBundle::with_builtin_chain(report, vcek).map_err(CheckError::Chain)?;
            (bundle, EvidencePolicy::default())
        }
        (_, Some(root)) => {
            let policy = root
                .allowed_by(EvidencePolicy { products: Vec::new(), ..EvidencePolicy::default() });
            (root.bundle(report), policy)
        }
        (_, None) => {
            return Err(CheckError::NoMeasurement("a simulated VM without a simulated root".into()))
        }
    };
    let m: Hex<48> =
        expected_m.parse().map_err(|e: String| CheckError::Bad("(manifest)".into(), e))?;
    policy.measurements = Some(vec![m].into());
    let host_data =
        launch.host_data().map_err(|e| CheckError::Statement(StatementError::Launch(e)))?;
    let report_data = st.report_data().map_err(CheckError::Statement)?;
    let expected = Expected { host_data: Some(host_data), report_data: Some(report_data) };
    let verified = build_trace::evidence::Verifier::global()
        .verify(&bundle, &policy, &expected)
        .map_err(CheckError::Evidence)?;
    if st.measurement.0 != verified.measurement.0 {
        return Err(CheckError::MeasurementClaim {
            claimed: st.measurement.to_string(),
            report: verified.measurement.to_string(),
        });
    }

    // 3. outputs
    let named: BTreeSet<&StorePath> = st.outputs.values().map(|o| &o.path).collect();
    if let Some(extra) = nars.keys().find(|p| !named.contains(p)) {
        return Err(CheckError::UnexpectedOutput(extra.clone()));
    }
    let rule = job.ca_rule.into();
    let mut outputs = BTreeMap::new();
    for (name, info) in &st.outputs {
        let nar =
            nars.get(&info.path).ok_or_else(|| CheckError::MissingOutput(info.path.clone()))?;
        if nar.sha256 != info.nar_hash.0 || nar.size != info.nar_size {
            return Err(CheckError::NarMismatch {
                path: info.path.clone(),
                claimed: format!("{} ({} bytes)", info.nar_hash, info.nar_size),
                got: format!("{} ({} bytes)", build_trace::job::NarHash(nar.sha256), nar.size),
            });
        }
        if let Some(ca) = &info.ca {
            let ca = ContentAddress::parse(ca)
                .map_err(|e| CheckError::Bad(info.path.to_string(), e.to_string()))?;
            let file = std::fs::File::open(&nar.file)
                .map_err(|e| CheckError::Io(nar.file.display().to_string(), e))?;
            nix_formats::content_address::verify(
                &info.path,
                &ca,
                &info.references,
                std::io::BufReader::new(file),
                rule,
                &NarLimits::default(),
            )
            .map_err(|e| CheckError::Ca(info.path.to_string(), e))?;
        }
        outputs.insert(
            name.clone(),
            ReceivedOutput { info: info.clone(), nar_file: nar.file.clone() },
        );
    }
    Ok(Checked { statement: st, evidence: bundle, verified, outputs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use build_trace::evidence::cert_table::{encode, CertEntry, CertKind};

    /// The launcher takes the VCEK (else the VLEK) from the guest's certificate table.
    #[test]
    fn the_vcek_of_a_certificate_table() {
        let vcek = include_bytes!("../../tests/data/snp/vcek_milan.der").to_vec();
        let table = encode(&[
            CertEntry { kind: CertKind::Ark, data: vec![1; 8] },
            CertEntry { kind: CertKind::Vcek, data: vcek.clone() },
        ]);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&table);
        assert_eq!(table_vek(&b64), Some(vcek));
        let vlek_only = encode(&[CertEntry { kind: CertKind::Vlek, data: vec![2; 4] }]);
        let b64 = base64::engine::general_purpose::STANDARD.encode(vlek_only);
        assert_eq!(table_vek(&b64), Some(vec![2; 4]));
        assert_eq!(table_vek("not base64!"), None);
        assert_eq!(table_vek(""), None, "an empty table has no key");
    }
}
