//! `vouch evidence ...`: check or show one raw SEV-SNP attestation report, and make simulated
//! ones with this host's simulated root.
//!
//! `check` runs `build_trace::evidence::Verifier` and prints every check as it passes, the one
//! that failed, and those not reached; exit 0 pass, 1 fail, 2 error (unreadable input, bad
//! arguments). The policy file is the same `EvidencePolicy` TOML the trust policy embeds
//! (`docs/evidence.md`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use build_trace::evidence::certs::{
    is_self_issued, load_certificates, names_issuer_of, parse_time,
};
use build_trace::evidence::report::TcbLayout;
use build_trace::evidence::{
    Check, CheckTime, EvidenceBundle, EvidencePolicy, Expected, Hex, Report, SimulatedLaunch,
    SimulatedRoot, Verifier, SIMULATED_ROOT_DIR,
};

use super::{evidence_report, exit, CmdResult, Global};

/// Subcommands of `vouch evidence`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Verify one raw report and its certificates, printing each check and its result
    /// (exit 0 pass, 1 fail, 2 error).
    Check(CheckArgs),
    /// Print the fields of a raw report.
    Show(ShowArgs),
    /// Write a SIMULATED report signed by this host's simulated root (state directory), with
    /// its certificates and a policy naming that root. Simulated evidence proves nothing about
    /// hardware.
    Simulate(SimulateArgs),
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The evidence bundle vouch stores with a step (`evidence.json`), or the trace entry
    /// directory holding it; with its `statement.json` beside it, the REPORT_DATA and HOST_DATA
    /// that statement demands are checked too.
    #[arg(long, value_name = "FILE|DIR", conflicts_with_all = ["report", "cert", "chain"])]
    pub bundle: Option<PathBuf>,
    /// The raw 1184-byte report.
    #[arg(long, required_unless_present = "bundle", requires = "cert")]
    pub report: Option<PathBuf>,
    /// The VCEK or VLEK (DER or PEM). A PEM may carry the ASK/ASVK and ARK after it.
    #[arg(long, requires = "report")]
    pub cert: Option<PathBuf>,
    /// ASK/ASVK and ARK (PEM bundle in any order, or one DER ARK for a simulated root).
    /// Default: AMD's built-in chain of the product the report and certificate name.
    #[arg(long)]
    pub chain: Option<PathBuf>,
    /// Print one JSON object (every check with `ok`, `not-checked`, `fail` or `not-reached`).
    #[arg(long)]
    pub json: bool,
    /// Check certificate validity at this UTC time (2025-06-01 or 2025-06-01T12:00:00Z)
    /// instead of now; overrides the policy's check_time.
    #[arg(long)]
    pub now: Option<String>,
    /// Evidence policy (TOML). Default: authenticity plus the default guest policy rules.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Require exactly this MEASUREMENT (96 hex digits); replaces the policy's set.
    #[arg(long)]
    pub measurement: Option<String>,
    /// Require exactly this HOST_DATA (64 hex digits).
    #[arg(long)]
    pub host_data: Option<String>,
    /// Require exactly this REPORT_DATA (128 hex digits).
    #[arg(long)]
    pub report_data: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The raw 1184-byte report.
    pub report: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// Directory to write report.bin, vcek.der, ark.der and policy.toml into.
    #[arg(long)]
    pub out: PathBuf,
    /// MEASUREMENT to report (96 hex digits; default zeros).
    #[arg(long)]
    pub measurement: Option<String>,
    /// HOST_DATA (64 hex digits; default zeros).
    #[arg(long)]
    pub host_data: Option<String>,
    /// REPORT_DATA (128 hex digits; default zeros).
    #[arg(long)]
    pub report_data: Option<String>,
}

