//! Adapters between the build core's traits and the remote builder: the content store as the
//! build core's [`InputSource`], and the protocol front-end's log sink as its [`LogSink`].
//!
//! What is not here: the store (`crate::store`) and the protocol sinks (`crate::nixproto`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, Read};

use build_trace::job::PathInfo;
use nix_formats::StorePath;

use crate::build::{InputSource, InputSourceError, LogSink, Progress};
use crate::nixproto;
use crate::store::ContentStore;

/// The content store as the build core's input source.
#[derive(Debug)]
pub struct StoreInputs<'a>(pub &'a ContentStore);

fn store_err(e: crate::store::StoreError) -> InputSourceError {
    InputSourceError("vouch's content store".into(), Some(Box::new(e)))
}

impl InputSource for StoreInputs<'_> {
    fn path_info(&self, path: &StorePath) -> Result<PathInfo, InputSourceError> {
        match self.0.path_info(path).map_err(store_err)? {
            Some(valid) => Ok(valid.info),
            None => Err(InputSourceError(format!("{path} is not in vouch's content store"), None)),
        }
    }

    fn nar(&self, path: &StorePath) -> Result<Box<dyn Read + Send + '_>, InputSourceError> {
        match self.0.open_nar(path).map_err(store_err)? {
            Some((_, f)) => Ok(Box::new(BufReader::with_capacity(1 << 16, f))),
            None => Err(InputSourceError(format!("{path} is not in vouch's content store"), None)),
        }
    }

    fn closure(
        &self,
        roots: &BTreeSet<StorePath>,
    ) -> Result<BTreeMap<StorePath, PathInfo>, InputSourceError> {
        Ok(self
            .0
            .closure(roots)
            .map_err(store_err)?
            .into_iter()
            .map(|(p, v)| (p, v.info))
            .collect())
    }
}

/// Forwards the build core's log bytes and progress to a protocol log sink, line by line, as
/// they arrive.
pub struct LinesToClient<'a> {
    out: &'a mut dyn nixproto::LogSink,
    partial: Vec<u8>,
}

impl std::fmt::Debug for LinesToClient<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinesToClient")
            .field("partial", &self.partial.len())
            .finish_non_exhaustive()
    }
}

impl<'a> LinesToClient<'a> {
    /// Wrap a protocol log sink.
    pub fn new(out: &'a mut dyn nixproto::LogSink) -> Self {
        LinesToClient { out, partial: Vec::new() }
    }

    /// Send what is left of an unterminated last line.
    pub fn finish(&mut self) {
        if !self.partial.is_empty() {
            let line = String::from_utf8_lossy(&self.partial).into_owned();
            self.partial.clear();
            self.out.line(&line);
        }
    }
}

impl LogSink for LinesToClient<'_> {
    fn log(&mut self, data: &[u8]) {
        self.partial.extend_from_slice(data);
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]);
            self.out.line(text.trim_end_matches('\r'));
        }
        // Keep memory bounded for a builder that never prints a newline.
        if self.partial.len() > 64 * 1024 {
            self.finish();
        }
    }

    fn progress(&mut self, event: &Progress) {
        use channel::messages::PhaseName as P;
        let text = match event {
            Progress::Booting { mode, pid } => {
                format!("vouch: booting a fresh {mode} VM (QEMU pid {pid})")
            }
            Progress::AgentReady { attester } => match attester {
                channel::messages::AttesterKind::SevSnp => {
                    "vouch: agent ready; evidence: sev-snp".into()
                }
                channel::messages::AttesterKind::Simulated => {
                    "vouch: agent ready; evidence: SIMULATED (no SEV-SNP hardware on this host)"
                        .into()
                }
            },
            Progress::InputsSent { paths, bytes } => {
                format!("vouch: sent {paths} input paths ({bytes} NAR bytes)")
            }
            Progress::Guest(P::Building) => "vouch: building".into(),
            Progress::Guest(P::Attesting) => "vouch: attesting".into(),
            Progress::Verified => "vouch: statement, evidence and outputs checked".into(),
            Progress::Retrying { reason, abandoned_job, job } => format!(
                "vouch: retrying step in a fresh VM after: {reason} (job {abandoned_job} abandoned, nothing of it kept; new job {job})"
            ),
            _ => return,
        };
        self.finish();
        self.out.line(&text);
    }
}
