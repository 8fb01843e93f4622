//! Issue 13, item 3: the CI service's HTTP front-end (tokio, hyper, axum), attacked and used
//! over real connections to the real `vouch serve`:
//! - a slow client (hundreds of connections that each sent one byte, and one that trickles a
//!   byte every half second) cannot stop another client's fetch: per-address connection limits,
//!   and a deadline for the whole request head that closes the trickler however it trickles;
//! - anonymous clients from many addresses cannot take the capacity reserved for token holders;
//! - heads are parsed strictly (hyper's): bare CR, NUL, spaces in names, obs-fold, conflicting
//!   lengths, oversized heads;
//! - NARs are served with HTTP Range;
//! - with `--tls-cert`/`--tls-key` the cache is served over HTTPS (curl checks the chain);
//! - scoped tokens and `--private-cache`: each route needs its scope.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use test_support::http_service::HttpService;

mod net;
use net::{connect_from, request};

fn start(dir: &Path, extra: &[&str]) -> HttpService {
    HttpService::start(
        Path::new(env!("CARGO_BIN_EXE_vouch")),
        &dir.join("state"),
        &dir.join("serve.log"),
        extra,
    )
}

/// Whether the server closed `c` within `within` (EOF or reset), reading what it sent.
fn closed_within(c: &mut TcpStream, within: Duration) -> (bool, String) {
    c.set_read_timeout(Some(within)).unwrap();
    let mut got = Vec::new();
    let closed = match c.read_to_end(&mut got) {
        Ok(_) => true,
        Err(e) => {
            e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut
        }
    };
    (closed, String::from_utf8_lossy(&got).into_owned())
}

#[test]
fn a_slow_client_cannot_stop_another_clients_fetch() {
    let t = tempfile::tempdir().unwrap();
    let s = start(t.path(), &["--max-connections-per-peer", "16", "--head-timeout", "3"]);
    // 300 connections from one address, each one byte into its request head.
    let mut slow: Vec<TcpStream> = (0..300)
        .map(|_| {
            let mut c = connect_from("127.0.0.2", &s.addr);
            c.write_all(b"G").unwrap();
            c
        })
        .collect();
    // A trickler from another address: one byte of a valid head every half second.
    let mut trickler = connect_from("127.0.0.3", &s.addr);
    let t_trickle = Instant::now();
    let trickle = std::thread::spawn(move || {
        for b in
            b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n"
        {
            if trickler.write_all(&[*b]).is_err() {
                return (t_trickle.elapsed(), true);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        (t_trickle.elapsed(), false)
    });
    // Meanwhile another client fetches at once.
    let t0 = Instant::now();
    let (status, body) = request(&s, "127.0.0.1", "GET", "/nix-cache-info", None, b"");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("StoreDir"), "{body}");
    assert!(t0.elapsed() < Duration::from_secs(2), "the fetch took {:?}", t0.elapsed());
    // All but 16 of the slow ones were refused at once, with a reason.
    let mut refused = 0;
    for c in slow.iter_mut() {
        let (closed, text) = closed_within(c, Duration::from_millis(200));
        let said = text.starts_with("HTTP/1.1 503") && text.contains("connections from 127.0.0.2");
        refused += usize::from(closed && said);
    }
    assert_eq!(refused, 300 - 16, "{}", s.log_text());
    // The 16 admitted ones are closed at the head deadline.
    for c in slow.iter_mut() {
        let (closed, _) = closed_within(c, Duration::from_secs(6));
        assert!(closed, "a slow connection outlived the head deadline");
    }
    // The trickler too, although it kept sending: the deadline is for the whole head.
    let (when, cut) = trickle.join().unwrap();
    assert!(cut && when < Duration::from_secs(8), "trickler cut {cut} after {when:?}");
}

#[test]
fn capacity_is_reserved_for_token_holders() {
    let t = tempfile::tempdir().unwrap();
    let tokens = t.path().join("tokens");
    std::fs::write(&tokens, "ci cache,upload,build holder-token-0123456789\n").unwrap();
    let s = start(
        t.path(),
        &[
            "--tokens",
            tokens.to_str().unwrap(),
            "--max-connections",
            "8",
            "--max-connections-per-peer",
            "3",
        ],
    );
    let auth = Some("holder-token-0123456789");
    // The holder's address is known once it presented its token.
    assert_eq!(request(&s, "127.0.0.1", "GET", "/nix-cache-info", auth, b"").0, 200);
    // Anonymous clients from two addresses take all but the reserved quarter (6 of 8).
    let from = |i: usize| ["127.0.0.2", "127.0.0.3"][i / 3];
    let mut idle: Vec<TcpStream> = (0..6).map(|i| connect_from(from(i), &s.addr)).collect();
    // The holder's first connection leaves its slot a moment after its answer (more on a loaded
    // machine): an idle one refused meanwhile (it got a 503) is opened again, until all six hold
    // a slot.
    for round in 0.. {
        std::thread::sleep(Duration::from_millis(500));
        let refused: Vec<usize> = (0..6).filter(|&i| answered(&idle[i])).collect();
        if refused.is_empty() {
            break;
        }
        assert!(round < 20, "idle connections keep being refused: {}", s.log_text());
        for i in refused {
            idle[i] = connect_from(from(i), &s.addr);
        }
    }
    let (status, body) = request(&s, "127.0.0.4", "GET", "/nix-cache-info", None, b"");
    assert_eq!(status, 503, "an anonymous newcomer finds no room: {body}");
    let (status, body) = request(&s, "127.0.0.1", "GET", "/nix-cache-info", auth, b"");
    assert_eq!(status, 200, "the token holder gets a reserved connection: {body}");
    // A reserved connection carries only requests with a token.
    let (status, body) = request(&s, "127.0.0.1", "GET", "/nix-cache-info", None, b"");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("reserved for token holders"), "{body}");
    drop(idle);
}

