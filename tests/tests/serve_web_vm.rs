//! The CI service's web page in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, through WebDriver), with the real Debian Nix 2.8 and real VMs (TCG here;
//! evidence simulated):
//! - Nix uploads two derivations' closures with its default compression; both are submitted
//!   (`--jobs 1`: the second waits);
//! - the page lists both builds; the first one's page shows its log growing while it runs
//!   (server-sent events), then the build succeeded, its simulated evidence marked, and the
//!   `nix copy --from` and `vouch verify` commands;
//! - the second one is cancelled from its page while it runs, and the page and the list show it
//!   cancelled.
//!
//! Screenshots of the pages go to `$VOUCH_SCREENSHOT_DIR` (else a temporary directory, named in
//! the output); `docs/` keeps the ones of a run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use test_support::nix::text;
use test_support::vm::{nonce, Scratch};
use tests::service::{closure_nix, json, nix_copy, start_trusted, wait, TRUSTED};
use tests::webdriver::Browser;

fn shots(s: &Scratch) -> PathBuf {
    let dir = std::env::var_os("VOUCH_SCREENSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| s.dir.path().join("screenshots"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn shoot(b: &Browser, dir: &Path, name: &str) {
    let file = dir.join(name);
    b.screenshot(&file);
    eprintln!("screenshot: {}", file.display());
}

/// The build's state as its page shows it.
const STATE: &str =
    "const e = document.querySelector('#state .state'); return e ? e.dataset.state : '';";

/// A script: whether the page shows the build in `state`.
fn state_is(state: &str) -> String {
    format!("const e = document.querySelector('#state .state'); return !!e && e.dataset.state === '{state}';")
}

#[test]
fn the_page_follows_a_build_live_and_cancels_one() {
    for tool in ["chromium", "chromedriver"] {
        test_support::nix::require_tool(
            tool,
            "scripts/setup-host.sh installs chromium and chromium-driver",
        );
    }
    let s = Scratch::new();
    let n = nonce();
    let file = s.write("serve.nix", &closure_nix(&n));
    let (ticker, slow) = (s.instantiate(&file, "ticker"), s.instantiate(&file, "slow"));
    let token = s.dir.path().join("trusted-token");
    std::fs::write(&token, "trusted-0123456789abcdef\n").unwrap();
    let svc = start_trusted(&s.state(), &s.dir.path().join("serve.log"), &token);
    let up =
        nix_copy(&s.dir.path().join("xdg"), &["--to", &svc.url(), "--derivation", &ticker, &slow]);
    assert!(up.status.success(), "upload: {}\n{}", text(&up), svc.log_text());
    let ids: Vec<u64> = [&ticker, &slow]
        .iter()
        .map(|d| {
            let body = format!(r#"{{"drv": "{d}"}}"#);
            let r = svc.request_with("POST", "/v1/builds", &[TRUSTED], body.as_bytes());
            assert_eq!(r.status, 202, "{}", r.text());
            json(&r)["id"].as_u64().unwrap()
        })
        .collect();
    let dir = shots(&s);
    let b = Browser::start(&s.dir.path().join("chromium-profile"));

    // The list shows both builds.
    b.goto(&format!("{}/", svc.url()));
    let rows = b.text("#builds");
    assert!(rows.contains("serve-ticker") && rows.contains("serve-slow"), "{rows}");

    // The first one's log grows while it runs.
    b.goto(&format!("{}/builds/{}", svc.url(), ids[0]));
    let log_has = |what: &str| {
        format!("return document.querySelector('pre.log').textContent.includes('{what}');")
    };
    b.wait_for(&log_has(&format!("tick 3 {n}")), Duration::from_secs(300), "tick 3 in the log");
    let early = b.text("pre.log").len();
    assert_eq!(b.eval(STATE), "running");
    shoot(&b, &dir, "serve-build-running.png");
    b.wait_for(&log_has(&format!("tick 9 {n}")), Duration::from_secs(120), "tick 9 in the log");
    let later = b.text("pre.log").len();
    assert!(later > early, "the log grew: {early} → {later}");
    // It succeeds; the page says so (it reloads at the end), simulated evidence unmistakable.
    b.wait_for(&state_is("succeeded"), Duration::from_secs(300), "succeeded");
    b.wait_for(
        "return !!document.getElementById('commands');",
        Duration::from_secs(30),
        "the commands",
    );
    let page = b.text("body");
    assert!(page.contains("SIMULATED EVIDENCE"), "{page}");
    assert!(page.contains(&format!("nix copy --from '{}'", svc.url())), "{page}");
    assert!(page.contains("vouch verify") && page.contains(&ticker), "{page}");
    // The reloaded page streams the whole log again.
    b.wait_for(&log_has(&format!("tick 20 {n}")), Duration::from_secs(30), "the whole log");
    shoot(&b, &dir, "serve-build-succeeded.png");

    // The second one is cancelled from its page while it runs.
    b.goto(&format!("{}/builds/{}", svc.url(), ids[1]));
    b.wait_for(
        &log_has(&format!("started {n}")),
        Duration::from_secs(300),
        "the slow build running",
    );
    b.eval("document.getElementById('cancel').click(); return true;");
    b.wait_for(&state_is("cancelled"), Duration::from_secs(60), "cancelled on its page");
    // The page reloads at the end: finished, no cancel button.
    b.wait_for("return !document.getElementById('cancel');", Duration::from_secs(30), "reloaded");
    assert_eq!(b.eval(STATE), "cancelled");
    shoot(&b, &dir, "serve-build-cancelled.png");
    assert_eq!(wait(&svc, ids[1])["state"], "cancelled");
    b.goto(&format!("{}/", svc.url()));
    let row =
        b.eval(&format!("return document.querySelector('tr[data-id=\"{}\"]').innerText;", ids[1]));
    assert!(row.as_str().unwrap_or_default().contains("cancelled"), "{row}");
    shoot(&b, &dir, "serve-builds.png");
    drop(b);
    let (st, log) = svc.stop("TERM");
    assert!(st.success(), "{st}: {log}");
}
