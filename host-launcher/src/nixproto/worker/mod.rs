//! The worker protocol, server side (`vouch nix-builder --stdio`, what `ssh-ng://` runs).
//!
//! Handshake (all client versions from 1.34, Nix 2.8, through 1.38 with feature negotiation):
//!
//! ```text
//! C→S u64 WORKER_MAGIC_1               (clients ≥ 2.24 send their version right after it)
//! S→C u64 WORKER_MAGIC_2, u64 1.38
//! C→S u64 clientVersion                 v = min(client, 1.38)
//! v ≥ 1.38: C→S strings features; S→C strings ours   (negotiated = intersection)
//! v ≥ 1.14: C→S u64 cpuAffinity [+ u64]; v ≥ 1.11: C→S u64 reserveSpace
//! v ≥ 1.33: S→C string version; v ≥ 1.35: S→C u64 trusted (1 trusted, 2 not trusted)
//! S→C STDERR_LAST
//! ```
//!
//! Then per operation: `u64 op` and its arguments, parsed into an [`Action`]; while it runs, log
//! messages (`STDERR_START_ACTIVITY`/`STDERR_RESULT`/`STDERR_STOP_ACTIVITY`, a build activity
//! with `resBuildLogLine` results, flushed as they happen); then `STDERR_LAST` and the result, or
//! `STDERR_ERROR` with a message. An unknown or unsupported operation gets `STDERR_ERROR` naming
//! it and the connection closes (its arguments cannot be skipped); a bad upload is drained to
//! its end first, so the session goes on.
//!
//! What is not here: what the operations do (the [`Handler`]), record encodings (`types`).

use std::collections::BTreeSet;
use std::io::{self, BufRead, Read, Write};

use nix_formats::StorePath;

use super::action::{error_chain, Action, ActionError, DerivedPath, Handler, Reply};
use super::types::{self, CodecError};
use super::version::{
    minor, show, ClientProfile, ProtoVersion, Protocol, FEATURE_REALISATION_WITH_PATH,
};
use super::wire::{FramedReader, MessageBudget, Taken, WireError, WireRead, WireWrite};
use super::ServerError;

mod log;
mod request;
mod uploads;

use log::WorkerLog;
use request::{parse_wanted, Parsed};
use uploads::{ManyUploads, OneUpload};

/// First word a client sends.
pub const WORKER_MAGIC_1: u64 = 0x6e69_7863;
/// First word the server answers.
pub const WORKER_MAGIC_2: u64 = 0x6478_696f;
/// The version we speak: 1.38.
pub const SERVER_VERSION: ProtoVersion = 0x126;
/// The oldest client we serve: 1.34 (Nix 2.8).
pub const MIN_CLIENT_VERSION: ProtoVersion = 0x122;
/// The handshake's `TrustedFlag` for a trusted client.
pub const TRUSTED: u64 = 1;
/// The handshake's `TrustedFlag` for a client that is not trusted.
pub const NOT_TRUSTED: u64 = 2;
/// Features we offer.
pub const SERVER_FEATURES: &[&str] = &[FEATURE_REALISATION_WITH_PATH];

/// `STDERR_NEXT`: a log line.
pub const STDERR_NEXT: u64 = 0x6f6c_6d67;
/// `STDERR_READ`: the server asks for data.
pub const STDERR_READ: u64 = 0x6461_7461;
/// `STDERR_WRITE`: data for the client.
pub const STDERR_WRITE: u64 = 0x6461_7416;
/// `STDERR_LAST`: the result follows.
pub const STDERR_LAST: u64 = 0x616c_7473;
/// `STDERR_ERROR`: the operation failed.
pub const STDERR_ERROR: u64 = 0x6378_7470;
/// `STDERR_START_ACTIVITY`.
pub const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
/// `STDERR_STOP_ACTIVITY`.
pub const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
/// `STDERR_RESULT`.
pub const STDERR_RESULT: u64 = 0x5253_4c54;

/// Activity type `actBuild`.
pub const ACT_BUILD: u64 = 105;
/// Result type `resBuildLogLine`.
pub const RES_BUILD_LOG_LINE: u64 = 101;
/// Verbosity `lvlInfo`.
pub const LVL_INFO: u64 = 3;

