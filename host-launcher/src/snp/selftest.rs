//! `vouch selftest`: one tiny build end to end on this host, verified as a third party would,
//! with a report to attach to a bug.
//!
//! Algorithm ([`run`]):
//! 1. The host checks of `vouch doctor` ([`super::checks`]), recorded in the report.
//! 2. A tiny derivation: `nix-instantiate` of a one-line busybox builder (the host's static
//!    `/bin/busybox`, added to the Nix store) that writes a line to `$out`.
//! 3. [`crate::build::run_step`] in the mode the launcher picks (SNP where the host and image
//!    can; otherwise KVM or TCG with simulated evidence, which the report says loudly). In SNP
//!    mode the launcher's preflight runs first.
//! 4. Verification as a verifier would do it, apart from the launcher's own acceptance: the
//!    default genuine-AMD policy ([`EvidencePolicy::default`]: AMD's pinned roots, VCEK-signed,
//!    VMPL 0, no debug) with MEASUREMENT pinned to this image's expected SNP measurement,
//!    HOST_DATA and REPORT_DATA recomputed from the statement. Simulated evidence must be
//!    *rejected* by that policy (its root is not AMD's); the self-test fails if it is not.
//!
//! Nothing is published: the output stays in the launcher's staging area and is removed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use build_trace::evidence::{EvidencePolicy, Expected, Hex};
use serde::Serialize;
use vm_image::image::Manifest;

use super::checks::{evaluate, Check, Facts, ProbeConfig, Status};
use crate::build::nix_store::{load_basic_derivation, LocalNixStore, NIX_CONFIG};
use crate::build::{run_step, LauncherConfig, StepRequest};
use crate::core::log::{BuildLog, Progress};

