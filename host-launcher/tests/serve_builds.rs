//! `vouch serve` without VMs, the build API: the real binary on a TCP port behind the real
//! Nix 2.8.
//!
//! - the build API refuses what it cannot build before queueing anything; SIGTERM stops it;
//! - build ids, outcomes and logs survive a restart;
//! - no caller, the trusted one included, gets another derivation's output path built and
//!   signed: vouch computes input-addressed paths from the derivation graph.
//!
//! Uploads, the binary cache and tokens are in `serve_http.rs`; the API's pages and its OpenAPI
//! description in `serve_api.rs`; the real-VM build through the API in
//! `tests/tests/serve_vm.rs`.

use std::path::Path;
use std::time::Duration;

use nix_formats::derivation::Derivation;
use nix_formats::StorePath;
use test_support::http_service::HttpService;
use test_support::nix;

mod serve_common;
use serve_common::*;

#[test]
fn the_build_api_refuses_what_it_cannot_build_and_sigterm_stops_it() {
    nix::require_nix();
    let t = tempfile::tempdir().unwrap();
    // No guest image: builds that pass the checks fail at their VM.
    let no_image = t.path().join("no-image");
    let s = HttpService::start(
        Path::new(env!("CARGO_BIN_EXE_vouch")),
        &t.path().join("state"),
        &t.path().join("serve.log"),
        &["--image", no_image.to_str().unwrap()],
    );
    let post = |body: &str| s.request("POST", "/v1/builds", body.as_bytes());
    let missing = format!("/nix/store/{}-missing.drv", "a".repeat(32));
    let r = post(&format!(r#"{{"drv": "{missing}"}}"#));
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains(&missing) && r.text().contains("nix copy"), "{}", r.text());
    let r = post(r#"{"drv": "/nix/store/x"}"#);
    assert_eq!(r.status, 400, "{}", r.text());
    let r = post(r#"{"drv": "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x.drv", "timout": 1}"#);
    assert!(r.status == 400 && r.text().contains("timout"), "{}", r.text());
    assert_eq!(post("not json").status, 400);

    // A derivation with input derivations (a CA one, as Nix instantiates it) builds its whole
    // closure, one step per derivation, its input first (Nix schedules them).
    let drv = instantiate(t.path(), &simple_nix(&nix::nonce()), "b");
    let to = format!("{}?compression=none", s.url());
    copy_derivation(&t.path().join("xdg"), &to, &drv);
    let r = post(&format!(r#"{{"drv": "{drv}"}}"#));
    assert_eq!(r.status, 202, "{}", r.text());
    let v: serde_json::Value =
        serde_json::from_slice(&s.request("GET", "/v1/builds/1", b"").body).unwrap();
    let steps: Vec<&str> =
        v["steps"].as_array().unwrap().iter().map(|s| s["drv"].as_str().unwrap()).collect();
    assert_eq!(steps.len(), 2, "{v}");
    assert!(steps[0].contains("-serve-a-") && steps[1] == drv, "{v}");
    // Without a guest image the input's step fails (on the service's own builder, where Nix
    // sent it); the dependent fails naming the step it waited for.
    let v = wait_failed(&s, 1, &[], Duration::from_secs(120));
    let (first, second) = (&v["steps"][0], &v["steps"][1]);
    assert_eq!((&first["state"], &second["state"]), (&"failed".into(), &"failed".into()), "{v}");
    assert!(first["evidence_check"]["machine"].as_str().unwrap().starts_with("unix://"), "{v}");
    assert_eq!(second["status"], "DependencyFailed", "{v}");
    assert!(second["error"].as_str().unwrap().contains("waited for step 0"), "{v}");
    // A step no builder has the features for: Nix says why nothing could start, and so does the
    // build.
    let drv = instantiate(t.path(), &simple_nix(&nix::nonce()), "h2");
    copy_derivation(&t.path().join("xdg-h"), &to, &drv);
    let r = post(&format!(r#"{{"drv": "{drv}"}}"#));
    assert_eq!(r.status, 202, "{}", r.text());
    let id = serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["id"].as_u64().unwrap();
    let v = wait_failed(&s, id, &[], Duration::from_secs(120));
    let error = v["steps"][0]["error"].as_str().unwrap();
    assert!(error.contains("Failed to find a machine") && error.contains("no-such-feature"), "{v}");
    assert_eq!(v["steps"][1]["status"], "DependencyFailed", "{v}");

    // A (floating-CA) derivation whose text names an input it does not declare as a reference
    // (so the upload itself passes, and the input is not in the content store): its path is
    // not the one its contents give, as Nix computes a .drv's path, so it is refused naming
    // that path.
    let input = format!("/nix/store/{}-serve-input", "b".repeat(32));
    let out = "/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9";
    let aterm = format!(
        "Derive([(\"out\",\"\",\"r:sha256\",\"\")],[],[\"{input}\"],\"x86_64-linux\",\"{input}/sh\",[],[(\"out\",\"{out}\")])"
    );
    let drv = upload_text(&s, "serve-x.drv", aterm.as_bytes(), &Default::default());
    let r = post(&format!(r#"{{"drv": "{drv}"}}"#));
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("its contents hash to"), "{}", r.text());

    let (status, log) = s.stop("TERM");
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("stopping on SIGTERM"), "{log}");
}

#[test]
fn build_ids_outcomes_and_logs_survive_a_restart() {
    nix::require_nix();
    let t = tempfile::tempdir().unwrap();
    let no_image = t.path().join("no-image");
    let trusted = trusted_token_file(t.path());
    let args = ["--image", no_image.to_str().unwrap(), "--trusted-token-file", &trusted];
    let (state, vouch) = (t.path().join("state"), Path::new(env!("CARGO_BIN_EXE_vouch")));
    let s = HttpService::start(vouch, &state, &t.path().join("serve1.log"), &args);
    let post =
        |s: &HttpService, body: &[u8]| s.request_with("POST", "/v1/builds", &[TRUSTED], body);
    let drv = instantiate(t.path(), &simple_nix(&nix::nonce()), "a");
    let to = format!("{}?compression=none", s.url());
    copy_derivation(&t.path().join("xdg"), &to, &drv);
    let submit = format!(r#"{{"drv": "{drv}"}}"#);
    let r = post(&s, submit.as_bytes());
    assert_eq!(r.status, 202, "{}", r.text());
    // Without a guest image the build fails at once, naming the image.
    let status = wait_failed(&s, 1, &[], Duration::from_secs(60));
    assert!(status["error"].to_string().contains("no-image"), "{status}");
    let log = s.request("GET", "/v1/builds/1/log", b"").text();
    let (st, _) = s.stop("TERM");
    assert!(st.success());

    let s = HttpService::start(vouch, &state, &t.path().join("serve2.log"), &args);
    let r = s.request("GET", "/v1/builds/1", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&r.body).unwrap(), status);
    assert_eq!(s.request("GET", "/v1/builds/1/log", b"").text(), log);
    let r = post(&s, submit.as_bytes());
    assert_eq!(r.status, 202, "{}", r.text());
    assert!(r.text().contains(r#""id":2"#), "a new id after the restart: {}", r.text());
}

/// The attack: a client uploads an input-addressed derivation whose declared output path is
/// another derivation's (the victim's), with its own builder script, and asks for a build. vouch
/// computes input-addressed output paths from the derivation graph, as Nix does: the forgery is
/// refused, naming the computed path, from anyone — the trusted caller too —, while any caller
/// may build the genuine derivation. A deferred derivation (its input is floating CA) that
/// declares a path is refused likewise; an honest one waits for its input's build.
#[test]
fn an_untrusted_caller_cannot_get_another_derivations_output_path_signed() {
    nix::require_nix();
    let t = tempfile::tempdir().unwrap();
    let trusted = trusted_token_file(t.path());
    let no_image = t.path().join("no-image");
    let s = HttpService::start(
        Path::new(env!("CARGO_BIN_EXE_vouch")),
        &t.path().join("state"),
        &t.path().join("serve.log"),
        &["--trusted-token-file", &trusted, "--image", no_image.to_str().unwrap()],
    );
    let nonce = nix::nonce();
    let victim = instantiate(t.path(), &simple_nix(&nonce), "a");
    let to = format!("{}?compression=none", s.url());
    copy_derivation(&t.path().join("xdg"), &to, &victim);
    // The forged derivation: the victim's output path, the attacker's builder script.
    let genuine = Derivation::from_aterm(&std::fs::read(&victim).unwrap()).unwrap();
    let victim_out = genuine.outputs["out"].path().unwrap().clone();
    let mut forged = genuine.clone();
    forged.args = vec!["sh".into(), "-c".into(), "echo evil > $out".into()];
    let name = StorePath::parse(&victim).unwrap().name().to_owned();
    let forged_path = upload_drv(&s, &name, &forged);
    assert_ne!(forged_path.to_string(), victim);
    let computed = nix_formats::derivation::DrvGraph::new()
        .input_addressed_paths(&forged, forged_path.drv_name().unwrap())
        .unwrap()
        .unwrap()["out"]
        .clone();

    let submit = format!(r#"{{"drv": "{forged_path}"}}"#);
    for (who, headers) in [("an anonymous caller", &[][..]), ("the trusted caller", &[TRUSTED][..])]
    {
        let r = s.request_with("POST", "/v1/builds", headers, submit.as_bytes());
        assert_eq!(r.status, 403, "{who}: {}", r.text());
        assert!(
            r.text().contains(&computed.to_string()) && r.text().contains(&victim_out.to_string()),
            "{who}: the message names the computed and the claimed path: {}",
            r.text()
        );
    }
    assert_eq!(s.request("GET", "/v1/builds/1", b"").status, 404, "nothing was queued");
    // Any caller may build the genuine derivation: its paths are the ones vouch computes.
    let r = s.request("POST", "/v1/builds", format!(r#"{{"drv": "{victim}"}}"#).as_bytes());
    assert_eq!(r.status, 202, "{}", r.text());

    // A deferred derivation (its input is floating CA): its path exists only after resolution,
    // against an output of the input that vouch accepted; its closure builds in one go (Nix
    // resolves it once its input is built).
    let deferred = instantiate(t.path(), &simple_nix(&nonce), "g");
    copy_derivation(&t.path().join("xdg3"), &to, &deferred);
    let r = s.request("POST", "/v1/builds", format!(r#"{{"drv": "{deferred}"}}"#).as_bytes());
    assert_eq!(r.status, 202, "{}", r.text());
    // A trusted caller's closure runs in a private Nix store of its own: its build may read
    // its overlay's uploads, which no other caller's may see.
    let body = format!(r#"{{"drv": "{deferred}"}}"#);
    let r = s.request_with("POST", "/v1/builds", &[TRUSTED], body.as_bytes());
    assert_eq!(r.status, 202, "{}", r.text());
    let id = serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["id"].as_u64().unwrap();
    wait_failed(&s, id, &[], Duration::from_secs(120));
    let serve = t.path().join("state/serve");
    assert!(serve.join("nix/nix/store").is_dir() && serve.join("nix-client-0/nix/store").is_dir());
    // Declaring the victim's path in it (where Nix leaves it empty) is a forgery: refused.
    let mut forged = Derivation::from_aterm(&std::fs::read(&deferred).unwrap()).unwrap();
    let out = nix_formats::derivation::DerivationOutput::InputAddressed(victim_out.clone());
    forged.outputs.insert("out".into(), out);
    forged.env.insert("out".into(), victim_out.to_string());
    let name = StorePath::parse(&deferred).unwrap().name().to_owned();
    let forged_path = upload_drv(&s, &name, &forged);
    let submit = format!(r#"{{"drv": "{forged_path}"}}"#);
    let r = s.request_with("POST", "/v1/builds", &[TRUSTED], submit.as_bytes());
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("known only after resolution"), "{}", r.text());

    // A fixed-output derivation builds with network access: refused without a token, even for
    // content the client cannot choose.
    let fod = instantiate(t.path(), &simple_nix(&nonce), "f");
    copy_derivation(&t.path().join("xdg2"), &to, &fod);
    let r = s.request("POST", "/v1/builds", format!(r#"{{"drv": "{fod}"}}"#).as_bytes());
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("fixed-output") && r.text().contains("--token-file"), "{}", r.text());
    let r = s.request_with(
        "POST",
        "/v1/builds",
        &[TRUSTED],
        format!(r#"{{"drv": "{fod}"}}"#).as_bytes(),
    );
    assert_eq!(r.status, 202, "a token holder may: {}", r.text());
}