/// Worker operation numbers and names (Nix's `WorkerProto::Op`).
pub fn op_name(op: u64) -> &'static str {
    match op {
        1 => "IsValidPath",
        3 => "HasSubstitutes",
        4 => "QueryPathHash",
        5 => "QueryReferences",
        6 => "QueryReferrers",
        7 => "AddToStore",
        8 => "AddTextToStore",
        9 => "BuildPaths",
        10 => "EnsurePath",
        11 => "AddTempRoot",
        12 => "AddIndirectRoot",
        13 => "SyncWithGC",
        14 => "FindRoots",
        16 => "ExportPath",
        18 => "QueryDeriver",
        19 => "SetOptions",
        20 => "CollectGarbage",
        21 => "QuerySubstitutablePathInfo",
        22 => "QueryDerivationOutputs",
        23 => "QueryAllValidPaths",
        24 => "QueryFailedPaths",
        25 => "ClearFailedPaths",
        26 => "QueryPathInfo",
        27 => "ImportPaths",
        28 => "QueryDerivationOutputNames",
        29 => "QueryPathFromHashPart",
        30 => "QuerySubstitutablePathInfos",
        31 => "QueryValidPaths",
        32 => "QuerySubstitutablePaths",
        33 => "QueryValidDerivers",
        34 => "OptimiseStore",
        35 => "VerifyStore",
        36 => "BuildDerivation",
        37 => "AddSignatures",
        38 => "NarFromPath",
        39 => "AddToStoreNar",
        40 => "QueryMissing",
        41 => "QueryDerivationOutputMap",
        42 => "RegisterDrvOutput",
        43 => "QueryRealisation",
        44 => "AddMultipleToStore",
        45 => "AddBuildLog",
        46 => "BuildPathsWithResults",
        47 => "AddPermRoot",
        _ => "unknown",
    }
}

/// Options of the worker front-end.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The version string `nix store ping` shows.
    pub version_string: String,
    /// `--client-nix-version`, copied into the client profile.
    pub declared_nix: Option<crate::core::NixVersion>,
}

/// Serve one worker-protocol connection until the client hangs up.
pub fn serve<R: BufRead, W: Write>(
    mut r: R,
    mut w: W,
    cfg: &WorkerConfig,
    handler: &mut dyn Handler,
) -> Result<(), ServerError> {
    let profile = handshake(&mut r, &mut w, cfg, handler.trusted())?;
    tracing::info!(
        version = %show(profile.version),
        features = ?profile.features,
        client = %profile.nix_range(),
        "worker protocol handshake done"
    );
    let mut conn = Conn { w, profile, next_activity: first_activity_id() };
    loop {
        let Some(op) = r.read_u64_or_eof()? else {
            tracing::debug!("client closed the connection");
            return Ok(());
        };
        tracing::debug!(op, name = op_name(op), "operation");
        match conn.op(op, &mut r, handler)? {
            Flow::Continue => {}
            Flow::Close => return Ok(()),
        }
    }
}

/// The first activity id of a connection: the process id in the high half (one process per
/// connection over `ssh-ng://`), and the connection's number in this process above the low 24
/// bits (many connections per process with `--listen`), so that the activities of concurrent
/// builds never share an id in a client's log.
fn first_activity_id() -> u64 {
    static CONNECTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = CONNECTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) & 0xff;
    (u64::from(std::process::id()) << 32) | (n << 24)
}

