//! The serve protocol, server side (`vouch nix-builder --serve --write`, what `ssh://` runs).
//!
//! Handshake: C→S `u64 SERVE_MAGIC_1, u64 clientVersion` (the client may send both before
//! reading); S→C `u64 SERVE_MAGIC_2, u64 2.8`; negotiated = min. No STDERR messages: a command's
//! answer follows directly, and logs go to the process's stderr (Nix passes `log-fd=4` for
//! `ssh://` builders, so they land in the build log).
//!
//! Commands served: 1 QueryValidPaths, 2 QueryPathInfos, 3 DumpStorePath, 8 BuildDerivation,
//! 9 AddToStoreNar. The protocol has no error message: on an unknown command or a request that
//! fails (a bad upload), the message goes to stderr and the process exits non-zero, as
//! `nix-store --serve` does; the client then reports the failure with our stderr text.
//!
//! What is not here: what the commands do (the [`Handler`]).

use std::collections::BTreeSet;
use std::io::{self, BufRead, Read, Write};

use super::action::{error_chain, Action, ActionError, BuildDerivation, Handler, Reply};
use super::types::{self, CodecError};
use super::version::{
    major, serve_build_options_range, show, ClientProfile, ProtoVersion, Protocol,
};
use super::wire::{MessageBudget, Taken, WireError, WireRead, WireWrite};
use super::ServerError;
use crate::core::log::TextLog;
use crate::core::{NixVersion, UploadError, UploadSource, ValidPathInfo};
use nix_formats::StorePath;

/// First word a client sends.
pub const SERVE_MAGIC_1: u64 = 0x390c_9deb;
/// First word the server answers.
pub const SERVE_MAGIC_2: u64 = 0x5452_eecb;
/// The version we speak: 2.8 (Nix ≥ 2.35 realisations; older clients negotiate down).
pub const SERVER_VERSION: ProtoVersion = 0x208;
/// The oldest client we serve: 2.5 (`AddToStoreNar`).
pub const MIN_CLIENT_VERSION: ProtoVersion = 0x205;

/// Serve command names.
pub fn cmd_name(cmd: u64) -> &'static str {
    match cmd {
        1 => "QueryValidPaths",
        2 => "QueryPathInfos",
        3 => "DumpStorePath",
        4 => "ImportPaths",
        5 => "ExportPaths",
        6 => "BuildPaths",
        7 => "QueryClosure",
        8 => "BuildDerivation",
        9 => "AddToStoreNar",
        _ => "unknown",
    }
}

/// Options of the serve front-end.
#[derive(Debug, Clone, Default)]
pub struct ServeConfig {
    /// `--write`: uploads and builds are allowed.
    pub write: bool,
    /// `--client-nix-version`, copied into the client profile.
    pub declared_nix: Option<NixVersion>,
}

/// Serve one serve-protocol connection until the client hangs up. Build logs are written to
/// `log` (the process's stderr).
pub fn serve<R: BufRead, W: Write>(
    mut r: R,
    mut w: W,
    log: &mut dyn Write,
    cfg: &ServeConfig,
    handler: &mut dyn Handler,
) -> Result<(), ServerError> {
    let profile = handshake(&mut r, &mut w, cfg)?;
    loop {
        let Some(cmd) = r.read_u64_or_eof()? else {
            tracing::debug!("client closed the connection");
            return Ok(());
        };
        tracing::debug!(cmd, name = cmd_name(cmd), "command");
        // One command is one message: what it decodes is bounded in all (its NAR, streamed to
        // disk, is not counted).
        let _budget = MessageBudget::start();
        let needs_write = matches!(cmd, 8 | 9);
        if needs_write && !cfg.write {
            return Err(ServerError::Refused(format!(
                "serve command {cmd} ({}) needs --write",
                cmd_name(cmd)
            )));
        }
        let mut cx = Command { w: &mut w, sink: TextLog(&mut *log), handler, cmd };
        cx.run(&mut r, &profile)?;
        w.flush().map_err(WireError::from)?;
    }
}

/// The handshake: magic words, then the version both sides speak.
fn handshake<R: BufRead, W: Write>(
    r: &mut R,
    w: &mut W,
    cfg: &ServeConfig,
) -> Result<ClientProfile, ServerError> {
    let magic = r.read_u64()?;
    if magic != SERVE_MAGIC_1 {
        return Err(ServerError::BadMagic { protocol: "serve", got: magic });
    }
    w.write_u64(SERVE_MAGIC_2)?;
    w.write_u64(SERVER_VERSION)?;
    w.flush().map_err(WireError::from)?;
    let client_version = r.read_u64()?;
    let version = client_version.min(SERVER_VERSION);
    if major(client_version) != 2 || version < MIN_CLIENT_VERSION {
        return Err(ServerError::Version { protocol: "serve", version: show(client_version) });
    }
    let mut profile = ClientProfile::new(Protocol::Serve, version, BTreeSet::new());
    profile.declared_nix = cfg.declared_nix;
    tracing::info!(version = %show(version), client = %profile.nix_range(), "serve protocol handshake done");
    Ok(profile)
}

/// One command being answered.
struct Command<'a, W: Write> {
    w: &'a mut W,
    sink: TextLog<&'a mut dyn Write>,
    handler: &'a mut dyn Handler,
    cmd: u64,
}

