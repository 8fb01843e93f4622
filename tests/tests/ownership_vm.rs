//! Who owns an output path, end to end through `vouch serve` and `vouch nix-builder` with the
//! real Nix 2.8 and real VMs (TCG here; evidence simulated) — issue 12, item 1:
//!
//! - a divergent build: a trusted caller builds an input-addressed derivation that is not
//!   reproducible (it writes random bytes) twice. The second build reports `diverged` with its
//!   **own** NAR hash, different from the one the cache's narinfo keeps (the first build's),
//!   and its trace is recorded as divergent. It used to report success as if it were the
//!   published entry;
//! - the same through Nix's build hook: the second build's Nix gets the path with the bytes
//!   the cache publishes (the first build's), never a mix, and the trace says it diverged;
//! - a deferred derivation (input-addressed, its input floating CA) from an anonymous caller:
//!   its closure builds in one go (Nix builds the input, resolves it, builds the resolution),
//!   under the output path the real Nix gives it after resolution.

use std::process::Command;
use std::sync::Mutex;

use test_support::http_service::HttpService;
use test_support::nix::{local_build, text};
use test_support::vm::{builder_wrapper, image_dir, nix, nonce, vouch_bin, Scratch, NIX_CONFIG};
use tests::service::{nix_copy, trusted_args, wait, TRUSTED};

/// The tests take it so their VMs do not compete for the CPUs.
static VMS: Mutex<()> = Mutex::new(());

/// `noisy`: input-addressed, random output; `c`: floating CA; `d`: input-addressed on `c`
/// (deferred).
fn expr(n: &str) -> String {
    format!(
        r#"let bb = builtins.path {{ path = ./bb; name = "busybox"; }}; sys = builtins.currentSystem; in rec {{
  noisy = derivation {{ name = "own-noisy"; system = sys; builder = "${{bb}}/sh";
    args = [ "-c" "echo {n} > $out; ${{bb}}/busybox head -c 32 /dev/urandom >> $out" ]; }};
  c = derivation {{ name = "own-c"; system = sys; builder = "${{bb}}/sh"; args = [ "-c" "echo c {n} > $out" ];
    __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; }};
  d = derivation {{ name = "own-d"; system = sys; builder = "${{bb}}/sh";
    args = [ "-c" "cat ${{c}} > $out; echo d >> $out" ]; }};
}}
"#
    )
}

fn start(s: &Scratch, extra: &[&str]) -> HttpService {
    let image = image_dir();
    let mut args = vec!["--image", image.to_str().unwrap(), "--jobs", "1"];
    args.extend(extra);
    HttpService::start(&vouch_bin(), &s.state(), &s.dir.path().join("serve.log"), &args)
}

fn submit(svc: &HttpService, headers: &[&str], drv: &str) -> (u16, serde_json::Value) {
    let body = format!(r#"{{"drv": "{drv}", "nix_version": "2.8"}}"#);
    let r = svc.request_with("POST", "/v1/builds", headers, body.as_bytes());
    let v = serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::String(r.text()));
    (r.status, v)
}

#[test]
fn a_divergent_build_keeps_the_published_entry_and_reports_its_own_hash() {
    let _vms = VMS.lock().unwrap_or_else(|e| e.into_inner());
    let s = Scratch::new();
    let noisy = s.instantiate(&s.write("own.nix", &expr(&nonce())), "noisy");
    let [flag, token] = trusted_args(&s);
    let svc = start(&s, &[&flag, &token]);
    let to = format!("{}?compression=none", svc.url());
    let out = nix_copy(&s.dir.path().join("xdg"), &["--to", &to, "--derivation", &noisy]);
    assert!(out.status.success(), "upload: {}", text(&out));

    let mut builds = Vec::new();
    for _ in 0..2 {
        let (status, v) = submit(&svc, &[TRUSTED], &noisy);
        assert_eq!(status, 202, "{v}");
        let v = wait(&svc, v["id"].as_u64().unwrap());
        assert_eq!(v["state"], "succeeded", "{v}\n{}", svc.log_text());
        builds.push(v["outputs"]["out"].clone());
    }
    let (first, second) = (&builds[0], &builds[1]);
    assert_eq!(first["path"], second["path"], "one input-addressed path");
    assert_ne!(first["nar_hash"], second["nar_hash"], "the builds differ");
    // The second build reports its own hash, says it diverged, and what the cache kept.
    assert_eq!(second["diverged"], true, "{second}");
    assert_eq!(second["published"]["nar_hash"], first["nar_hash"], "{second}");
    assert_eq!(first["diverged"], false, "{first}");
    // The cache's narinfo is still the first build's.
    let path = first["path"].as_str().unwrap();
    let hash = &path["/nix/store/".len()..][..32];
    let r = svc.request("GET", &format!("/{hash}.narinfo"), b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let served = r.text().lines().find_map(|l| l.strip_prefix("NarHash: ")).unwrap().to_owned();
    assert_eq!(serde_json::Value::String(served), first["nar_hash"]);
    // Both traces are kept; the second is recorded as divergent, with its own hash.
    let steps = s.state().join("cache/vouch/v1/steps").join(&noisy["/nix/store/".len()..]);
    let entries: Vec<_> = std::fs::read_dir(&steps).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    let marked: Vec<_> = entries.iter().filter(|e| e.join("divergent.json").is_file()).collect();
    assert_eq!(marked.len(), 1, "{entries:?}");
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(marked[0].join("divergent.json")).unwrap()).unwrap();
    assert_eq!(rec["outputs"]["out"]["nar_hash"], second["nar_hash"], "{rec}");
    let (st, log) = svc.stop("INT");
    assert!(st.success(), "{st}: {log}");
}

