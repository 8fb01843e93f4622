//! `vouch serve` without VMs, uploads and the binary cache: the real binary on a TCP port
//! behind the real Nix 2.8.
//!
//! - `nix copy --to 'http://…?compression=none'` uploads a derivation's closure into the content
//!   store (not the trace store), a second copy uploads nothing, and copies with Nix's default
//!   compression (xz) and with zstd are accepted too;
//! - hand-made uploads with a wrong hash, a wrong compression or no staged NAR are refused and
//!   register nothing;
//! - a trusted caller's unsigned upload stays in its own overlay, never another caller's input;
//! - the binary cache serves the trace store read-only with exact lengths and refuses `..`, and
//!   its transparency log as static files;
//! - with `--token-file`, uploads, the build API and uploaded paths' narinfos need the token
//!   (Nix sends it from a netrc entry) while the signed binary cache stays public.
//!
//! The build API is in `serve_builds.rs`; the real-VM build through the API in
//! `tests/tests/serve_vm.rs`.

use std::path::Path;
use std::process::Command;

use nix_formats::narinfo::NarInfo;
use nix_formats::signing::SecretKey;
use nix_formats::StorePath;
use sha2::{Digest, Sha256};
use test_support::http_service::HttpService;
use test_support::nix;

mod serve_common;
use serve_common::*;

#[test]
fn nix_copy_uploads_into_the_content_store_and_a_second_copy_skips() {
    nix::require_nix();
    let t = tempfile::tempdir().unwrap();
    let s = start(t.path());
    let state = t.path().join("state");
    let drv = instantiate(t.path(), &simple_nix(&nix::nonce()), "a");
    let to = format!("{}?compression=none", s.url());

    let out = nix_copy(&t.path().join("xdg1"), &["--to", &to, "--derivation", &drv]);
    assert!(out.status.success(), "nix copy: {}\n{}", nix::text(&out), s.log_text());
    assert_eq!(registered(&state, &drv).as_deref(), Some("upload"), "{}", s.log_text());
    let refs = nix::nix(&["nix-store", "-q", "--references", &drv]);
    let bb = String::from_utf8(refs.stdout).unwrap().trim().to_owned();
    assert!(bb.contains("-busybox"), "{bb}");
    assert_eq!(registered(&state, &bb).as_deref(), Some("upload"), "the closure came too");

    // Uploaded paths are inputs: never in the trace store, answered unsigned, NAR not served.
    let sp = StorePath::parse(&drv).unwrap();
    let cache = state.join("cache");
    assert!(!cache.join(format!("{}.narinfo", sp.hash_part())).exists());
    let r = s.request("GET", &format!("/{}.narinfo", sp.hash_part()), b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains(&format!("StorePath: {drv}")) && !r.text().contains("Sig:"));
    assert!(r.text().contains("CA: text:sha256:"), "{}", r.text());
    let url = r.text().lines().find_map(|l| l.strip_prefix("URL: ")).unwrap().to_owned();
    assert_eq!(s.request("GET", &format!("/{url}"), b"").status, 404);

    // A second copy (a fresh client cache, so it asks the server) uploads nothing.
    let before = puts(&s.log_text());
    assert!(before >= 4, "two NARs and two narinfos: {}", s.log_text());
    let out = nix_copy(&t.path().join("xdg2"), &["--to", &to, "--derivation", &drv]);
    assert!(out.status.success(), "second nix copy: {}", nix::text(&out));
    assert_eq!(puts(&s.log_text()), before, "nothing re-uploaded:\n{}", s.log_text());

    // Nix's default compression (xz) and zstd are accepted: decompressed once the narinfo says
    // what the NAR must be.
    for (i, to) in [s.url(), format!("{}?compression=zstd", s.url())].iter().enumerate() {
        let file = t.path().join(format!("other{i}.txt"));
        std::fs::write(&file, nix::nonce()).unwrap();
        let add = nix::nix(&["nix-store", "--add", file.to_str().unwrap()]);
        let other = String::from_utf8(add.stdout).unwrap().trim().to_owned();
        let out = nix_copy(&t.path().join(format!("xdg3-{i}")), &["--to", to, &other]);
        assert!(out.status.success(), "{to}: {}\n{}", nix::text(&out), s.log_text());
        assert_eq!(registered(&state, &other).as_deref(), Some("upload"), "{to}");
    }
    let ext = if s.log_text().contains(".nar.xz") { "xz" } else { "none" };
    assert_eq!(ext, "xz", "Nix's default is xz:\n{}", s.log_text());
}

