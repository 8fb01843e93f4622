//! `vouch provenance`.

use super::{CmdResult, Global, NotYet};

/// Arguments of `vouch provenance`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args, _global: &Global) -> CmdResult {
    Err(Box::new(NotYet("provenance")))
}
