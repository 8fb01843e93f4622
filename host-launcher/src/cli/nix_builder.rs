//! `vouch nix-builder`.

use super::{CmdResult, Global, NotYet};

/// Arguments of `vouch nix-builder`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args, _global: &Global) -> CmdResult {
    Err(Box::new(NotYet("nix-builder")))
}
