//! Issue 14, "any cache": `vouch verify`, `vouch trace show` and `vouch provenance` (the built
//! binary) read the trace store of a real `vouch serve` over HTTP and a directory as `file://`,
//! on a closure the real Debian Nix built ([`tests::fixture`]). A remote store that does not
//! answer, or lacks a `.drv` the local store lacks too, is an error (exit 2) naming the URL,
//! never a local "No such file or directory"; a second run takes the statements and evidence
//! from the local cache (`<state dir>/trace-cache`), which the server's own response counter
//! shows. The attacks on the fetching itself (a `.drv` that does not hash to its path, a forged
//! statement, withheld traces, 500s) are `build-trace/tests/remote.rs`.

use std::path::Path;
use std::process::{Command, Output};

use test_support::http_service::HttpService;
use test_support::nix::text;
use test_support::vm::vouch_bin;
use tests::fixture::Fixture;

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

#[test]
fn verify_over_http_from_vouch_serve_and_over_file_urls() {
    let fx = Fixture::new(&["c"]);
    let dir = tempfile::tempdir().unwrap();
    // The service serves the fixture's trace store as its own (`<state>/cache`).
    let state = dir.path().join("serve-state");
    std::fs::create_dir_all(&state).unwrap();
    let st = Command::new("cp").arg("-a").arg(&fx.traces).arg(state.join("cache")).status();
    assert!(st.unwrap().success());
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
