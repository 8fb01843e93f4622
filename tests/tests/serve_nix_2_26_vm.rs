//! The CI service with Debian trixie's Nix 2.26.3 as its client (in a chroot,
//! `test_support::chroot`; the chroot shares the host's network, so it reaches `vouch serve` on
//! 127.0.0.1), with real VMs (TCG here; evidence simulated): 2.26 uploads a floating-CA
//! derivation (with a self-reference) and an input-addressed one with
//! `nix copy --to 'http://…?compression=none' --derivation`, the service builds both, and a
//! fresh 2.26 store substitutes the outputs from the service (`--max-jobs 0`: nothing may be
//! built locally), the CA one through its signed realisation, with the same paths as 2.26
//! building them itself.
//! Also: 2.26 uploads with its default compression (xz) a closure with a fixed-output step,
//! which one POST builds in a networked VM before its dependent; and `nix log --store http://…`
//! shows a step's log to 2.26. (A whole built closure, CA and deferred steps, substituted by
//! 2.26 over `http://`: `serve_closure_vm`.)

use std::sync::Mutex;

use test_support::chroot::ChrootNix;
use test_support::http_service::HttpService;
use test_support::nix::text;
use test_support::vm::{nonce, public_key_of};
use tests::service::{closure_nix, json, start_trusted, wait};

/// The tests take it so their VMs do not compete for the CPUs.
static VMS: Mutex<()> = Mutex::new(());

const TOKEN: &str = "trusted-0123456789abcdef";

/// A service on 127.0.0.1 for a client in `c` (state in `/srv/state`), with the trusted
/// callers' token.
fn service(c: &ChrootNix) -> HttpService {
    let token = c.write("token", &format!("{TOKEN}\n"), false);
    start_trusted(&c.srv().join("state"), &c.dir.path().join("serve.log"), &token)
}

/// Nix 2.26 uploads, the service builds, a fresh 2.26 store substitutes.
#[test]
fn nix_2_26_uploads_and_substitutes() {
    let _vms = VMS.lock().unwrap_or_else(|e| e.into_inner());
    let c = ChrootNix::new();
    let n = nonce();
    c.write("serve.nix", &closure_nix(&n), false);
    let (ia, ca) = (c.instantiate("/srv/serve.nix", "ia"), c.instantiate("/srv/serve.nix", "ca"));
    let svc = service(&c);
    let to = format!("{}?compression=none", svc.url());
    for drv in [&ia, &ca] {
        upload_and_build(&c, &svc, &to, drv);
    }

    // A fresh 2.26 store, the service as its only substituter and its key the only one trusted.
    let key = public_key_of(&c.srv().join("state"));
    let conf = format!(
        "{}substituters = {}\ntrusted-public-keys = {key}\n",
        test_support::nix::NIX_CONFIG.replace("substituters =\n", ""),
        svc.url()
    );
    let build =
        ["nix-build", "/srv/serve.nix", "--no-out-link", "--max-jobs", "0", "-A", "ia", "-A", "ca"];
    let got = c.command_in("nix-sub", &[("NIX_CONFIG", &conf)], &build).output().unwrap();
    assert!(got.status.success(), "substitution: {}\n{}", text(&got), svc.log_text());
    let mut local = c.command_in("nix-local", &[], &build[..3]);
    local.args(["-A", "ia", "-A", "ca"]);
    let local = test_support::nix::stdout(&mut local);
    assert_eq!(String::from_utf8_lossy(&got.stdout), local, "2.26's own paths");
    let ca_out = local.lines().nth(1).unwrap();
    let self_file =
        c.dir.path().join("nix-sub").join(ca_out.trim_start_matches("/nix/")).join("self");
    assert_eq!(std::fs::read_to_string(self_file).unwrap().trim(), ca_out);
    let (st, log) = svc.stop("INT");
    assert!(st.success(), "{st}: {log}");
}

