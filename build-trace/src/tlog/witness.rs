//! A C2SP tlog-witness: the `add-checkpoint` rules, independent of HTTP.
//!
//! Request body: `old <size>\n`, up to 63 base64 consistency-proof lines, an empty line, then
//! the signed checkpoint. Answers, in the order the spec checks them: 400 malformed (or old
//! size larger than the checkpoint's); 404 unknown origin; 403 no valid signature by the log's
//! key; 409 with `<size>\n` (`text/x.tlog.size`) when the old size is not the size this witness
//! last cosigned; 422 when the consistency proof does not check; 409 for the same size with
//! another root; 200 with a `cosignature/v1` line otherwise. The check of the old size and the
//! update of the record happen under one lock (a mutex and a lock file), so two concurrent
//! requests cannot roll the record back. The record is one file per origin in the state
//! directory: the last checkpoint cosigned.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::prelude::{Engine, BASE64_STANDARD};
use tlog_tiles::Hash;

use super::note::{Checkpoint, CosignerKey, NoteVerifierKey};
use super::proof::consistency;
use super::{io_err, origin_file_name, TlogError};

/// The media type of a 409's body.
pub const SIZE_MEDIA_TYPE: &str = "text/x.tlog.size";

/// A witness's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessReply {
    /// HTTP status.
    pub status: u16,
    /// Content type.
    pub content_type: &'static str,
    /// Body.
    pub body: Vec<u8>,
}

impl WitnessReply {
    fn text(status: u16, msg: impl Into<String>) -> WitnessReply {
        let mut body = msg.into().into_bytes();
        body.push(b'\n');
        WitnessReply { status, content_type: "text/plain; charset=utf-8", body }
    }
}

/// A witness: its key, the logs it follows, and its records.
#[derive(Debug)]
pub struct Witness {
    key: CosignerKey,
    logs: Vec<NoteVerifierKey>,
    dir: PathBuf,
    lock: Mutex<()>,
}

/// A parsed request.
struct AddCheckpoint<'a> {
    old: u64,
    proof: Vec<Hash>,
    note: &'a [u8],
}

fn parse(body: &[u8]) -> Result<AddCheckpoint<'_>, String> {
    let mut rest = body;
    let mut line = || -> Result<&str, String> {
        let end = rest.iter().position(|&b| b == b'\n').ok_or("a line without newline")?;
        let l = std::str::from_utf8(&rest[..end]).map_err(|_| "not UTF-8")?;
        rest = &rest[end + 1..];
        Ok(l)
    };
    let old_line = line()?;
    let old = old_line
        .strip_prefix("old ")
        .filter(|n| *n == "0" || !n.starts_with('0'))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("the first line {old_line:?} is not `old <size>`"))?;
    let mut proof = Vec::new();
    loop {
        let l = line()?;
        if l.is_empty() {
            break;
        }
        if proof.len() == 63 {
            return Err("more than 63 consistency proof lines".into());
        }
        let h = BASE64_STANDARD.decode(l).ok().and_then(|b| <[u8; 32]>::try_from(b).ok());
        proof.push(Hash(h.ok_or_else(|| format!("{l:?} is not a base64 hash"))?));
    }
    Ok(AddCheckpoint { old, proof, note: rest })
}

impl Witness {
    /// A witness with `key`, cosigning the logs whose keys are `logs`, keeping its records in
    /// `dir`.
    pub fn new(
        key: CosignerKey,
        logs: Vec<NoteVerifierKey>,
        dir: &Path,
    ) -> Result<Witness, TlogError> {
        std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        Ok(Witness { key, logs, dir: dir.to_path_buf(), lock: Mutex::new(()) })
    }

    /// The witness's key.
    pub fn key(&self) -> &CosignerKey {
        &self.key
    }

    /// The last checkpoint cosigned for `origin`.
    pub fn last(&self, origin: &str) -> Result<Option<Checkpoint>, TlogError> {
        let p = self.dir.join(origin_file_name(origin));
        match std::fs::read(&p) {
            Ok(note) => Checkpoint::verify(&note, &self.logs, &[], 0).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &p)(e)),
        }
    }

    /// Handle `POST add-checkpoint` with `body` at time `now` (POSIX seconds).
    pub fn add_checkpoint(&self, body: &[u8], now: u64) -> WitnessReply {
        let req = match parse(body) {
            Ok(r) => r,
            Err(e) => return WitnessReply::text(400, e),
        };
        let origin = match signed_note::Note::from_bytes(req.note)
            .ok()
            .and_then(|n| tlog_tiles::Checkpoint::from_bytes(n.text()).ok())
        {
            Some(c) => c.origin().to_owned(),
            None => return WitnessReply::text(400, "the body does not end in a signed checkpoint"),
        };
        if !self.logs.iter().any(|k| !k.cosigner && k.name == origin) {
            return WitnessReply::text(404, format!("unknown log {origin:?}"));
        }
        let cp = match Checkpoint::verify(req.note, &self.logs, &[], 0) {
            Ok(cp) => cp,
            Err(e) => return WitnessReply::text(403, crate::error_chain(&e)),
        };
        if req.old > cp.size {
            return WitnessReply::text(
                400,
                format!("old size {} > checkpoint size {}", req.old, cp.size),
            );
        }
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        match self.locked(|| self.check_and_record(&cp, &req)) {
            Ok(Ok(())) => WitnessReply {
                status: 200,
                content_type: "text/plain; charset=utf-8",
                body: self.key.cosign(cp.text().as_bytes(), now).into_bytes(),
            },
            Ok(Err(reply)) => reply,
            Err(e) => WitnessReply::text(500, crate::error_chain(&e)),
        }
    }

    fn check_and_record(
        &self,
        cp: &Checkpoint,
        req: &AddCheckpoint<'_>,
    ) -> Result<Result<(), WitnessReply>, TlogError> {
        let last = self.last(&cp.origin)?;
        let (last_size, last_root) = last.as_ref().map_or((0, [0; 32]), |l| (l.size, l.root));
        if req.old != last_size {
            let mut r = WitnessReply::text(409, last_size.to_string());
            r.content_type = SIZE_MEDIA_TYPE;
            return Ok(Err(r));
        }
        if req.old == cp.size && req.old != 0 && last_root != cp.root {
            tracing::warn!(origin = %cp.origin, size = cp.size, "witness: same size, another root");
            return Ok(Err(WitnessReply::text(
                409,
                format!("size {} was cosigned with another root: a fork", cp.size),
            )));
        }
        if let Err(e) = consistency(&req.proof, cp.size, &cp.root_hash(), req.old, &Hash(last_root))
        {
            tracing::warn!(origin = %cp.origin, old = req.old, size = cp.size, "witness: inconsistent: {e}");
            return Ok(Err(WitnessReply::text(422, format!("consistency proof: {e}"))));
        }
        let path = self.dir.join(origin_file_name(&cp.origin));
        crate::store::write_atomic(&path, &cp.note).map_err(io_err("write", &path))?;
        Ok(Ok(()))
    }

    fn locked<T>(&self, f: impl FnOnce() -> Result<T, TlogError>) -> Result<T, TlogError> {
        let _lock = super::lock_file(&self.dir.join(".lock"))?;
        f()
    }
}

/// The body of an `add-checkpoint` request.
pub fn request_body(old: u64, proof: &[Hash], note: &[u8]) -> Vec<u8> {
    let mut b = format!("old {old}\n").into_bytes();
    for h in proof {
        b.extend_from_slice(format!("{h}\n").as_bytes());
    }
    b.push(b'\n');
    b.extend_from_slice(note);
    b
}
