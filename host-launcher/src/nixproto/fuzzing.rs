//! Bodies of the Nix protocol fuzz targets (the repository's `fuzz/` workspace), plain functions
//! so that `host-launcher/tests/fuzz_seeds.rs` replays their seed corpora with the stable
//! toolchain. Not part of vouch's API.
//!
//! The server side is fuzzed as a hostile client would drive it: [`worker_session`] and
//! [`serve_session`] feed the input, as the whole byte stream a client sends, to the real
//! front-ends ([`super::worker::serve`], [`super::serve::serve`]) in front of [`FuzzCore`], an
//! in-memory core that answers every action (some paths valid, uploads read to their end,
//! builds that log and succeed). Invariants: the session ends (clean end, or an error), never
//! panics; an upload's NAR that reads to its end has exactly its declared `narSize`; the core
//! sees only store paths that parsed. [`records`] decodes one record per input (the first byte
//! picks the record and the protocol version) and checks that what decodes re-encodes to bytes
//! that decode to the same record, and that re-encoding is stable.
//!
//! Heap use is held to [`BOUND`] by the harness: nothing may allocate on the word of a length or
//! count field before the data arrived.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use channel::messages::AttesterKind;

use nix_formats::fuzzing::AllocBound;
use nix_formats::StorePath;

use super::action::{Action, ActionError, BuildDerivation, Handler, NarStream, Reply};
use super::serve::ServeConfig;
use super::types::{self, CodecError};
use super::version::{ClientProfile, Protocol, FEATURE_REALISATION_WITH_PATH};
use super::worker::WorkerConfig;
use crate::build::Timings;
use crate::core::result::Published;
use crate::core::{
    self, BuildLog, Built, LegacyRealisation, PublishedOutput, UploadSource, ValidPathInfo,
};
use crate::vm::Mode;

/// The heap bound of the protocol bodies: decoded records (store-path sets, string maps) are a
/// few times their wire size; a fixed-size read buffer or two on top.
pub const BOUND: AllocBound = AllocBound { per_byte: 32, base: 256 << 10 };

/// A real NAR (a regular file) that [`FuzzCore`] serves for every valid path.
const NAR: &[u8] = &[
    13, 0, 0, 0, 0, 0, 0, 0, b'n', b'i', b'x', b'-', b'a', b'r', b'c', b'h', b'i', b'v', b'e',
    b'-', b'1', 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, b'(', 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0,
    b't', b'y', b'p', b'e', 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, b'r', b'e', b'g', b'u', b'l', b'a',
    b'r', 0, 8, 0, 0, 0, 0, 0, 0, 0, b'c', b'o', b'n', b't', b'e', b'n', b't', b's', 0, 0, 0, 0, 0,
    0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, b')', 0, 0, 0, 0, 0, 0, 0,
];

/// An in-memory core for fuzzing the front-ends: a path is valid if the first byte of its
/// digest is even or it was uploaded in this session.
#[derive(Debug, Default)]
pub struct FuzzCore {
    uploaded: BTreeSet<StorePath>,
}

impl FuzzCore {
    fn valid(&self, p: &StorePath) -> bool {
        p.digest()[0] % 2 == 0 || self.uploaded.contains(p)
    }

    fn upload(&mut self, uploads: &mut dyn UploadSource) -> Result<Reply, ActionError> {
        while let Some(info) = uploads.next_path()? {
            let mut got = 0u64;
            let mut buf = [0u8; 4096];
            loop {
                match uploads.nar().read(&mut buf)? {
                    0 => break,
                    n => got += n as u64,
                }
            }
            assert_eq!(got, info.info.nar_size, "an upload's NAR has its declared size");
            self.uploaded.insert(info.path);
        }
        Ok(Reply::Done)
    }

    fn build(&mut self, req: &BuildDerivation, log: &mut dyn BuildLog) -> Reply {
        log.started(&req.drv_path);
        log.output(b"fuzz build\n");
        log.finished();
        let mut outputs = BTreeMap::new();
        for (name, out) in &req.drv.outputs {
            let Some(path) = &out.path else { continue };
            let json = format!("{{\"outPath\":\"{}\"}}", path.base_name());
            let published = PublishedOutput {
                path: path.clone(),
                info: nar_info(),
                narinfo_sigs: BTreeSet::new(),
                signatures: BTreeSet::from(["fuzz-1:AAAA".to_string()]),
                legacy: Some(LegacyRealisation { id: format!("sha256:00!{name}"), json }),
                diverged: None,
            };
            outputs.insert(name.clone(), published);
        }
        Reply::Built(Box::new(core::BuildResult::Built(Box::new(Built {
            start_time: 0,
            stop_time: 0,
            attester: AttesterKind::Simulated,
            evidence_root: "fuzz (simulated)".into(),
            measurement: String::new(),
            mode: Mode::Tcg,
            timings: Timings::default(),
            published: Published { key_name: "fuzz-1".into(), step_dir: PathBuf::new(), outputs },
        }))))
    }
}

/// The path info of [`NAR`].
fn nar_info() -> build_trace::PathInfo {
    build_trace::PathInfo {
        nar_hash: build_trace::NarHash::of(NAR),
        nar_size: NAR.len() as u64,
        references: BTreeSet::new(),
        ca: None,
    }
}