/// The handshake; on success the client has its `STDERR_LAST`. `trusted` is what the client is
/// told about itself (Nix's `TrustedFlag`: never "unknown", which Nix ≥ 2.16 reads as trusted).
pub fn handshake<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    cfg: &WorkerConfig,
    trusted: bool,
) -> Result<ClientProfile, ServerError> {
    let magic = r.read_u64()?;
    if magic != WORKER_MAGIC_1 {
        return Err(ServerError::BadMagic { protocol: "worker", got: magic });
    }
    w.write_u64(WORKER_MAGIC_2)?;
    w.write_u64(SERVER_VERSION)?;
    w.flush().map_err(WireError::from)?;
    let client_version = r.read_u64()?;
    if client_version >> 8 != 1 {
        return Err(ServerError::Version { protocol: "worker", version: show(client_version) });
    }
    let version = client_version.min(SERVER_VERSION);
    let mut features = BTreeSet::new();
    let _budget = MessageBudget::start();
    if minor(version) >= 38 {
        let theirs = r.read_string_set("client features")?;
        let ours: Vec<String> = SERVER_FEATURES.iter().map(|s| s.to_string()).collect();
        w.write_strings(&ours)?;
        w.flush().map_err(WireError::from)?;
        features = ours.into_iter().filter(|f| theirs.contains(f)).collect();
    }
    if minor(version) >= 14 && r.read_u64()? != 0 {
        r.read_u64()?; // obsolete CPU affinity
    }
    if minor(version) >= 11 {
        r.read_u64()?; // obsolete reserveSpace
    }
    if minor(version) >= 33 {
        w.write_str(&cfg.version_string)?;
    }
    if minor(version) >= 35 {
        // Trusted: Nix ≥ 2.16 sends BuildDerivation for every derivation; not trusted: for
        // content-addressed ones, and BuildPaths of the `.drv` closure for the others.
        w.write_u64(if trusted { TRUSTED } else { NOT_TRUSTED })?;
    }
    if version < MIN_CLIENT_VERSION {
        let msg = format!(
            "vouch needs a Nix client speaking worker protocol 1.34 (Nix 2.8) or later; this one speaks {}",
            show(version)
        );
        write_error(w, version, &msg)?;
        w.flush().map_err(WireError::from)?;
        return Err(ServerError::Version { protocol: "worker", version: show(version) });
    }
    w.write_u64(STDERR_LAST)?;
    w.flush().map_err(WireError::from)?;
    let mut profile = ClientProfile::new(Protocol::Worker, version, features);
    profile.declared_nix = cfg.declared_nix;
    Ok(profile)
}

/// `STDERR_ERROR` in the layout of `version`.
pub fn write_error(w: &mut impl Write, version: ProtoVersion, msg: &str) -> Result<(), WireError> {
    w.write_u64(STDERR_ERROR)?;
    if minor(version) >= 26 {
        w.write_str("Error")?;
        w.write_u64(0)?; // lvlError
        w.write_str("Error")?;
        w.write_str(msg)?;
        w.write_u64(0)?; // no position
        w.write_u64(0)?; // no traces
    } else {
        w.write_str(msg)?;
        w.write_u64(1)?; // exit status
    }
    Ok(())
}

enum Flow {
    Continue,
    Close,
}

struct Conn<W: Write> {
    w: W,
    profile: ClientProfile,
    next_activity: u64,
}

impl<W: Write> Conn<W> {
    fn flush(&mut self) -> Result<(), WireError> {
        self.w.flush().map_err(WireError::from)
    }

    fn error(&mut self, msg: &str) -> Result<(), ServerError> {
        tracing::warn!("{msg}");
        write_error(&mut self.w, self.profile.version, msg)?;
        self.flush()?;
        Ok(())
    }

