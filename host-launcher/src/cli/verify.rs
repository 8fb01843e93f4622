//! `vouch verify`: verify a derivation's closure against trace stores under a trust policy.
//!
//! Exit codes: 0 verified, 1 not verified (the first broken link is printed), 2 error (bad
//! arguments, unreadable files). The algorithm is `build_trace::verify`'s. With a `[log]`
//! policy, a store's entries count only when its transparency log includes them, through a
//! checkpoint with the witness quorum that is consistent with the ones seen before
//! (`<state dir>/tlog/`); an inconsistent one is "not verified".

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use build_trace::evidence::Verifier as EvidenceVerifier;
use build_trace::store::TraceSource;
use build_trace::tlog::proof::CheckpointHistory;
use build_trace::tlog::source::LoggedTraces;
use build_trace::tlog::{LogView, TileSource, TlogError};
use build_trace::trust::{LogPolicy, TrustPolicy};
use build_trace::verify::{BrokenLink, ClosureVerifier, DrvSet, Outcome, Request};
use nix_formats::StorePath;

use super::target::{realisation_info, Lookup};
use super::{CmdResult, Global};

/// Arguments of `vouch verify`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to verify: a derivation (unresolved, or resolved), an output path, or `./result`
    /// or any symlink into the store (see `docs/cli.md`, "Arguments"). From an output, the
    /// derivation is a hint that the verification checks: the output must be one it accepts.
    pub drv: String,
    /// The Nix store to ask for derivers and realisations (Nix's `--store`; default: Nix's).
    #[arg(long, value_name = "STORE")]
    pub nix_store: Option<String>,
    /// Trust policy (TOML, see docs/trust-policy.md). Default: genuine AMD SEV-SNP evidence
    /// of Genoa or Turin at the minimum TCB AMD's bulletins require, launched with a guest
    /// image of `--image-manifest` (simulated evidence is rejected).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Image manifest (`manifest.json` of `vouch image build`) whose launch measurements the
    /// default policy pins (repeatable). Default: the one in the default image directory
    /// ($VOUCH_IMAGE_DIR, else $VOUCH_CACHE/image); without any, the default policy refuses.
    #[arg(long = "image-manifest", value_name = "FILE", conflicts_with = "policy")]
    pub image_manifests: Vec<PathBuf>,
    /// Trace store to look traces up in (repeatable): a directory, `file://DIR`, or
    /// `http(s)://HOST[:PORT][/prefix]` (`vouch serve`, or any server of a trace store).
    /// Default: `<state dir>/cache`.
    #[arg(long = "traces", value_name = "DIR|URL")]
    pub traces: Vec<String>,
    /// How remote trace stores are read.
    #[command(flatten)]
    pub fetch: super::sources::FetchArgs,
    /// Directory holding the `.drv` files of the closure (those it lacks are fetched from the
    /// remote trace stores, each checked against its path).
    #[arg(long, value_name = "DIR", default_value = "/nix/store")]
    pub drv_dir: PathBuf,
    /// Read the derivation graph from `nix show-derivation -r` JSON (a file, or `-` for stdin)
    /// instead of `.drv` files.
    #[arg(long, value_name = "FILE", conflicts_with = "drv_dir")]
    pub show_derivation: Option<PathBuf>,
    /// Output paths that must be exactly what the policy accepts (repeatable).
    #[arg(long = "expect", value_name = "PATH")]
    pub expect: Vec<StorePath>,
    /// Expect the target's outputs registered in the local Nix store (`nix realisation info`
    /// for content-addressed outputs, the derivation's own paths otherwise; Nix 2.8 and later).
    #[arg(long, conflicts_with = "expect")]
    pub expect_local: bool,
    /// Also check the bytes: the NAR hash of each target output in the local store directory
    /// (`--store-dir`) must be one the policy accepted (implied by --expect-local).
    #[arg(long)]
    pub check_local: bool,
    /// The store directory `--check-local` reads.
    #[arg(long, value_name = "DIR", default_value = "/nix/store")]
    pub store_dir: PathBuf,
    /// Also check the bytes this binary cache (`http(s)://` or `file://`) serves for each target
    /// output: their NAR hash must be one the policy accepted (repeatable).
    #[arg(long = "check-cache", value_name = "URL")]
    pub check_caches: Vec<String>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Threads that check trace entries (statements, evidence, signatures) in parallel.
    /// Default: the available parallelism. The verdict does not depend on it.
    #[arg(long, short = 'j', value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub jobs: Option<u16>,
    /// Write the checked closure as a graph (`dot`, or `svg` through Graphviz): steps, resolved
    /// derivations, evidence kind, the broken link in red.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub graph: Option<super::verify_graph::Format>,
    /// Where to write the graph (default: stdout, in place of the verdict's text).
    #[arg(long, value_name = "FILE", requires = "graph")]
    pub graph_out: Option<PathBuf>,
    /// Print, instead of the verdict, the smallest set of steps to rebuild so that the closure
    /// verifies under the policy (docs/trust-policy.md, "Trust migration"; `vouch rebuild`
    /// follows it). Exit 0 when a plan was made, 1 when rebuilding cannot make it verify.
    #[arg(long, conflicts_with_all = ["expect", "expect_local", "check_local", "check_caches", "graph"])]
    pub plan_rebuild: bool,
}

