//! Whole-closure builds through the CI service, scheduled by a real Nix, with the real Debian
//! Nix 2.8 and real VMs (TCG here; evidence simulated):
//!
//! - a client uploads two closures with `nix copy --to http://… --derivation` (Nix's default
//!   xz): `ia` (input-addressed) → `mid` (floating CA, needs the feature `vouch-b`) → `top`
//!   (deferred input-addressed: its input is floating CA); and `fails` (exits 3) with `after`,
//!   which needs `fails` and `ia`;
//! - one `POST /v1/builds` of `top` builds the whole closure across two vouch builders: the
//!   service's own (`ia`, `top`) and a second `vouch nix-builder` with its own state directory
//!   and key name (`mid`, the only machine with `vouch-b`), reached over `ssh-ng://localhost`;
//!   the API shows each step with its own state, log and machine; `mid`'s trace was fetched
//!   over HTTP from a second `vouch serve` on loopback serving the second builder's state
//!   directory (its trace store, read-only: `--builder-traces MACHINE=http://…`), verified
//!   under the service's policy and published here;
//! - `nix-build --max-jobs 0` of `top` succeeds in a second, empty store with the service as
//!   its only substituter, trusting only the service's key: Nix 2.26 (Debian trixie's, in the
//!   chroot) with the service over `http://`, and Nix 2.8 with the service's cache directory
//!   (`file://`; 2.8's own race over HTTP, docs/ci-service.md); outputs equal to the service's;
//! - `nix log --store http://…` shows `top`'s log;
//! - a POST of `after` naming `"nix_version": "2.26"` is refused (422): its floating-CA steps
//!   follow the service's Nix 2.8's self-reference rule; a second POST, of `after` naming 2.8:
//!   `ia` is reused, `fails` fails, `after` fails naming `fails`;
//! - `--jobs 2` bounds the VMs of every Nix together: a closure with two slow steps takes
//!   both VM slots (`/metrics`), and a trusted client's closure build, in its own
//!   private Nix store whose Nix sees the builder's slots free, waits for a slot instead of
//!   booting a third VM; cancelled while waiting, it leaves the line; `DELETE` of the first
//!   build kills Nix and both steps' VMs, the build and its steps end cancelled, nothing is
//!   published, both slots are given back;
//! - with a policy that does not name b's simulated root, b's step (`mid`) is built but its
//!   trace (read from b's trace store directory, `MACHINE=file://DIR`) refused: nothing of it
//!   is published, and `top` fails naming it.
//!
//! The attacks on the HTTP trace source itself (tampered, long or missing NARs, forged traces,
//! 500s, no server) are `serve_builder_traces` (no VM).

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use build_trace::evidence::SimulatedRoot;
use test_support::chroot::ChrootNix;
use test_support::http_service::HttpService;
use test_support::nix::{text, CA_PRELUDE};
use test_support::vm::{builder_wrapper, image_dir, public_key_of, vouch_bin, VmTest, NIX_CONFIG};
use tests::service::{json, nix_copy, trusted_args, wait, TRUSTED};

static VMS: Mutex<()> = Mutex::new(());

fn closure_nix(n: &str) -> String {
    format!(
        r#"let
{CA_PRELUDE}in rec {{
  ia = derivation {{
    name = "sc-ia"; system = sys; builder = "${{bb}}/sh";
    args = [ "-c" "echo ia {n}; mkdir $out; echo {n} > $out/n" ];
  }};
  ia2 = derivation {{
    name = "sc-ia2"; system = sys; builder = "${{bb}}/sh";
    args = [ "-c" "echo ia2 {n}; mkdir $out; echo ${{ia}} > $out/ia" ];
  }};
  mid = ca "sc-mid" {{ requiredSystemFeatures = [ "vouch-b" ]; }} "echo mid {n}; mkdir $out; cat ${{ia}}/n > $out/n; echo ${{ia}} > $out/ia";
  top = derivation {{
    name = "sc-top"; system = sys; builder = "${{bb}}/sh";
    args = [ "-c" "echo top {n}; mkdir $out; echo ${{mid}} > $out/mid; echo ${{ia2}} > $out/ia2" ];
  }};
  fails = ca "sc-fails" {{}} "echo about to fail {n}; exit 3";
  after = ca "sc-after" {{}} "echo ${{fails}} ${{ia}}; mkdir $out";
  slow = ca "sc-slow" {{}} "echo started {n}; ${{bb}}/busybox sleep 600";
  later = ca "sc-later" {{}} "echo ${{slow}}; mkdir $out";
  slow2 = ca "sc-slow2" {{}} "echo started2 {n}; ${{bb}}/busybox sleep 600";
  both = ca "sc-both" {{}} "echo ${{slow}} ${{slow2}}; mkdir $out";
}}
"#
    )
}