    fn op<R: BufRead>(
        &mut self,
        op: u64,
        r: &mut R,
        handler: &mut dyn Handler,
    ) -> Result<Flow, ServerError> {
        let version = self.profile.version;
        let parsed = request::read(op, r, &self.profile);
        let parsed = match parsed {
            Ok(p) => p,
            Err(CodecError::Wire(e)) if !e.is_limit() => return Err(e.into()),
            Err(e) => {
                // The request was malformed or over a limit: we cannot know where it ends.
                self.error(&format!("bad {} request: {}", op_name(op), error_chain(&e)))?;
                return Ok(Flow::Close);
            }
        };
        match parsed {
            Parsed::Unsupported => {
                let msg = if op_name(op) == "unknown" {
                    format!("vouch nix-builder: unknown worker operation {op}")
                } else {
                    format!(
                        "vouch nix-builder does not support worker operation {op} ({}); it serves \
                         Nix's remote-build hook (build-remote) and `nix copy`",
                        op_name(op)
                    )
                };
                self.error(&msg)?;
                Ok(Flow::Close)
            }
            Parsed::IsValid(path) => {
                let paths = BTreeSet::from([path.clone()]);
                let reply = self.run(handler, Action::QueryValidPaths { paths, substitute: false });
                self.answer(reply, |w, reply| match reply {
                    Reply::ValidPaths(v) => Ok(w.write_bool(v.contains(&path))?),
                    other => Err(unexpected(other)),
                })
            }
            Parsed::Ensure { op, wanted, mode } => self.build_paths(handler, op, wanted, mode),
            Parsed::Missing(wanted) => self.query_missing(handler, wanted),
            Parsed::TempRoot(path) => {
                // A temporary GC root: pin the path for the session.
                let paths = BTreeSet::from([path]);
                let reply = self.run(handler, Action::QueryValidPaths { paths, substitute: false });
                self.answer(reply, |w, _| Ok(w.write_u64(1)?))
            }
            Parsed::PathInfo(path) => {
                let reply = self.run(handler, Action::QueryPathInfo(path));
                self.answer(reply, |w, reply| match reply {
                    Reply::PathInfo(None) => Ok(w.write_u64(0)?),
                    Reply::PathInfo(Some(info)) => {
                        w.write_u64(1)?;
                        types::write_unkeyed_path_info(w, &info, version)
                    }
                    other => Err(unexpected(other)),
                })
            }
            Parsed::Nar(path) => self.nar_from_path(handler, path),
            Parsed::AddOne(info, repair) => {
                let mut framed = FramedReader::new(r);
                let outcome = {
                    let mut src = OneUpload { info: Some(*info), nar: Taken::new(&mut framed, 0) };
                    let reply = self.run(handler, Action::AddToStore { repair, uploads: &mut src });
                    (reply, src.nar.wire_failed)
                };
                self.finish_upload(outcome, &mut framed)
            }
            Parsed::AddMany(repair) => {
                let mut framed = FramedReader::new(r);
                let outcome = {
                    let mut src =
                        ManyUploads { left: None, nar: Taken::new(&mut framed, 0), bad: None };
                    let reply = self.run(handler, Action::AddToStore { repair, uploads: &mut src });
                    (reply, src.nar.wire_failed)
                };
                self.finish_upload(outcome, &mut framed)
            }
            Parsed::Action(action) => {
                let is_build = matches!(action, Action::BuildDerivation(_));
                let reply = self.run(handler, action);
                let profile = self.profile.clone();
                self.answer(reply, |w, reply| match reply {
                    Reply::Done if !is_build => Ok(()),
                    Reply::ValidPaths(v) => types::write_store_path_set(w, &v),
                    Reply::Built(res) => types::write_build_result(w, &(&*res).into(), &profile),
                    other => Err(unexpected(other)),
                })
            }
        }
    }

    /// `QueryMissing` (40): nothing is substituted or built here on request, so every path
    /// that is not valid is "unknown" (derivation outputs included).
    fn query_missing(
        &mut self,
        handler: &mut dyn Handler,
        wanted: Vec<String>,
    ) -> Result<Flow, ServerError> {
        // Nothing is substituted or built here on request: every path that is not valid
        // is "unknown" (derivation outputs included).
        let parsed = parse_wanted(wanted);
        let opaque = parsed.iter().filter_map(|(_, p)| p.clone()).collect();
        let reply = self.run(handler, Action::QueryValidPaths { paths: opaque, substitute: false });
        self.answer(reply, |w, reply| match reply {
            Reply::ValidPaths(valid) => {
                let unknown: BTreeSet<&String> = parsed
                    .iter()
                    .filter(|(_, p)| p.as_ref().is_none_or(|p| !valid.contains(p)))
                    .map(|(x, _)| x)
                    .collect();
                w.write_u64(0)?; // willBuild
                w.write_u64(0)?; // willSubstitute
                w.write_strings(unknown)?;
                w.write_u64(0)?; // downloadSize
                w.write_u64(0)?; // narSize
                Ok(())
            }
            other => Err(unexpected(other)),
        })
    }

    /// `NarFromPath` (38): the NAR, exactly as long as the store says.
    fn nar_from_path(
        &mut self,
        handler: &mut dyn Handler,
        path: StorePath,
    ) -> Result<Flow, ServerError> {
        let reply = self.run(handler, Action::NarFromPath(path));
        self.answer(reply, |w, reply| match reply {
            Reply::Nar(mut nar) => {
                let n =
                    io::copy(&mut (&mut nar.reader).take(nar.size), w).map_err(WireError::from)?;
                if n != nar.size {
                    return Err(CodecError::Field {
                        what: "NAR",
                        problem: format!("store file ended after {n} of {} bytes", nar.size),
                    });
                }
                Ok(())
            }
            other => Err(unexpected(other)),
        })
    }

