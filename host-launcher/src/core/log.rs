//! The log of one build: the one trait every front-end's log implements ([`BuildLog`]), the
//! host's [`Progress`] events, [`TextLog`] for logs that are a text stream, and
//! [`LineSplitter`] for logs that carry lines (the worker protocol's log lines, the CI service's
//! build log).
//!
//! Order of calls for a build: [`BuildLog::progress`] with a [`Progress::Note`] the engine has
//! for the client (if any), [`BuildLog::started`], the builder's output bytes and the step's
//! progress as they happen, [`BuildLog::finished`] (also after a failure).
//!
//! What is not here: where a log goes (each front-end's sink: the worker protocol's build
//! activity, stderr, the CI service's record).

use std::io::Write;

use channel::messages::{AttesterKind, PhaseName};
use nix_formats::StorePath;

use crate::vm::Mode;

/// Where the log of a build goes, as it happens.
pub trait BuildLog {
    /// The build of `drv` starts (the worker protocol opens a build activity).
    fn started(&mut self, _drv: &StorePath) {}
    /// Builder output bytes, as they arrive (not split into lines).
    fn output(&mut self, data: &[u8]);
    /// A progress event of the host.
    fn progress(&mut self, event: &Progress);
    /// The build ended, whatever the outcome (flush a last unterminated line, close the
    /// activity).
    fn finished(&mut self) {}
}

/// A log that drops everything (tests, benchmarks, requests that log nothing).
#[derive(Debug, Default)]
pub struct NullLog;

impl BuildLog for NullLog {
    fn output(&mut self, _data: &[u8]) {}
    fn progress(&mut self, _event: &Progress) {}
}

/// A log as text on a stream (`vouch build`'s stderr, the serve protocol's stderr, which Nix
/// copies into the build log): the builder's bytes as they come, the host's lines after them.
#[derive(Debug)]
pub struct TextLog<W: Write>(pub W);

impl<W: Write> BuildLog for TextLog<W> {
    fn started(&mut self, drv: &StorePath) {
        let _ = writeln!(self.0, "building '{drv}' in a vouch VM");
        let _ = self.0.flush();
    }

    fn output(&mut self, data: &[u8]) {
        let _ = self.0.write_all(data);
        let _ = self.0.flush();
    }

    fn progress(&mut self, event: &Progress) {
        let _ = writeln!(self.0, "vouch: {}", event.text());
        let _ = self.0.flush();
    }
}

/// Progress of a build, for display and benchmarks.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// Something the host tells the client about its request (e.g. a guessed CA rule).
    Note(String),
    /// QEMU started.
    Booting {
        /// The mode.
        mode: Mode,
        /// QEMU's pid.
        pid: u32,
    },
    /// A pre-booted pool VM takes the job (it runs only this job, then powers off).
    WarmVm {
        /// The mode.
        mode: Mode,
        /// QEMU's pid.
        pid: u32,
        /// How long it had been ready.
        ready_for: std::time::Duration,
    },
    /// The agent connected and said hello.
    AgentReady {
        /// What it will attest with.
        attester: AttesterKind,
    },
    /// All inputs were sent.
    InputsSent {
        /// Number of paths.
        paths: usize,
        /// NAR bytes.
        bytes: u64,
    },
    /// A phase reported by the guest.
    Guest(PhaseName),
    /// An output NAR arrived.
    OutputReceived {
        /// Its store path.
        path: StorePath,
    },
    /// Everything checked.
    Verified,
    /// An attempt failed for a reason of the infrastructure (not the build); the step starts
    /// again in a fresh VM with a fresh job.
    Retrying {
        /// Why the attempt failed (error chain).
        reason: String,
        /// The failed attempt's job id (nothing of it is kept).
        abandoned_job: String,
        /// The new attempt's job id.
        job: String,
    },
}

impl Progress {
    /// The event as a log line, without the `vouch: ` prefix every front-end puts before it.
    pub fn text(&self) -> String {
        match self {
            Progress::Note(note) => note.clone(),
            Progress::Booting { mode, pid } => format!("booting a fresh {mode} VM (QEMU pid {pid})"),
            Progress::WarmVm { mode, pid, ready_for } => format!(
                "a pre-booted {mode} VM, ready for {:.1} s, takes the job and runs it alone (QEMU pid {pid})",
                ready_for.as_secs_f64()
            ),
            Progress::AgentReady { attester: AttesterKind::SevSnp } => {
                "agent ready; evidence: sev-snp".into()
            }
            Progress::AgentReady { attester: AttesterKind::Simulated } => {
                "agent ready; evidence: SIMULATED (no SEV-SNP hardware on this host)".into()
            }
            Progress::InputsSent { paths, bytes } => {
                format!("sent {paths} input paths ({bytes} NAR bytes)")
            }
            Progress::Guest(phase) => match phase {
                PhaseName::JobAccepted => "job accepted by the agent",
                PhaseName::InputsReady => "inputs unpacked and checked in the VM",
                PhaseName::Building => "building",
                PhaseName::Built => "builder finished",
                PhaseName::Hashing => "hashing outputs",
                PhaseName::Attesting => "attesting",
                PhaseName::Sending => "receiving outputs",
            }
            .into(),
            Progress::OutputReceived { path } => format!("received {path}"),
            Progress::Verified => "statement, evidence and outputs checked".into(),
            Progress::Retrying { reason, abandoned_job, job } => format!(
                "retrying step in a fresh VM after: {reason} (job {abandoned_job} abandoned, nothing of it kept; new job {job})"
            ),
        }
    }
}

/// Most bytes of an unterminated line kept before it is passed on anyway (a builder that never
/// prints a newline must not grow the host's memory).
pub const MAX_PARTIAL_LINE: usize = 64 * 1024;

/// Splits builder output into lines (without the newline, a trailing `\r` dropped, invalid
/// UTF-8 replaced) for logs that carry lines.
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    /// The complete lines `data` ends (a line longer than [`MAX_PARTIAL_LINE`] comes out in
    /// pieces).
    pub fn push(&mut self, data: &[u8]) -> Vec<String> {
        self.partial.extend_from_slice(data);
        let mut lines = Vec::new();
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]);
            lines.push(text.trim_end_matches('\r').to_owned());
        }
        if self.partial.len() > MAX_PARTIAL_LINE {
            lines.extend(self.flush());
        }
        lines
    }

    /// What is left of an unterminated last line, if anything.
    pub fn flush(&mut self) -> Option<String> {
        if self.partial.is_empty() {
            return None;
        }
        let line = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_split_into_lines_across_chunks() {
        let mut s = LineSplitter::default();
        assert!(s.push(b"a").is_empty());
        assert_eq!(s.push(b"b\r\nc\nd"), ["ab", "c"]);
        assert_eq!(s.flush().as_deref(), Some("d"));
        assert_eq!(s.flush(), None);
        let long = vec![b'x'; MAX_PARTIAL_LINE + 1];
        assert_eq!(s.push(&long), [String::from_utf8(long).unwrap()], "bounded");
        // A multi-byte character split between two chunks is kept whole.
        assert!(s.push(&[0xc3]).is_empty());
        assert_eq!(s.push(&[0xa9, b'\n']), ["é"]);
    }
}
