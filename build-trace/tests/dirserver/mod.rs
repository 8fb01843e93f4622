//! For the remote trace source's tests and bench: write trace entries (and `.drv` files) into a
//! trace store directory laid out as `docs/trace-store.md` says, and serve a directory over real
//! HTTP on loopback (axum on tokio, as `vouch serve` is built), counting requests per path and
//! answering chosen paths with a chosen status.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use build_trace::store::TraceEntry;
use build_trace::verify::DrvSet;
use sha2::{Digest, Sha256};

/// Write `entries` as a trace store in `dir` (statement, evidence, JWS, laut's index) and, with
/// `drvs`, each derivation as `drv/<hash>.nar` (what `vouch serve` serves for its steps).
pub fn write_store(dir: &Path, entries: &[TraceEntry], drvs: Option<&DrvSet>) {
    std::fs::create_dir_all(dir.join("traces")).unwrap();
    std::fs::write(dir.join("nix-cache-info"), build_trace::store::NIX_CACHE_INFO).unwrap();
    let mut index: HashMap<String, Vec<String>> = HashMap::new();
    for e in entries {
        let id = hex::encode(&Sha256::digest(&e.statement)[..16]);
        let d = dir.join("vouch/v1/steps").join(e.drv_path.base_name()).join(id);
        std::fs::create_dir_all(d.join("jws")).unwrap();
        std::fs::write(d.join("statement.json"), &e.statement).unwrap();
        if let Some(ev) = &e.evidence {
            std::fs::write(d.join("evidence.json"), ev).unwrap();
        }
        for (i, j) in e.jws.iter().enumerate() {
            std::fs::write(d.join("jws").join(format!("{i:016x}.jws")), j).unwrap();
        }
        index.entry(e.drv_path.hash_part().to_owned()).or_default().extend(e.jws.clone());
    }
    for (h, sigs) in index {
        let body = serde_json::json!({ "signatures": sigs }).to_string();
        std::fs::write(dir.join("traces").join(h), body).unwrap();
    }
    if let Some(drvs) = drvs {
        std::fs::create_dir_all(dir.join("drv")).unwrap();
        for (p, d) in drvs.iter() {
            std::fs::write(drv_nar_file(dir, p), nar_of(&d.to_aterm())).unwrap();
        }
    }
}

/// Where [`write_store`] puts the NAR of `.drv` `p`.
pub fn drv_nar_file(dir: &Path, p: &nix_formats::StorePath) -> PathBuf {
    dir.join("drv").join(format!("{}.nar", p.hash_part()))
}

/// A NAR of one regular file.
pub fn nar_of(contents: &[u8]) -> Vec<u8> {
    let mut w = nix_formats::nar::NarWriter::new(Vec::new()).unwrap();
    w.regular(false, contents).unwrap();
    w.into_inner()
}

#[derive(Debug, Default)]
struct Shared {
    root: PathBuf,
    /// Requests per path (without the leading `/`).
    seen: Mutex<HashMap<String, usize>>,
    /// Paths (prefixes) answered with a status instead of the file.
    faults: Mutex<Vec<(String, u16)>>,
}

/// A file server of one directory on 127.0.0.1, until dropped.
pub struct DirServer {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DirServer {
    /// Serve `root`.
    pub fn start(root: &Path) -> DirServer {
        let shared = Arc::new(Shared { root: root.to_path_buf(), ..Shared::default() });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let state = Arc::clone(&shared);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(listener).unwrap();
                let app = axum::Router::new().fallback(serve_file).with_state(state);
                axum::serve(l, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        DirServer { url, shared, stop: Some(stop), thread: Some(thread) }
    }

    /// Answer every path starting with `prefix` with `status`.
    pub fn fail(&self, prefix: &str, status: u16) {
        self.shared.faults.lock().unwrap().push((prefix.to_owned(), status));
    }

    /// Requests so far per path.
    pub fn seen(&self) -> HashMap<String, usize> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// Requests so far whose path starts with `prefix`.
    pub fn count(&self, prefix: &str) -> usize {
        self.seen().iter().filter(|(p, _)| p.starts_with(prefix)).map(|(_, n)| n).sum()
    }

    /// Forget the requests seen.
    pub fn reset(&self) {
        self.shared.seen.lock().unwrap().clear();
    }
}

impl Drop for DirServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve_file(State(s): State<Arc<Shared>>, uri: Uri) -> Response {
    // Percent-decoded, as file servers (and `vouch serve`) read a request's path.
    let Some(rel) = percent_decode(uri.path().trim_start_matches('/')) else {
        return (StatusCode::BAD_REQUEST, "bad percent-encoding\n").into_response();
    };
    *s.seen.lock().unwrap().entry(rel.clone()).or_default() += 1;
    let fault = s.faults.lock().unwrap().iter().find(|(p, _)| rel.starts_with(p)).map(|f| f.1);
    if let Some(status) = fault {
        return (StatusCode::from_u16(status).unwrap(), "injected fault\n").into_response();
    }
    if rel.split('/').any(|seg| seg.is_empty() || seg.starts_with('.')) {
        return (StatusCode::BAD_REQUEST, "bad path\n").into_response();
    }
    match tokio::fs::read(s.root.join(&rel)).await {
        Ok(b) => b.into_response(),
        Err(_) => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    }
}

/// `%XX` decoded; `None` for a malformed escape or a result that is not UTF-8.
fn percent_decode(path: &str) -> Option<String> {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}