    /// `BuildPaths` (9) and `BuildPathsWithResults` (46): the session makes each derived path
    /// valid (see `crate::nixbuilder`). 46 answers one result per path; 9 answers success, or
    /// the first failure as an error.
    fn build_paths(
        &mut self,
        handler: &mut dyn Handler,
        op: u64,
        wanted: Vec<String>,
        mode: super::action::BuildMode,
    ) -> Result<Flow, ServerError> {
        let parsed: Result<Vec<DerivedPath>, String> =
            wanted.iter().map(|w| DerivedPath::parse(w)).collect();
        let parsed = match parsed {
            Ok(p) => p,
            Err(e) => {
                return self.answer(Err(format!("bad {}: {e}", op_name(op)).into()), |_, _| Ok(()))
            }
        };
        tracing::info!(op = op_name(op), paths = ?wanted, "building derived paths");
        let client = self.profile.clone();
        let reply = self.run(handler, Action::BuildPaths { wanted: parsed, mode, client });
        let results = match reply {
            Ok(Reply::BuiltPaths(r)) if r.len() == wanted.len() => r,
            Ok(other) => return Err(ServerError::Reply(format!("the session answered {other:?}"))),
            Err(e) => return self.answer(Err(e), |_, _| Ok(())),
        };
        if op == 9 {
            if let Some(bad) = results.into_iter().find(|r| !r.status.is_success()) {
                return self.answer(Err(bad.error_msg.into()), |_, _| Ok(()));
            }
            return self.answer(Ok(Reply::Done), |w, _| Ok(w.write_u64(1)?));
        }
        let profile = self.profile.clone();
        self.answer(Ok(Reply::Done), |w, _| {
            w.write_u64(wanted.len() as u64)?;
            for (path, result) in wanted.iter().zip(&results) {
                w.write_str(path)?;
                types::write_build_result(w, result, &profile)?;
            }
            Ok(())
        })
    }

    fn run(&mut self, handler: &mut dyn Handler, action: Action<'_>) -> Result<Reply, ActionError> {
        let mut log = WorkerLog {
            w: &mut self.w,
            next_activity: &mut self.next_activity,
            activity: None,
            lines: Default::default(),
            failed: false,
        };
        let reply = handler.handle(action, &mut log);
        if log.failed {
            tracing::warn!("could not send log messages to the client");
        }
        reply
    }

    /// After an upload: drain what the session did not read, so the protocol stays in step.
    fn finish_upload<R: Read + ?Sized>(
        &mut self,
        (reply, wire_failed): (Result<Reply, ActionError>, Option<io::ErrorKind>),
        framed: &mut FramedReader<'_, R>,
    ) -> Result<Flow, ServerError> {
        if let Some(kind) = wire_failed {
            // The peer hung up or the stream broke mid-upload: nothing was registered (the
            // content store commits only complete, verified uploads); there is no one to answer.
            return Err(ServerError::PeerGone(kind));
        }
        let extra = framed.drain()?;
        let reply = match reply {
            Ok(_) if extra > 0 => Err(format!(
                "the upload carried {extra} bytes after the last NAR; nothing was registered"
            )
            .into()),
            other => other,
        };
        self.answer(reply, |_, reply| match reply {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        })
    }

    fn answer(
        &mut self,
        reply: Result<Reply, ActionError>,
        write: impl FnOnce(&mut W, Reply) -> Result<(), CodecError>,
    ) -> Result<Flow, ServerError> {
        match reply {
            Ok(reply) => {
                self.w.write_u64(STDERR_LAST)?;
                match write(&mut self.w, reply) {
                    Ok(()) => {}
                    Err(CodecError::Wire(e)) => return Err(e.into()),
                    // We already sent STDERR_LAST; the connection cannot carry an error now.
                    Err(e) => return Err(ServerError::Reply(error_chain(&e))),
                }
                self.flush()?;
                Ok(Flow::Continue)
            }
            Err(e) => {
                self.error(&error_chain(e.as_ref()))?;
                Ok(Flow::Continue)
            }
        }
    }
}

fn unexpected(reply: Reply) -> CodecError {
    CodecError::Field { what: "reply", problem: format!("the session answered {reply:?}") }
}
