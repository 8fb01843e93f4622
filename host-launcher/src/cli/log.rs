//! `vouch log`: the transparency log of the trace store (`docs/transparency-log.md`).
//!
//! - `key` prints the log's verifier key (making the key on first use);
//! - `sync` appends every step of the trace store that is not in its log yet;
//! - `cosign` asks witnesses to cosign the current checkpoint (C2SP tlog-witness);
//! - `monitor URL|DIR` follows a log: every new entry, and exit 1 on an inconsistent
//!   checkpoint (a fork or a rollback) or a derivation logged with two different outputs;
//! - `witness` runs a witness (`POST /add-checkpoint`).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use build_trace::store::TraceStore;
use build_trace::tlog::monitor::{Monitor, MonitorEvent, MonitorReport};
use build_trace::tlog::proof::LogTrust;
use build_trace::tlog::witness::Witness;
use build_trace::tlog::{CosignerKey, DirTiles, NoteVerifierKey, TileSource, TlogError, LOG_DIR};
use host_launcher::core::keys::{host_name, log_key};
use host_launcher::core::publish::default_trace_store;
use host_launcher::transparency::client::HttpTiles;
use host_launcher::transparency::witness::{cosign, serve, CosignOutcome};

use super::{CmdResult, Global};

/// `vouch log …`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print the log's verifier key (the key is made on first use).
    Key {
        /// The log's origin, for a new key (default: `<state dir>/log-origin`, else
        /// `<hostname>/vouch`). It should be the URL the log is served at, without scheme.
        #[arg(long)]
        origin: Option<String>,
    },
    /// Append every step of the trace store that is not in its log yet.
    Sync {
        /// Trace store directory (default: `<state dir>/cache`).
        #[arg(long, value_name = "DIR")]
        traces: Option<PathBuf>,
    },
    /// Ask witnesses to cosign the log's current checkpoint.
    Cosign {
        /// Trace store directory (default: `<state dir>/cache`).
        #[arg(long, value_name = "DIR")]
        traces: Option<PathBuf>,
        /// A witness's URL prefix (repeatable; one `--witness-key` each, in the same order).
        #[arg(long = "witness", value_name = "URL", required = true)]
        urls: Vec<String>,
        /// A witness's cosigning key (`vouch log witness` prints it).
        #[arg(long = "witness-key", value_name = "VKEY", required = true)]
        keys: Vec<String>,
    },
    /// Follow a log: report every new entry, inconsistent checkpoints, and derivations logged
    /// with two different outputs.
    Monitor(MonitorArgs),
    /// Run a C2SP tlog-witness (`POST /add-checkpoint`).
    Witness(WitnessArgs),
}

/// Which log to trust, as `monitor` takes it.
#[derive(Debug, clap::Args)]
pub struct MonitorArgs {
    /// The log: its URL prefix (`http://host:port/log`) or its directory.
    pub source: String,
    /// The log's verifier key (repeatable).
    #[arg(long = "log-key", value_name = "VKEY", required = true)]
    pub log_keys: Vec<String>,
    /// A witness's cosigning key (repeatable).
    #[arg(long = "witness-key", value_name = "VKEY")]
    pub witness_keys: Vec<String>,
    /// Distinct witnesses that must have cosigned each checkpoint.
    #[arg(long, default_value_t = 0)]
    pub quorum: usize,
    /// Keep following, every `--interval` seconds.
    #[arg(long)]
    pub follow: bool,
    /// Seconds between polls with `--follow`.
    #[arg(long, default_value_t = 60)]
    pub interval: u64,
}

/// A witness.
#[derive(Debug, clap::Args)]
pub struct WitnessArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7380")]
    pub listen: String,
    /// The witness's name, for a new key (default `<hostname>/vouch-witness`).
    #[arg(long)]
    pub name: Option<String>,
    /// The verifier key of a log this witness cosigns (repeatable).
    #[arg(long = "log-key", value_name = "VKEY", required = true)]
    pub log_keys: Vec<String>,
}