#[test]
fn with_a_token_uploads_and_builds_need_it_and_the_cache_stays_public() {
    nix::require_nix();
    let t = tempfile::tempdir().unwrap();
    let token = "s3cr3t-0123456789abcdef";
    let token_file = t.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let s = HttpService::start(
        Path::new(env!("CARGO_BIN_EXE_vouch")),
        &t.path().join("state"),
        &t.path().join("serve.log"),
        &["--token-file", token_file.to_str().unwrap()],
    );
    let state = t.path().join("state");
    assert_eq!(s.request("GET", "/nix-cache-info", b"").status, 200);
    assert_eq!(s.request("GET", "/healthz", b"").status, 200);

    // The build API and uploads answer 401 with a challenge, before reading the body.
    let submit = br#"{"drv": "/nix/store/00000000000000000000000000000000-x.drv"}"#;
    let r = s.request("POST", "/v1/builds", submit);
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.header("www-authenticate"), Some("Basic realm=\"vouch\""));
    assert!(r.text().contains("access token"), "{}", r.text());
    let wrong = ["Authorization: Bearer s3cr3t-0123456789abcdeX"];
    assert_eq!(s.request_with("POST", "/v1/builds", &wrong, submit).status, 401);
    assert_eq!(s.request_with("GET", "/v1/builds/1", &wrong, b"").status, 401);
    let bearer = format!("Authorization: Bearer {token}");
    let r = s.request_with("POST", "/v1/builds", &[&bearer], submit);
    assert_eq!(r.status, 422, "past the token, the submission itself is judged: {}", r.text());
    assert_eq!(s.request_with("GET", "/v1/builds/1", &[&bearer], b"").status, 404);

    // Nix without credentials cannot upload; with a netrc entry it can.
    let drv = instantiate(t.path(), &simple_nix(&nix::nonce()), "a");
    let to = format!("{}?compression=none", s.url());
    let out = nix_copy(&t.path().join("xdg1"), &["--to", &to, "--derivation", &drv]);
    assert!(!out.status.success(), "an upload without the token must fail");
    assert!(nix::text(&out).contains("401"), "{}", nix::text(&out));
    assert_eq!(registered(&state, &drv), None);
    let netrc = t.path().join("netrc");
    std::fs::write(&netrc, format!("machine 127.0.0.1 login ci password {token}\n")).unwrap();
    let netrc = netrc.to_str().unwrap();
    let args = ["--option", "netrc-file", netrc, "--to", &to, "--derivation", &drv];
    let out = nix_copy(&t.path().join("xdg2"), &args);
    assert!(out.status.success(), "nix copy with netrc: {}\n{}", nix::text(&out), s.log_text());
    assert_eq!(registered(&state, &drv).as_deref(), Some("upload"));
    // Which inputs were uploaded is not public: their unsigned narinfo needs the token.
    let narinfo = format!("/{}.narinfo", StorePath::parse(&drv).unwrap().hash_part());
    assert_eq!(s.request("GET", &narinfo, b"").status, 404);
    let r = s.request_with("GET", &narinfo, &[&bearer], b"");
    assert!(r.status == 200 && r.text().contains(&drv), "{}", r.text());
    // So a second copy with the netrc entry still sees them and uploads nothing.
    let before = puts(&s.log_text());
    let out = nix_copy(&t.path().join("xdg3"), &args);
    assert!(out.status.success(), "second nix copy: {}", nix::text(&out));
    assert_eq!(puts(&s.log_text()), before, "nothing re-uploaded:\n{}", s.log_text());
}

