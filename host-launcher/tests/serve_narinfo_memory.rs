//! Issue 13, item 8: the binary cache's hot path, trace-store narinfos answered from memory
//! before the router (`serve/hot.rs`, `http::hot_narinfo`), attacked and used over real
//! connections to the real `vouch serve`:
//! - the answer is the file's bytes, for GET and HEAD, as the router answers it;
//! - memory is short: a narinfo withdrawn from the store stops being served within a second, and
//!   a miss is never remembered, so a path published after a miss is served at once;
//! - a narinfo warmed by a token holder of a private cache is still refused to everyone else;
//! - requests the hot path does not answer (a compressed answer asked for) still get the
//!   router's answer.

use std::path::{Path, PathBuf};
use std::time::Duration;

use test_support::http_service::{HttpResponse, HttpService};

const H: &str = "zcb6z8gqrjqcd9cr2v2rxfil79ps7vp9";
/// A little over the memory's freshness (`serve::hot::FRESH`, 1 s).
const STALE: Duration = Duration::from_millis(1300);

fn start(dir: &Path, extra: &[&str]) -> (HttpService, PathBuf) {
    let s = HttpService::start(
        Path::new(env!("CARGO_BIN_EXE_vouch")),
        &dir.join("state"),
        &dir.join("serve.log"),
        extra,
    );
    let cache = dir.join("state/cache");
    assert!(cache.is_dir(), "the trace store is state/cache");
    (s, cache)
}

fn narinfo(n: u32) -> String {
    format!(
        "StorePath: /nix/store/{H}-hot-{n}\nURL: nar/{H}.nar\nCompression: none\nNarHash: \
         sha256:{H}\nNarSize: {n}\nReferences: \nSig: test-1:{}==\n",
        "A".repeat(86)
    )
}

fn get(s: &HttpService, method: &str, headers: &[&str]) -> HttpResponse {
    s.request_with(method, &format!("/{H}.narinfo"), headers, b"")
}

#[test]
fn narinfos_from_memory_are_the_files_and_follow_withdrawal() {
    let t = tempfile::tempdir().unwrap();
    let (s, cache) = start(t.path(), &[]);
    let file = cache.join(format!("{H}.narinfo"));

    // A miss is not remembered: published after the miss, the narinfo is served at once.
    assert_eq!(get(&s, "GET", &[]).status, 404);
    std::fs::write(&file, narinfo(1)).unwrap();
    let r = get(&s, "GET", &[]);
    assert_eq!((r.status, r.text()), (200, narinfo(1)), "{}", s.log_text());
    assert_eq!(r.header("content-type"), Some("text/x-nix-narinfo"));
    let len = narinfo(1).len().to_string();
    assert_eq!(r.header("content-length"), Some(len.as_str()));
    let r = get(&s, "HEAD", &[]);
    assert_eq!((r.status, r.header("content-length"), r.body.len()), (200, Some(len.as_str()), 0));

    // Within the freshness the answer comes from memory: a file changed behind the service's
    // back (the publish step never does this) is not read yet...
    std::fs::write(&file, narinfo(22)).unwrap();
    assert_eq!(get(&s, "GET", &[]).text(), narinfo(1), "answered from memory");
    // ...and a request the path before the router leaves to the router is answered too, compressed.
    let r = get(&s, "GET", &["Accept-Encoding: gzip"]);
    assert_eq!((r.status, r.header("content-encoding")), (200, Some("gzip")));
    // Past it, the file is read again.
    std::thread::sleep(STALE);
    assert_eq!(get(&s, "GET", &[]).text(), narinfo(22));

    // Withdrawn (as `vouch store audit --fix` moves it away): gone within the freshness.
    std::fs::remove_file(&file).unwrap();
    std::thread::sleep(STALE);
    let r = get(&s, "GET", &[]);
    assert_eq!(r.status, 404, "a withdrawn narinfo is still served: {}", r.text());
    assert_eq!(get(&s, "HEAD", &[]).status, 404);
}

#[test]
fn a_narinfo_a_token_holder_warmed_stays_private() {
    let t = tempfile::tempdir().unwrap();
    let tokens = t.path().join("tokens");
    std::fs::write(&tokens, "reader cache reader-token-0123456789\n").unwrap();
    let (s, cache) = start(t.path(), &["--tokens", tokens.to_str().unwrap(), "--private-cache"]);
    std::fs::write(cache.join(format!("{H}.narinfo")), narinfo(3)).unwrap();
    let reader = "Authorization: Bearer reader-token-0123456789";
    for _ in 0..2 {
        let r = get(&s, "GET", &[reader]);
        assert_eq!((r.status, r.text()), (200, narinfo(3)));
    }
    // In memory now: anonymous callers and wrong tokens are still refused, and learn nothing.
    for headers in [&[][..], &["Authorization: Bearer reader-token-012345678X"][..]] {
        for method in ["GET", "HEAD"] {
            let r = get(&s, method, headers);
            assert_eq!(r.status, 401, "{method} {headers:?}: {}", r.text());
            assert!(!r.text().contains("StorePath"), "{}", r.text());
        }
    }
    let r = s.request_with(
        "GET",
        &format!("/{H}.narinfo"),
        &["Authorization: Basic eDpyZWFkZXItdG9rZW4tMDEyMzQ1Njc4OQ=="],
        b"",
    );
    assert_eq!(r.status, 200, "HTTP Basic with the token as password (a netrc): {}", r.text());
}