impl<W: Write> Command<'_, W> {
    fn handle(&mut self, action: Action<'_>) -> Result<Reply, ServerError> {
        ok(self.handler.handle(action, &mut self.sink), self.cmd)
    }

    /// Read command `cmd`'s arguments from `r` and answer it.
    fn run<R: BufRead>(&mut self, r: &mut R, profile: &ClientProfile) -> Result<(), ServerError> {
        match self.cmd {
            1 => {
                let _lock = r.read_bool()?;
                let substitute = r.read_bool()?;
                let paths = codec(types::read_store_path_set(r, "paths"))?;
                match self.handle(Action::QueryValidPaths { paths, substitute })? {
                    Reply::ValidPaths(v) => codec(types::write_store_path_set(self.w, &v)),
                    other => Err(unexpected(other)),
                }
            }
            2 => {
                let paths = codec(types::read_store_path_set(r, "paths"))?;
                self.query_path_infos(paths, profile.version)
            }
            7 => {
                let include_outputs = r.read_bool()?;
                let paths = codec(types::read_store_path_set(r, "paths"))?;
                if include_outputs {
                    tracing::debug!(
                        "QueryClosure: includeOutputs is ignored (vouch keeps no derivations)"
                    );
                }
                match self.handle(Action::QueryClosure(paths))? {
                    Reply::ValidPaths(v) => codec(types::write_store_path_set(self.w, &v)),
                    other => Err(unexpected(other)),
                }
            }
            3 => {
                let path = codec(types::read_store_path(r, "path"))?;
                self.dump_store_path(path)
            }
            8 => self.build_derivation(r, profile),
            9 => {
                let info = codec(types::read_upload_info(r))?;
                let mut src = RawUpload { info: Some(info), nar: Taken::new(r, 0) };
                let reply = self.handle(Action::AddToStore { repair: false, uploads: &mut src });
                if src.nar.wire_failed.is_some() {
                    return Err(ServerError::PeerGone(io::ErrorKind::UnexpectedEof));
                }
                match reply? {
                    Reply::Done => Ok(self.w.write_u64(1)?),
                    other => Err(unexpected(other)),
                }
            }
            cmd => Err(ServerError::Refused(if cmd_name(cmd) == "unknown" {
                format!("unknown serve command {cmd}")
            } else {
                format!(
                    "vouch nix-builder does not support serve command {cmd} ({}); it serves \
                     Nix's remote-build hook (build-remote) and `nix copy`",
                    cmd_name(cmd)
                )
            })),
        }
    }

    /// `QueryPathInfos` (2): the infos of the valid ones among `paths`, then an empty name.
    fn query_path_infos(
        &mut self,
        paths: BTreeSet<StorePath>,
        version: ProtoVersion,
    ) -> Result<(), ServerError> {
        for path in paths {
            match self.handle(Action::QueryPathInfo(path.clone()))? {
                Reply::PathInfo(None) => {}
                Reply::PathInfo(Some(info)) => {
                    self.w.write_str(&path.to_string())?;
                    codec(types::write_serve_path_info(self.w, &info, version))?;
                }
                other => return Err(unexpected(other)),
            }
        }
        Ok(self.w.write_str("")?)
    }

    /// `DumpStorePath` (3): the NAR, exactly as long as the store says.
    fn dump_store_path(&mut self, path: StorePath) -> Result<(), ServerError> {
        match self.handle(Action::NarFromPath(path))? {
            Reply::Nar(mut nar) => {
                let n = io::copy(&mut (&mut nar.reader).take(nar.size), self.w)
                    .map_err(WireError::from)?;
                if n != nar.size {
                    return Err(ServerError::Reply(format!(
                        "store file ended after {n} of {} NAR bytes",
                        nar.size
                    )));
                }
                Ok(())
            }
            other => Err(unexpected(other)),
        }
    }

    /// `BuildDerivation` (8): a basic derivation with the client's build options.
    fn build_derivation<R: BufRead>(
        &mut self,
        r: &mut R,
        profile: &ClientProfile,
    ) -> Result<(), ServerError> {
        let drv_path = codec(types::read_store_path(r, "drvPath"))?;
        let drv = codec(types::read_basic_derivation(r, &drv_path))?;
        let options = codec(types::read_build_options(r, profile.version))?;
        let mut client = profile.clone();
        client.observed =
            serve_build_options_range(options.nr_repeats, options.enforce_determinism);
        if client.observed.is_some() {
            tracing::info!(client = %client.nix_range(), "build options tell the client's Nix");
        }
        let req = BuildDerivation {
            drv_path,
            drv,
            mode: super::action::BuildMode::Normal,
            options: Some(options),
            client: client.clone(),
        };
        match self.handle(Action::BuildDerivation(Box::new(req)))? {
            Reply::Built(res) => codec(types::write_build_result(self.w, &(&*res).into(), &client)),
            other => Err(unexpected(other)),
        }
    }
}

fn codec<T>(r: Result<T, CodecError>) -> Result<T, ServerError> {
    r.map_err(|e| match e {
        CodecError::Wire(w) => ServerError::Wire(w),
        other => ServerError::Refused(format!("bad request: {}", error_chain(&other))),
    })
}

fn ok(reply: Result<Reply, ActionError>, cmd: u64) -> Result<Reply, ServerError> {
    reply.map_err(|e| {
        ServerError::Refused(format!("{}: {}", cmd_name(cmd), error_chain(e.as_ref())))
    })
}

fn unexpected(reply: Reply) -> ServerError {
    ServerError::Reply(format!("the session answered {reply:?}"))
}

/// Serve `AddToStoreNar`: exactly `narSize` raw bytes follow the info.
struct RawUpload<'r, R: Read> {
    info: Option<ValidPathInfo>,
    nar: Taken<'r, R>,
}

impl<R: Read> UploadSource for RawUpload<'_, R> {
    fn next_path(&mut self) -> Result<Option<ValidPathInfo>, UploadError> {
        self.nar.skip_rest()?;
        let info = self.info.take();
        if let Some(i) = &info {
            self.nar.left = i.info.nar_size;
        }
        Ok(info)
    }

    fn nar(&mut self) -> &mut dyn Read {
        &mut self.nar
    }
}
