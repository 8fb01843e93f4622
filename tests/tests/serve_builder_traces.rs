//! Issue 13 item 2, "every vouch host serves its trace store read-only": the CI service's
//! import of a step another builder built (`host_launcher::serve::closure::traces::Importer`,
//! what `vouch serve --builder-traces MACHINE=http://…` runs for each such step) from a real
//! `vouch serve` on loopback serving that builder's trace store, on a closure the real Debian
//! Nix 2.8 built ([`tests::fixture`]: a floating-CA chain `fod → a → b → c`, simulated
//! evidence). No VM: the VM flow with two builders is `serve_closure_vm`.
//!
//! Attacks first, each against a fresh service cache, each refused with an error naming the
//! URL and the cause, and nothing of the step published (no step directory, no narinfo, no
//! NAR): a NAR with other bytes than its statement names (or one byte more), a NAR the builder
//! does not have (404), evidence of another step (a forged trace), a withheld trace, a server
//! answering 500, no server at all. Then the ordinary use: the step verifies over HTTP, is published and signed here with
//! its NAR re-hashed, and the fetched statements and evidence are in the fetch cache.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use build_trace::source::{FetchOptions, Location, TlsRoots};
use build_trace::trust::TrustModel;
use host_launcher::core::{Derivations, KeyNaming, PublishConfig};
use host_launcher::serve::closure::traces::{BuilderTraces, Importer};
use nix_formats::derivation::Derivation;
use nix_formats::StorePath;
use test_support::http_service::HttpService;
use test_support::vm::vouch_bin;
use tests::fixture::Fixture;
use tests::service::self_signed;

const MACHINE: &str = "ssh-ng://builder-b?remote-program=/opt/vouch";

/// A copy of the fixture's trace store as the trace store (`<state>/cache`) of a state
/// directory in `dir`, for a `vouch serve` of its own.
fn builder_state(fx: &Fixture, dir: &Path, name: &str) -> PathBuf {
    let state = dir.join(name);
    std::fs::create_dir_all(&state).unwrap();
    let st = Command::new("cp").arg("-a").arg(&fx.traces).arg(state.join("cache")).status();
    assert!(st.unwrap().success());
    state
}

/// A server on loopback that answers `nix-cache-info` and 500 to everything else, until the
/// test ends.
fn failing_server() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let mut line = String::new();
            let mut r = BufReader::new(c.try_clone().unwrap());
            let _ = r.read_line(&mut line);
            let mut h = String::new();
            while r.read_line(&mut h).is_ok_and(|n| n > 2) {
                h.clear();
            }
            let (status, body) = if line.starts_with("GET /nix-cache-info ") {
                ("200 OK", "StoreDir: /nix/store\n")
            } else {
                ("500 Internal Server Error", "boom\n")
            };
            let _ = write!(
                c,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

struct Setup {
    fx: Fixture,
    graph: Derivations,
    /// The step imported: `c`, its unresolved and its resolved derivation.
    udrv: StorePath,
    key: StorePath,
    out: StorePath,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let fx = Fixture::new(&["c"]);
        let udrv = fx.drvs["c"].clone();
        let step = fx.step("c");
        let key = step.statement.job.drv_path.clone();
        let out = step.statement.outputs["out"].path.clone();
        let store_dir = fx.store_dir.clone();
        let graph = Derivations::load(&udrv, &mut |p| {
            Derivation::from_aterm(&std::fs::read(store_dir.join(p.base_name())).ok()?).ok()
        })
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        Setup { fx, graph, udrv, key, out, dir }
    }

    /// Import step `c` from `location` into a fresh service cache `svc-<name>`: the outcome,
    /// and the service's state directory.
    fn import(&self, name: &str, location: &str) -> (Result<(), String>, PathBuf) {
        self.import_with(name, location, TlsRoots::BuiltIn)
    }

    /// [`Setup::import`], trusting `roots` for `https://`.
    fn import_with(
        &self,
        name: &str,
        location: &str,
        roots: TlsRoots,
    ) -> (Result<(), String>, PathBuf) {
        let state = self.dir.path().join(format!("svc-{name}"));
        let publish = PublishConfig {
            state_dir: state.clone(),
            trace_store: state.join("cache"),
            key_naming: KeyNaming::named("ci-service-simulated-1").unwrap(),
        };
        build_trace::store::TraceStore::create(&publish.trace_store).unwrap();
        let loc = Location::parse(location).unwrap();
        let builders = BuilderTraces {
            machines: BTreeMap::from([(MACHINE.to_owned(), loc)]),
            fetch: FetchOptions {
                cache_dir: Some(state.join("serve/trace-cache")),
                tls_roots: roots,
                ..BuilderTraces::default().fetch
            },
        };
        let policy = self.fx.policy(TrustModel::Leaf("builder:sim".into())).prepare().unwrap();
        let downloads = state.join("serve/trace-downloads");
        let importer = Importer {
            policy: &policy,
            publish: &publish,
            builders: &builders,
            downloads: &downloads,
        };
        let got = importer
            .import(&self.graph, &self.udrv, &self.key, MACHINE)
            .map(drop)
            .map_err(|e| build_trace::error_chain(&e));
        if downloads.exists() {
            let left: Vec<_> = std::fs::read_dir(&downloads).unwrap().collect();
            assert!(left.is_empty(), "{name}: downloaded NARs left behind: {left:?}");
        }
        (got, state)
    }

    /// Nothing of step `c` is in the service's cache at `state`.
    fn nothing_published(&self, state: &Path, what: &str) {
        let cache = state.join("cache");
        let step = cache.join("vouch/v1/steps").join(self.key.base_name());
        assert!(!step.exists(), "{what}: {} published", step.display());
        let narinfo = cache.join(format!("{}.narinfo", self.out.hash_part()));
        assert!(!narinfo.exists(), "{what}: {} signed", narinfo.display());
        let nar = self.nar_name();
        assert!(!cache.join("nar").join(&nar).exists(), "{what}: its NAR copied");
    }

    /// `c`'s output NAR's name in a trace store (`nar/<nix32 NAR hash>.nar`).
    fn nar_name(&self) -> String {
        let o = &self.fx.step("c").statement.outputs["out"];
        format!("{}.nar", nix_formats::base32::encode(&o.nar_hash.0))
    }

    /// `c`'s entry directory in the trace store at `cache` (the fixture writes one per step).
    fn entry_dir(&self, cache: &Path, key: &StorePath) -> PathBuf {
        let steps = cache.join("vouch/v1/steps").join(key.base_name());
        std::fs::read_dir(steps).unwrap().next().unwrap().unwrap().path()
    }

    fn serve(&self, state: &Path) -> HttpService {
        let log = state.with_extension("log");
        HttpService::start(&vouch_bin(), state, &log, &[])
    }
}

