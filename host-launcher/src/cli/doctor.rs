//! `vouch doctor`: what this host can do, one line per check with the fix for each failing one
//! (`host_launcher::snp::checks`), and the mode `vouch build` would pick; `--json` prints the
//! same as one JSON object (`checks` with `name`, `status` ok|warn|fail, `detail`, `fix`,
//! `needed`; `mode` snp|kvm|tcg, `evidence` sev-snp|simulated, `mode_refused`, `can_build`,
//! `snp_ready`). Exit 0 when builds can run at all (QEMU, a vsock backend and an
//! image; with `--snp`: every SEV-SNP check too), 1 otherwise.

use std::path::PathBuf;
use std::process::ExitCode;

use host_launcher::snp::checks::{evaluate, Check, Facts, Needed, ProbeConfig, Status};
use host_launcher::vm::{choose_mode, Mode};

use super::{CmdResult, Global};

/// Arguments of `vouch doctor`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image directory (default: $VOUCH_IMAGE_DIR, else $VOUCH_CACHE/image).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Also check this OVMF for the AmdSev kernel-hashes section.
    #[arg(long)]
    pub ovmf: Option<PathBuf>,
    /// QEMU binary.
    #[arg(long, env = "VOUCH_QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// This host's VCEK certificate, when not in the certificate cache.
    #[arg(long, env = "VOUCH_SNP_VCEK")]
    pub snp_vcek: Option<PathBuf>,
    /// Exit 1 unless every SEV-SNP check passes too.
    #[arg(long)]
    pub snp: bool,
    /// Print one JSON object instead of lines.
    #[arg(long)]
    pub json: bool,
}

/// Where distributions put an AmdSev OVMF (Debian sid's and Ubuntu's `ovmf-amdsev`, Fedora).
const OVMF_CANDIDATES: &[&str] = &[
    "/usr/share/ovmf/OVMF.amdsev.fd",
    "/usr/share/OVMF/OVMF.amdsev.fd",
    "/usr/share/edk2/ovmf/OVMF.amdsev.fd",
];

fn mark(s: Status) -> &'static str {
    match s {
        Status::Ok => "[ok]  ",
        Status::Warn => "[warn]",
        Status::Fail => "[no]  ",
    }
}

fn ovmf_file_check(path: &std::path::Path) -> Check {
    let ok = vm_image::measure::ovmf_supports_kernel_hashes(path).unwrap_or(false);
    Check {
        name: "ovmf-file",
        status: if ok { Status::Ok } else { Status::Fail },
        detail: format!(
            "{}: SNP kernel-hashes section: {}",
            path.display(),
            if ok { "yes" } else { "no" }
        ),
        fix: Some(if ok {
            format!("build the image with it: `vouch image build --ovmf {}`", path.display())
        } else {
            "use an OvmfPkg/AmdSev build (scripts/build-ovmf-amdsev.sh)".into()
        }),
        needed: Needed::Snp,
    }
}

/// Whether fixed-output builds can run in their filtered network namespace
/// (`host_launcher::vm::egress`); a warning only, since other builds do not need it.
fn network_check() -> Check {
    use host_launcher::vm::egress::{check_host, EgressError};
    let (status, detail, fix) = match check_host() {
        Ok(_) => {
            (Status::Ok, "fixed-output builds run in a filtered network namespace".into(), None)
        }
        Err(EgressError::Unavailable(why)) => (
            Status::Warn,
            format!("fixed-output builds are refused: {why}"),
            Some("see docs/vm.md (networked VMs); --unfiltered-network is unsafe".into()),
        ),
        Err(e) => (Status::Warn, e.to_string(), None),
    };
    Check { name: "network", status, detail, fix, needed: Needed::Build }
}

/// Run `vouch doctor`.
pub fn run(args: Args, global: &Global) -> CmdResult {
    let image_dir = args.image.clone().unwrap_or_else(vm_image::default_image_dir);
    let state_dir = global.state_dir();
    let facts = Facts::probe(&ProbeConfig {
        qemu: &args.qemu,
        image_dir: &image_dir,
        state_dir: &state_dir,
        vcek: args.snp_vcek.as_deref(),
        manifest: None,
    });
    let mut checks = evaluate(&facts);
    let image_snp = facts.image.1.as_ref().is_ok_and(|m| m.snp.is_some());
    // An AmdSev OVMF to build the image with: the one given, else one at the usual paths.
    let candidate = args.ovmf.clone().or_else(|| {
        (!image_snp)
            .then(|| OVMF_CANDIDATES.iter().map(PathBuf::from).find(|p| p.exists()))
            .flatten()
    });
    if let Some(ovmf) = &candidate {
        checks.push(ovmf_file_check(ovmf));
    }
    checks.push(network_check());
    let snp_ok = checks.iter().all(|c| c.status != Status::Fail);
    let chosen = choose_mode(None, &facts.caps, image_snp).unwrap_or(Mode::Tcg);
    // The launcher would refuse SNP while a check fails (its preflight).
    let refused = chosen == Mode::Snp && !snp_ok;
    let evidence = if chosen == Mode::Snp { "sev-snp" } else { "simulated" };
    let mode = match chosen {
        Mode::Snp if refused => "snp, refused by the preflight until the failing checks pass",
        Mode::Snp => "snp; evidence: sev-snp",
        Mode::Kvm => "kvm; evidence: simulated (no SEV-SNP here)",
        Mode::Tcg => "tcg; evidence: simulated (no SEV-SNP here)",
    };
    let can_build = checks.iter().all(|c| c.needed != Needed::Build || c.status != Status::Fail);
    let ok = can_build && (!args.snp || snp_ok);
    if args.json {
        let v = serde_json::json!({
            "checks": checks,
            "mode": chosen.to_string(),
            "evidence": evidence,
            "mode_refused": refused,
            "can_build": can_build,
            "snp_ready": snp_ok,
        });
        println!("{v}");
    } else {
        for c in &checks {
            let fix = c.fix.as_deref().map(|f| format!("; fix: {f}")).unwrap_or_default();
            println!("{} {:<16} {}{fix}", mark(c.status), c.name, c.detail);
        }
        println!(
            "{} {:<16} `vouch build` would run {mode}",
            mark(if can_build { Status::Ok } else { Status::Fail }),
            "mode"
        );
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
