//! `vouch trace ...`.

use super::{CmdResult, Global, NotYet};

/// Subcommands of `vouch trace`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Not available yet.
    Show,
}

pub fn run(_cmd: Command, _global: &Global) -> CmdResult {
    Err(Box::new(NotYet("trace")))
}