fn refused(got: &Result<(), String>, what: &str, needles: &[&str]) {
    let e = got.as_ref().expect_err(what);
    for n in needles {
        assert!(e.contains(n), "{what}: {n:?} not in: {e}");
    }
}

#[test]
fn a_builders_trace_is_fetched_over_http_verified_and_only_then_published() {
    let s = Setup::new();
    let nar = s.nar_name();

    // A NAR with other bytes: the trace verifies, the download does not.
    let b = builder_state(&s.fx, s.dir.path(), "b-bad-nar");
    let file = b.join("cache/nar").join(&nar);
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 20;
    bytes[last] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let srv = s.serve(&b);
    let (got, state) = s.import("bad-nar", &srv.url());
    let url = format!("{}/nar/{nar}", srv.url());
    refused(&got, "a tampered NAR", &[&url, "is not the NAR of output out", "its SHA-256 is"]);
    s.nothing_published(&state, "a tampered NAR");
    // One byte more than the statement's size: stopped there.
    bytes.push(0);
    std::fs::write(&file, &bytes).unwrap();
    let (got, state) = s.import("long-nar", &srv.url());
    refused(&got, "a long NAR", &[&url, "more than the", "bytes expected"]);
    s.nothing_published(&state, "a long NAR");

    // The NAR is not there: 404, named.
    std::fs::remove_file(&file).unwrap();
    let (got, state) = s.import("no-nar", &srv.url());
    refused(&got, "a missing NAR", &[&url, "answered HTTP 404", "not at the builder"]);
    s.nothing_published(&state, "a missing NAR");
    drop(srv);

    // A forged trace: c's entry carries b's evidence (another statement's report).
    let b = builder_state(&s.fx, s.dir.path(), "b-forged");
    let key_b = s.fx.step("b").statement.job.drv_path.clone();
    let theirs = s.entry_dir(&b.join("cache"), &key_b).join("evidence.json");
    std::fs::copy(theirs, s.entry_dir(&b.join("cache"), &s.key).join("evidence.json")).unwrap();
    let srv = s.serve(&b);
    let (got, state) = s.import("forged", &srv.url());
    refused(&got, "a forged trace", &["does not verify under the service's policy"]);
    s.nothing_published(&state, "a forged trace");
    drop(srv);

    // No trace of the step there (laut's index of it withheld): not verified, named.
    let b = builder_state(&s.fx, s.dir.path(), "b-no-trace");
    std::fs::remove_file(b.join("cache/traces").join(s.key.hash_part())).unwrap();
    let srv = s.serve(&b);
    let (got, state) = s.import("no-trace", &srv.url());
    refused(&got, "no trace", &["does not verify under the service's policy", "NOT VERIFIED"]);
    s.nothing_published(&state, "no trace");
    drop(srv);

    // A server that answers 500, and no server at all.
    let url = failing_server();
    let (got, state) = s.import("500", &url);
    refused(&got, "500", &[&url, "answered HTTP 500"]);
    s.nothing_published(&state, "500");
    let gone = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let (got, state) = s.import("unreachable", &gone);
    refused(&got, "no server", &["opening the traces of builder", &gone, "cannot fetch"]);
    s.nothing_published(&state, "no server");

    // The builder's own trace store, served by a real `vouch serve`: verified, published,
    // signed here; its NAR re-hashed into the service's cache; what was fetched by URL that
    // always names the same bytes (statements, evidence) kept in the fetch cache.
    let b = builder_state(&s.fx, s.dir.path(), "b-honest");
    let srv = s.serve(&b);
    let (got, state) = s.import("honest", &srv.url());
    assert_eq!(got, Ok(()), "{}", srv.log_text());
    let cache = state.join("cache");
    assert!(cache.join("vouch/v1/steps").join(s.key.base_name()).is_dir());
    let narinfo = std::fs::read_to_string(cache.join(format!("{}.narinfo", s.out.hash_part())));
    assert!(narinfo.unwrap().contains("Sig: ci-service-simulated-1:"));
    assert_eq!(
        std::fs::read(cache.join("nar").join(&nar)).unwrap(),
        std::fs::read(b.join("cache/nar").join(&nar)).unwrap()
    );
    let cached = state.join("serve/trace-cache/sha256");
    assert!(cached.read_dir().unwrap().count() >= 2, "statement and evidence cached");

    // The same step from the directory, as a path and as file://: the same outcome.
    let dir = b.join("cache").display().to_string();
    for (name, loc) in [("dir", dir.clone()), ("file-url", format!("file://{dir}"))] {
        let (got, state) = s.import(name, &loc);
        assert_eq!(got, Ok(()), "{loc}");
        let nar_here = state.join("cache/nar").join(&nar);
        assert!(nar_here.is_file(), "{loc}");
    }
}

