//! How a long-running server learns it should stop: a [`StopSource`], and SIGINT/SIGTERM as
//! one ([`Signals`], a signalfd). The Unix-socket Nix builder and the CI service stop on it.
//!
//! What is not here: what stopping means for each server (`crate::nixproto::listen`,
//! `crate::serve::server`).

use std::os::fd::{AsFd, BorrowedFd};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// Setting up signal delivery failed.
#[derive(Debug, thiserror::Error)]
#[error("setting up SIGINT/SIGTERM handling")]
pub struct SignalsError(#[source] nix::Error);

/// What ends a server (`crate::nixproto::listen::serve_socket`,
/// `crate::serve::server::serve_http`): a descriptor that becomes readable, and a way to consume
/// that.
pub trait StopSource {
    /// Readable when the server should stop.
    fn fd(&self) -> BorrowedFd<'_>;
    /// Consume the event (after `fd` was readable); names it, for logs.
    fn take(&mut self) -> String;
}

/// SIGINT and SIGTERM as a [`StopSource`] (a signalfd). [`Signals::new`] blocks both signals in
/// the calling thread, so it must run before the process starts any other thread (threads
/// inherit the mask; child processes started through `std::process` get a clean mask).
#[derive(Debug)]
pub struct Signals(SignalFd);

impl Signals {
    /// Block SIGINT and SIGTERM and receive them on a descriptor instead.
    pub fn new() -> Result<Signals, SignalsError> {
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGINT);
        mask.add(Signal::SIGTERM);
        mask.thread_block().map_err(SignalsError)?;
        let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .map_err(SignalsError)?;
        Ok(Signals(fd))
    }
}

impl StopSource for Signals {
    fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    fn take(&mut self) -> String {
        match self.0.read_signal() {
            Ok(Some(info)) => Signal::try_from(info.ssi_signo as i32)
                .map(|s| s.as_str().to_owned())
                .unwrap_or_else(|_| format!("signal {}", info.ssi_signo)),
            Ok(None) => "a signal".into(),
            Err(e) => format!("a signal (reading it failed: {e})"),
        }
    }
}
