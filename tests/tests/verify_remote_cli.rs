//! Issue 14, "any cache": `vouch verify`, `vouch trace show` and `vouch provenance` (the built
//! binary) read the trace store of a real `vouch serve` over HTTP and a directory as `file://`,
//! on a closure the real Debian Nix built ([`tests::fixture`]). A remote store that does not
//! answer, or lacks a `.drv` the local store lacks too, is an error (exit 2) naming the URL,
//! never a local "No such file or directory"; a second run takes the statements and evidence
//! from the local cache (`<state dir>/trace-cache`), which the server's own response counter
//! shows. The attacks on the fetching itself (a `.drv` that does not hash to its path, a forged
//! statement, withheld traces, 500s) are `build-trace/tests/remote.rs`. Over HTTPS (a real
//! `vouch serve --tls-cert/--tls-key` with a certificate made here by openssl): not trusted
//! without its CA (exit 2, the URL), verified with `--tls-ca` or `SSL_CERT_FILE`, a certificate
//! for another name refused, bad CA files named.

use std::path::Path;
use std::process::{Command, Output};

use test_support::http_service::HttpService;
use test_support::nix::text;
use test_support::vm::vouch_bin;
use tests::fixture::Fixture;
use tests::service::self_signed;

fn vouch(state: &Path, args: &[&str]) -> Output {
    Command::new(vouch_bin()).arg("--state-dir").arg(state).args(args).output().unwrap()
}

