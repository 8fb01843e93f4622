//! `vouch selftest`: one tiny build in a VM on this host, verified under the default
//! genuine-AMD policy with this image's measurement, and a report to attach to a bug
//! (`host_launcher::snp::selftest`). Without SEV-SNP the same flow runs with simulated
//! evidence, and the report says so at its top.

use std::path::PathBuf;
use std::process::ExitCode;

use host_launcher::snp::selftest;

use super::common::{LimitArgs, VmArgs};
use super::{CmdResult, Global};

/// Arguments of `vouch selftest`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// VM settings.
    #[command(flatten)]
    pub vm: VmArgs,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also write the report to this file.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Run `vouch selftest`.
pub fn run(args: Args, global: &Global) -> CmdResult {
    let state_dir = global.state_dir();
    let limits: LimitArgs = clap::Parser::try_parse_from(["limits"]).map(|w: Wrapper| w.limits)?;
    let cfg = args.vm.launcher(&state_dir, &limits);
    let work = selftest::work_dir(&state_dir)?;
    eprintln!("vouch: selftest: building a tiny derivation in a VM (this boots one VM)");
    let report = match selftest::run(&cfg, work.path()) {
        Ok(r) => r,
        // Built, but not verified: a rejection (exit 1), not a usage error.
        Err(e @ selftest::SelftestError::Verify(_)) => {
            super::print_error_chain(&e);
            return Ok(ExitCode::from(super::exit::REJECTED));
        }
        Err(e) => return Err(e.into()),
    };
    let mut text = Vec::new();
    if args.json {
        text = serde_json::to_vec_pretty(&report)?;
        text.push(b'\n');
    } else {
        report.write_text(&mut text)?;
    }
    std::io::Write::write_all(&mut std::io::stdout(), &text)?;
    if let Some(out) = &args.output {
        std::fs::write(out, &text)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Default build limits (none): `LimitArgs` parsed from no flags.
#[derive(Debug, clap::Parser)]
struct Wrapper {
    #[command(flatten)]
    limits: LimitArgs,
}
