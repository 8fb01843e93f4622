//! Issue 13, items 4, 6 and 7 without VMs: the real `vouch serve` (no guest image, so every
//! build fails at once, after its step started and logged) behind the real Nix 2.8.
//!
//! - Nix uploads with its default compression (xz); builds are listed newest first, paged and
//!   filtered by state; one build, its steps, a step's log from an offset, its events, and
//!   cancel (refused for a finished build) answer as `docs/openapi.json` describes (every JSON
//!   response is checked against its schema);
//! - `nix log --store http://…` shows a step's log: Nix reads the `.drv` (its narinfo and NAR,
//!   served because a step built it) and then `log/<drv>`;
//! - `/metrics` counts builds by state and VM boots;
//! - the web page lists the builds;
//! - a restart resumes a queued build (checked again) and fails one whose submission no longer
//!   checks, saying why.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};
use test_support::http_service::HttpService;
use test_support::nix;

mod serve_common;
use serve_common::{copy_derivation, trusted_token_file, wait_failed, TRUSTED};

/// How long a build without a guest image may take to fail.
const WITHIN: Duration = Duration::from_secs(60);

fn spec() -> Value {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json"))
            .expect("docs/openapi.json");
    serde_json::from_str(&text).expect("docs/openapi.json is JSON")
}