/// Bad arguments or unreadable input (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum EvidenceCliError {
    #[error("{path}: cannot read")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot write")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no certificate (expected DER or PEM)")]
    Certificates {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{path}: invalid evidence policy")]
    Policy {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("--{flag}: {reason}")]
    Argument { flag: &'static str, reason: String },
    #[error("{0}")]
    Chain(String),
    #[error("cannot choose AMD's built-in chain")]
    Builtin(#[source] build_trace::evidence::BuiltinChainError),
    #[error("simulated root")]
    Simulated(#[source] build_trace::evidence::SimulatedError),
    #[error("{path}: not an evidence bundle (evidence.json)")]
    Bundle {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: not a canonical statement")]
    Statement {
        path: PathBuf,
        #[source]
        source: build_trace::statement::StatementError,
    },
}

pub fn run(cmd: Command, global: &Global) -> CmdResult {
    match cmd {
        Command::Check(args) => check(args),
        Command::Show(args) => show(&args.report),
        Command::Simulate(args) => simulate(args, global),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, EvidenceCliError> {
    fs::read(path).map_err(|source| EvidenceCliError::Read { path: path.to_path_buf(), source })
}

fn read_certs(path: &Path) -> Result<Vec<Vec<u8>>, EvidenceCliError> {
    load_certificates(&read(path)?)
        .map_err(|e| EvidenceCliError::Certificates { path: path.to_path_buf(), source: e.into() })
}

fn hex_arg<const N: usize>(flag: &'static str, value: &str) -> Result<[u8; N], EvidenceCliError> {
    value
        .parse::<Hex<N>>()
        .map(|h| h.0)
        .map_err(|reason| EvidenceCliError::Argument { flag, reason })
}

fn opt_hex<const N: usize>(
    flag: &'static str,
    value: &Option<String>,
) -> Result<Option<[u8; N]>, EvidenceCliError> {
    value.as_deref().map(|v| hex_arg(flag, v)).transpose()
}

/// The bundle from `--report`, `--cert` and `--chain` (or AMD's built-in chain).
fn assemble(
    args: &CheckArgs,
    cert: &Path,
    report: Vec<u8>,
) -> Result<EvidenceBundle, EvidenceCliError> {
    let mut certs = read_certs(cert)?;
    let vek = certs.remove(0);
    if let Some(chain) = &args.chain {
        certs.extend(read_certs(chain)?);
    }
    if certs.is_empty() {
        return EvidenceBundle::with_builtin_chain(report, vek).map_err(EvidenceCliError::Builtin);
    }
    let root = certs.iter().position(|c| is_self_issued(c)).ok_or_else(|| {
        EvidenceCliError::Chain("the chain has no self-signed root certificate (ARK)".into())
    })?;
    let ark = certs.remove(root);
    // A bundle may hold both the ASK and the ASVK (as trustee's do): keep the leaf's issuer.
    if certs.len() > 1 {
        certs.retain(|c| names_issuer_of(c, &vek));
    }
    if certs.len() > 1 {
        return Err(EvidenceCliError::Chain(format!(
            "expected one intermediate (ASK/ASVK) that issued the certificate, found {}",
            certs.len()
        )));
    }
    Ok(EvidenceBundle { report, vek, ask: certs.pop(), ark, provider: None })
}

const ALL_CHECKS: [Check; 19] = [
    Check::ReportFormat,
    Check::Certificates,
    Check::Root,
    Check::ArkSignature,
    Check::AskSignature,
    Check::VekSignature,
    Check::Product,
    Check::Validity,
    Check::SignerKind,
    Check::TcbBinding,
    Check::ChipIdBinding,
    Check::ReportSignature,
    Check::GuestPolicy,
    Check::Vmpl,
    Check::MinimumTcb,
    Check::Measurement,
    Check::HostData,
    Check::ReportData,
    Check::ReservedBytes,
];

/// The statement stored beside a bundle, and the HOST_DATA and REPORT_DATA it demands.
type FromStatement = Option<(PathBuf, Expected)>;

/// The bundle to check and what it is called, and the expectations its statement sets.
fn evidence_of(
    args: &CheckArgs,
) -> Result<(EvidenceBundle, String, FromStatement), EvidenceCliError> {
    let (Some(path), None) = (&args.bundle, &args.report) else {
        let (report, cert) = (args.report.as_deref(), args.cert.as_deref());
        let (report, cert) = report.zip(cert).ok_or(EvidenceCliError::Argument {
            flag: "report",
            reason: "give --report and --cert, or --bundle".into(),
        })?;
        let bundle = assemble(args, cert, read(report)?)?;
        return Ok((bundle, report.display().to_string(), None));
    };
    let (file, statement) = evidence_report::stored_bundle(path);
    let bundle = serde_json::from_slice(&read(&file)?)
        .map_err(|source| EvidenceCliError::Bundle { path: file.clone(), source })?;
    let expected = match statement {
        None => None,
        Some(st) => {
            let bytes = read(&st)?;
            build_trace::statement::Statement::from_canonical_bytes(&bytes)
                .map_err(|source| EvidenceCliError::Statement { path: st.clone(), source })?;
            let expected = Expected {
                host_data: build_trace::statement::host_data_of(&bytes),
                report_data: Some(build_trace::statement::report_data_of(&bytes)),
            };
            Some((st, expected))
        }
    };
    Ok((bundle, file.display().to_string(), expected))
}

fn check(args: CheckArgs) -> CmdResult {
    let mut policy = match &args.policy {
        Some(path) => {
            let text = String::from_utf8_lossy(&read(path)?).into_owned();
            EvidencePolicy::from_toml(&text).map_err(|e| {
                let source = match trust_policy_hint(&text) {
                    Some(hint) => format!("{hint}: {e}").into(),
                    None => e.into(),
                };
                EvidenceCliError::Policy { path: path.clone(), source }
            })?
        }
        None => EvidencePolicy::default(),
    };
    if let Some(now) = &args.now {
        let t =
            parse_time(now).map_err(|reason| EvidenceCliError::Argument { flag: "now", reason })?;
        policy.check_time = Some(CheckTime(t));
    }
    if let Some(m) = &args.measurement {
        policy.measurements = Some(vec![Hex(hex_arg::<48>("measurement", m)?)].into());
    }
    let (bundle, name, from_statement) = evidence_of(&args)?;
    let (statement, from_statement) = match from_statement {
        Some((p, e)) => (Some(p.display().to_string()), e),
        None => (None, Expected::default()),
    };
    // Values given on the command line win over the statement's.
    let expected = Expected {
        host_data: opt_hex("host-data", &args.host_data)?.or(from_statement.host_data),
        report_data: opt_hex("report-data", &args.report_data)?.or(from_statement.report_data),
    };
    let mut lines = Vec::new();
    let mut observer =
        |check: Check, detail: String| lines.push(evidence_report::passed(check, detail));
    let result = Verifier::new().inspect(
        &bundle,
        &policy,
        &expected,
        SystemTime::now(),
        Some(&mut observer),
    );
    let answer =
        evidence_report::Answer::new(name, statement, lines, &ALL_CHECKS, &bundle, &result);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        if args.policy.is_none() {
            println!("(no --policy: authenticity and the default guest policy rules)");
        }
        answer.print();
    }
    Ok(ExitCode::from(if result.is_ok() { exit::OK } else { exit::REJECTED }))
}

/// The reverse trap: a trust policy (docs/trust-policy.md) where an evidence policy is expected.
fn trust_policy_hint(text: &str) -> Option<&'static str> {
    let doc = text.parse::<toml::Table>().ok()?;
    ["require", "builders", "keys"].iter().any(|k| doc.contains_key(*k)).then_some(
        "this is a trust policy (docs/trust-policy.md); `vouch evidence check --policy` takes an \
         evidence policy (docs/evidence.md): the contents of one [builders.NAME.evidence] table",
    )
}

fn show(path: &Path) -> CmdResult {
    let report = Report::parse(&read(path)?)?;
    use build_trace::evidence::report::ProductHint;
    let layout = match report.product_hint() {
        ProductHint::Known(p) => Some(p.tcb_layout()),
        ProductHint::MilanOrGenoa | ProductHint::Masked => Some(TcbLayout::MilanGenoa),
        ProductHint::UnknownCpu { .. } => None,
    };
    print!("{}", report.describe(layout));
    if report.cpuid() == Some((0, 0, 0)) {
        println!("note: CPUID is zero, as in vouch's SIMULATED reports; only the root that verifies it can tell");
    }
    Ok(ExitCode::SUCCESS)
}

fn simulate(args: SimulateArgs, global: &Global) -> CmdResult {
    let dir = global.state_dir().join(SIMULATED_ROOT_DIR);
    let root = SimulatedRoot::load_or_generate(&dir).map_err(EvidenceCliError::Simulated)?;
    let zero = |o: Option<[u8; 48]>| o.unwrap_or([0; 48]);
    let launch = SimulatedLaunch::new(
        zero(opt_hex("measurement", &args.measurement)?),
        opt_hex("host-data", &args.host_data)?.unwrap_or([0; 32]),
    );
    let report_data = opt_hex("report-data", &args.report_data)?.unwrap_or([0; 64]);
    let report = root.attester(launch).report(&report_data);
    let mut policy = root.allowed_by(EvidencePolicy::default());
    policy.measurements = Some(vec![Hex(launch.measurement)].into());
    fs::create_dir_all(&args.out)
        .map_err(|source| EvidenceCliError::Write { path: args.out.clone(), source })?;
    let policy_text = format!(
        "# SIMULATED root of {}: evidence under it proves nothing about hardware.\n{}",
        dir.display(),
        policy.to_toml()
    );
    for (name, bytes) in [
        ("report.bin", &report[..]),
        ("vcek.der", root.vcek_der()),
        ("ark.der", root.ark_der()),
        ("policy.toml", policy_text.as_bytes()),
    ] {
        let path = args.out.join(name);
        fs::write(&path, bytes).map_err(|source| EvidenceCliError::Write { path, source })?;
    }
    println!("SIMULATED report written to {} (no SEV-SNP hardware involved)", args.out.display());
    println!("simulated root: {} (key id {})", dir.display(), root.key_id());
    Ok(ExitCode::SUCCESS)
}