#[test]
fn a_deferred_derivation_builds_under_the_path_nix_gives_after_resolution() {
    let _vms = VMS.lock().unwrap_or_else(|e| e.into_inner());
    let s = Scratch::new();
    let file = s.write("own.nix", &expr(&nonce()));
    let (c, d) = (s.instantiate(&file, "c"), s.instantiate(&file, "d"));
    // Where the real Nix puts d's output: it resolves d against c's output, then computes it.
    let nix_says = local_build(&file, &["d"], &s.dir.path().join("chroot"));
    let svc = start(&s, &[]);
    let to = format!("{}?compression=none", svc.url());
    let out = nix_copy(&s.dir.path().join("xdg"), &["--to", &to, "--derivation", &d]);
    assert!(out.status.success(), "upload: {}", text(&out));

    // An anonymous caller submits d (its input c has no accepted build yet): the closure
    // builds, c first; Nix resolves d against c's output and builds the resolution.
    let (status, v) = submit(&svc, &[], &d);
    assert_eq!(status, 202, "{v}");
    let v = wait(&svc, v["id"].as_u64().unwrap());
    assert_eq!(v["state"], "succeeded", "{v}\n{}", svc.log_text());
    assert_eq!(v["steps"][0]["drv"], c.as_str(), "{v}");
    // d's step names both; `nix log` finds the step's log under either name.
    assert_eq!(v["steps"][1]["drv"], d.as_str(), "{v}");
    let drv = v["steps"][1]["resolved"].as_str().unwrap();
    assert!(drv != d && drv.ends_with("-own-d.drv"), "the resolved derivation: {v}");
    for name in [d.as_str(), drv] {
        let r = svc.request("GET", &format!("/log/{}", &name["/nix/store/".len()..]), b"");
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        assert!(r.text().contains("vouch: building"), "{name}: {}", r.text());
    }
    assert_eq!(v["outputs"]["out"]["path"], nix_says[0].as_str(), "{v}");
    assert_eq!(v["outputs"]["out"]["diverged"], false, "{v}");
    let hash = &nix_says[0]["/nix/store/".len()..][..32];
    assert_eq!(svc.request("GET", &format!("/{hash}.narinfo"), b"").status, 200);
    let (st, log) = svc.stop("INT");
    assert!(st.success(), "{st}: {log}");
}

/// The NAR hash of `path` in the host's Nix store, as Nix registered it (`sha256:<nix32>`).
fn registered_hash(path: &str) -> String {
    let out = nix(&["nix", "path-info", "--json", path]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let h = nix_formats::Hash::parse_any(v[0]["narHash"].as_str().unwrap(), None).unwrap();
    build_trace::NarHash(h.sha256_bytes().unwrap()).to_string()
}

#[test]
fn a_divergent_remote_build_gives_nix_the_published_bytes() {
    let _vms = VMS.lock().unwrap_or_else(|e| e.into_inner());
    let s = Scratch::new();
    let file = s.write("own.nix", &expr(&nonce()));
    let noisy = s.instantiate(&file, "noisy");
    let w = builder_wrapper(s.dir.path(), "builder", &s.state(), "--trusted");
    let machines = format!(
        "ssh-ng://localhost?remote-program={} x86_64-linux - 1 1 ca-derivations",
        w.display()
    );
    let build = || {
        let out = Command::new("nix-build")
            .env("NIX_CONFIG", NIX_CONFIG)
            .arg(&file)
            .args(["-A", "noisy", "--no-out-link", "--max-jobs", "0", "--builders", &machines])
            .output()
            .expect("running nix-build");
        assert!(out.status.success(), "nix-build: {}", text(&out));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let path = build();
    let first = registered_hash(&path);
    // Nix builds it again once its output is gone from the client's store.
    let del = nix(&["nix-store", "--delete", &path]);
    assert!(del.status.success(), "{}", text(&del));
    assert_eq!(build(), path);
    // The client got the bytes the cache publishes for the path: the first build's.
    assert_eq!(registered_hash(&path), first);
    let narinfo = s.state().join("cache").join(format!("{}.narinfo", &path[11..43]));
    let narinfo = std::fs::read_to_string(narinfo).unwrap();
    assert!(narinfo.contains(&format!("NarHash: {first}\n")), "{narinfo}");
    // The second build's trace is kept, recorded as divergent with its own hash.
    let steps = s.state().join("cache/vouch/v1/steps").join(&noisy["/nix/store/".len()..]);
    let recs: Vec<serde_json::Value> = std::fs::read_dir(&steps)
        .unwrap()
        .filter_map(|e| std::fs::read(e.unwrap().path().join("divergent.json")).ok())
        .map(|b| serde_json::from_slice(&b).unwrap())
        .collect();
    assert_eq!(recs.len(), 1, "one divergent entry");
    let own = recs[0]["outputs"]["out"]["nar_hash"].as_str().unwrap();
    assert_ne!(own, first, "its own hash");
    assert_eq!(recs[0]["outputs"]["out"]["published_nar_hash"], first.as_str());
}