/// Why the self-test could not run or failed.
#[derive(Debug, thiserror::Error)]
pub enum SelftestError {
    /// The tiny derivation could not be made.
    #[error("making the test derivation: {0}")]
    Derivation(String),
    /// The build failed.
    #[error("the test build failed")]
    Build(#[source] crate::build::StepError),
    /// The result did not verify as it must.
    #[error("third-party verification: {0}")]
    Verify(String),
}

/// The self-test's report.
#[derive(Debug, Clone, Serialize)]
pub struct SelftestReport {
    /// `vouch --version`.
    pub vouch: String,
    /// `uname -srm`.
    pub host_kernel: String,
    /// The checks.
    pub checks: Vec<Check>,
    /// The mode the VM ran in.
    pub mode: String,
    /// Real SEV-SNP evidence, or simulated.
    pub simulated: bool,
    /// The test derivation.
    pub drv: String,
    /// Its output path.
    pub output: String,
    /// The verified MEASUREMENT.
    pub measurement: String,
    /// The measurement the image expects in SNP mode, if it has one.
    pub expected_snp_measurement: Option<String>,
    /// The launcher's verification (its root, signer, TCB …).
    pub evidence: String,
    /// The genuine-AMD policy's verdict.
    pub genuine_amd_policy: String,
    /// Seconds from the request to the verified result.
    pub seconds: f64,
}

struct Quiet;

impl BuildLog for Quiet {
    fn output(&mut self, _data: &[u8]) {}
    fn progress(&mut self, event: &Progress) {
        tracing::info!("selftest: {event:?}");
    }
}

fn text(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Write the test expression into `work` and instantiate it; returns the `.drv` path.
pub fn instantiate(work: &Path) -> Result<String, SelftestError> {
    let d = |e: String| SelftestError::Derivation(e);
    let bb = work.join("bb");
    std::fs::create_dir_all(&bb).map_err(|e| d(e.to_string()))?;
    let busybox = Path::new("/bin/busybox");
    std::fs::copy(busybox, bb.join("busybox")).map_err(|e| {
        d(format!("{}: {e} (install busybox-static: scripts/setup-host.sh)", busybox.display()))
    })?;
    let expr = work.join("selftest.nix");
    std::fs::write(
        &expr,
        r#"let bb = builtins.path { path = ./bb; name = "busybox"; }; in
derivation {
  name = "vouch-selftest";
  system = "x86_64-linux";
  builder = "${bb}/busybox";
  args = [ "sh" "-c" "echo 'vouch selftest: built in a VM' > $out" ];
}
"#,
    )
    .map_err(|e| d(e.to_string()))?;
    text(Command::new("nix-instantiate").env("NIX_CONFIG", NIX_CONFIG).arg(&expr)).map_err(d)
}

fn genuine_amd_policy(manifest: &Manifest) -> EvidencePolicy {
    // Without an expected SNP measurement nothing may pass (an empty list accepts nothing).
    let measurements = manifest
        .snp
        .as_ref()
        .and_then(|s| s.expected_measurement.parse::<Hex<48>>().ok())
        .map(|m| vec![m])
        .unwrap_or_default();
    EvidencePolicy { measurements: Some(measurements.into()), ..EvidencePolicy::default() }
}

/// Run the self-test (see the module doc) with `cfg`, working in `work`.
pub fn run(cfg: &LauncherConfig, work: &Path) -> Result<SelftestReport, SelftestError> {
    let probe = ProbeConfig {
        qemu: &cfg.qemu,
        image_dir: &cfg.image_dir,
        state_dir: &cfg.state_dir,
        vcek: cfg.snp_vcek.as_deref(),
        manifest: None,
    };
    let facts = Facts::probe(&probe);
    let checks = evaluate(&facts);
    let manifest = facts.image.1.clone().map_err(SelftestError::Derivation)?;
    let drv_path = instantiate(work)?;
    let (drv_store_path, drv) =
        load_basic_derivation(&drv_path).map_err(|e| SelftestError::Derivation(e.to_string()))?;
    let req = StepRequest {
        drv_path: drv_store_path,
        drv,
        outputs: Default::default(),
        limits: Default::default(),
        // Input-addressed: the rule does not apply.
        ca_rule: build_trace::job::CaRule::SelfRefPositions,
        network: false,
        job_id: None,
    };
    let t = Instant::now();
    let outcome = run_step(req, &LocalNixStore, &mut Quiet, cfg).map_err(SelftestError::Build)?;
    let seconds = t.elapsed().as_secs_f64();

    let policy = genuine_amd_policy(&manifest);
    let expected = Expected {
        host_data: Some(outcome.verified.host_data.0),
        report_data: Some(
            outcome.statement.report_data().map_err(|e| SelftestError::Verify(e.to_string()))?,
        ),
    };
    let verdict =
        build_trace::evidence::Verifier::global().verify(&outcome.evidence, &policy, &expected);
    let simulated = outcome.verified.is_simulated();
    let genuine_amd_policy = match (simulated, verdict) {
        (false, Ok(v)) => format!("accepted: {} with the image's expected measurement", v.root),
        (false, Err(e)) => return Err(SelftestError::Verify(build_trace::error_chain(&e))),
        (true, Err(e)) => format!(
            "rejected, as simulated evidence must be ({}: {})",
            e.check().name(),
            build_trace::error_chain(&e)
        ),
        (true, Ok(_)) => {
            return Err(SelftestError::Verify(
                "the genuine-AMD policy accepted SIMULATED evidence".into(),
            ))
        }
    };
    let output =
        outcome.outputs.values().map(|o| o.info.path.to_string()).collect::<Vec<_>>().join(" ");
    let uname = text(Command::new("uname").arg("-srm")).unwrap_or_else(|e| e);
    Ok(SelftestReport {
        vouch: format!("vouch {}", env!("CARGO_PKG_VERSION")),
        host_kernel: uname,
        checks,
        mode: outcome.mode.to_string(),
        simulated,
        drv: drv_path,
        output,
        measurement: outcome.verified.measurement.to_string(),
        expected_snp_measurement: manifest.snp.as_ref().map(|s| s.expected_measurement.clone()),
        evidence: outcome.verified.to_string(),
        genuine_amd_policy,
        seconds,
    })
}

impl SelftestReport {
    /// The plain-text report.
    pub fn write_text(&self, w: &mut dyn Write) -> std::io::Result<()> {
        writeln!(w, "vouch selftest report")?;
        writeln!(w, "=====================")?;
        if self.simulated {
            writeln!(
                w,
                "SIMULATED: this host cannot run SEV-SNP guests (mode {}); the same flow ran with \
                 simulated evidence, which proves nothing about hardware.",
                self.mode
            )?;
        } else {
            writeln!(w, "SEV-SNP: the build ran in an SNP guest and its AMD evidence verified.")?;
        }
        writeln!(w, "{}; host kernel {}", self.vouch, self.host_kernel)?;
        writeln!(w, "\nhost checks:")?;
        for c in &self.checks {
            let mark = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "no  ",
            };
            writeln!(w, "  [{mark}] {:<16} {}", c.name, c.detail)?;
        }
        writeln!(
            w,
            "\nbuild: {} -> {} in {:.1} s ({} mode)",
            self.drv, self.output, self.seconds, self.mode
        )?;
        writeln!(w, "\nevidence as the launcher verified it:")?;
        for l in self.evidence.lines() {
            writeln!(w, "  {l}")?;
        }
        if let Some(m) = &self.expected_snp_measurement {
            writeln!(w, "image's expected SNP measurement: {m}")?;
        } else {
            writeln!(w, "image's expected SNP measurement: none (built without an AmdSev OVMF)")?;
        }
        writeln!(w, "genuine-AMD policy: {}", self.genuine_amd_policy)?;
        Ok(())
    }
}

/// Where the self-test works: a fresh directory under `state_dir/tmp`.
pub fn work_dir(state_dir: &Path) -> std::io::Result<tempfile::TempDir> {
    let base: PathBuf = state_dir.join("tmp");
    std::fs::create_dir_all(&base)?;
    tempfile::Builder::new().prefix("selftest-").tempdir_in(base)
}
