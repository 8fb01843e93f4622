//! `vouch provenance <output path>`: export the in-toto Statement v1 / SLSA Provenance v1 of
//! an output from the trace store (`build_trace::provenance`). Each trace is first verified
//! under a trust policy (`build_trace::verify::check_entry_alone`: statement, output addresses,
//! evidence and signatures; not its closure, which is `vouch verify`'s work); only traces that
//! pass are exported, their `builder.id` naming the policy rule that accepted them. With
//! `--sign`, each as a DSSE envelope signed by the launcher key (`vouch provenance verify`).

use std::path::PathBuf;
use std::process::ExitCode;

use std::time::SystemTime;

use super::target::Lookup;
use super::{CmdResult, Global};
use build_trace::evidence::Verifier;
use build_trace::provenance::{in_toto, set_times, sign_envelope, Acceptance, TIMES_FILE};
use build_trace::verify::check_entry_alone;

/// Arguments of `vouch provenance`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Args {
    /// `vouch provenance verify ENVELOPE`.
    #[command(subcommand)]
    pub command: Option<super::provenance_verify::Command>,
    /// An output path, `./result` or any symlink into the store, or a derivation (unresolved
    /// or resolved: every output it is known to have).
    #[arg(required = true)]
    pub output: Option<String>,
    /// Sign each statement as a DSSE envelope with this host's launcher key (the state
    /// directory's Nix signing key; `vouch provenance verify` checks it).
    #[arg(long)]
    pub sign: bool,
    /// The key `--sign` uses, by name (default: the state directory's only key).
    #[arg(long, value_name = "NAME", requires = "sign")]
    pub key_name: Option<String>,
    /// Directory holding `.drv` files.
    #[arg(long, value_name = "DIR", default_value = "/nix/store")]
    pub drv_dir: PathBuf,
    /// The Nix store to ask for derivers and realisations (Nix's `--store`; default: Nix's).
    #[arg(long, value_name = "STORE")]
    pub nix_store: Option<String>,
    /// Trace store: a directory, `file://DIR` or `http(s)://HOST[:PORT][/prefix]` (default:
    /// `<state dir>/cache`).
    #[arg(long, value_name = "DIR|URL")]
    pub traces: Option<String>,
    /// How a remote trace store is read.
    #[command(flatten)]
    pub fetch: super::sources::FetchArgs,
    /// Write the statement here instead of stdout.
    #[arg(long, short, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Trust policy each trace must pass before it is exported (default: `vouch verify`'s).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Image manifest whose launch measurements the default policy pins (repeatable).
    #[arg(long = "image-manifest", value_name = "FILE", conflicts_with = "policy")]
    pub image_manifests: Vec<PathBuf>,
}

/// Why `vouch provenance` failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvenanceError {
    /// A derivation without known outputs.
    #[error("no output of {0} is known (build it first, or give an output path)")]
    NoOutputs(String),
    /// No trace produced it.
    #[error("no trace in {dir} produced {path}")]
    NoTrace {
        /// The store.
        dir: String,
        /// The output.
        path: String,
    },
    /// Traces produced it, but none passes the policy.
    #[error("no trace of {path} passes the trust policy: {reasons}")]
    NoneVerified {
        /// The output.
        path: String,
        /// Why each trace failed.
        reasons: String,
    },
}

pub fn run(args: Args, global: &Global) -> CmdResult {
    if let Some(cmd) = args.command {
        return super::provenance_verify::run(cmd, global);
    }
    let arg = args.output.clone().unwrap_or_default();
    let key = match args.sign {
        true => Some(super::provenance_verify::launcher_key(global, args.key_name.as_deref())?),
        false => None,
    };
    let stores = [super::sources::open_one(args.traces.as_deref(), &args.fetch, global)?];
    let at =
        Lookup { drv_dir: &args.drv_dir, nix_store: args.nix_store.as_deref(), traces: &stores };
    let target = super::target::resolve(&arg, &at)?;
    if target.outputs.is_empty() {
        return Err(Box::new(ProvenanceError::NoOutputs(target.path.to_string())));
    }
    if let Some(d) = &target.drv {
        eprintln!("derivation {d} ({})", target.found_by);
    }
    let store = &stores[0];
    let policy = super::verify::load_policy(args.policy.as_deref(), &args.image_manifests)?;
    let prepared = policy.prepare()?;
    // The statements are JSON on stdout; a policy that accepts any guest says so first, on
    // stderr.
    if let Some(b) = prepared.any_guest_banner() {
        eprintln!("{b}");
    }
    let mut statements = Vec::new();
    let mut refused = Vec::new();
    for path in &target.outputs {
        for e in &super::trace::lookup(store, path)? {
            let verdict =
                match check_entry_alone(&prepared, Verifier::global(), e, SystemTime::now()) {
                    Ok(v) => v,
                    Err(b) => {
                        refused.push(format!("{}: {}", e.location, b.explanation));
                        continue;
                    }
                };
            let st = &verdict.statement;
            let Some((name, _)) = st.outputs.iter().find(|(_, o)| &o.path == path) else {
                continue;
            };
            let accepted =
                Acceptance { kind: verdict.kind, rules: &verdict.rules, keys: &verdict.keys };
            let mut st = in_toto(st, name, &e.statement, e.evidence.as_deref(), &accepted)?;
            if let Some(t) = store.entry_file(e, TIMES_FILE) {
                set_times(&mut st, &t);
            }
            statements.push(match &key {
                Some(k) => sign_envelope(&st, k),
                None => st,
            });
        }
    }
    if statements.is_empty() && !refused.is_empty() {
        return Err(Box::new(ProvenanceError::NoneVerified {
            path: target.path.to_string(),
            reasons: refused.join("; "),
        }));
    }
    if statements.is_empty() {
        return Err(Box::new(ProvenanceError::NoTrace {
            dir: store.location(),
            path: target.path.to_string(),
        }));
    }
    for r in &refused {
        tracing::warn!("not exported (fails the policy): {r}");
    }
    // One statement per trace (a path built twice has two); JSON Lines when several.
    let text = statements
        .iter()
        .map(|s| serde_json::to_string(s).expect("JSON value"))
        .collect::<Vec<_>>()
        .join("\n");
    match &args.out {
        Some(f) => std::fs::write(f, format!("{text}\n"))?,
        None => println!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}
