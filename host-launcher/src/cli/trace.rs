//! `vouch trace show <drv or output>`: print stored build traces in human terms.
//! `vouch trace reindex`: rebuild laut's signature index (`traces/`) of a trace store.

use std::path::PathBuf;
use std::process::ExitCode;

use build_trace::provenance::classify_evidence;
use build_trace::source::Traces;
use build_trace::store::{TraceEntry, TraceSource, TraceStore};
use build_trace::Statement;
use host_launcher::core::publish::default_trace_store;
use nix_formats::StorePath;

use super::target::Lookup;
use super::{exit, CmdResult, Global};

/// Subcommands of `vouch trace`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Show the traces of a step (by its drv path: the resolved one for CA steps) or of the
    /// step that produced an output path.
    Show(ShowArgs),
    /// Rebuild laut's signature index (`traces/<drv hash>`) of every step, e.g. for a store
    /// written before vouch wrote it. Writing a step keeps it current by itself.
    Reindex(ReindexArgs),
}

/// Arguments of `vouch trace reindex`.
#[derive(Debug, clap::Args)]
pub struct ReindexArgs {
    /// Trace store directory (default: `<state dir>/cache`).
    #[arg(long, value_name = "DIR")]
    pub traces: Option<PathBuf>,
}

/// Arguments of `vouch trace show`.
#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// A derivation (unresolved or resolved), an output path, or `./result` or any symlink
    /// into the store.
    pub path: String,
    /// Trace store: a directory, `file://DIR` or `http(s)://HOST[:PORT][/prefix]` (default:
    /// `<state dir>/cache`).
    #[arg(long, value_name = "DIR|URL")]
    pub traces: Option<String>,
    /// How a remote trace store is read.
    #[command(flatten)]
    pub fetch: super::sources::FetchArgs,
    /// Directory holding `.drv` files (to tell an unresolved derivation from a resolved one).
    #[arg(long, value_name = "DIR", default_value = "/nix/store")]
    pub drv_dir: PathBuf,
    /// The Nix store to ask for derivers and realisations (Nix's `--store`; default: Nix's).
    #[arg(long, value_name = "STORE")]
    pub nix_store: Option<String>,
    /// Print the statements as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Find the entries for a drv path or an output path.
pub(crate) fn lookup(
    store: &Traces,
    p: &StorePath,
) -> Result<Vec<TraceEntry>, Box<dyn std::error::Error + Send + Sync>> {
    Ok(if p.is_derivation() { store.entries(p)? } else { store.entries_for_output(p)? })
}

pub fn run(cmd: Command, global: &Global) -> CmdResult {
    let args = match cmd {
        Command::Show(args) => args,
        Command::Reindex(args) => {
            let dir = args.traces.unwrap_or_else(|| default_trace_store(&global.state_dir()));
            let n = TraceStore::open(&dir)?.reindex_laut()?;
            println!("laut index: {n} steps listed under {}", dir.join("traces").display());
            return Ok(ExitCode::SUCCESS);
        }
    };
    let stores = [super::sources::open_one(args.traces.as_deref(), &args.fetch, global)?];
    let at =
        Lookup { drv_dir: &args.drv_dir, nix_store: args.nix_store.as_deref(), traces: &stores };
    let target = super::target::resolve(&args.path, &at)?;
    let store = &stores[0];
    let mut entries = lookup(store, &target.path)?;
    if entries.is_empty() && !target.is_output() {
        // An unresolved derivation: its steps, by the outputs it is known to have.
        for o in &target.outputs {
            for e in store.entries_for_output(o)? {
                if !entries.iter().any(|x| x.location == e.location) {
                    entries.push(e);
                }
            }
        }
    }
    if entries.is_empty() {
        eprintln!(
            "no trace of {} in {} (an unresolved content-addressed derivation is found through \
             its outputs: build it first, or give its resolved drv or an output path)",
            args.path,
            store.location()
        );
        return Ok(ExitCode::from(exit::REJECTED));
    }
    if !args.json {
        if let Some(d) = &target.drv {
            println!("derivation {d} ({})", target.found_by);
        }
    }
    let mut json = Vec::new();
    let mut malformed = 0;
    for e in &entries {
        let st = match e.parse_statement() {
            Ok(st) => st,
            Err(err) => {
                // On stderr, so that `--json` stays one JSON document.
                eprintln!("trace {} is malformed: {err}", e.location);
                malformed += 1;
                continue;
            }
        };
        if args.json {
            json.push(serde_json::to_value(&st)?);
            continue;
        }
        print_entry(e, &st)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    }
    // A malformed statement is a rejected trace (exit 1), as `vouch verify` would reject it.
    Ok(ExitCode::from(if malformed > 0 { exit::REJECTED } else { exit::OK }))
}

/// One trace entry `e`, its statement `st`, as text.
fn print_entry(e: &TraceEntry, st: &Statement) -> Result<(), super::CmdError> {
    let job = &st.job;
    let kind = e.evidence.as_deref().map(classify_evidence).unwrap_or("none");
    println!("step      {}", job.drv_path);
    println!("  trace   {}", e.location);
    println!(
        "  kind    {}{}",
        job_kind_name(job.kind()?),
        if job.network { " (networked fixed output)" } else { "" }
    );
    println!("  job     {} (HOST_DATA {})", job.job_id, hex::encode(st.host_data()?));
    for (name, o) in &st.outputs {
        println!("  output  {name}: {}", o.path);
        println!(
            "            NAR {} ({} bytes){}",
            o.nar_hash,
            o.nar_size,
            o.ca.as_ref().map(|c| format!(", ca {c}")).unwrap_or_default()
        );
        for r in &o.references {
            println!("            references {r}");
        }
    }
    println!(
        "  inputs  {} direct, {} in the closure, {} content-addressed (recomputed in the guest)",
        job.direct_inputs().len(),
        job.closure.len(),
        st.input_cas.len()
    );
    println!("  guest   measurement {}, {}", st.measurement, st.agent_version);
    match kind {
        "simulated" => println!("  evidence SIMULATED (no SEV-SNP hardware; proves nothing about hardware) — not verified here"),
        "none" => println!("  evidence none"),
        k => println!("  evidence {k} — not verified here (use `vouch verify`)"),
    }
    for j in &e.jws {
        let kid = build_trace::jws::kid_of(j).unwrap_or_else(|| "<malformed>".into());
        println!("  signed  JWS by {kid}");
    }
    Ok(())
}

/// A step kind as words.
pub(crate) fn job_kind_name(kind: build_trace::job::StepKind) -> &'static str {
    use build_trace::job::StepKind;
    match kind {
        StepKind::FloatingCa => "floating content-addressed",
        StepKind::FixedOutput => "fixed output",
        StepKind::InputAddressed => "input-addressed",
    }
}