#[test]
fn bad_uploads_are_refused_and_nothing_is_registered() {
    let t = tempfile::tempdir().unwrap();
    let trusted = uploader_key().public_key().to_string();
    let s = HttpService::start(
        Path::new(env!("CARGO_BIN_EXE_vouch")),
        &t.path().join("state"),
        &t.path().join("serve.log"),
        &["--trusted-public-key", &trusted],
    );
    let state = t.path().join("state");
    let nar = nar_of(nix::nonce().as_bytes());
    let hash: [u8; 32] = Sha256::digest(&nar).into();
    let url = format!("nar/{}.nar", nix32(&hash));
    let path = StorePath::from_parts([7; 20], "serve-bad").unwrap();
    let hp = path.hash_part().to_owned();
    let put_narinfo = |text: String| s.request("PUT", &format!("/{hp}.narinfo"), text.as_bytes());
    // Signed by the trusted uploader, so that each refusal below is about what it names.
    let by_uploader = |text: String| {
        let mut info = NarInfo::parse(&text).unwrap();
        info.sign(&uploader_key()).unwrap();
        info.to_text()
    };

    // A NAR whose bytes do not match its name is not even staged.
    let r = s.request("PUT", &format!("/nar/{}.nar", nix32(&[1; 32])), &nar);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("SHA-256"), "{}", r.text());
    // A narinfo without its NAR.
    let r = put_narinfo(by_uploader(narinfo(&path, &url, "none", &hash, nar.len())));
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("PUT the NAR first"), "{}", r.text());

    // A wrong NarHash: refused by the content store's check; the staged NAR is consumed.
    assert_eq!(s.request("PUT", &format!("/{url}"), &nar).status, 200);
    let r = put_narinfo(by_uploader(narinfo(&path, &url, "none", &[9; 32], nar.len())));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains(&format!("upload of {path} refused")), "{}", r.text());
    assert_eq!(registered(&state, &path.to_string()), None);
    assert_eq!(
        put_narinfo(by_uploader(narinfo(&path, &url, "none", &hash, nar.len()))).status,
        409
    );

    // Compression other than none, and a narinfo for another path.
    assert_eq!(s.request("PUT", &format!("/{url}"), &nar).status, 200);
    let r = put_narinfo(by_uploader(narinfo(&path, &url, "xz", &hash, nar.len())));
    assert_eq!(r.status, 415, "{}", r.text());
    assert!(r.text().contains("Compression xz"), "{}", r.text());
    let r = s.request(
        "PUT",
        &format!("/{}.narinfo", StorePath::from_parts([8; 20], "x").unwrap().hash_part()),
        by_uploader(narinfo(&path, &url, "none", &hash, nar.len())).as_bytes(),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let r = s.request("PUT", "/nar/x.nar.bz2", &nar);
    assert_eq!(r.status, 415, "{}", r.text());
    assert!(r.text().contains("xz") && r.text().contains("zstd"), "{}", r.text());
    assert_eq!(registered(&state, &path.to_string()), None);

    // The right narinfo, but with neither a content address nor a trusted signature: anyone
    // could have sent any bytes under this name, so it is refused, naming the rule.
    let r = put_narinfo(narinfo(&path, &url, "none", &hash, nar.len()));
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("no content address and no signature"), "{}", r.text());
    assert_eq!(registered(&state, &path.to_string()), None);
    // Signed by a key nobody configured: refused too. By the trusted key: registered, and not
    // in the trace store (an input, never a signed cache entry).
    let signed = |key: &SecretKey| {
        let mut info = NarInfo::parse(&narinfo(&path, &url, "none", &hash, nar.len())).unwrap();
        info.sign(key).unwrap();
        info.to_text()
    };
    let r = put_narinfo(signed(&SecretKey::from_seed("stranger-1", [2; 32])));
    assert_eq!(r.status, 403, "{}", r.text());
    let r = put_narinfo(signed(&uploader_key()));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(registered(&state, &path.to_string()).as_deref(), Some("upload"));
    let r = s.request("GET", &format!("/{hp}.narinfo"), b"");
    assert!(r.status == 200 && !r.text().contains("Sig:"), "{}", r.text());
    assert_eq!(s.request("GET", &format!("/{url}"), b"").status, 404);
    assert!(!state.join("cache").join(format!("{hp}.narinfo")).exists());
}