fn keys(list: &[String], cosigner: bool) -> Result<Vec<NoteVerifierKey>, TlogError> {
    list.iter()
        .map(|k| {
            let key = NoteVerifierKey::parse(k)?;
            if key.cosigner != cosigner {
                let want = if cosigner { "a witness" } else { "a log" };
                return Err(TlogError::Key(format!("{k} is not {want} key")));
            }
            Ok(key)
        })
        .collect()
}

pub fn run(cmd: Command, global: &Global) -> CmdResult {
    let state = global.state_dir();
    let store_dir = |t: Option<PathBuf>| t.unwrap_or_else(|| default_trace_store(&state));
    match cmd {
        Command::Key { origin } => {
            println!("{}", log_key(&state, origin.as_deref())?.vkey());
            Ok(ExitCode::SUCCESS)
        }
        Command::Sync { traces } => {
            let key = log_key(&state, None)?;
            let store = TraceStore::create(&store_dir(traces))?.with_log(key)?;
            let n = store.log_missing()?;
            println!("{n} entries appended");
            Ok(ExitCode::SUCCESS)
        }
        Command::Cosign { traces, urls, keys: wkeys } => {
            if urls.len() != wkeys.len() {
                return Err("give one --witness-key per --witness, in the same order".into());
            }
            let store = TraceStore::create(&store_dir(traces))?.with_log(log_key(&state, None)?)?;
            let log = store.log().expect("attached above");
            let pairs = urls.into_iter().zip(keys(&wkeys, true)?).collect::<Vec<_>>();
            let mut refused = false;
            for (url, outcome) in cosign(log, &pairs)? {
                match outcome {
                    CosignOutcome::Cosigned(_) => println!("{url}: cosigned"),
                    CosignOutcome::Refused(status, why) => {
                        refused = true;
                        println!("{url}: refused ({status}): {why}");
                    }
                }
            }
            Ok(if refused { ExitCode::from(1) } else { ExitCode::SUCCESS })
        }
        Command::Monitor(args) => monitor(args, &state),
        Command::Witness(args) => {
            let name = args.name.unwrap_or_else(|| format!("{}/vouch-witness", host_name()));
            let key = CosignerKey::load_or_generate(&state, &name)?;
            let witness = Witness::new(key, keys(&args.log_keys, false)?, &state.join("witness"))?;
            let listener = TcpListener::bind(&args.listen)?;
            println!("{}", witness.key().vkey());
            println!("listening on http://{}", listener.local_addr()?);
            serve(listener, Arc::new(witness))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn monitor(args: MonitorArgs, state: &std::path::Path) -> CmdResult {
    let trust = LogTrust {
        logs: keys(&args.log_keys, false)?,
        witnesses: keys(&args.witness_keys, true)?,
        quorum: args.quorum,
    };
    let src: Box<dyn TileSource> = if args.source.starts_with("http://") {
        Box::new(HttpTiles::new(&args.source))
    } else {
        let dir = PathBuf::from(&args.source);
        // A trace store directory stands for its log.
        let log = dir.join(LOG_DIR);
        Box::new(DirTiles::new(if log.join("checkpoint").exists() { &log } else { &dir }))
    };
    let m = Monitor::new(&state.join("tlog-monitor"));
    loop {
        match m.follow(src.as_ref(), &trust) {
            Ok(report) => {
                print_report(&report);
                if report.has_conflicts() {
                    return Ok(ExitCode::from(1));
                }
            }
            Err(e @ TlogError::Inconsistent { .. }) => {
                println!("INCONSISTENT {}", build_trace::error_chain(&e));
                return Ok(ExitCode::from(1));
            }
            Err(e) => return Err(e.into()),
        }
        if !args.follow {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_secs(args.interval.max(1)));
    }
}

fn print_report(r: &MonitorReport) {
    for e in &r.events {
        match e {
            MonitorEvent::Entry { index, entry } => {
                let outs: Vec<String> = entry
                    .outputs
                    .iter()
                    .map(|(n, o)| format!("{n}={} {}", o.path, o.nar_hash))
                    .collect();
                println!("entry {index} {} {}", entry.drv, outs.join(" "));
            }
            MonitorEvent::Conflict { drv, earlier, index } => {
                println!("CONFLICT {drv}: leaves {earlier} and {index} log different outputs");
            }
        }
    }
    eprintln!("{}: checked sizes {} to {}", r.origin, r.from, r.to);
}