/// `--builder-traces MACHINE=https://…`: a builder's `vouch serve --tls-cert/--tls-key` with a
/// self-signed certificate is not trusted on Mozilla's roots (the step refused, naming the URL
/// and `--builder-tls-ca`, nothing published), and is with its CA given (as
/// `--builder-tls-ca` gives it); a CA file that cannot be used stops `vouch serve` at start,
/// naming it.
#[test]
fn an_https_builder_is_trusted_on_the_ca_given_only() {
    let s = Setup::new();
    let (cert, key) = self_signed(s.dir.path(), "loopback", "IP:127.0.0.1");
    let b = builder_state(&s.fx, s.dir.path(), "b-https");
    let (c, k) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let log = s.dir.path().join("b-https.log");
    let srv = HttpService::start(&vouch_bin(), &b, &log, &["--tls-cert", c, "--tls-key", k]);
    let url = format!("https://{}", srv.addr);

    let (got, state) = s.import("https-untrusted", &url);
    let how = "trust another CA with --builder-tls-ca FILE or SSL_CERT_FILE";
    refused(&got, "an untrusted certificate", &[&url, "not trusted", how]);
    s.nothing_published(&state, "an untrusted certificate");

    let roots = TlsRoots::Files { paths: vec![cert.clone()], given_by: "--builder-tls-ca".into() };
    let (got, state) = s.import_with("https-trusted", &url, roots);
    assert_eq!(got, Ok(()), "{}", srv.log_text());
    assert!(state.join("cache/vouch/v1/steps").join(s.key.base_name()).is_dir());

    // The service itself: a CA file that is not PEM stops it before it listens.
    let not_pem = s.dir.path().join("not-pem.pem");
    std::fs::write(&not_pem, "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n")
        .unwrap();
    let out = Command::new(vouch_bin())
        .arg("--state-dir")
        .arg(s.dir.path().join("svc-bad-ca"))
        .args(["serve", "--listen", "127.0.0.1:0", "--builder-traces"])
        .arg(format!("{MACHINE}={url}"))
        .arg("--builder-tls-ca")
        .arg(&not_pem)
        .output()
        .unwrap();
    let t = test_support::nix::text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains(not_pem.to_str().unwrap()) && t.contains("--builder-tls-ca"), "{t}");
    assert!(!t.contains("listening on"), "{t}");
}
