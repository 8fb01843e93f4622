//! `vouch policy init`: write a ready, commented trust policy for an image (its manifest's
//! measurements) and, on a simulated host, this state directory's simulated root.
//! `vouch policy check P.toml`: validate a trust policy and explain it
//! ([`super::policy_explain`]): exit 0 valid, 1 invalid (what is wrong and where each misplaced
//! key belongs, on stdout), 2 unreadable.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use build_trace::evidence::{SimulatedRoot, SIMULATED_ROOT_DIR};
use build_trace::trust::{PreparedPolicy, TrustPolicy};
use vm_image::image::{files, Manifest};

use super::policy_explain::{self, Problem};
use super::{exit, CmdResult, Global};

/// Subcommands of `vouch policy`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Write a ready, commented trust policy that accepts builds in an image's guests.
    Init(InitArgs),
    /// Validate a trust policy and explain it: which signers could satisfy it (exit 0 valid,
    /// 1 invalid, 2 unreadable).
    Check(CheckArgs),
}

/// Arguments of `vouch policy init`.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Image directory whose `manifest.json` names the measurements to allow (default:
    /// $VOUCH_IMAGE_DIR, else $VOUCH_CACHE/image).
    #[arg(long, conflicts_with = "manifest")]
    pub image: Option<PathBuf>,
    /// The image manifest itself.
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Accept this state directory's SIMULATED root (a host without SEV-SNP) and the image's
    /// simulated measurement, instead of genuine AMD evidence.
    #[arg(long)]
    pub simulated: bool,
    /// AMD products whose evidence counts (genuine evidence only). Milan is left out by
    /// default: see the Milan caveat in docs/evidence.md.
    #[arg(long, value_delimiter = ',', default_value = "Genoa,Turin")]
    pub products: Vec<String>,
    /// Write the policy here instead of stdout (refuses to replace a file).
    #[arg(long, short, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// Arguments of `vouch policy check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The trust policy (TOML).
    pub policy: PathBuf,
    /// Print the verdict and explanation as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Why `vouch policy` could not do its work (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum PolicyCmdError {
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
    #[error("{0} exists: not replacing it")]
    Exists(PathBuf),
    #[error("{0}: not an image manifest")]
    Manifest(PathBuf, #[source] serde_json::Error),
    #[error(
        "{0}: the image has no SEV-SNP measurement (built without --ovmf), so no genuine \
         evidence can match it; give --simulated for this host's simulated evidence, or build \
         the image with an AmdSev OVMF"
    )]
    NoSnpMeasurement(PathBuf),
    #[error("no simulated root in {0} (a simulated host makes it on its first build, or run `vouch evidence simulate`)")]
    NoSimulatedRoot(PathBuf, #[source] build_trace::evidence::SimulatedError),
    #[error("--products: {0:?} is not Milan, Genoa or Turin")]
    Product(String),
    #[error("the written policy does not check (a bug in `vouch policy init`)")]
    Written(#[source] build_trace::trust::PolicyError),
    #[error("{path}: {problems}")]
    Misplaced {
        path: PathBuf,
        problems: String,
        #[source]
        source: Box<build_trace::trust::PolicyError>,
    },
}

/// Load a trust policy (as `vouch verify --policy` does); when it does not load, the error says
/// where each misplaced key belongs (an evidence policy given here is recognised).
pub fn load(path: &Path) -> Result<TrustPolicy, super::CmdError> {
    let err = match TrustPolicy::load(path) {
        Ok(p) => return Ok(p),
        Err(e) => e,
    };
    let doc = std::fs::read_to_string(path).ok().and_then(|t| t.parse::<toml::Table>().ok());
    let problems = doc.map(|d| policy_explain::diagnose(&d)).unwrap_or_default();
    if problems.is_empty() {
        return Err(err.into());
    }
    let problems =
        problems.iter().map(|p| format!("{}: {}", p.at, p.message)).collect::<Vec<_>>().join("; ");
    Err(PolicyCmdError::Misplaced { path: path.to_owned(), problems, source: Box::new(err) }.into())
}

pub fn run(cmd: Command, global: &Global) -> CmdResult {
    match cmd {
        Command::Init(args) => init(args, global),
        Command::Check(args) => check(&args),
    }
}

fn init(args: InitArgs, global: &Global) -> CmdResult {
    let manifest_path = match (&args.manifest, &args.image) {
        (Some(m), _) => m.clone(),
        (None, Some(d)) => d.join(files::MANIFEST),
        (None, None) => vm_image::default_image_dir().join(files::MANIFEST),
    };
    let manifest_path = std::path::absolute(&manifest_path)
        .map_err(|source| PolicyCmdError::Read { path: manifest_path.clone(), source })?;
    let bytes = std::fs::read(&manifest_path)
        .map_err(|source| PolicyCmdError::Read { path: manifest_path.clone(), source })?;
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| PolicyCmdError::Manifest(manifest_path.clone(), e))?;
    let text = if args.simulated {
        let root_dir = global.state_dir().join(SIMULATED_ROOT_DIR);
        let root = SimulatedRoot::load(&root_dir)
            .map_err(|e| PolicyCmdError::NoSimulatedRoot(root_dir.clone(), e))?;
        simulated_policy(&manifest_path, &manifest, &root_dir, &root.key_id().to_string())
    } else {
        let snp = manifest
            .snp
            .as_ref()
            .ok_or_else(|| PolicyCmdError::NoSnpMeasurement(manifest_path.clone()))?;
        for p in &args.products {
            if !["Milan", "Genoa", "Turin"].contains(&p.as_str()) {
                return Err(PolicyCmdError::Product(p.clone()).into());
            }
        }
        genuine_policy(&manifest_path, &launch_lines(snp), &args.products)
    };
    // Ready means: it parses, checks, and its manifest gives measurements.
    TrustPolicy::from_toml(&text).and_then(|p| p.prepare()).map_err(PolicyCmdError::Written)?;
    match &args.out {
        None => print!("{text}"),
        Some(out) => {
            write_new(out, &text)?;
            eprintln!(
                "trust policy written to {} (check it with `vouch policy check {}`)",
                out.display(),
                out.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Write `text` to a file that must not exist yet.
fn write_new(path: &Path, text: &str) -> Result<(), PolicyCmdError> {
    use std::io::Write;
    let mut f =
        std::fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(|source| {
            match source.kind() {
                std::io::ErrorKind::AlreadyExists => PolicyCmdError::Exists(path.to_owned()),
                _ => PolicyCmdError::Write { path: path.to_owned(), source },
            }
        })?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|source| PolicyCmdError::Write { path: path.to_owned(), source })
}

/// A path as a TOML string literal.
fn toml_string(path: &Path) -> String {
    toml::Value::String(path.display().to_string()).to_string()
}

const FOOTER: &str = "\n[fixed_output]\n# md5 and sha1 fixed-output derivations are refused; set true to accept them.\nallow_weak_hashes = false\n";

/// One comment line per launch measurement of an image: the default launch's, then each other
/// VM shape (vCPU count and model) it was measured for.
fn launch_lines(snp: &vm_image::image::SnpLaunch) -> String {
    let p = &snp.params;
    let mut lines = vec![format!(
        "#   {} vCPU {} (default): {}",
        p.vcpus, p.vcpu_type, snp.expected_measurement
    )];
    for shape in &snp.measurements {
        if shape.measurement != snp.expected_measurement {
            lines.push(format!(
                "#   {} vCPU {}: {}",
                shape.vcpus, shape.vcpu_type, shape.measurement
            ));
        }
    }
    lines.join("\n")
}

fn genuine_policy(manifest: &Path, launches: &str, products: &[String]) -> String {
    let mut s = String::new();
    let quoted: Vec<String> = products.iter().map(|p| format!("\"{p}\"")).collect();
    let _ = write!(
        s,
        "# vouch trust policy, written by `vouch policy init` (format: docs/trust-policy.md).\n\
         # Check or explain it with `vouch policy check FILE`; use it with `vouch verify --policy FILE`.\n\
         #\n\
         # Every step of a closure must be vouched for by genuine AMD SEV-SNP evidence from a guest\n\
         # that runs the image below. Top-level keys must come before the first [table].\n\
         require = \"builder:image\"\n\
         \n\
         [builders.image]\n\
         # The image's manifest: its SEV-SNP launch measurements, one per VM shape it was\n\
         # measured for, are allowed (rebuilding the image changes them: run `vouch policy init`\n\
         # again):\n\
         {launches}\n\
         image_manifests = [{}]\n\
         \n\
         [builders.image.evidence]\n\
         # AMD roots that may vouch. Milan: see the Milan caveat in docs/evidence.md before adding\n\
         # it (`--products Milan,Genoa,Turin`).\n\
         products = [{}]\n\
         # Reports signed by a VLEK (a cloud provider's key, not the chip's) are refused.\n\
         allow_vlek = false\n\
         # The guest's VMPL (vouch's agent runs at VMPL 0).\n\
         vmpl = 0\n\
         # A minimum firmware TCB per product, after AMD's security bulletins, e.g.:\n\
         # [builders.image.evidence.min_tcb.Genoa]\n\
         # bootloader = 9\n\
         # tee = 0\n\
         # snp = 21\n\
         # microcode = 72\n",
        toml_string(manifest),
        quoted.join(", ")
    );
    s.push_str(FOOTER);
    s
}

fn simulated_policy(manifest: &Path, m: &Manifest, root_dir: &Path, key_id: &str) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "# vouch trust policy, written by `vouch policy init --simulated` (format:\n\
         # docs/trust-policy.md). Check or explain it with `vouch policy check FILE`.\n\
         #\n\
         # SIMULATED evidence: this accepts builds vouched for by the simulated SNP root of one\n\
         # development host, which proves nothing about hardware. Never use it to accept builds\n\
         # from anyone else. Top-level keys must come before the first [table].\n\
         require = \"builder:dev-simulated\"\n\
         \n\
         [builders.dev-simulated]\n\
         # The image's manifest: its simulated measurement\n\
         # {}\n\
         # is allowed, because the rule names a simulated root.\n\
         image_manifests = [{}]\n\
         \n\
         [builders.dev-simulated.evidence]\n\
         # The simulated root of {} (`vouch key show` prints its id).\n\
         simulated_roots = [\"{key_id}\"]\n\
         # No AMD root: genuine evidence of this image is another policy (`vouch policy init`).\n\
         products = []\n\
         vmpl = 0\n",
        m.simulated_measurement,
        toml_string(manifest),
        root_dir.display()
    );
    s.push_str(FOOTER);
    s
}

/// The verdict of `vouch policy check`, as `--json` prints it.
#[derive(Debug, serde::Serialize)]
struct Verdict {
    policy: String,
    valid: bool,
    problems: Vec<Problem>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    requires: Option<String>,
    signer_sets: Vec<policy_explain::SignerSet>,
    more_signer_sets: bool,
    keys: std::collections::BTreeMap<String, String>,
    builders: std::collections::BTreeMap<String, policy_explain::RuleSummary>,
    unused: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log: Option<String>,
}

fn check(args: &CheckArgs) -> CmdResult {
    let path = &args.policy;
    let text = std::fs::read_to_string(path)
        .map_err(|source| PolicyCmdError::Read { path: path.clone(), source })?;
    let mut v = Verdict {
        policy: path.display().to_string(),
        valid: false,
        problems: Vec::new(),
        error: None,
        requires: None,
        signer_sets: Vec::new(),
        more_signer_sets: false,
        keys: Default::default(),
        builders: Default::default(),
        unused: Vec::new(),
        log: None,
    };
    match text.parse::<toml::Table>() {
        Err(e) => v.error = Some(format!("not TOML: {e}")),
        Ok(doc) => v.problems = policy_explain::diagnose(&doc),
    }
    if v.error.is_none() {
        // `load` resolves relative image manifests; `prepare` reads them.
        match TrustPolicy::load(path).and_then(|p| p.prepare()) {
            Err(e) => v.error = Some(build_trace::error_chain(&e)),
            Ok(p) => explain(&p, &mut v),
        }
    }
    v.valid = v.error.is_none() && v.problems.is_empty();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_verdict(&v);
    }
    Ok(ExitCode::from(if v.valid { exit::OK } else { exit::REJECTED }))
}