/// Why `vouch verify` could not reach a verdict.
#[derive(Debug, thiserror::Error)]
pub enum VerifyCmdError {
    /// No derivation could be found for the output given.
    #[error("no derivation known for {0}: it is registered in neither the local Nix database nor the trace stores' index (give its .drv)")]
    NoDerivation(String),
    /// The JSON could not be read.
    #[error("cannot read {0}")]
    Read(String, #[source] std::io::Error),
    /// `nix realisation info` failed.
    #[error("cannot ask the local Nix store for the outputs of {drv}: {problem}")]
    Local {
        /// The target.
        drv: String,
        /// What went wrong.
        problem: String,
    },
}

pub fn run(args: Args, global: &Global) -> CmdResult {
    // A policy the user gave comes first: a wrong one is theirs to fix whatever the argument
    // names. The default policy (which needs an image manifest) waits for a valid argument.
    let given = args.policy.as_deref().map(super::policy::load).transpose()?;
    let stores = super::sources::open_all(&args.traces, &args.fetch, global)?;
    let lookup =
        Lookup { drv_dir: &args.drv_dir, nix_store: args.nix_store.as_deref(), traces: &stores };
    let named = super::target::resolve(&args.drv, &lookup)?;
    if named.candidates.is_empty() {
        return Err(VerifyCmdError::NoDerivation(named.path.to_string()).into());
    }
    let policy = match given {
        Some(p) => p,
        None => load_policy(None, &args.image_manifests)?,
    };
    let prepared = policy.prepare()?;
    // A policy that accepts any guest says so before anything else.
    let banner = prepared.any_guest_banner();
    if let Some(b) = &banner {
        if args.json {
            eprintln!("{b}");
        } else {
            println!("{b}");
        }
    }
    let shown = match &args.show_derivation {
        Some(p) => Some(DrvSet::from_show_derivation(&read_input(p)?)?),
        None => None,
    };
    // With a `[log]` policy, each store counts only through its transparency log.
    let log_srcs: Vec<Box<dyn TileSource>> = stores.iter().map(|s| s.tiles()).collect();
    let logged = match &policy.log {
        Some(log) => match logged_sources(log, &stores, &log_srcs, global)? {
            Some(logged) => Some(logged),
            None => return Ok(ExitCode::from(1)),
        },
        None => None,
    };
    let evidence = EvidenceVerifier::global();
    let verifier = ClosureVerifier {
        policy: &prepared,
        sources: match &logged {
            Some(logged) => logged.iter().map(|s| s as &dyn TraceSource).collect(),
            None => stores.iter().map(|s| s as &dyn TraceSource).collect(),
        },
        evidence,
        now: SystemTime::now(),
        threads: args
            .jobs
            .map(usize::from)
            .unwrap_or_else(|| std::thread::available_parallelism().map(usize::from).unwrap_or(1)),
    };
    if args.plan_rebuild {
        let shown = shown.as_ref();
        return super::rebuild::plan(&args, &verifier, &stores, shown, &named, banner.as_deref());
    }
    let (target, drvs, outcome) = choose(&args, &verifier, &stores, shown.as_ref(), &named)?;
    print_verdict(&args, &named, banner.as_deref(), &target, &drvs, &outcome)?;
    Ok(match outcome {
        Outcome::Verified(_) => ExitCode::SUCCESS,
        Outcome::NotVerified(_) => ExitCode::from(1),
    })
}

/// Each of `stores` through its transparency log, under `log`: its checkpoint checked with the
/// witness quorum and against those seen before (`<state dir>/tlog/`). `None` when one is
/// inconsistent or unacceptable, which is printed as the verdict ("not verified").
fn logged_sources<'a>(
    log: &LogPolicy,
    stores: &'a [build_trace::source::Traces],
    log_srcs: &'a [Box<dyn TileSource>],
    global: &Global,
) -> Result<Option<Vec<LoggedTraces<'a>>>, super::CmdError> {
    let trust = log.trust()?;
    let history = CheckpointHistory::new(&global.state_dir().join("tlog"));
    let mut logged = Vec::new();
    for (store, src) in stores.iter().zip(log_srcs) {
        let checked = LogView::open(src.as_ref(), &trust)
            .and_then(|v| history.accept(&v, &trust).map(|()| v));
        let view = match checked {
            Ok(v) => v,
            Err(e @ (TlogError::Inconsistent { .. } | TlogError::Checkpoint(_))) => {
                println!("not verified: {}", build_trace::error_chain(&e));
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let cp = view.checkpoint();
        tracing::info!(origin = %cp.origin, size = cp.size, witnesses = ?cp.cosigned_by.keys(), "log checkpoint");
        logged.push(LoggedTraces::new(store, view));
    }
    Ok(Some(logged))
}

/// Each candidate derivation in turn (one, unless only a trace store's index knew the output):
/// the first that verifies, else the first verdict; its graph with it.
fn choose(
    args: &Args,
    verifier: &ClosureVerifier<'_>,
    stores: &[build_trace::source::Traces],
    shown: Option<&DrvSet>,
    named: &super::target::Target,
) -> Result<(StorePath, DrvSet, Outcome), super::CmdError> {
    let mut chosen: Option<(StorePath, DrvSet, Outcome)> = None;
    for cand in &named.candidates {
        let several = named.candidates.len() > 1;
        let Some(drvs) = candidate_graph(&args.drv_dir, stores, shown, cand, several)? else {
            continue;
        };
        let outcome = verify_one(args, verifier, &drvs, cand, named)?;
        let ok = matches!(outcome, Outcome::Verified(_));
        if ok || chosen.is_none() {
            chosen = Some((cand.clone(), drvs, outcome));
        }
        if ok {
            break;
        }
    }
    chosen.ok_or_else(|| VerifyCmdError::NoDerivation(named.path.to_string()).into())
}

/// The verdict on stdout (text or JSON), and the graph where one was asked for (on stdout, it
/// replaces the verdict, which is then only the exit code).
fn print_verdict(
    args: &Args,
    named: &super::target::Target,
    banner: Option<&str>,
    target: &StorePath,
    drvs: &DrvSet,
    outcome: &Outcome,
) -> Result<(), super::CmdError> {
    let graph_on_stdout = args.graph.is_some() && args.graph_out.is_none();
    if !args.json && !graph_on_stdout {
        println!("derivation {target} ({})", named.found_by);
    }
    if let Some(format) = args.graph {
        super::verify_graph::write(format, args.graph_out.as_ref(), drvs, target, outcome)?;
    }
    if graph_on_stdout {
        // The graph took stdout; the verdict is the exit code.
    } else if args.json {
        let mut v = serde_json::to_value(outcome)?;
        if let Some(map) = v.as_object_mut() {
            if let Some(b) = banner {
                map.insert("any_guest".into(), serde_json::Value::String(b.to_owned()));
            }
            map.insert("derivation".into(), target.to_string().into());
            map.insert("found_by".into(), serde_json::to_value(named.found_by)?);
            map.insert("argument".into(), named.given.clone().into());
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        match outcome {
            Outcome::Verified(v) => print!("{v}"),
            Outcome::NotVerified(b) => print!("{b}"),
        }
    }
    Ok(())
}

/// The derivation graph of candidate `cand`: `shown`, else read from `drv_dir` (what it lacks
/// fetched from the remote stores among `stores`, checked). `None` when it does not load and
/// there are `several` candidates (a same-named candidate whose graph is incomplete here is not
/// the one).
pub(super) fn candidate_graph(
    drv_dir: &Path,
    stores: &[build_trace::source::Traces],
    shown: Option<&DrvSet>,
    cand: &StorePath,
    several: bool,
) -> Result<Option<DrvSet>, super::CmdError> {
    match shown {
        Some(set) => Ok(Some(set.clone())),
        None => match super::sources::drv_set(cand, drv_dir, stores) {
            Ok(d) => Ok(Some(d)),
            Err(e) if several => {
                tracing::info!(candidate = %cand, "skipped: {}", build_trace::error_chain(&e));
                Ok(None)
            }
            Err(e) => Err(e.into()),
        },
    }
}

/// Verify the closure of candidate derivation `target`, with the expected outputs (and the
/// output given, which the derivation found for it must have) and the byte checks asked for.
fn verify_one(
    args: &Args,
    verifier: &ClosureVerifier<'_>,
    drvs: &DrvSet,
    target: &StorePath,
    named: &super::target::Target,
) -> Result<Outcome, super::CmdError> {
    let mut expect: BTreeSet<StorePath> = args.expect.iter().cloned().collect();
    if args.expect_local {
        expect = local_outputs(drvs, target, args.nix_store.as_deref())?;
    }
    if named.is_output() {
        expect.insert(named.path.clone());
    }
    let mut outcome = verifier.verify(drvs, &Request { target: target.clone(), expect })?;
    // Paths are not bytes: check what the user has, where asked.
    if let Outcome::Verified(v) = &outcome {
        let mut bad = Vec::new();
        if args.check_local || args.expect_local {
            bad.extend(super::verify_bytes::check_local(v, &args.store_dir)?);
        }
        for cache in &args.check_caches {
            bad.extend(super::verify_bytes::check_cache(v, cache)?);
        }
        if !bad.is_empty() {
            outcome = Outcome::NotVerified(BrokenLink::bytes(target, bad.join("; ")));
        }
    }
    Ok(outcome)
}

/// The policy of `--policy`, else the default one pinning `manifests` (else the default image
/// directory's manifest).
pub(super) fn load_policy(
    policy: Option<&Path>,
    manifests: &[PathBuf],
) -> Result<TrustPolicy, super::CmdError> {
    match policy {
        Some(p) => super::policy::load(p),
        None => Ok(TrustPolicy::default_for(&default_manifests(manifests))?),
    }
}

/// The manifests the default policy pins: those given, else the default image directory's.
fn default_manifests(given: &[PathBuf]) -> Vec<String> {
    if !given.is_empty() {
        return given.iter().map(|p| p.display().to_string()).collect();
    }
    let default = vm_image::default_image_dir().join("manifest.json");
    if default.is_file() {
        vec![default.display().to_string()]
    } else {
        Vec::new()
    }
}

fn read_input(p: &Path) -> Result<String, VerifyCmdError> {
    let mut s = String::new();
    let r = if p == Path::new("-") {
        std::io::stdin().read_to_string(&mut s).map(|_| ())
    } else {
        std::fs::read_to_string(p).map(|t| s = t)
    };
    r.map_err(|e| VerifyCmdError::Read(p.display().to_string(), e))?;
    Ok(s)
}

/// The target's outputs as the local Nix store has them.
fn local_outputs(
    drvs: &DrvSet,
    target: &StorePath,
    nix_store: Option<&str>,
) -> Result<BTreeSet<StorePath>, VerifyCmdError> {
    let err = |problem: String| VerifyCmdError::Local { drv: target.to_string(), problem };
    let drv = drvs.get(target).ok_or_else(|| err("not in the derivation set".into()))?;
    let mut out = BTreeSet::new();
    let mut floating = false;
    for o in drv.outputs.values() {
        match o.path() {
            Some(p) => {
                out.insert(p.clone());
            }
            None => floating = true,
        }
    }
    if floating {
        // Nix ≤ 2.12 answers for the derivation's outputs; Nix ≥ 2.13 takes a bare drv path as
        // the `.drv` file itself (`{"opaquePath": …}`) and wants `DRV^*` (which 2.8 refuses).
        let mut v = realisation_info(&target.to_string(), nix_store).map_err(err)?;
        if v.iter().all(|r| r.get("outPath").is_none()) {
            v = realisation_info(&format!("{target}^*"), nix_store).map_err(err)?;
        }
        for r in v {
            if let Some(p) = r.get("outPath").and_then(|p| p.as_str()) {
                // A base name (Nix 2.8–2.34); a whole path (later releases) is taken as it is.
                let base = p.strip_prefix(&format!("{}/", nix_formats::STORE_DIR)).unwrap_or(p);
                let p =
                    StorePath::from_base_name(base).map_err(|e| err(format!("outPath: {e}")))?;
                out.insert(p);
            }
        }
    }
    if out.is_empty() {
        return Err(err("the local store has no outputs for it (build it first)".into()));
    }
    Ok(out)
}
