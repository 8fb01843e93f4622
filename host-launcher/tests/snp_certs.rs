//! `vouch snp certs fetch` against a fake AMD KDS on loopback that serves the real AMD
//! certificates of `tests/data/snp` under the real URL layout (exact paths and queries: a URL
//! that differs in one character gets a 404), plus the answers that go wrong: a 404, a VCEK of
//! another chip, an expired certificate, a 429, and a proxy in between.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use host_launcher::snp::kds::Kds;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/snp");

fn data(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(DATA).join(name)).unwrap()
}

fn der(name: &str) -> Vec<u8> {
    build_trace::evidence::certs::load_certificates(&data(name)).unwrap().remove(0)
}

/// hwID of a report (64 bytes, or Turin's 8).
fn hw_id(report: &str, n: usize) -> String {
    hex::encode(&data(report)[0x1A0..0x1A0 + n])
}

/// `(status, body, extra header)` per exact request target.
type Routes = HashMap<String, (u16, Vec<u8>, Option<String>)>;

/// A fake KDS (and HTTP CONNECT proxy) on 127.0.0.1. Every request target it saw is logged; a
/// route that answered 429 answers 200 the next time.
struct FakeKds {
    url: String,
    log: Arc<Mutex<Vec<String>>>,
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<(String, String)> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next()?.to_owned(), parts.next()?.to_owned());
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 || h == "\r\n" {
            break;
        }
    }
    Some((method, target))
}

fn serve(stream: TcpStream, routes: Arc<Mutex<Routes>>, log: Arc<Mutex<Vec<String>>>) {
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    while let Some((method, target)) = read_request(&mut r) {
        log.lock().unwrap().push(format!("{method} {target}"));
        if method == "CONNECT" {
            // A proxy tunnel: what follows is the KDS request itself.
            let _ = w.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
            continue;
        }
        // Absolute-form targets (a plain HTTP proxy) name the path after the authority.
        let path = match target.strip_prefix("http://") {
            Some(rest) => rest[rest.find('/').unwrap_or(rest.len())..].to_owned(),
            None => target,
        };
        let mut routes = routes.lock().unwrap();
        let (status, body, header) =
            routes.get(&path).cloned().unwrap_or((404, b"no such VCEK".to_vec(), None));
        if status == 429 {
            // Rate-limited once, then served.
            if let Some(e) = routes.get_mut(&path) {
                e.0 = 200;
                e.2 = None;
            }
        }
        drop(routes);
        let extra = header.map(|h| format!("{h}\r\n")).unwrap_or_default();
        let head = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n{extra}\r\n", body.len());
        if w.write_all(head.as_bytes()).and_then(|()| w.write_all(&body)).is_err() {
            return;
        }
    }
}