#[test]
fn the_cache_is_served_read_only_with_exact_lengths() {
    let t = tempfile::tempdir().unwrap();
    let s = start(t.path());
    let cache = t.path().join("state/cache");
    let r = s.request("GET", "/nix-cache-info", b"");
    assert_eq!(r.status, 200);
    assert!(r.text().contains("StoreDir: /nix/store"), "{}", r.text());
    std::fs::create_dir_all(cache.join("nar")).unwrap();
    let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(cache.join("nar/abc.nar"), &bytes).unwrap();
    let r = s.request("GET", "/nar/abc.nar", b"");
    assert_eq!((r.status, r.header("content-length")), (200, Some("100000")));
    assert_eq!(r.body, bytes);
    let r = s.request("HEAD", "/nar/abc.nar", b"");
    assert_eq!((r.status, r.header("content-length")), (200, Some("100000")));
    std::fs::create_dir_all(cache.join("vouch/v1/tmp")).unwrap();
    std::fs::write(cache.join("vouch/v1/tmp/x"), b"work area").unwrap();
    std::fs::write(t.path().join("state/secret"), b"secret").unwrap();
    for (path, status) in [
        ("/nar/../../secret", 400),
        ("/nar/%2e%2e/%2e%2e/secret", 400),
        ("/nar/.abc.nar", 400),
        ("//secret", 400),
        ("/vouch/v1/tmp/x", 404),
        ("/secret", 404),
        ("/nar/missing.nar", 404),
        ("/store/index.sqlite", 404),
    ] {
        let r = s.request("GET", path, b"");
        assert_eq!(r.status, status, "{path}: {}", r.text());
        assert!(!r.text().contains("secret\n") && !r.text().contains("work area"), "{path}");
    }
    assert_eq!(s.request("PUT", "/realisations/sha256:ab!out.doi", b"{}").status, 403);
    // laut's signature index is served as JSON and, like realisations, never taken from clients.
    let laut = "/traces/0123456789abcdfghijklmnpqrsvwxyz";
    std::fs::create_dir_all(cache.join("traces")).unwrap();
    std::fs::write(cache.join(&laut[1..]), br#"{"signatures":[]}"#).unwrap();
    let r = s.request("GET", laut, b"");
    assert_eq!((r.status, r.header("content-type")), (200, Some("application/json")));
    assert_eq!(r.text(), r#"{"signatures":[]}"#);
    assert_eq!(s.request("PUT", laut, br#"{"signatures":["a.b.c"]}"#).status, 403);
    assert_eq!(s.request("DELETE", "/nar/abc.nar", b"").status, 405);
    assert_eq!(s.request("GET", "/healthz", b"").status, 200);
}

#[test]
fn the_transparency_log_is_served_as_static_files_and_a_monitor_follows_it() {
    use build_trace::tlog::entry::LoggedOutput;
    use build_trace::tlog::{LogEntry, LogKey, LogWriter};
    let t = tempfile::tempdir().unwrap();
    let s = start(t.path());
    let dir = t.path().join("state/cache/log");
    let key = LogKey::from_seed("serve.test/log", [3; 32]).unwrap();
    let entries: Vec<LogEntry> = (0..300u32)
        .map(|i| {
            let mut statement = [0u8; 32];
            statement[..4].copy_from_slice(&i.to_be_bytes());
            let out = LoggedOutput {
                path: StorePath::parse(&format!("/nix/store/{}-out", "x".repeat(32))).unwrap(),
                nar_hash: build_trace::job::NarHash([i as u8; 32]),
                nar_size: u64::from(i),
            };
            LogEntry {
                drv: StorePath::parse(&format!(
                    "/nix/store/{:a>32}-step.drv",
                    i.to_string().replace('0', "z")
                ))
                .unwrap(),
                statement,
                evidence: None,
                jws: None,
                outputs: [("out".to_string(), out)].into(),
            }
        })
        .collect();
    LogWriter::open(&dir, key.clone()).unwrap().append(&entries).unwrap();
    let r = s.request("GET", "/log/checkpoint", b"");
    assert_eq!((r.status, r.header("content-type")), (200, Some("text/plain; charset=utf-8")));
    assert!(r.text().starts_with("serve.test/log\n300\n"), "{}", r.text());
    for p in [
        "tile/0/000",
        "tile/0/001.p/44",
        "tile/1/000.p/1",
        "tile/entries/001.p/44",
        "index/00000000000000000000000000000000",
    ] {
        let file = std::fs::read(dir.join(p)).unwrap_or_default();
        let r = s.request("GET", &format!("/log/{p}"), b"");
        assert_eq!((r.status, r.body.len()), (200, file.len()), "{p}");
        assert_eq!(r.body, file, "{p}");
    }
    assert_eq!(s.request("GET", "/log/.lock", b"").status, 400);
    assert_eq!(s.request("PUT", "/log/checkpoint", b"x").status, 405);
    assert_eq!(s.request("GET", "/log/tile/0/002", b"").status, 404);
    // `vouch log monitor` over HTTP reads the same log and reports every entry.
    let out = Command::new(env!("CARGO_BIN_EXE_vouch"))
        .arg("--state-dir")
        .arg(t.path().join("monitor"))
        .args(["log", "monitor", &format!("http://{}/log", s.addr), "--log-key", key.vkey()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.lines().filter(|l| l.starts_with("entry ")).count(), 300, "{text}");
}

/// Issue 12, item 2, for the CI service. A trusted client (one `--trusted-token-file` each) may
/// upload a path that vouch cannot certify (no content address, no trusted signature), as Nix's
/// trusted users may; it goes to that client's overlay, never to the shared content store or
/// another trusted client's overlay. So when another caller then uploads the genuine path
/// (signed by a key the operator trusts), its bytes are registered and served, not a trusted
/// client's. Before this rule the first upload went into the shared store, the later ones were
/// skipped as already valid, and every build reading that path got the first uploader's bytes.
#[test]
fn a_trusted_callers_unsigned_upload_never_becomes_another_callers_input() {
    let t = tempfile::tempdir().unwrap();
    let trusted = trusted_token_file(t.path());
    let second = t.path().join("second-trusted-token");
    std::fs::write(&second, "second-0123456789abcdef\n").unwrap();
    let second_header = "Authorization: Bearer second-0123456789abcdef";
    let key = uploader_key().public_key().to_string();
    let state = t.path().join("state");
    let s = HttpService::start(
        Path::new(env!("CARGO_BIN_EXE_vouch")),
        &state,
        &t.path().join("serve.log"),
        &[
            "--trusted-token-file",
            &trusted,
            "--trusted-token-file",
            second.to_str().unwrap(),
            "--trusted-public-key",
            &key,
        ],
    );
    let path = StorePath::from_parts([5; 20], "tenant-dep").unwrap();
    let hp = path.hash_part().to_owned();
    let stage = |data: &[u8], headers: &[&str]| {
        let nar = nar_of(data);
        let hash: [u8; 32] = Sha256::digest(&nar).into();
        let url = format!("nar/{}.nar", nix32(&hash));
        let r = s.request_with("PUT", &format!("/{url}"), headers, &nar);
        assert_eq!(r.status, 200, "{}", r.text());
        (narinfo(&path, &url, "none", &hash, nar.len()), hash)
    };

    // Each trusted client's unsigned bytes: accepted, privately, each in its own overlay (the
    // second is not skipped as already there: the first one's upload is not its own).
    let mut sizes = std::collections::BTreeSet::new();
    for (data, header) in
        [(&b"the first trusted client's"[..], TRUSTED), (b"the second's", second_header)]
    {
        let (info, _) = stage(data, &[header]);
        let r = s.request_with("PUT", &format!("/{hp}.narinfo"), &[header], info.as_bytes());
        assert_eq!(r.status, 200, "{}", r.text());
        sizes.insert(nar_of(data).len() as u64);
    }
    assert_eq!(registered(&state, &path.to_string()), None, "not in the shared store");
    assert_eq!(s.request("GET", &format!("/{hp}.narinfo"), b"").status, 404);
    let overlays: Vec<_> = std::fs::read_dir(state.join("store/sessions"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(overlays.len(), 2, "one overlay per trusted client");
    let held: std::collections::BTreeSet<u64> = overlays
        .iter()
        .flat_map(|o| std::fs::read_dir(o).unwrap())
        .map(|e| e.unwrap().metadata().unwrap().len())
        .collect();
    assert_eq!(held, sizes, "each overlay holds its own client's NAR");

    // Another caller's genuine bytes, signed by the operator's key: registered and served.
    let (info, genuine) = stage(b"genuine", &[]);
    let mut signed = NarInfo::parse(&info).unwrap();
    signed.sign(&uploader_key()).unwrap();
    let r = s.request("PUT", &format!("/{hp}.narinfo"), signed.to_text().as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(registered(&state, &path.to_string()).as_deref(), Some("upload"));
    let r = s.request("GET", &format!("/{hp}.narinfo"), b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains(&format!("NarHash: sha256:{}", nix32(&genuine))), "{}", r.text());

    // The overlay lives as long as the service.
    let (st, log) = s.stop("TERM");
    assert!(st.success(), "{st}: {log}");
    assert_eq!(std::fs::read_dir(state.join("store/sessions")).unwrap().count(), 0);
}