/// Upload `drv`'s closure from 2.26 to `to` and build it through the API; the build's final
/// status.
fn upload_and_build(c: &ChrootNix, svc: &HttpService, to: &str, drv: &str) -> serde_json::Value {
    let up = c.output(&["nix", "copy", "--to", to, "--derivation", drv]);
    assert!(up.status.success(), "upload: {}\n{}", text(&up), svc.log_text());
    let body = format!(r#"{{"drv": "{drv}", "nix_version": "2.26"}}"#);
    let auth = format!("Authorization: Bearer {TOKEN}");
    let r = svc.request_with("POST", "/v1/builds", &[&auth], body.as_bytes());
    assert_eq!(r.status, 202, "{}", r.text());
    let v = wait(svc, json(&r)["id"].as_u64().expect("an id"));
    assert_eq!(v["state"], "succeeded", "{v}\n{}", svc.log_text());
    v
}

/// An upload with Nix 2.26's default compression (xz), of a closure with a fixed-output step:
/// one POST of `usesfod` builds `fod` (fixed-output, so in the networked variant, for a caller
/// with a token) and then `usesfod` from its output.
#[test]
fn nix_2_26_uploads_with_default_compression_a_closure_with_a_fixed_output_step() {
    let _vms = VMS.lock().unwrap_or_else(|e| e.into_inner());
    let c = ChrootNix::new();
    let n = nonce();
    c.write("serve.nix", &closure_nix(&n), false);
    let usesfod = c.instantiate("/srv/serve.nix", "usesfod");
    let svc = service(&c);
    let v = upload_and_build(&c, &svc, &svc.url(), &usesfod);
    let steps = v["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2, "{v}");
    // Each step succeeded with its own log; the fixed-output one in a networked VM (its
    // statement's job says so), its dependent without a network.
    for (st, line, network) in [(&steps[0], "fetching", true), (&steps[1], "usesfod", false)] {
        assert_eq!(st["state"], "succeeded", "{st}");
        let log = svc.request("GET", st["log"].as_str().unwrap(), b"").text();
        assert!(log.contains(&format!("{line} {n}")), "{st}: {log}");
        let base = st["drv"].as_str().unwrap().trim_start_matches("/nix/store/").to_owned();
        let dir = c.srv().join("state/cache/vouch/v1/steps").join(&base);
        let entry = std::fs::read_dir(&dir).unwrap().next().unwrap().unwrap().path();
        let bytes = std::fs::read(entry.join("statement.json")).unwrap();
        let statement = build_trace::Statement::from_canonical_bytes(&bytes).unwrap();
        assert_eq!(statement.job.network, network, "{base}");
    }
    assert!(steps[0]["drv"].as_str().unwrap().ends_with("-serve-fod.drv"), "{v}");
    let out = v["outputs"]["out"]["path"].as_str().expect("usesfod's output");
    let got = svc.request("GET", &format!("/{}.narinfo", &out["/nix/store/".len()..][..32]), b"");
    assert_eq!(got.status, 200, "{v}");
}

/// `nix log --store http://…` shows a step's log to Nix 2.26.
#[test]
fn nix_2_26_reads_the_log_with_nix_log() {
    let _vms = VMS.lock().unwrap_or_else(|e| e.into_inner());
    let c = ChrootNix::new();
    let n = nonce();
    c.write("serve.nix", &closure_nix(&n), false);
    let ia = c.instantiate("/srv/serve.nix", "ia");
    let svc = service(&c);
    upload_and_build(&c, &svc, &format!("{}?compression=none", svc.url()), &ia);
    // A fresh client: an empty store and its own narinfo cache (the uploader's remembers the
    // URL it uploaded the .drv under, not the one the service serves it under).
    let env = [("XDG_CACHE_HOME", "/srv/xdg-log")];
    let argv = ["nix", "log", "--store", &svc.url(), &ia];
    let log = text(&c.command_in("nix-log", &env, &argv).output().unwrap());
    let hash = &ia["/nix/store/".len()..][..32];
    let info = svc.request("GET", &format!("/{hash}.narinfo"), b"").text();
    assert!(log.contains(&format!("ia {n}")), "{log}\nthe .drv's narinfo:\n{info}");
}