fn explain(prepared: &PreparedPolicy, v: &mut Verdict) {
    let p = &prepared.policy;
    v.requires = Some(policy_explain::requirement_words(&p.require));
    let mut sets = policy_explain::satisfying_sets(&p.require);
    v.more_signer_sets = sets.len() > 16;
    sets.truncate(16);
    v.signer_sets = sets;
    v.keys = p.keys.clone();
    for (name, rule) in &p.builders {
        let mut summary = policy_explain::summarise(rule);
        // With the manifests' measurements.
        if let Some((_, ev)) = prepared.rules.iter().find(|(n, _)| n == name) {
            summary.measurements = policy_explain::pinned(ev);
        }
        v.builders.insert(name.clone(), summary);
    }
    v.unused = policy_explain::unused(p);
    v.log = p.log.as_ref().map(|l| {
        format!(
            "a store's traces count only through its transparency log ({} log key(s), {} of {} witnesses must cosign)",
            l.keys.len(),
            l.quorum,
            l.witnesses.len()
        )
    });
}

fn print_verdict(v: &Verdict) {
    for pr in &v.problems {
        println!("problem: {}: {}", pr.at, pr.message);
    }
    if let Some(e) = &v.error {
        println!("error: {e}");
    }
    if !v.valid {
        println!("INVALID trust policy {} (docs/trust-policy.md)", v.policy);
        return;
    }
    println!("valid trust policy {}", v.policy);
    println!("every step needs: {}", v.requires.as_deref().unwrap_or_default());
    println!("signers that could satisfy it (any one line, per step):");
    for s in &v.signer_sets {
        println!("  - {}", s.join(" + "));
    }
    if v.more_signer_sets {
        println!("  - … (more combinations)");
    }
    for (name, key) in &v.keys {
        println!("key {name}: {key}");
    }
    for (name, r) in &v.builders {
        println!("builder rule {name}: evidence rooted in {}", r.roots.join(", "));
        println!(
            "  VLEK {}, VMPL {}, {}, image manifests: {}",
            if r.allow_vlek { "accepted" } else { "refused" },
            r.vmpl,
            r.measurements,
            if r.image_manifests.is_empty() { "none".into() } else { r.image_manifests.join(", ") }
        );
        for w in &r.warnings {
            println!("  warning: {w}");
        }
    }
    for u in &v.unused {
        println!("note: {u} is defined but the requirement never names it");
    }
    if let Some(l) = &v.log {
        println!("log: {l}");
    }
}