impl FakeKds {
    fn start(routes: Routes) -> FakeKds {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let routes = Arc::new(Mutex::new(routes));
        let l = log.clone();
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                let (routes, log) = (routes.clone(), l.clone());
                std::thread::spawn(move || serve(s, routes, log));
            }
        });
        FakeKds { url, log }
    }

    fn seen(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

fn ok(body: Vec<u8>) -> (u16, Vec<u8>, Option<String>) {
    (200, body, None)
}

const MILAN_TCB: &str = "blSPL=03&teeSPL=00&snpSPL=08&ucodeSPL=115";

/// The real KDS layout for the three products' reports in the test data.
fn real_routes() -> Routes {
    let mut r = Routes::new();
    r.insert("/vcek/v1/Milan/cert_chain".into(), ok(data("cert_chain_milan")));
    r.insert("/vcek/v1/Turin/cert_chain".into(), ok(data("cert_chain_turin")));
    r.insert("/vcek/v1/Genoa/cert_chain".into(), ok(data("ask_ark_genoa.pem")));
    let milan = format!("/vcek/v1/Milan/{}?{MILAN_TCB}", hw_id("report_milan.bin", 64));
    r.insert(milan, ok(data("vcek_milan.der")));
    let turin = format!(
        "/vcek/v1/Turin/{}?fmcSPL=01&blSPL=01&teeSPL=01&snpSPL=04&ucodeSPL=81",
        hw_id("turin_attestation_report.bin", 8)
    );
    r.insert(turin, ok(der("turin_vcek.pem")));
    let genoa = format!(
        "/vcek/v1/Genoa/{}?blSPL=10&teeSPL=00&snpSPL=23&ucodeSPL=84",
        hw_id("az-genoa-snp-report.bin", 64)
    );
    r.insert(genoa, ok(der("az-genoa-vcek.pem")));
    r
}

fn vouch(state: &Path, kds: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vouch"));
    cmd.arg("--state-dir").arg(state).args(["snp", "certs"]).args(args);
    cmd.env("VOUCH_KDS_URL", kds);
    for v in [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        cmd.env_remove(v);
    }
    cmd.envs(env.iter().copied());
    cmd.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn report(name: &str) -> String {
    format!("{DATA}/{name}")
}

#[test]
fn fetches_each_products_vcek_under_the_real_layout_and_caches_it() {
    let kds = FakeKds::start(real_routes());
    let state = tempfile::tempdir().unwrap();
    let cases = [
        ("report_milan.bin", Some("milan"), "Milan", "bl03-tee00-snp08-ucode115"),
        ("turin_attestation_report.bin", None, "Turin", "fmc01-bl01-tee01-snp04-ucode81"),
        ("az-genoa-snp-report.bin", None, "Genoa", "bl10-tee00-snp23-ucode84"),
    ];
    for (rep, product, name, tcb) in cases {
        let rep_path = report(rep);
        let mut args = vec!["fetch", "--report", rep_path.as_str()];
        if let Some(p) = product {
            args.extend(["--product", p]);
        }
        let o = vouch(state.path(), &kds.url, &args, &[]);
        assert!(o.status.success(), "{rep}: {}", stderr(&o));
        let path = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        assert!(path.starts_with(state.path().join("snp/certs").join(name)), "{}", path.display());
        assert!(path.ends_with(format!("{tcb}/vcek.der")), "{}", path.display());
        assert!(state.path().join(format!("snp/certs/{name}/cert_chain.pem")).is_file());
    }
    let fetched = kds.seen().len();
    assert_eq!(fetched, 6, "three chains and three VCEKs: {:?}", kds.seen());
    // Cached: a second fetch asks the KDS nothing.
    let o = vouch(
        state.path(),
        &kds.url,
        &["fetch", "--report", &report("report_milan.bin"), "--product", "milan"],
        &[],
    );
    assert!(o.status.success() && stderr(&o).contains("cached VCEK"), "{}", stderr(&o));
    assert_eq!(kds.seen().len(), fetched);
    let o = vouch(state.path(), &kds.url, &["list"], &[]);
    let listed = String::from_utf8_lossy(&o.stdout);
    assert_eq!(listed.lines().count(), 3, "{listed}");
    assert!(!listed.contains("INVALID"), "{listed}");
}

#[test]
fn a_404_a_wrong_chip_and_an_expired_certificate_are_refused() {
    let state = tempfile::tempdir().unwrap();
    let trustee = ["fetch", "--report", &report("test-report.bin"), "--product", "milan"];
    // A chip the KDS does not know.
    let kds = FakeKds::start(real_routes());
    let o = vouch(state.path(), &kds.url, &trustee, &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("the KDS has no such certificate (404)"), "{}", stderr(&o));

    // The KDS hands out the VCEK of another Milan chip with the same TCB.
    let mut routes = real_routes();
    let other = format!("/vcek/v1/Milan/{}?{MILAN_TCB}", hw_id("test-report.bin", 64));
    routes.insert(other, ok(data("vcek_milan.der")));
    let kds = FakeKds::start(routes);
    let o = vouch(state.path(), &kds.url, &trustee, &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("the VCEK is for chip"), "{}", stderr(&o));

    // The real VLEK of the test data, which expired on 2025-12-10.
    let mut routes = real_routes();
    let milan = format!("/vcek/v1/Milan/{}?{MILAN_TCB}", hw_id("report_milan.bin", 64));
    routes.insert(milan, ok(data("test-vlek.der")));
    let kds = FakeKds::start(routes);
    let milan = ["fetch", "--report", &report("report_milan.bin"), "--product", "milan"];
    let o = vouch(state.path(), &kds.url, &milan, &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("the certificate expired on 2025-12-10"), "{}", stderr(&o));
    assert!(no_vceks(state.path()), "nothing refused was cached");
}

fn no_vceks(state: &Path) -> bool {
    host_launcher::snp::certs::CertCache::new(state).vceks().is_empty()
}

#[test]
fn a_429_waits_at_least_ten_seconds_and_a_404_is_final() {
    let mut routes = real_routes();
    routes.insert("/limited".into(), (429, Vec::new(), Some("Retry-After: 1".into())));
    let kds = FakeKds::start(routes);
    let waits = Arc::new(Mutex::new(Vec::new()));
    let w = waits.clone();
    let mut client = Kds::new(&kds.url).with_sleep(move |d| w.lock().unwrap().push(d));
    assert_eq!(client.get("/limited").unwrap(), b"");
    assert_eq!(*waits.lock().unwrap(), [Duration::from_secs(10)]);
    let e = client.get("/vcek/v1/Milan/00").unwrap_err();
    assert!(e.to_string().contains("(404)"), "{e}");
    assert_eq!(waits.lock().unwrap().len(), 1, "a 404 is not retried");
    // No server at all: retried with backoff, then given up.
    let mut dead = Kds::new("http://127.0.0.1:9").with_sleep(|_| {});
    let e = dead.get("/x").unwrap_err();
    assert!(e.to_string().contains("gave up after 4 tries"), "{e}");
}

#[test]
fn proxies_from_the_environment_are_used_unless_no_proxy_says_otherwise() {
    let kds = FakeKds::start(real_routes());
    let state = tempfile::tempdir().unwrap();
    let args = ["fetch", "--report", &report("report_milan.bin"), "--product", "milan"];
    // Through the proxy: the KDS host name never resolves; the proxy sees the request.
    let o = vouch(state.path(), "http://kdsintf.amd.invalid", &args, &[("HTTPS_PROXY", &kds.url)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(kds.seen().iter().any(|l| l.contains("kdsintf.amd.invalid")), "{:?}", kds.seen());
    // NO_PROXY: a dead proxy is bypassed for the KDS's host.
    let state = tempfile::tempdir().unwrap();
    let dead = [("HTTPS_PROXY", "http://127.0.0.1:9"), ("NO_PROXY", "127.0.0.1")];
    let o = vouch(state.path(), &kds.url, &args, &dead);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn offline_import_files_each_vcek_under_its_own_chip_and_tcb() {
    let from = tempfile::tempdir().unwrap();
    for f in ["vcek_milan.der", "turin_vcek.pem", "cert_chain_turin", "test-vlek.der"] {
        std::fs::write(from.path().join(f), data(f)).unwrap();
    }
    let state = tempfile::tempdir().unwrap();
    let from_dir = from.path().to_str().unwrap();
    let o = vouch(state.path(), "http://127.0.0.1:9", &["fetch", "--from", from_dir], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 2, "two VCEKs");
    assert!(stderr(&o).contains("skipped SEV-VLEK"), "{}", stderr(&o));
    assert!(state.path().join("snp/certs/Turin/cert_chain.pem").is_file());
    // A damaged VCEK fails the import, naming the file.
    let mut bad = data("vcek_milan.der");
    let n = bad.len();
    bad[n - 10] ^= 0xff;
    std::fs::write(from.path().join("vcek_milan.der"), bad).unwrap();
    let o = vouch(state.path(), "http://127.0.0.1:9", &["fetch", "--from", from_dir], &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("vcek_milan.der: the VCEK is not signed by AMD's Milan ASK"),
        "{}",
        stderr(&o)
    );
}
