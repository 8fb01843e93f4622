//! `vouch image ...`.

use super::{CmdResult, Global, NotYet};

/// Subcommands of `vouch image`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Not available yet.
    Show,
}

pub fn run(_cmd: Command, _global: &Global) -> CmdResult {
    Err(Box::new(NotYet("image")))
}
