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

use super::{CmdResult, Global};

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
    /// The raw 1184-byte report.
    #[arg(long)]
    pub report: PathBuf,
    /// The VCEK or VLEK (DER or PEM). A PEM may carry the ASK/ASVK and ARK after it.
    #[arg(long)]
    pub cert: PathBuf,
    /// ASK/ASVK and ARK (PEM bundle in any order, or one DER ARK for a simulated root).
    /// Default: AMD's built-in chain of the product the report and certificate name.
    #[arg(long)]
    pub chain: Option<PathBuf>,
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
fn assemble(args: &CheckArgs, report: Vec<u8>) -> Result<EvidenceBundle, EvidenceCliError> {
    let mut certs = read_certs(&args.cert)?;
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

fn check(args: CheckArgs) -> CmdResult {
    let report = read(&args.report)?;
    let mut policy = match &args.policy {
        Some(path) => {
            let text = String::from_utf8_lossy(&read(path)?).into_owned();
            EvidencePolicy::from_toml(&text)
                .map_err(|e| EvidenceCliError::Policy { path: path.clone(), source: e.into() })?
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
    let expected = Expected {
        host_data: opt_hex("host-data", &args.host_data)?,
        report_data: opt_hex("report-data", &args.report_data)?,
    };
    let bundle = assemble(&args, report)?;

    println!("checking {}", args.report.display());
    if args.policy.is_none() {
        println!("(no --policy: authenticity and the default guest policy rules)");
    }
    let mut passed = Vec::new();
    let mut observer = |check: Check, detail: String| {
        println!("  [ ok ] {:<24} {detail}", check.name());
        passed.push(check);
    };
    let result = Verifier::new().inspect(
        &bundle,
        &policy,
        &expected,
        SystemTime::now(),
        Some(&mut observer),
    );
    if let Err(e) = &result {
        println!("  [FAIL] {:<24} {e}", e.check().name());
        let failed = e.check();
        for c in ALL_CHECKS.iter().filter(|c| !passed.contains(c) && **c != failed) {
            println!("  [ -- ] {:<24} not reached", c.name());
        }
    }
    if let Ok(parsed) = Report::parse(&bundle.report) {
        println!("MEASUREMENT: {}", hex::encode(parsed.measurement()));
        println!("HOST_DATA:   {}", hex::encode(parsed.host_data()));
        println!("REPORT_DATA: {}", hex::encode(parsed.report_data()));
    }
    match result {
        Ok(v) if v.is_simulated() => {
            println!(
                "result: PASS: SIMULATED evidence ({}); it proves nothing about hardware",
                v.root
            );
            Ok(ExitCode::SUCCESS)
        }
        Ok(v) => {
            println!("result: PASS: AMD SEV-SNP evidence, {}, signed by {}", v.root, v.signer);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("result: FAIL ({}): {e}", e.check().name());
            Ok(ExitCode::from(1))
        }
    }
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