/// Check `v` against `schema` (the subset of JSON Schema that `docs/openapi.json` uses: type,
/// enum, properties, required, additionalProperties, items, $ref); the first mismatch.
fn check(spec: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.trim_start_matches("#/components/schemas/");
        return check(spec, &spec["components"]["schemas"][name], v, at);
    }
    let type_of = |v: &Value| match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_u64() || n.is_i64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    if !types.is_empty() && !types.contains(&type_of(v)) {
        return Err(format!("{at}: {v} is not {types:?}"));
    }
    if let Some(e) = schema["enum"].as_array() {
        if !e.contains(v) {
            return Err(format!("{at}: {v} is not one of {e:?}"));
        }
    }
    if let Value::Object(o) = v {
        for r in schema["required"].as_array().into_iter().flatten() {
            let r = r.as_str().unwrap();
            if !o.contains_key(r) {
                return Err(format!("{at}: {r} is missing in {v}"));
            }
        }
        for (k, val) in o {
            let sub = &schema["properties"][k];
            let extra = &schema["additionalProperties"];
            if !sub.is_null() {
                check(spec, sub, val, &format!("{at}.{k}"))?;
            } else if extra == &Value::Bool(false) {
                return Err(format!("{at}: {k} is not described"));
            } else if extra.is_object() {
                check(spec, extra, val, &format!("{at}.{k}"))?;
            }
        }
    }
    if let (Value::Array(items), Some(s)) = (v, schema.get("items")) {
        for (i, item) in items.iter().enumerate() {
            check(spec, s, item, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// A JSON response checked against the schema `name`.
fn valid(spec: &Value, name: &str, r: &test_support::http_service::HttpResponse) -> Value {
    let v: Value = serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text()));
    let schema = serde_json::json!({"$ref": format!("#/components/schemas/{name}")});
    check(spec, &schema, &v, name).unwrap_or_else(|e| panic!("{e}"));
    v
}

fn instantiate(dir: &Path, nonce: &str) -> String {
    nix::busybox_dir(&dir.join("bb"));
    let file = dir.join("drv.nix");
    let body = format!(
        r#"let bb = builtins.path {{ path = ./bb; name = "busybox"; }}; in
  derivation {{ name = "api-{nonce}"; system = "x86_64-linux"; builder = "${{bb}}/busybox";
               args = [ "sh" "-c" "echo a > $out" ]; }}"#
    );
    std::fs::write(&file, body).unwrap();
    let out = nix::nix(&["nix-instantiate", file.to_str().unwrap()]);
    assert!(out.status.success(), "nix-instantiate: {}", nix::text(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn serve(t: &Path, log: &str) -> HttpService {
    let token = trusted_token_file(t);
    let no_image = t.join("no-image");
    HttpService::start(
        Path::new(env!("CARGO_BIN_EXE_vouch")),
        &t.join("state"),
        &t.join(log),
        &["--image", no_image.to_str().unwrap(), "--trusted-token-file", &token],
    )
}

/// A service (log in `log`) holding a new derivation's closure, uploaded by Nix with `query`
/// (`""` for Nix's default compression); the derivation.
fn served_upload(t: &Path, log: &str, query: &str) -> (HttpService, String) {
    nix::require_nix();
    let s = serve(t, log);
    let drv = instantiate(t, &nix::nonce());
    copy_derivation(&t.join("xdg"), &format!("{}{query}", s.url()), &drv);
    (s, drv)
}

#[test]
fn the_build_api_pages_filters_and_answers_as_its_openapi_description_says() {
    let spec = spec();
    let t = tempfile::tempdir().unwrap();
    // Nix's default compression.
    let (s, drv) = served_upload(t.path(), "serve.log", "");
    let post = || {
        let r = s.request_with(
            "POST",
            "/v1/builds",
            &[TRUSTED],
            format!(r#"{{"drv": "{drv}"}}"#).as_bytes(),
        );
        assert_eq!(r.status, 202, "{}", r.text());
        valid(&spec, "Accepted", &r)["id"].as_u64().unwrap()
    };
    let ids: Vec<u64> = (0..3).map(|_| post()).collect();
    assert_eq!(ids, [1, 2, 3]);
    for id in &ids {
        wait_failed(&s, *id, &[TRUSTED], WITHIN);
    }
    let get = |path: &str| s.request_with("GET", path, &[TRUSTED], b"");

    // Listing: newest first, paged, filtered.
    let page = valid(&spec, "BuildList", &get("/v1/builds?limit=2"));
    let listed: Vec<u64> =
        page["builds"].as_array().unwrap().iter().map(|b| b["id"].as_u64().unwrap()).collect();
    assert_eq!((listed, &page["next_before"]), (vec![3, 2], &Value::from(2)));
    let page = valid(&spec, "BuildList", &get("/v1/builds?limit=2&before=2"));
    assert_eq!(page["builds"].as_array().unwrap().len(), 1);
    assert!(page["next_before"].is_null());
    let failed = valid(&spec, "BuildList", &get("/v1/builds?state=failed"));
    assert_eq!(failed["builds"].as_array().unwrap().len(), 3);
    let queued = valid(&spec, "BuildList", &get("/v1/builds?state=queued"));
    assert_eq!(queued["builds"].as_array().unwrap().len(), 0);
    let r = get("/v1/builds?state=bogus");
    assert_eq!(r.status, 400);
    valid(&spec, "Error", &r);

    // One build, its steps, a step's log from an offset.
    let b = valid(&spec, "Build", &get("/v1/builds/1"));
    assert!(b["submitted"].as_str().unwrap().ends_with('Z') && b["finished"].is_string(), "{b}");
    assert_eq!(b["steps"][0]["drv"], drv.as_str());
    let steps = valid(&spec, "Steps", &get("/v1/builds/1/steps"));
    assert_eq!(steps["steps"][0]["state"], "failed");
    let whole = get("/v1/builds/1/steps/0/log");
    let log = whole.text();
    assert!(log.contains(&format!("vouch: building {drv}")), "{log}");
    assert_eq!(whole.header("vouch-log-complete"), Some("true"));
    assert_eq!(whole.header("vouch-log-offset"), Some(log.len().to_string().as_str()));
    let tail = get("/v1/builds/1/steps/0/log?offset=7");
    assert_eq!(tail.text(), log[7..]);
    assert_eq!(get("/v1/builds/1/steps/0/log?offset=99999").text(), "");
    assert_eq!(get("/v1/builds/1/steps/1/log").status, 404);
    // Its events: the log, the state, the end.
    let ev = get("/v1/builds/1/steps/0/events");
    assert_eq!(ev.header("content-type"), Some("text/event-stream"));
    let text = ev.text();
    assert!(text.contains("event: log") && text.contains("vouch: building"), "{text}");
    assert!(text.contains(&format!("id: {}", log.len())), "{text}");
    assert!(text.contains("event: state") && text.contains("event: end"), "{text}");
    let resumed = s.request_with(
        "GET",
        "/v1/builds/1/steps/0/events",
        &[TRUSTED, &format!("Last-Event-ID: {}", log.len())],
        b"",
    );
    assert!(!resumed.text().contains("event: log"), "resumed past the log: {}", resumed.text());

    // Cancel: only what has not finished.
    let r = s.request_with("DELETE", "/v1/builds/1", &[TRUSTED], b"");
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(valid(&spec, "Error", &r)["error"].as_str().unwrap().contains("already finished"));
    assert_eq!(s.request_with("DELETE", "/v1/builds/99", &[TRUSTED], b"").status, 404);

    // Metrics.
    let m = get("/metrics").text();
    assert!(m.contains("vouch_builds{state=\"failed\"} 3"), "{m}");
    assert!(
        m.contains("vouch_vm_boots_total 3") && m.contains("vouch_build_queue_length 0"),
        "{m}"
    );

    // The page.
    let page = get("/").text();
    let name = drv.rsplit_once('-').map(|(_, n)| n.trim_end_matches(".drv")).unwrap();
    assert!(page.contains(name) && page.contains("data-state=\"failed\""), "{page}");
    let page = get("/builds/2").text();
    assert!(page.contains("id=steps") && page.contains("EventSource"), "{page}");
    valid(&spec, "Health", &s.request("GET", "/health", b""));
}

#[test]
fn nix_log_reads_a_steps_log_from_the_service() {
    let t = tempfile::tempdir().unwrap();
    let (s, drv) = served_upload(t.path(), "serve.log", "?compression=zstd");
    let hash = &drv["/nix/store/".len()..][..32];
    // Before any step built it, the .drv is an uploaded input: its NAR is not served.
    let r = s.request("GET", &format!("/{hash}.narinfo"), b"");
    let url = r.text().lines().find_map(|l| l.strip_prefix("URL: ")).unwrap().to_owned();
    assert_eq!(s.request("GET", &format!("/{url}"), b"").status, 404, "{url}");
    let r = s.request_with(
        "POST",
        "/v1/builds",
        &[TRUSTED],
        format!(r#"{{"drv": "{drv}"}}"#).as_bytes(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    wait_failed(&s, 1, &[TRUSTED], WITHIN);
    // Now its narinfo (unsigned, text-addressed) and NAR are, for anyone.
    let r = s.request("GET", &format!("/{hash}.narinfo"), b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let info = nix_formats::narinfo::NarInfo::parse(&r.text()).unwrap();
    assert!(info.ca.as_deref().is_some_and(|c| c.starts_with("text:")) && info.sigs.is_empty());
    let nar = s.request("GET", &format!("/{}", info.url), b"");
    assert_eq!(nar.status, 200);
    let digest: [u8; 32] = Sha256::digest(&nar.body).into();
    assert_eq!(info.nar_hash.sha256_bytes().unwrap(), digest);
    let base = &drv["/nix/store/".len()..];
    assert!(s.request("GET", &format!("/log/{base}"), b"").text().contains("vouch: building"));

    // A fresh Nix with an empty store asks the service.
    let out = nix::output(
        Command::new("nix")
            .args(["log", "--store", &s.url(), &drv])
            .env("XDG_CACHE_HOME", t.path().join("xdg-log"))
            .env("NIX_REMOTE", t.path().join("empty-store")),
    );
    let text = nix::text(&out);
    assert!(out.status.success(), "nix log: {text}\n{}", s.log_text());
    assert!(text.contains(&format!("vouch: building {drv}")), "{text}");
}

#[test]
fn a_restart_resumes_queued_builds_and_fails_those_that_no_longer_check() {
    let t = tempfile::tempdir().unwrap();
    let (s, drv) = served_upload(t.path(), "serve1.log", "?compression=none");
    let (st, _) = s.stop("TERM");
    assert!(st.success());
    // Two builds queued when the service went away (as a crash leaves them): one still checks,
    // one names a derivation that is not here.
    let db = rusqlite::Connection::open(t.path().join("state/serve/builds.sqlite")).unwrap();
    let missing = format!("/nix/store/{}-gone.drv", "a".repeat(32));
    for (id, d) in [(1, drv.as_str()), (2, missing.as_str())] {
        db.execute(
            "INSERT INTO builds (id, drv, state, submitted, submission, caller)
             VALUES (?1, ?2, 'queued', 1, ?3, '{\"authenticated\":true,\"trusted\":true}')",
            rusqlite::params![id, d, format!(r#"{{"drv":"{d}"}}"#)],
        )
        .unwrap();
        db.execute(
            "INSERT INTO steps (build, idx, drv, state) VALUES (?1, 0, ?2, 'queued')",
            rusqlite::params![id, d],
        )
        .unwrap();
    }
    drop(db);
    let s = serve(t.path(), "serve2.log");
    let one = wait_failed(&s, 1, &[TRUSTED], WITHIN);
    assert!(one["error"].as_str().unwrap().contains("no-image"), "it ran: {one}");
    let two = wait_failed(&s, 2, &[TRUSTED], WITHIN);
    let e = two["error"].as_str().unwrap();
    assert!(e.contains("no longer checks") && e.contains("gone.drv"), "{two}");
    assert!(s.log_text().contains("queued build resumed"), "{}", s.log_text());
}
