//! One exit-code scheme for every command (`docs/cli.md`): [`OK`], [`REJECTED`] (rejected, not
//! verified, a check failed), [`USAGE`] (bad arguments or unreadable input; also clap's own
//! usage errors), and [`BROKEN_PIPE`] when the reader of stdout went away (`vouch … | head`):
//! the command ends quietly, never with 0, since its verdict was not read in full.
//!
//! Also here: the `--help` text that names this host's default state directory.

use std::panic::PanicHookInfo;

use clap::FromArgMatches;

/// Success: verified, passed, done.
pub const OK: u8 = 0;
/// Rejected or not verified (the reason is printed on stdout).
pub const REJECTED: u8 = 1;
/// Usage or bad input: bad arguments, unreadable or malformed files (the error on stderr).
pub const USAGE: u8 = 2;
/// stdout was closed before everything was written: 128 + SIGPIPE, as a shell reports it.
pub const BROKEN_PIPE: u8 = 141;

/// Whether a panic is the standard library's report of a write to a closed stdout or stderr.
fn is_broken_pipe(info: &PanicHookInfo<'_>) -> bool {
    let msg = match info.payload().downcast_ref::<String>() {
        Some(s) => s.as_str(),
        None => info.payload().downcast_ref::<&str>().copied().unwrap_or_default(),
    };
    msg.starts_with("failed printing to std") && msg.contains("Broken pipe")
}

/// End the process quietly with [`BROKEN_PIPE`] when `println!` finds stdout closed, instead
/// of a panic message and status 101. Every other panic is reported as before.
pub fn quiet_broken_pipe() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if is_broken_pipe(info) {
            std::process::exit(i32::from(BROKEN_PIPE));
        }
        previous(info)
    }));
}

/// The `--state-dir` help, naming the directory this host would use without the flag.
pub fn state_dir_help() -> String {
    format!(
        "State directory (content store, trace store, keys, simulated SNP root) [default: {}, \
         i.e. $XDG_DATA_HOME/vouch, else ~/.local/share/vouch, else /var/lib/vouch]",
        super::default_state_dir().display()
    )
}

/// Parse the command line of `cmd` into `T`, with [`state_dir_help`] on `--state-dir`.
pub fn parse_with_state_dir_help<T: FromArgMatches>(cmd: clap::Command) -> T {
    let mut cmd = cmd.mut_arg("state_dir", |a| a.help(state_dir_help()));
    let matches = cmd.get_matches_mut();
    T::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut cmd).exit())
}