/// The status line of `raw` sent on a fresh connection.
/// Whether the server has written to (or closed) `c`, which sent nothing: it was refused.
fn answered(c: &TcpStream) -> bool {
    c.set_nonblocking(true).unwrap();
    let r = c.peek(&mut [0u8; 1]);
    c.set_nonblocking(false).unwrap();
    !matches!(r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

fn status_of(s: &HttpService, raw: &[u8]) -> String {
    let mut c = connect_from("127.0.0.1", &s.addr);
    c.write_all(raw).unwrap();
    let (_, text) = closed_within(&mut c, Duration::from_secs(10));
    text.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn heads_are_parsed_strictly() {
    let t = tempfile::tempdir().unwrap();
    let s = start(t.path(), &[]);
    let ok = b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    assert!(status_of(&s, ok).starts_with("HTTP/1.1 200"), "{}", status_of(&s, ok));
    let big = format!("GET /nix-cache-info HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(70 << 10));
    for (what, raw) in [
        ("bare CR in a value", &b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n"[..]),
        ("NUL in a name", b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nX\0A: b\r\n\r\n"),
        ("NUL in a value", b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n"),
        ("space in a name", b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nBad Name: b\r\n\r\n"),
        ("space before the colon", b"GET /nix-cache-info HTTP/1.1\r\nHost : x\r\n\r\n"),
        ("obs-fold", b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n"),
        ("two lengths", b"PUT /x.narinfo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
        ("a signed length", b"PUT /x.narinfo HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\na"),
        ("a bad request line", b"GET /nix-cache-info\r\n\r\n"),
    ] {
        let line = status_of(&s, raw);
        assert!(line.starts_with("HTTP/1.1 400"), "{what}: {line:?}");
    }
    let line = status_of(&s, big.as_bytes());
    assert!(
        line.starts_with("HTTP/1.1 431") || line.starts_with("HTTP/1.1 400"),
        "big head: {line:?}"
    );
    // The server still serves.
    assert!(status_of(&s, ok).starts_with("HTTP/1.1 200"));
}

#[test]
fn nars_are_served_with_ranges() {
    let t = tempfile::tempdir().unwrap();
    let s = start(t.path(), &[]);
    let nar_dir = t.path().join("state/cache/nar");
    std::fs::create_dir_all(&nar_dir).unwrap();
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(nar_dir.join("abc.nar"), &bytes).unwrap();
    let get =
        |range: &str| s.request_with("GET", "/nar/abc.nar", &[&format!("Range: {range}")], b"");
    let r = get("bytes=10-19");
    assert_eq!((r.status, r.header("content-range")), (206, Some("bytes 10-19/300000")));
    assert_eq!(r.body, &bytes[10..20]);
    let r = get("bytes=-5");
    assert_eq!((r.status, r.body.as_slice()), (206, &bytes[299_995..]));
    let r = get("bytes=299990-");
    assert_eq!((r.status, r.header("content-length")), (206, Some("10")));
    assert_eq!(get("bytes=400000-").status, 416);
    let r = get("bytes=0-1, 5-6");
    assert_eq!((r.status, r.body.len()), (200, bytes.len()), "several ranges: the whole file");
    let r = s.request("GET", "/nar/abc.nar", b"");
    assert_eq!((r.status, r.header("accept-ranges")), (200, Some("bytes")));
    assert_eq!(r.body, bytes);
}

#[test]
fn tls_serves_the_cache_over_https() {
    let t = tempfile::tempdir().unwrap();
    let (cert, key) = (t.path().join("cert.pem"), t.path().join("key.pem"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"])
        .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1", "-days", "1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("running openssl");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    // A key that does not parse is refused at start, naming the file.
    let bad = t.path().join("bad.pem");
    std::fs::write(&bad, "not a key").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vouch"))
        .arg("--state-dir")
        .arg(t.path().join("state-bad"))
        .args(["serve", "--listen", "127.0.0.1:0", "--tls-cert", cert.to_str().unwrap()])
        .args(["--tls-key", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bad.pem"), "{err}");

    let s = start(
        t.path(),
        &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()],
    );
    assert!(s.log_text().contains("listening on https://"), "{}", s.log_text());
    let port = s.addr.rsplit(':').next().unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--cacert", cert.to_str().unwrap()])
        .arg(format!("https://127.0.0.1:{port}/nix-cache-info"))
        .output()
        .expect("running curl (scripts/setup-host.sh installs it)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("StoreDir"));
    // Plain HTTP on the TLS port gets no HTTP answer.
    let mut c = connect_from("127.0.0.1", &s.addr);
    c.write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (_, text) = closed_within(&mut c, Duration::from_secs(10));
    assert!(!text.contains("StoreDir"), "{text}");
}

#[test]
fn scoped_tokens_and_a_private_cache() {
    let t = tempfile::tempdir().unwrap();
    let tokens = t.path().join("tokens");
    let hashed = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b"ci-token-0123456789ab"))
    };
    std::fs::write(
        &tokens,
        format!("# readers may read\nreader cache reader-token-0123456789\nci cache,upload,build sha256:{hashed}\n"),
    )
    .unwrap();
    let s = start(t.path(), &["--tokens", tokens.to_str().unwrap(), "--private-cache"]);
    let get = |path: &str, token: Option<&str>| request(&s, "127.0.0.1", "GET", path, token, b"");
    let (reader, ci) = (Some("reader-token-0123456789"), Some("ci-token-0123456789ab"));
    assert_eq!(get("/health", None).0, 200, "health is public");
    let (status, body) = get("/nix-cache-info", None);
    assert_eq!(status, 401, "a private cache: {body}");
    assert!(body.contains("`cache` scope"), "{body}");
    assert_eq!(get("/nix-cache-info", reader).0, 200);
    assert_eq!(get("/nix-cache-info", Some("reader-token-012345678X")).0, 401);
    let (status, body) = get("/v1/builds", reader);
    assert!(status == 401 && body.contains("`build` scope"), "{status} {body}");
    assert_eq!(get("/", reader).0, 401, "the page needs `build`");
    let (status, body) = request(&s, "127.0.0.1", "PUT", "/nar/x.nar", reader, b"x");
    assert!(status == 401 && body.contains("`upload` scope"), "{status} {body}");
    let (status, body) = get("/v1/builds", ci);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"builds\":[]"), "{body}");
    let (status, body) = get("/metrics", ci);
    assert!(status == 200 && body.contains("vouch_build_queue_length 0"), "{body}");
}