/// The step of `v` whose derivation ends with `suffix`.
fn step<'a>(v: &'a serde_json::Value, suffix: &str) -> &'a serde_json::Value {
    v["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["drv"].as_str().is_some_and(|d| d.ends_with(suffix))))
        .unwrap_or_else(|| panic!("no step {suffix}: {v}"))
}

fn step_log(svc: &HttpService, id: u64, s: &serde_json::Value) -> String {
    let idx = s["index"].as_u64().unwrap();
    svc.request("GET", &format!("/v1/builds/{id}/steps/{idx}/log"), b"").text()
}

/// The step directories in a trace store.
fn steps_in(cache: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(cache.join("vouch/v1/steps"))
        .map(|r| r.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// A service on `e`'s state with a second builder `b` (its own state under the scratch area,
/// key name and simulated root; trusted, as Nix 2.8 sends it the input-addressed `ia` output to
/// build `mid` from, and the only machine with `vouch-b`), whose traces are verified under a
/// policy naming simulated roots (`both_roots`: the service's and b's; else the
/// service's only). b's traces are read over HTTP from a second `vouch serve` of b's state
/// directory (`over_http`), else from b's trace store directory as `file://`. The service, b's
/// state directory, and b's `vouch serve`.
fn service_with_builder_b(
    e: &VmTest,
    both_roots: bool,
    over_http: bool,
) -> (HttpService, std::path::PathBuf, Option<HttpService>) {
    let (s, state, sb) = (&e.s, &e.state, e.s.dir.path().join("state-b"));
    std::fs::create_dir_all(&sb).unwrap();
    std::fs::write(sb.join("key-name"), "builder-b-simulated-1\n").unwrap();
    for st in [state, &sb] {
        SimulatedRoot::load_or_generate(&st.join("simulated-snp")).unwrap();
    }
    let wb = builder_wrapper(s.dir.path(), "builder-b", &sb, "--trusted");
    let machine_b = format!("ssh-ng://localhost?remote-program={}", wb.display());
    let builders = s.write(
        "machines",
        &format!("{machine_b} x86_64-linux - 1 1 ca-derivations,vouch-b vouch-b\n"),
    );
    let roots: Vec<&Path> = if both_roots { vec![state, &sb] } else { vec![state] };
    let manifest = image_dir().join("manifest.json");
    let policy = tests::policy::simulated(s.dir.path(), &roots, &[], &manifest);
    let image = image_dir();
    // Every vouch host serves its trace store read-only: b's state directory served by a
    // `vouch serve` of its own, whose tokens file gives nobody more than reading its cache.
    let serve_b = over_http.then(|| {
        let log = s.dir.path().join("serve-b.log");
        let tokens = s.write("tokens-b", "anonymous cache -\n");
        let args = ["--image", image.to_str().unwrap(), "--tokens", tokens.to_str().unwrap()];
        let b = HttpService::start(&vouch_bin(), &sb, &log, &args);
        let r = b.request("POST", "/v1/builds", br#"{"drv": "/nix/store/x.drv"}"#);
        assert_eq!(r.status, 401, "b's server builds nothing: {}", r.text());
        b
    });
    let traces_b = match &serve_b {
        Some(b) => format!("{machine_b}={}", b.url()),
        None => format!("{machine_b}=file://{}", sb.join("cache").display()),
    };
    let args = [
        "--image",
        image.to_str().unwrap(),
        "--jobs",
        "1",
        "--builders",
        builders.to_str().unwrap(),
        "--builder-traces",
        &traces_b,
        "--policy",
        policy.to_str().unwrap(),
    ];
    let svc = HttpService::start(&vouch_bin(), state, &s.dir.path().join("serve.log"), &args);
    (svc, sb, serve_b)
}

/// Upload `drvs`' closures with `nix copy --to http://… --derivation` (Nix's default xz), then
/// `POST /v1/builds` of `drvs[0]`; the build's id.
fn upload_and_build(e: &VmTest, svc: &HttpService, drvs: &[&str]) -> u64 {
    let mut args = vec!["--to".to_owned(), svc.url(), "--derivation".to_owned()];
    args.extend(drvs.iter().map(|d| d.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = nix_copy(&e.s.dir.path().join("xdg-up"), &args);
    assert!(out.status.success(), "upload: {}\n{}", text(&out), svc.log_text());
    let r = svc.request("POST", "/v1/builds", format!(r#"{{"drv": "{}"}}"#, drvs[0]).as_bytes());
    assert_eq!(r.status, 202, "{}", r.text());
    json(&r)["id"].as_u64().unwrap()
}

#[test]
fn one_post_builds_a_closure_across_two_builders_scheduled_by_nix() {
    let e = VmTest::new(&VMS, "closure.nix", closure_nix);
    let (svc, sb, serve_b) = service_with_builder_b(&e, true, true);
    let top = e.s.instantiate(&e.file, "top");
    let after = e.s.instantiate(&e.file, "after");
    // One POST: the whole closure, four steps on two builders.
    let id = upload_and_build(&e, &svc, &[&top, &after]);
    let v = wait(&svc, id);
    assert_eq!(v["state"], "succeeded", "{v}\n{}", svc.log_text());
    each_step_on_its_builder_with_its_own_log(&e, &svc, id, &v);
    // `mid` was built on b (its trace there), fetched from b's `vouch serve` (its statement and
    // evidence are in the service's fetch cache; b's server answered) and published here after
    // verification.
    assert_eq!(steps_in(&sb.join("cache")).len(), 1, "{:?}", steps_in(&sb.join("cache")));
    let serve_b = serve_b.expect("b's traces over HTTP");
    let mid_log = step_log(&svc, id, step(&v, "-sc-mid.drv"));
    assert!(mid_log.contains(&serve_b.url()), "{mid_log}");
    let fetched = e.state.join("serve/trace-cache/sha256").read_dir().map_or(0, |d| d.count());
    assert!(fetched >= 2, "{fetched} files fetched\n{}", serve_b.log_text());
    let published = steps_in(&e.state.join("cache"));
    assert_eq!(published.len(), 4, "{published:?}");
    let top_out = v["outputs"]["out"]["path"].as_str().expect("top's output").to_owned();
    let mid_out = a_fresh_nix_2_8_store_substitutes_the_closure(&e, &svc, &top_out);
    a_fresh_nix_2_26_store_substitutes_it_over_http(&e, &svc, &top_out, &mid_out);
    // `nix log` of the submitted derivation, from the service.
    let out = Command::new("nix")
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("XDG_CACHE_HOME", e.s.dir.path().join("xdg-log"))
        .args(["log", "--store", &svc.url(), &top])
        .output()
        .unwrap();
    assert!(text(&out).contains(&format!("top {}", e.n)), "nix log: {}", text(&out));
    a_failing_step_fails_its_dependent(&e, &svc, &after);
}

/// Each of the closure's four steps succeeded on the builder it belongs to, with simulated
/// evidence and a log of its own.
fn each_step_on_its_builder_with_its_own_log(
    e: &VmTest,
    svc: &HttpService,
    id: u64,
    v: &serde_json::Value,
) {
    let n = &e.n;
    assert_eq!(v["steps"].as_array().unwrap().len(), 4, "{v}");
    let each = [
        ("-sc-ia.drv", "ia", false),
        ("-sc-ia2.drv", "ia2", false),
        ("-sc-mid.drv", "mid", true),
        ("-sc-top.drv", "top", false),
    ];
    for (suffix, line, on_b) in each {
        let st = step(v, suffix);
        assert_eq!(st["state"], "succeeded", "{st}");
        assert_eq!(st["evidence"], "simulated", "{st}");
        let machine = st["evidence_check"]["machine"].as_str().unwrap_or_default();
        assert_eq!(machine.contains("remote-program="), on_b, "{suffix} on {machine}");
        assert_eq!(machine.starts_with("unix://"), !on_b, "{suffix} on {machine}");
        let log = step_log(svc, id, st);
        assert!(log.contains(&format!("{line} {n}")), "{suffix}'s own log: {log}");
        for other in ["ia", "ia2", "mid", "top"].into_iter().filter(|o| *o != line) {
            assert!(!log.contains(&format!("{other} {n}")), "{suffix}'s log has {other}'s: {log}");
        }
    }
    assert!(step(v, "-sc-mid.drv")["resolved"].is_string(), "{v}");
    assert!(step(v, "-sc-top.drv")["resolved"].is_string(), "deferred: resolved: {v}");
}

/// A second, empty store substitutes the whole closure from the service's cache alone,
/// trusting only its key: `nix-build --max-jobs 0` (nothing may be built). Nix 2.8 reads the
/// cache directory the service serves (`file://`): over `http://`, 2.8's realisation query
/// (`DrvOutputSubstitutionGoal::tryNext`) hands the download thread a callback that captures
/// its stack frame by reference, so it sometimes crashes (SIGSEGV or `free(): invalid
/// pointer`), also with Python's `http.server` serving the same directory
/// (docs/ci-service.md); `nix copy --from http://…` works. `mid`'s output path.
fn a_fresh_nix_2_8_store_substitutes_the_closure(
    e: &VmTest,
    svc: &HttpService,
    top_out: &str,
) -> String {
    let (s, n) = (&e.s, &e.n);
    let key = public_key_of(&e.state);
    let fresh = s.dir.path().join("fresh");
    let cache_url = format!("file://{}", e.state.join("cache").display());
    let out = Command::new("nix-build")
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("XDG_CACHE_HOME", s.dir.path().join("xdg-fresh"))
        .arg(&e.file)
        .args(["-A", "top", "--no-out-link", "--max-jobs", "0"])
        .arg("--store")
        .arg(format!("local?root={}", fresh.display()))
        .args(["--option", "substituters", &cache_url, "--option", "trusted-public-keys", &key])
        .output()
        .unwrap();
    assert!(out.status.success(), "nix-build from the service: {}\n{}", text(&out), svc.log_text());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), top_out);
    let mid_out = std::fs::read_to_string(fresh.join(top_out.trim_start_matches('/')).join("mid"));
    let mid_out = mid_out.unwrap().trim().to_owned();
    let n_file = fresh.join(mid_out.trim_start_matches('/')).join("n");
    assert_eq!(std::fs::read_to_string(n_file).unwrap().trim(), n.as_str());
    let ia2_out = std::fs::read_to_string(fresh.join(top_out.trim_start_matches('/')).join("ia2"));
    assert!(fresh.join(ia2_out.unwrap().trim().trim_start_matches('/')).join("ia").is_file());
    // Over HTTP, the outputs' closure (top, mid built on b, ia) with the service's signatures.
    let http_root = s.dir.path().join("fresh-http");
    let to = format!("local?root={}", http_root.display());
    let url = svc.url();
    let args = ["--from", &url, "--to", &to, "--option", "trusted-public-keys", &key, top_out];
    let out = nix_copy(&s.dir.path().join("xdg-http"), &args);
    assert!(out.status.success(), "nix copy --from http: {}\n{}", text(&out), svc.log_text());
    assert!(http_root.join(mid_out.trim_start_matches('/')).join("n").is_file());
    mid_out
}

/// Nix 2.26 (Debian trixie's, in the chroot; it reaches the service on 127.0.0.1):
/// `nix-build --max-jobs 0` of the same expression's `top` in a second, empty store with the
/// service over `http://` as its only substituter, trusting only its key: the whole closure
/// comes from the service (`top`'s and `mid`'s signed realisations, the NARs), nothing is
/// built, and the outputs are the service's.
fn a_fresh_nix_2_26_store_substitutes_it_over_http(
    e: &VmTest,
    svc: &HttpService,
    top_out: &str,
    mid_out: &str,
) {
    let n = &e.n;
    let key = public_key_of(&e.state);
    let c = ChrootNix::new();
    c.write("closure.nix", &closure_nix(n), false);
    let conf = format!(
        "{}substituters = {}\ntrusted-public-keys = {key}\n",
        NIX_CONFIG.replace("substituters =\n", ""),
        svc.url()
    );
    let build = ["nix-build", "/srv/closure.nix", "-A", "top", "--no-out-link", "--max-jobs", "0"];
    let got = c.command_in("nix-sub", &[("NIX_CONFIG", &conf)], &build).output().unwrap();
    assert!(got.status.success(), "2.26 over http: {}\n{}", text(&got), svc.log_text());
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), top_out, "{}", text(&got));
    let sub = |p: &str| c.dir.path().join("nix-sub").join(p.trim().trim_start_matches("/nix/"));
    let mid_226 = std::fs::read_to_string(sub(top_out).join("mid")).unwrap();
    assert_eq!(mid_226.trim(), mid_out);
    assert_eq!(std::fs::read_to_string(sub(mid_out).join("n")).unwrap().trim(), n.as_str());
    let ia2_226 = std::fs::read_to_string(sub(top_out).join("ia2")).unwrap();
    assert!(sub(&ia2_226).join("ia").is_file(), "{ia2_226}");
}

/// `after` depends on a step that fails: refused with a Nix of another self-reference rule,
/// then built, its dependent failing and naming the failed step; `ia` is reused.
fn a_failing_step_fails_its_dependent(e: &VmTest, svc: &HttpService, after: &str) {
    let n = &e.n;
    // A closure's floating-CA steps follow the self-reference rule of the service's own Nix
    // (2.8): naming a Nix with another rule is refused before anything is queued.
    let body = format!(r#"{{"drv": "{after}", "nix_version": "2.26"}}"#);
    let r = svc.request("POST", "/v1/builds", body.as_bytes());
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("Nix 2.8") && r.text().contains("-sc-"), "{}", r.text());
    let body = format!(r#"{{"drv": "{after}", "nix_version": "2.8"}}"#);
    let r = svc.request("POST", "/v1/builds", body.as_bytes());
    assert_eq!(r.status, 202, "{}", r.text());
    let id = json(&r)["id"].as_u64().unwrap();
    let v = wait(svc, id);
    assert_eq!(v["state"], "failed", "{v}");
    assert_eq!(step(&v, "-sc-ia.drv")["state"], "succeeded", "{v}");
    assert!(step_log(svc, id, step(&v, "-sc-ia.drv")).contains("reused"), "{v}");
    let fails = step(&v, "-sc-fails.drv");
    assert_eq!(fails["state"], "failed", "{fails}");
    assert!(step_log(svc, id, fails).contains(&format!("about to fail {n}")), "{fails}");
    let dependent = step(&v, "-sc-after.drv");
    assert_eq!(dependent["state"], "failed", "{dependent}");
    assert_eq!(dependent["status"], "DependencyFailed", "{dependent}");
    assert!(dependent["error"].as_str().unwrap().contains("-sc-fails.drv"), "{dependent}");
}

#[test]
fn a_step_whose_trace_the_policy_refuses_is_not_published_and_its_dependent_fails() {
    let e = VmTest::new(&VMS, "closure.nix", closure_nix);
    let (s, state) = (&e.s, e.state.clone());
    // The policy names the service's simulated root only: b's evidence is not accepted.
    let (svc, sb, _) = service_with_builder_b(&e, false, false);
    let top = s.instantiate(&e.file, "top");
    let id = upload_and_build(&e, &svc, &[&top]);
    let v = wait(&svc, id);
    assert_eq!(v["state"], "failed", "{v}");
    let mid = step(&v, "-sc-mid.drv");
    assert_eq!(mid["state"], "failed", "{mid}");
    let error = mid["error"].as_str().unwrap();
    assert!(error.contains("was not accepted") && error.contains("policy"), "{mid}");
    assert!(step_log(&svc, id, mid).contains("was not accepted"), "{mid}");
    assert_eq!(step(&v, "-sc-top.drv")["status"], "DependencyFailed", "{v}");
    assert!(step(&v, "-sc-top.drv")["error"].as_str().unwrap().contains("-sc-mid.drv"), "{v}");
    // b built it and has its trace; the service published nothing of it: no step, no
    // realisation of it, no narinfo of its output.
    assert_eq!(steps_in(&sb.join("cache")).len(), 1);
    let ours = steps_in(&state.join("cache"));
    assert!(ours.iter().all(|d| !d.ends_with("-sc-mid.drv")), "{ours:?}");
    let theirs = steps_in(&sb.join("cache")).remove(0);
    let statement = std::fs::read_dir(sb.join("cache/vouch/v1/steps").join(&theirs))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("statement.json");
    let st = build_trace::Statement::from_canonical_bytes(&std::fs::read(statement).unwrap());
    let mid_out = st.unwrap().outputs["out"].path.clone();
    let narinfo = state.join("cache").join(format!("{}.narinfo", mid_out.hash_part()));
    assert!(!narinfo.exists(), "{} is not signed here", mid_out);
    assert!(!state.join("cache/build-trace-v2").join(&theirs).exists());
    // Nix built `top` anyway from b's bytes (its trace, published by the service's own
    // builder, speaks of exactly those inputs); its step says it waited for `mid`.
    let top_step = step(&v, "-sc-top.drv");
    assert!(top_step["error"].as_str().unwrap().contains("unverified outputs"), "{top_step}");
}

/// `(vouch_vm_slots_busy, vouch_vm_slots_waiting)` from the service's `/metrics`.
fn slots(svc: &HttpService) -> (u64, u64) {
    let m = svc.request("GET", "/metrics", b"").text();
    let g = |name: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{m}"))
    };
    (g("vouch_vm_slots_busy "), g("vouch_vm_slots_waiting "))
}

/// Wait (up to `secs`) until the service's slots are `want`.
fn wait_slots(svc: &HttpService, want: (u64, u64), secs: u64, what: &str) {
    let t0 = std::time::Instant::now();
    while slots(svc) != want {
        assert!(t0.elapsed().as_secs() < secs, "{what}: {:?}\n{}", slots(svc), svc.log_text());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn cancelling_closure_builds_kills_nix_and_their_steps_and_jobs_bounds_the_vms() {
    let e = VmTest::new(&VMS, "closure.nix", closure_nix);
    let (s, state) = (&e.s, e.state.clone());
    let image = image_dir();
    let trusted = trusted_args(s);
    let mut args = vec!["--image", image.to_str().unwrap(), "--jobs", "2"];
    args.extend(trusted.iter().map(String::as_str));
    let svc = HttpService::start(&vouch_bin(), &state, &s.dir.path().join("serve.log"), &args);
    let (both, later) = (s.instantiate(&e.file, "both"), s.instantiate(&e.file, "later"));
    // `both` needs two slow steps: the service's Nix sends both to its builder, whose two
    // slots (`--jobs 2`) they take.
    let id = upload_and_build(&e, &svc, &[&both, &later]);
    wait_slots(&svc, (2, 0), 240, "both slow steps hold the two slots");
    // A trusted client's closure build runs in its own private Nix store, whose Nix also sees
    // the builder's two slots free: its step waits for one instead of booting a third VM.
    let body = format!(r#"{{"drv": "{later}"}}"#);
    let r = svc.request_with("POST", "/v1/builds", &[TRUSTED], body.as_bytes());
    assert_eq!(r.status, 202, "{}", r.text());
    let id2 = json(&r)["id"].as_u64().unwrap();
    wait_slots(&svc, (2, 1), 120, "the trusted client's step waits");
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(slots(&svc), (2, 1), "still waiting, no third VM");
    // Cancelled while it waits: its Nix hangs up, the step leaves the line, nothing booted.
    let r = svc.request_with("DELETE", &format!("/v1/builds/{id2}"), &[TRUSTED], b"");
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(wait(&svc, id2)["state"], "cancelled");
    wait_slots(&svc, (2, 0), 30, "the cancelled waiter left the line");

    // Cancelling the first: Nix and both running steps' VMs killed, both slots given back.
    assert_eq!(svc.request("DELETE", &format!("/v1/builds/{id}"), b"").status, 202);
    let v = wait(&svc, id);
    assert_eq!(v["state"], "cancelled", "{v}");
    for st in v["steps"].as_array().unwrap() {
        assert_eq!(st["state"], "cancelled", "{v}");
    }
    let t0 = std::time::Instant::now();
    let pid = svc.pid().to_string();
    while Command::new("pgrep").args(["-P", &pid, "-x", "nix-store"]).status().unwrap().success() {
        assert!(t0.elapsed().as_secs() < 30, "Nix still runs");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // The service's builder saw Nix hang up and killed the steps' VMs.
    while !svc.log_text().contains("its VM killed; nothing was registered") {
        assert!(t0.elapsed().as_secs() < 30, "the steps' VMs: {}", svc.log_text());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(steps_in(&state.join("cache")).is_empty(), "{:?}", steps_in(&state.join("cache")));
    wait_slots(&svc, (0, 0), 30, "the slots given back");
}