impl Handler for FuzzCore {
    fn handle(&mut self, action: Action<'_>, log: &mut dyn BuildLog) -> Result<Reply, ActionError> {
        Ok(match action {
            Action::SetOptions(_) => Reply::Done,
            Action::QueryValidPaths { paths, .. } | Action::QueryClosure(paths) => {
                Reply::ValidPaths(paths.into_iter().filter(|p| self.valid(p)).collect())
            }
            Action::QueryPathInfo(p) if self.valid(&p) => {
                Reply::PathInfo(Some(Box::new(ValidPathInfo {
                    path: p,
                    info: nar_info(),
                    deriver: None,
                    registration_time: 0,
                    ultimate: false,
                    sigs: BTreeSet::new(),
                })))
            }
            Action::QueryPathInfo(_) => Reply::PathInfo(None),
            Action::NarFromPath(p) if self.valid(&p) => {
                Reply::Nar(NarStream { size: NAR.len() as u64, reader: Box::new(NAR) })
            }
            Action::NarFromPath(p) => return Err(format!("{p} is not valid").into()),
            Action::AddToStore { uploads, .. } => return self.upload(uploads),
            Action::BuildDerivation(req) => self.build(&req, log),
            Action::BuildPaths { wanted, .. } => {
                let r = super::BuildResult::failure(super::BuildStatus::MiscFailure, "fuzz");
                Reply::BuiltPaths(vec![r; wanted.len()])
            }
        })
    }

    fn trusted(&self) -> bool {
        true
    }
}

/// Fuzz body: a worker-protocol client's byte stream (see the module docs).
pub fn worker_session(data: &[u8]) {
    let cfg = WorkerConfig { version_string: "vouch fuzz".into(), declared_nix: None };
    let mut out = Vec::new();
    let _ = super::worker::serve(data, &mut out, &cfg, &mut FuzzCore::default());
}

/// Fuzz body: a serve-protocol client's byte stream (see the module docs).
pub fn serve_session(data: &[u8]) {
    let cfg = ServeConfig { write: true, declared_nix: None };
    let (mut out, mut log) = (Vec::new(), Vec::new());
    let _ = super::serve::serve(data, &mut out, &mut log, &cfg, &mut FuzzCore::default());
}

/// Decode with `read`; if that works, encode with `write`, decode again, compare, encode again.
fn round_trip<T: PartialEq + std::fmt::Debug>(
    what: &str,
    mut data: &[u8],
    read: impl Fn(&mut &[u8]) -> Result<T, CodecError>,
    write: impl Fn(&mut Vec<u8>, &T) -> Result<(), CodecError>,
) {
    let Ok(v) = read(&mut data) else { return };
    let mut bytes = Vec::new();
    write(&mut bytes, &v).unwrap_or_else(|e| panic!("{what}: a decoded record encodes: {e}"));
    let mut r = &bytes[..];
    let again = read(&mut r).unwrap_or_else(|e| panic!("{what}: our encoding decodes: {e}"));
    assert!(r.is_empty(), "{what}: the decoder reads exactly our encoding");
    assert_eq!(again, v, "{what}: record round trip");
    let mut twice = Vec::new();
    write(&mut twice, &again).expect("encodes");
    assert_eq!(twice, bytes, "{what}: encoding is stable");
}

/// Fuzz body: one protocol record (see the module docs). The first byte's low 3 bits pick the
/// record; its high bits, the protocol minor version.
pub fn records(data: &[u8]) {
    let Some((&sel, data)) = data.split_first() else { return };
    let minor = u64::from(sel >> 3) + 10;
    let worker = 0x100 | minor;
    let drv_path: StorePath =
        "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar.drv".parse().expect("a drv path");
    match sel & 7 {
        0 => round_trip(
            "upload info",
            data,
            |r| types::read_upload_info(r),
            types::write_upload_info,
        ),
        1 => round_trip(
            "basic derivation",
            data,
            |r| types::read_basic_derivation(r, &drv_path),
            types::write_basic_derivation,
        ),
        2 => round_trip(
            "client options",
            data,
            |r| types::read_client_options(r, worker),
            |w, v| types::write_client_options(w, v, worker),
        ),
        3 => round_trip(
            "build options",
            data,
            |r| types::read_build_options(r, 0x200 | (minor & 7)),
            |w, v| types::write_build_options(w, v, 0x200 | (minor & 7)),
        ),
        4 => {
            let path = drv_path.clone();
            round_trip(
                "serve path info",
                data,
                |r| types::read_serve_path_info(r, path.clone(), 0x200 | (minor & 7)),
                |w, v| types::write_serve_path_info(w, v, 0x200 | (minor & 7)),
            )
        }
        5 => {
            let features = if sel & 0x80 != 0 {
                BTreeSet::from([FEATURE_REALISATION_WITH_PATH.to_string()])
            } else {
                BTreeSet::new()
            };
            let client = ClientProfile::new(Protocol::Worker, worker, features);
            round_trip(
                "build result",
                data,
                |r| types::read_build_result(r, &client),
                |w, v| types::write_build_result(w, v, &client),
            )
        }
        6 => round_trip(
            "store path set",
            data,
            |r| types::read_store_path_set(r, "paths"),
            |w, v| types::write_store_path_set(w, v),
        ),
        _ => round_trip(
            "unkeyed path info",
            data,
            |r| types::read_unkeyed_path_info(r, drv_path.clone(), worker),
            |w, v| types::write_unkeyed_path_info(w, v, worker),
        ),
    }
}
