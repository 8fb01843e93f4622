//! Test helpers for `vouch serve` over HTTP without VMs (`serve_http.rs`, `serve_builds.rs`,
//! `serve_api.rs`): the service started on a state directory, uploads by the real Nix and by
//! hand (NARs, narinfos, text-addressed `.drv`s), the trusted callers' token, and waiting for a
//! build to fail. The service process itself comes from the workspace's `test-support` crate
//! (`test_support::http_service`).

// Each test file uses part of this module.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix_formats::derivation::Derivation;
use nix_formats::nar::NarWriter;
use nix_formats::signing::SecretKey;
use nix_formats::StorePath;
use sha2::{Digest, Sha256};
use test_support::http_service::HttpService;
use test_support::nix;

/// The service on `dir/state`, its log in `dir/serve.log`.
pub fn start(dir: &Path) -> HttpService {
    HttpService::start(
        Path::new(env!("CARGO_BIN_EXE_vouch")),
        &dir.join("state"),
        &dir.join("serve.log"),
        &[],
    )
}

/// The origin (`upload`, `build`) of `path` in the content store of `state`, if valid there.
pub fn registered(state: &Path, path: &str) -> Option<String> {
    let db = rusqlite::Connection::open(state.join("store/index.sqlite")).unwrap();
    db.query_row("SELECT origin FROM paths WHERE path = ?1", [path], |r| r.get(0)).ok()
}

/// `nix copy --to URL ARGS…` with its own narinfo disk cache (`xdg`), so it asks the server.
pub fn nix_copy(xdg: &Path, args: &[&str]) -> std::process::Output {
    nix::output(Command::new("nix").arg("copy").args(args).env("XDG_CACHE_HOME", xdg))
}

/// Uploads the server accepted (NARs staged, narinfos registered), from its log.
pub fn puts(log: &str) -> usize {
    log.lines().filter(|l| l.contains("NAR staged") || l.contains("upload registered in")).count()
}

pub fn nar_of(contents: &[u8]) -> Vec<u8> {
    let mut w = NarWriter::new(Vec::new()).unwrap();
    w.regular(false, contents).unwrap();
    w.into_inner()
}

pub fn nix32(digest: &[u8]) -> String {
    nix_formats::base32::encode(digest)
}

pub fn narinfo(
    path: &StorePath,
    url: &str,
    compression: &str,
    nar_hash: &[u8],
    size: usize,
) -> String {
    format!(
        "StorePath: {path}\nURL: {url}\nCompression: {compression}\nNarHash: sha256:{}\nNarSize: {size}\nReferences: \n",
        nix32(nar_hash)
    )
}

/// A derivation whose closure is itself and the busybox directory, instantiated by the real Nix.
pub fn instantiate(dir: &Path, body: &str, attr: &str) -> String {
    nix::busybox_dir(&dir.join("bb"));
    let file = dir.join("drv.nix");
    std::fs::write(&file, body).unwrap();
    let out = nix::nix(&["nix-instantiate", file.to_str().unwrap(), "-A", attr]);
    assert!(out.status.success(), "nix-instantiate: {}", nix::text(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

pub fn simple_nix(nonce: &str) -> String {
    format!(
        r#"let bb = builtins.path {{ path = ./bb; name = "busybox"; }}; in rec {{
  a = derivation {{ name = "serve-a-{nonce}"; system = "x86_64-linux"; builder = "${{bb}}/busybox";
                    args = [ "sh" "-c" "echo a > $out" ]; }};
  b = derivation {{ name = "serve-b-{nonce}"; system = "x86_64-linux"; builder = "${{bb}}/busybox";
                    args = [ "sh" "-c" "cat ${{a}} > $out" ];
                    __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; }};
  g = derivation {{ name = "serve-g-{nonce}"; system = "x86_64-linux"; builder = "${{bb}}/busybox";
                    args = [ "sh" "-c" "cat ${{b}} > $out" ]; }};
  h = derivation {{ name = "serve-h-{nonce}"; system = "x86_64-linux"; builder = "${{bb}}/busybox";
                    args = [ "sh" "-c" "echo h > $out" ]; requiredSystemFeatures = [ "no-such-feature" ]; }};
  h2 = derivation {{ name = "serve-h2-{nonce}"; system = "x86_64-linux"; builder = "${{bb}}/busybox";
                     args = [ "sh" "-c" "cat ${{h}} > $out" ]; }};
  f = derivation {{ name = "serve-f-{nonce}"; system = "x86_64-linux"; builder = "${{bb}}/busybox";
                    args = [ "sh" "-c" "echo -n hello > $out" ]; outputHashMode = "flat";
                    outputHashAlgo = "sha256";
                    outputHash = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"; }};
}}"#
    )
}

/// `nix copy --to TO --derivation DRV` with its own narinfo cache (`xdg`); it must succeed.
pub fn copy_derivation(xdg: &Path, to: &str, drv: &str) {
    let out = nix_copy(xdg, &["--to", to, "--derivation", drv]);
    assert!(out.status.success(), "nix copy: {}", nix::text(&out));
}

/// The key of an uploader the service trusts (`--trusted-public-key`).
pub fn uploader_key() -> SecretKey {
    SecretKey::from_seed("uploader-1", [1; 32])
}

/// The trusted callers' token, as a header, and a file holding it.
pub const TRUSTED: &str = "Authorization: Bearer trusted-0123456789abcdef";
pub fn trusted_token_file(dir: &Path) -> String {
    let p = dir.join("trusted-token");
    std::fs::write(&p, "trusted-0123456789abcdef\n").unwrap();
    p.to_str().unwrap().to_owned()
}

/// Upload `drv` (a derivation, as its ATerm) by hand, as a client that is not Nix would: its
/// NAR, then a narinfo with its text content address. The drv path.
pub fn upload_drv(s: &HttpService, name: &str, drv: &Derivation) -> StorePath {
    upload_text(s, name, &drv.to_aterm(), &drv.references())
}

/// Upload `text` by hand as the text-addressed path `name` with references `refs`: its NAR,
/// then a narinfo with its text content address. The path.
pub fn upload_text(
    s: &HttpService,
    name: &str,
    text: &[u8],
    refs: &BTreeSet<StorePath>,
) -> StorePath {
    let nar = nar_of(text);
    let nar_hash: [u8; 32] = Sha256::digest(&nar).into();
    let text_hash = nix_formats::hash::Hash::sha256(Sha256::digest(text).into());
    let path = nix_formats::store_path::make_text_path(name, &text_hash, refs).unwrap();
    let url = format!("nar/{}.nar", nix32(&nar_hash));
    assert_eq!(s.request("PUT", &format!("/{url}"), &nar).status, 200);
    let refs: Vec<String> = refs.iter().map(|r| r.base_name().to_string()).collect();
    let info = narinfo(&path, &url, "none", &nar_hash, nar.len()).replace(
        "References: \n",
        &format!("References: {}\nCA: text:{text_hash}\n", refs.join(" ")),
    );
    let r = s.request("PUT", &format!("/{}.narinfo", path.hash_part()), info.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    path
}

/// Build `id`'s state once it has failed, asking with `headers`; the test fails if it has not
/// within `within`.
pub fn wait_failed(
    s: &HttpService,
    id: u64,
    headers: &[&str],
    within: Duration,
) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        let r = s.request_with("GET", &format!("/v1/builds/{id}"), headers, b"");
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        if v["state"] == "failed" {
            return v;
        }
        assert!(t0.elapsed() < within, "build {id} did not fail: {v}\n{}", s.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}