/// The service's count of 2xx responses (`/metrics`; no line before the first one).
fn responses_2xx(s: &HttpService) -> u64 {
    let m = s.request("GET", "/metrics", b"").text();
    m.lines()
        .find(|l| l.starts_with("vouch_http_responses_total{class=\"2xx\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .map(|n| n.parse().unwrap_or_else(|e| panic!("{e}: {n:?} in:\n{m}")))
        .unwrap_or(0)
}

/// A service state directory in `dir` whose trace store (`<state>/cache`) is a copy of the
/// fixture's.
fn serve_state(fx: &Fixture, dir: &std::path::Path) -> std::path::PathBuf {
    let state = dir.join("serve-state");
    std::fs::create_dir_all(&state).unwrap();
    let st = Command::new("cp").arg("-a").arg(&fx.traces).arg(state.join("cache")).status();
    assert!(st.unwrap().success());
    state
}

#[test]
fn verify_over_http_from_vouch_serve_and_over_file_urls() {
    let fx = Fixture::new(&["c"]);
    let dir = tempfile::tempdir().unwrap();
    let state = serve_state(&fx, dir.path());
    let server = HttpService::start(&vouch_bin(), &state, &dir.path().join("serve.log"), &[]);
    let url = server.url();
    let me = dir.path().join("verifier-state");
    let policy = fx.write_sim_policy(dir.path()).display().to_string();
    let drv_dir = fx.store_dir.display().to_string();
    let (drv, out) = (fx.drvs["c"].to_string(), fx.outs["c"].to_string());
    let verify = |traces: &str, extra: &[&str]| {
        let mut a = vec!["verify", "--policy", &policy, "--traces", traces, "--drv-dir", &drv_dir];
        a.extend(extra);
        vouch(&me, &a)
    };

    // Over HTTP: verified, and a second run asks the server for less (the cache answers).
    let before = responses_2xx(&server);
    let first = verify(&url, &["--expect", &out, &drv]);
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    assert!(text(&first).contains("VERIFIED"), "{}", text(&first));
    let after_first = responses_2xx(&server);
    let second = verify(&url, &["--expect", &out, &drv]);
    assert_eq!((second.status.code(), &second.stdout), (first.status.code(), &first.stdout));
    let after_second = responses_2xx(&server);
    let (d1, d2) = (after_first - before - 1, after_second - after_first - 1);
    // Three steps with traces (a, b, c): index + statement + evidence each, then the index only.
    assert_eq!(d1 - d2, 6, "first run {d1} files, second {d2}");
    assert!(me.join("trace-cache/sha256").read_dir().unwrap().count() >= 6);
    // The same verdict from the directory, as a path and as file://.
    let traces = fx.traces.display().to_string();
    for t in [traces.clone(), format!("file://{traces}")] {
        let local = verify(&t, &["--expect", &out, &drv]);
        assert_eq!(local.status.code(), Some(0), "{t}: {}", text(&local));
        assert_eq!(local.stdout, first.stdout, "{t}");
    }
    // `--json` over HTTP names the derivation; a wrong expectation is "not verified" (1).
    let json = verify(&url, &["--json", &drv]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!((v["result"].as_str(), v["derivation"].as_str()), (Some("verified"), Some(&*drv)));
    let wrong = verify(&url, &["--expect", &fx.outs["a"].to_string(), &drv]);
    assert_eq!(wrong.status.code(), Some(1), "{}", text(&wrong));

    // `trace show` and `provenance` over HTTP.
    let show = vouch(&me, &["trace", "show", "--traces", &url, "--drv-dir", &drv_dir, &out]);
    assert_eq!(show.status.code(), Some(0), "{}", text(&show));
    assert!(text(&show).contains(&format!("{url}/vouch/v1/steps/")), "{}", text(&show));
    let prov = vouch(
        &me,
        &["provenance", "--policy", &policy, "--traces", &url, "--drv-dir", &drv_dir, &out],
    );
    assert_eq!(prov.status.code(), Some(0), "{}", text(&prov));
    let st: serde_json::Value = serde_json::from_slice(&prov.stdout).unwrap();
    assert_eq!(st["subject"][0]["name"], out.as_str());

    // The service serves `.drv` files only of steps it built: a verifier without them is told
    // where each was looked for.
    let empty = dir.path().join("no-drvs");
    std::fs::create_dir(&empty).unwrap();
    let e = empty.display().to_string();
    let missing =
        vouch(&me, &["verify", "--policy", &policy, "--traces", &url, "--drv-dir", &e, &drv]);
    assert_eq!(missing.status.code(), Some(2), "{}", text(&missing));
    assert!(text(&missing).contains(&url) && text(&missing).contains(&e), "{}", text(&missing));

    // Nothing listening: exit 2, the URL and the cause; never a local path error.
    drop(server);
    let gone = verify(&url, &[&drv]);
    assert_eq!(gone.status.code(), Some(2), "{}", text(&gone));
    assert!(text(&gone).contains(&format!("{url}/nix-cache-info")), "{}", text(&gone));
    assert!(!text(&gone).contains("No such file"), "{}", text(&gone));
    let odd = verify("s3://bucket", &[&drv]);
    assert_eq!(odd.status.code(), Some(2), "{}", text(&odd));
    assert!(text(&odd).contains("names no trace store"), "{}", text(&odd));
}

/// `vouch verify --traces https://…` against a real `vouch serve --tls-cert/--tls-key` with a
/// self-signed certificate: refused (exit 2, the URL, "not trusted") with Mozilla's roots only,
/// verified with `--tls-ca` or `SSL_CERT_FILE`; a certificate for another name is refused even
/// with its CA trusted; a CA file that is not PEM, or holds no certificate, is named.
#[test]
fn verify_over_https_trusts_only_the_ca_given() {
    let fx = Fixture::new(&["c"]);
    let dir = tempfile::tempdir().unwrap();
    let state = serve_state(&fx, dir.path());
    let (cert, key) = self_signed(dir.path(), "loopback", "IP:127.0.0.1");
    let (other, other_key) = self_signed(dir.path(), "elsewhere", "DNS:elsewhere.invalid");
    let (cert_s, other_s) = (cert.display().to_string(), other.display().to_string());
    let serve = |state: &Path, log: &str, c: &Path, k: &Path| {
        let (c, k) = (c.to_str().unwrap(), k.to_str().unwrap());
        HttpService::start(
            &vouch_bin(),
            state,
            &dir.path().join(log),
            &["--tls-cert", c, "--tls-key", k],
        )
    };
    let server = serve(&state, "serve.log", &cert, &key);
    assert!(server.log_text().contains("listening on https://"), "{}", server.log_text());
    let url = format!("https://{}", server.addr);
    let me = dir.path().join("verifier-state");
    let policy = fx.write_sim_policy(dir.path()).display().to_string();
    let drv_dir = fx.store_dir.display().to_string();
    let (drv, out) = (fx.drvs["c"].to_string(), fx.outs["c"].to_string());
    let verify = |url: &str, extra: &[&str], env: Option<&Path>| {
        let mut c = Command::new(vouch_bin());
        c.arg("--state-dir").arg(&me).args(["verify", "--policy", &policy, "--traces", url]);
        c.args(["--drv-dir", &drv_dir, "--no-fetch-cache"])
            .args(extra)
            .args(["--expect", &out, &drv]);
        match env {
            Some(f) => c.env("SSL_CERT_FILE", f),
            None => c.env_remove("SSL_CERT_FILE"),
        };
        c.output().unwrap()
    };

    // Attack first: Mozilla's roots only, a self-signed server is not trusted.
    let refused = verify(&url, &[], None);
    let t = text(&refused);
    assert_eq!(refused.status.code(), Some(2), "{t}");
    assert!(t.contains(&format!("{url}/nix-cache-info")) && t.contains("not trusted"), "{t}");
    assert!(t.contains("--tls-ca"), "{t}");
    assert!(!t.contains("VERIFIED"), "{t}");
    // Another CA given (instead of the built-in roots): still not trusted.
    let wrong_ca = verify(&url, &["--tls-ca", &other_s], None);
    let t = text(&wrong_ca);
    assert_eq!(wrong_ca.status.code(), Some(2), "{t}");
    assert!(t.contains(&url) && t.contains("not trusted"), "{t}");

    // Its CA given: verified, by --tls-ca (also among several) and by SSL_CERT_FILE.
    for (extra, env) in [
        (vec!["--tls-ca", &cert_s], None),
        (vec!["--tls-ca", &other_s, "--tls-ca", &cert_s], None),
        (vec![], Some(cert.as_path())),
        // --tls-ca wins over SSL_CERT_FILE.
        (vec!["--tls-ca", &cert_s], Some(other.as_path())),
    ] {
        let ok = verify(&url, &extra, env);
        assert_eq!(ok.status.code(), Some(0), "{extra:?} {env:?}: {}", text(&ok));
        assert!(text(&ok).contains("VERIFIED"), "{}", text(&ok));
    }
    // A bundle of both certificates in one file.
    let bundle = dir.path().join("bundle.pem");
    let both = [std::fs::read(&other).unwrap(), std::fs::read(&cert).unwrap()].concat();
    std::fs::write(&bundle, both).unwrap();
    let ok = verify(&url, &["--tls-ca", bundle.to_str().unwrap()], None);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));

    // A server whose certificate names another host: refused even with that CA trusted.
    let state2 = dir.path().join("serve-state-2");
    std::fs::create_dir_all(&state2).unwrap();
    let st = Command::new("cp").arg("-a").arg(&fx.traces).arg(state2.join("cache")).status();
    assert!(st.unwrap().success());
    let misnamed = serve(&state2, "serve2.log", &other, &other_key);
    let url2 = format!("https://{}", misnamed.addr);
    let r = verify(&url2, &["--tls-ca", &other_s], None);
    let t = text(&r);
    assert_eq!(r.status.code(), Some(2), "{t}");
    assert!(t.contains(&url2) && t.contains("not valid for this host"), "{t}");

    bad_ca_files_are_named(dir.path(), &key, &url, &fx.traces, &verify);
}

/// `verify` as the test runs it: the store URL, extra arguments, `SSL_CERT_FILE` if any.
type Verify<'a> = dyn Fn(&str, &[&str], Option<&Path>) -> Output + 'a;

/// Bad CA files (`--tls-ca` or `SSL_CERT_FILE`, made under `dir`; `key`, the server's key, is
/// PEM without a certificate) are named, with what is wrong, for the store at `url`; they are
/// only read for https:// stores, so the directory `traces` still verifies.
fn bad_ca_files_are_named(dir: &Path, key: &Path, url: &str, traces: &Path, verify: &Verify<'_>) {
    let not_pem = dir.join("not-pem.pem");
    std::fs::write(&not_pem, "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n")
        .unwrap();
    let no_cert = dir.join("key-only.pem");
    std::fs::copy(key, &no_cert).unwrap();
    let missing = dir.join("absent.pem");
    for (f, what) in [
        (&not_pem, "not a readable PEM"),
        (&no_cert, "holds no certificate"),
        (&missing, "not a readable PEM"),
    ] {
        let fs = f.display().to_string();
        let r = verify(url, &["--tls-ca", &fs], None);
        let t = text(&r);
        assert_eq!(r.status.code(), Some(2), "{t}");
        assert!(t.contains(&fs) && t.contains(what) && t.contains("--tls-ca"), "{t}");
        let r = verify(url, &[], Some(f));
        let t = text(&r);
        assert_eq!(r.status.code(), Some(2), "{t}");
        assert!(t.contains(&fs) && t.contains("SSL_CERT_FILE"), "{t}");
    }
    // A plain directory store does not read SSL_CERT_FILE.
    let traces = traces.display().to_string();
    let local = verify(&traces, &[], Some(&missing));
    assert_eq!(local.status.code(), Some(0), "{}", text(&local));
}
