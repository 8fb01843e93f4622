//! The witness over HTTP (C2SP tlog-witness `POST <prefix>/add-checkpoint`), and the log's side
//! of it: asking witnesses to cosign the current checkpoint.

use std::io::{BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use build_trace::tlog::note::add_signatures;
use build_trace::tlog::witness::{request_body, Witness, SIZE_MEDIA_TYPE};
use build_trace::tlog::{Checkpoint, DirTiles, LogView, LogWriter, NoteVerifierKey, TlogError};

use super::client::request;
use super::http1::{read_request, write_response, Response};

/// The largest request body a witness reads (a checkpoint with its signatures and 63 proof
/// lines is a few KiB).
const MAX_REQUEST: u64 = 64 * 1024;

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Answer one connection's requests (keep-alive) with `witness`.
fn connection(stream: TcpStream, witness: &Witness) {
    let Ok(mut out) = stream.try_clone() else { return };
    let mut input = BufReader::new(stream);
    loop {
        let req = match read_request(&mut input) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                let _ = write_response(&mut out, Response::error(e.status, &e.msg), false, false);
                return;
            }
        };
        let resp = if req.path != "/add-checkpoint" {
            Response::error(
                404,
                &format!("{}: a witness serves POST /add-checkpoint only", req.path),
            )
        } else if req.method != "POST" {
            Response::error(405, "add-checkpoint is POST")
        } else {
            let mut body = Vec::new();
            match req.body(&mut input, &mut out, MAX_REQUEST) {
                Ok(mut r) => match r.read_to_end(&mut body) {
                    Ok(_) => {
                        let a = witness.add_checkpoint(&body, now());
                        tracing::info!(status = a.status, "add-checkpoint");
                        Response::bytes(a.status, a.content_type, a.body)
                    }
                    Err(e) => Response::error(400, &format!("reading the body: {e}")),
                },
                Err(e) => Response::error(e.status, &e.msg),
            }
        };
        let keep = req.keep_alive && resp.status < 400;
        if write_response(&mut out, resp, req.method == "HEAD", keep).is_err() || !keep {
            return;
        }
    }
}

/// Serve `witness` on `listener` until the process ends (a thread per connection).
pub fn serve(listener: TcpListener, witness: Arc<Witness>) -> std::io::Result<()> {
    for stream in listener.incoming() {
        let stream = stream?;
        let w = Arc::clone(&witness);
        std::thread::spawn(move || connection(stream, &w));
    }
    Ok(())
}

/// What one witness said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CosignOutcome {
    /// Its cosignature lines.
    Cosigned(String),
    /// It refused, with its status and message.
    Refused(u16, String),
}

/// Ask the witness at `url` (its submission prefix) to cosign `view`'s checkpoint: first from
/// size 0, then, when it answers 409 with the size it cosigned last, with the consistency proof
/// from that size.
pub fn ask(url: &str, view: &LogView<'_>) -> Result<CosignOutcome, TlogError> {
    let cp = view.checkpoint();
    let endpoint = format!("{}/add-checkpoint", url.trim_end_matches('/'));
    let mut old = 0;
    for _ in 0..2 {
        let proof = view.prove_consistency(old)?;
        let r = request("POST", &endpoint, &request_body(old, &proof, &cp.note))?;
        let text = String::from_utf8_lossy(&r.body).into_owned();
        match r.status {
            200 => return Ok(CosignOutcome::Cosigned(text)),
            409 if r.content_type.as_deref() == Some(SIZE_MEDIA_TYPE) => {
                let size: u64 = text.trim().parse().map_err(|_| TlogError::Corrupt {
                    path: endpoint.clone(),
                    problem: format!("409 without a size: {text:?}"),
                })?;
                if size > cp.size {
                    return Ok(CosignOutcome::Refused(
                        409,
                        format!(
                            "the witness has cosigned size {size}, beyond this log's {}",
                            cp.size
                        ),
                    ));
                }
                old = size;
            }
            s => return Ok(CosignOutcome::Refused(s, text.trim().to_owned())),
        }
    }
    Ok(CosignOutcome::Refused(409, "the witness's size kept changing".into()))
}

/// Ask every witness (its URL and its cosigning vkey) to cosign the log's current checkpoint
/// and add the cosignatures that check under that witness's key (others are ignored, as C2SP
/// says); each witness's outcome.
pub fn cosign(
    log: &LogWriter,
    witnesses: &[(String, NoteVerifierKey)],
) -> Result<Vec<(String, CosignOutcome)>, TlogError> {
    let Some(cp) = log.checkpoint()? else {
        return Err(TlogError::Missing(format!(
            "{}/checkpoint (nothing logged yet)",
            log.dir().display()
        )));
    };
    let src = DirTiles::new(log.dir());
    let view = LogView::at(&src, cp.clone());
    let own = [NoteVerifierKey::parse(log.key().vkey())?];
    let mut lines = String::new();
    let mut out = Vec::new();
    for (url, key) in witnesses {
        let mut o = ask(url, &view)?;
        if let CosignOutcome::Cosigned(l) = &o {
            let with = add_signatures(&cp.note, l)?;
            match Checkpoint::verify(&with, &own, std::slice::from_ref(key), 1) {
                Ok(_) => lines.push_str(l),
                Err(e) => o = CosignOutcome::Refused(200, format!("an invalid cosignature: {e}")),
            }
        }
        out.push((url.clone(), o));
    }
    if !lines.is_empty() && !log.add_cosignatures(cp.size, &cp.root, &lines)? {
        tracing::warn!("the log grew meanwhile: its new checkpoint needs its own cosignatures");
    }
    Ok(out)
}
