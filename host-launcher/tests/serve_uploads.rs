//! Issue 12, item 9, the CI service's staging area, attacked over real HTTP connections to the
//! real `vouch serve`:
//! - two uploads at once cannot together pass the staging bound (each used to check a directory
//!   listing that did not yet count the other);
//! - a narinfo can name only a NAR its own client staged: not another client's, whether the
//!   other client presents the same token from another address or another token from the same
//!   address (it used to consume any staged NAR).

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use nix_formats::nar::NarWriter;
use nix_formats::StorePath;
use sha2::{Digest, Sha256};
use test_support::http_service::HttpService;

mod net;
use net::{connect_from, head, request, response};

fn nar_of(contents: &[u8]) -> (Vec<u8>, [u8; 32], String) {
    let mut w = NarWriter::new(Vec::new()).unwrap();
    w.regular(false, contents).unwrap();
    let nar = w.into_inner();
    let h: [u8; 32] = Sha256::digest(&nar).into();
    let url = format!("nar/{}.nar", nix_formats::base32::encode(&h));
    (nar, h, url)
}

#[test]
fn concurrent_uploads_cannot_pass_the_staging_bound_together() {
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    // Room for one NAR of ~600 KiB, not two.
    let s = HttpService::start(
        Path::new(env!("CARGO_BIN_EXE_vouch")),
        &state,
        &t.path().join("serve.log"),
        &["--store-max-size", "1M"],
    );
    let (a, _, url_a) = nar_of(&vec![b'a'; 600 << 10]);
    let (b, _, url_b) = nar_of(&vec![b'b'; 600 << 10]);

    // A's upload is under way: its head is in, its body not yet.
    let mut ca = connect_from("127.0.0.1", &s.addr);
    head(&mut ca, "PUT", &format!("/{url_a}"), None, a.len());
    let staging = state.join("serve/staging");
    let t0 = Instant::now();
    while !std::fs::read_dir(&staging)
        .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("tmp-")))
        .unwrap_or(false)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "A's upload never started:\n{}",
            s.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // B, meanwhile: refused, since A's bytes are already reserved.
    let (status, body) = request(&s, "127.0.0.1", "PUT", &format!("/{url_b}"), None, &b);
    assert_eq!(status, 507, "{body}");
    assert!(body.contains("exceed the bound of 1048576 bytes"), "{body}");
    // A completes.
    ca.write_all(&a).unwrap();
    let (status, body) = response(ca);
    assert_eq!(status, 200, "{body}");
    // Many at once: never more staged than the bound.
    let (c, _, url_c) = nar_of(&vec![b'c'; 300 << 10]);
    let codes: Vec<u16> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..6)
            .map(|_| sc.spawn(|| request(&s, "127.0.0.1", "PUT", &format!("/{url_c}"), None, &c).0))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(codes.iter().all(|c| *c == 200 || *c == 507), "{codes:?}");
    let staged: u64 = walk(&staging);
    assert!(staged <= 1 << 20, "{staged} bytes staged, over the bound: {codes:?}");
}

/// Bytes of the files under `dir`.
fn walk(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => walk(&e.path()),
                    _ => e.metadata().map(|m| m.len()).unwrap_or(0),
                })
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn a_narinfo_cannot_name_another_clients_staged_nar() {
    let t = tempfile::tempdir().unwrap();
    let (access, trusted) = ("access-0123456789abcdef", "trusted-0123456789abcdef");
    std::fs::write(t.path().join("token"), access).unwrap();
    std::fs::write(t.path().join("trusted"), trusted).unwrap();
    let s = HttpService::start(
        Path::new(env!("CARGO_BIN_EXE_vouch")),
        &t.path().join("state"),
        &t.path().join("serve.log"),
        &[
            "--token-file",
            t.path().join("token").to_str().unwrap(),
            "--trusted-token-file",
            t.path().join("trusted").to_str().unwrap(),
        ],
    );
    // A victim stages a content-addressed path's NAR (a text file, as a .drv is uploaded).
    let text = format!("victim's data {}", test_support::nix::nonce());
    let (nar, nar_hash, url) = nar_of(text.as_bytes());
    let text_hash = nix_formats::hash::Hash::sha256(Sha256::digest(text.as_bytes()).into());
    let path: StorePath =
        nix_formats::store_path::make_text_path("victim", &text_hash, &Default::default()).unwrap();
    let narinfo = format!(
        "StorePath: {path}\nURL: {url}\nCompression: none\nNarHash: sha256:{}\nNarSize: {}\nReferences: \nCA: text:{text_hash}\n",
        nix_formats::base32::encode(&nar_hash),
        nar.len()
    );
    let put_narinfo = |from: &str, auth: &str| {
        request(
            &s,
            from,
            "PUT",
            &format!("/{}.narinfo", path.hash_part()),
            Some(auth),
            narinfo.as_bytes(),
        )
    };
    let (status, body) = request(&s, "127.0.0.1", "PUT", &format!("/{url}"), Some(access), &nar);
    assert_eq!(status, 200, "{body}");

    // The same token from another address, and another token from the same address: neither
    // may name it.
    for (from, auth) in [("127.0.0.2", access), ("127.0.0.1", trusted)] {
        let (status, body) = put_narinfo(from, auth);
        assert_eq!(status, 409, "{from} with another credential used the victim's NAR: {body}");
        assert!(body.contains("not uploaded before it by this client"), "{body}");
    }
    // Its own client still can (the attempts consumed nothing).
    let (status, body) = put_narinfo("127.0.0.1", access);
    assert_eq!(status, 200, "{body}\n{}", s.log_text());
}
