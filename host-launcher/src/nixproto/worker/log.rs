//! Build logs on the worker stream: a build activity (`actBuild`) with one `resBuildLogLine`
//! result per line, each message flushed as it happens; plain `STDERR_NEXT` lines outside a
//! build. A client that stopped reading only stops the log, never the build.
//! Not here: an operation's `STDERR_LAST`/`STDERR_ERROR` ending (the worker loop writes it).

use std::io::Write;

use nix_formats::StorePath;

use super::super::wire::{WireError, WireWrite};
use super::{
    ACT_BUILD, LVL_INFO, RES_BUILD_LOG_LINE, STDERR_NEXT, STDERR_RESULT, STDERR_START_ACTIVITY,
    STDERR_STOP_ACTIVITY,
};
use crate::core::log::{BuildLog, LineSplitter, Progress};

/// Build logs as activities on the worker stream, flushed per message.
pub(super) struct WorkerLog<'c, W: Write> {
    pub(super) w: &'c mut W,
    pub(super) next_activity: &'c mut u64,
    pub(super) activity: Option<u64>,
    pub(super) lines: LineSplitter,
    pub(super) failed: bool,
}

impl<W: Write> WorkerLog<'_, W> {
    fn send(&mut self, f: impl FnOnce(&mut W) -> Result<(), WireError>) {
        if self.failed {
            return;
        }
        let w = &mut *self.w;
        if f(w).and_then(|()| w.flush().map_err(WireError::from)).is_err() {
            self.failed = true;
        }
    }

    /// One line: a `resBuildLogLine` of the build activity, else a plain message.
    fn line(&mut self, line: &str) {
        match self.activity {
            Some(id) => self.send(|w| {
                w.write_u64(STDERR_RESULT)?;
                w.write_u64(id)?;
                w.write_u64(RES_BUILD_LOG_LINE)?;
                w.write_u64(1)?;
                w.write_u64(1)?;
                w.write_str(line)
            }),
            None => self.send(|w| {
                w.write_u64(STDERR_NEXT)?;
                w.write_str(&format!("{line}\n"))
            }),
        }
    }
}

impl<W: Write> BuildLog for WorkerLog<'_, W> {
    fn started(&mut self, drv_path: &StorePath) {
        let id = *self.next_activity;
        *self.next_activity += 1;
        self.activity = Some(id);
        let text = format!("building '{drv_path}' in a vouch VM");
        let drv = drv_path.to_string();
        self.send(|w| {
            w.write_u64(STDERR_START_ACTIVITY)?;
            w.write_u64(id)?;
            w.write_u64(LVL_INFO)?;
            w.write_u64(ACT_BUILD)?;
            w.write_str(&text)?;
            w.write_u64(4)?; // fields: drvPath, machineName, curRound, nrRounds
            w.write_u64(1)?;
            w.write_str(&drv)?;
            w.write_u64(1)?;
            w.write_str("")?;
            w.write_u64(0)?;
            w.write_u64(1)?;
            w.write_u64(0)?;
            w.write_u64(1)?;
            w.write_u64(0) // parent
        });
    }

    fn output(&mut self, data: &[u8]) {
        for line in self.lines.push(data) {
            self.line(&line);
        }
    }

    fn progress(&mut self, event: &Progress) {
        if let Some(rest) = self.lines.flush() {
            self.line(&rest);
        }
        self.line(&format!("vouch: {}", event.text()));
    }

    fn finished(&mut self) {
        if let Some(rest) = self.lines.flush() {
            self.line(&rest);
        }
        if let Some(id) = self.activity.take() {
            self.send(|w| {
                w.write_u64(STDERR_STOP_ACTIVITY)?;
                w.write_u64(id)
            });
        }
    }
}
