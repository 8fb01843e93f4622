//! vouch as the remote builder of the Nix that users run: Debian trixie's Nix 2.26.3 (in a
//! chroot, `test_support::chroot`) over every transport — `unix://`, and `ssh-ng://` and
//! `ssh://` through a `remote-program` that joins its stdio to a socket as ssh would
//! (`test_support::bridge` runs `vouch nix-builder` with the command line it sends) — and the
//! host's Nix 2.8.0 over `unix://` (its `ssh-ng://` and `ssh://` runs are in
//! `nix_builder_vm.rs`). Every VM is real (TCG here; evidence simulated).
//!
//! Each run builds one closure: a floating-CA chain with self-references (`c1` → `c2`), a
//! two-output CA step, a fixed-output step and an input-addressed step on top of it (5 VMs).
//! Checked: every output path equals a local build by the same Nix in a store of its own (the
//! CA self-reference rule differs between 2.8 and 2.26); the CA steps come back with vouch's
//! signed realisations; `vouch verify` accepts the closure from the `.drv` files, from the
//! client's own derivation JSON (`nix derivation show -r` of 2.26, `nix show-derivation -r` of
//! 2.8), and with `--expect-local` run beside the client's Nix (2.26's `DRV^*`). Over `ssh://`
//! no `--client-nix-version` is given: vouch works it out from what the client sends.
//!
//! The client is trusted in these runs (`--trusted-user root` on the socket, `--trusted` in the
//! ssh command), as Nix's build hook needs for `BuildDerivation` of input-addressed steps. An
//! untrusted Nix 2.26 builds them through `BuildPaths` of the `.drv` closure instead, at the
//! paths vouch computes ([`nix_2_26_untrusted_client_builds_input_addressed_steps_by_drv`]).
//!
//! The tests take a lock so their VMs do not compete for the CPUs.

use std::path::Path;
use std::process::Output;
use std::sync::{Mutex, MutexGuard};

use test_support::bridge::StdioBridge;
use test_support::chroot::ChrootNix;
use test_support::nix::{local_build, sha256_hex, text, CA_PRELUDE};
use test_support::server::SocketServer;
use test_support::vm::{builder_wrapper, image_dir, nix, nonce, vouch_bin, Scratch, NIX_CONFIG};

static VMS: Mutex<()> = Mutex::new(());

fn vms() -> MutexGuard<'static, ()> {
    VMS.lock().unwrap_or_else(|e| e.into_inner())
}

/// What is built: `c2` (and `c1` under it), both outputs of `multi`, and `ia` (on `fod`).
const ATTRS: &[&str] = &["c2", "multi.out", "multi.dev", "ia"];

/// The closure, new for every nonce `n`. `c1` and `c2` write their own path (`$out`) into
/// their output: their paths depend on the client's self-reference rule.
fn closure_nix(n: &str) -> String {
    let fod_hash = sha256_hex(format!("fixed-{n}").as_bytes());
    format!(
        r#"let
{CA_PRELUDE}in rec {{
  c1 = ca "nv-c1" {{}} "set -e; mkdir $out; echo {n} > $out/n; echo $out > $out/self; echo built c1";
  c2 = ca "nv-c2" {{}} "set -e; mkdir $out; cat ${{c1}}/n > $out/n; echo ${{c1}} > $out/up; echo $out > $out/self";
  multi = ca "nv-multi" {{ outputs = [ "out" "dev" ]; }} "set -e; mkdir $out $dev; echo ${{c1}} > $dev/c1; echo $dev > $out/dev; echo $out > $out/self";
  fod = derivation {{
    name = "nv-fod-{n}"; system = sys; builder = "${{bb}}/sh";
    args = [ "-c" "printf fixed-{n} > $out" ];
    outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "{fod_hash}";
  }};
  ia = derivation {{
    name = "nv-ia"; system = sys; builder = "${{bb}}/sh";
    args = [ "-c" "set -e; mkdir $out; cat ${{fod}} > $out/fixed; echo $out > $out/self" ];
  }};
}}
"#
    )
}

/// `nix-build … --max-jobs 0 --builders MACHINE -A ATTRS…` (everything goes to the builder).
fn remote_argv<'a>(file: &'a str, machine: &'a str) -> Vec<&'a str> {
    let mut v = vec![file, "--no-out-link", "--max-jobs", "0", "--builders", machine];
    for a in ATTRS {
        v.extend(["-A", a]);
    }
    v
}

/// The lines of a successful build's stdout; `context` is added to the failure message.
fn paths_of(out: &Output, context: &str) -> Vec<String> {
    assert!(out.status.success(), "the remote build failed:\n{}\n{context}", text(out));
    let paths: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(Into::into).collect();
    assert_eq!(paths.len(), ATTRS.len(), "{paths:?}");
    paths
}

/// The steps (resolved drv paths) in a builder's trace store.
fn steps(state: &Path) -> Vec<String> {
    let dir = std::fs::read_dir(state.join("cache/vouch/v1/steps"));
    let mut v: Vec<String> = dir
        .map(|r| {
            r.map(|e| format!("/nix/store/{}", e.unwrap().file_name().to_string_lossy())).collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The floating-CA steps (c1, c2 and multi, resolved), whose realisations vouch signs. Nix
/// registers them under the resolved derivation; under the unresolved one (`c2`, `multi`) it
/// registers a realisation of its own, unsigned.
fn ca_steps(state: &Path) -> Vec<String> {
    let all = steps(state);
    assert_eq!(all.len(), 5, "c1, c2, multi, fod, ia: {all:?}");
    let ca: Vec<String> =
        all.into_iter().filter(|s| !s.ends_with("-nv-ia.drv") && !s.contains("-nv-fod-")).collect();
    assert_eq!(ca.len(), 3, "{ca:?}");
    ca
}

/// Check the realisations records (`nix realisation info --json` of a CA step): present, and
/// signed by the simulated builder.
fn assert_signed(json: &str, step: &str) {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let records = v.as_array().unwrap_or_else(|| panic!("{json}"));
    assert!(!records.is_empty(), "no realisation for {step}: {json}");
    for r in records {
        let sigs = r["signatures"].to_string();
        assert!(sigs.contains("-simulated-1:"), "vouch's signature on {step}: {json}");
    }
}

/// `vouch verify ARGS…` on the host; it must say VERIFIED.
fn assert_verifies(args: &[&str]) {
    let out = std::process::Command::new(vouch_bin()).arg("verify").args(args).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "vouch verify {args:?}: {}", text(&out));
    assert!(text(&out).contains("VERIFIED"), "{}", text(&out));
}

/// How the Nix 2.26 client reaches the builder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Unix,
    SshNg,
    Ssh,
}

/// The builder process (kept alive for the build) and the machine line the client uses.
enum Builder {
    Socket(SocketServer),
    Bridge(StdioBridge),
}

impl Builder {
    fn log_text(&self) -> String {
        match self {
            Builder::Socket(s) => s.log_text(),
            Builder::Bridge(b) => b.log_text(),
        }
    }
}

/// Start vouch on the host for a client in `c`, its state in `/srv/state`.
fn start_builder(c: &ChrootNix, state: &Path, t: Transport) -> (Builder, String) {
    let features = "x86_64-linux - 1 1 ca-derivations";
    match t {
        Transport::Unix => {
            let image = image_dir();
            let s = SocketServer::start(
                &vouch_bin(),
                state,
                &c.run_dir().join("b.sock"),
                &["--trusted-user", "root"],
                &[("VOUCH_IMAGE_DIR", image.as_os_str())],
            );
            let m = format!("unix://{}?real={} {features}", c.inside(&s.socket), c.inside(&s.real));
            (Builder::Socket(s), m)
        }
        Transport::SshNg | Transport::Ssh => {
            // `--trusted` as the operator's forced command for this client's ssh key.
            let w = builder_wrapper(c.dir.path(), "builder", state, "--trusted");
            let bridge =
                StdioBridge::start(&c.run_dir().join("ssh.sock"), &w, &c.dir.path().join("b.log"));
            let program = c.remote_program("vouch-ssh", "ssh.sock");
            let proto = if t == Transport::Ssh { "ssh" } else { "ssh-ng" };
            (
                Builder::Bridge(bridge),
                format!("{proto}://localhost?remote-program={program} {features}"),
            )
        }
    }
}

/// Nix 2.26 in the chroot builds the closure through vouch over `t`; see the module docs.
fn nix_2_26_builds_through(t: Transport) {
    let _vms = vms();
    let c = ChrootNix::new();
    assert!(c.version().contains("2.26"), "{}", c.version());
    let n = nonce();
    c.write("closure.nix", &closure_nix(&n), false);
    let state = c.srv().join("state");
    let (builder, machine) = start_builder(&c, &state, t);

    let out = c.output(&[&["nix-build"], &remote_argv("/srv/closure.nix", &machine)[..]].concat());
    let paths = paths_of(&out, &builder.log_text());
    // The same outputs as Nix 2.26 building the closure itself, in a store of its own.
    let mut local = vec!["nix-build", "/srv/closure.nix", "--no-out-link"];
    ATTRS.iter().for_each(|a| local.extend(["-A", a]));
    let local = test_support::nix::stdout(&mut c.command_in("nix-local", &[], &local));
    assert_eq!(paths, local.lines().collect::<Vec<_>>(), "the builder's outputs are 2.26's own");
    // c2 holds its own path: the client's (2.17–2.34) self-reference rule was used.
    let c2 = c.store_dir().join(paths[0].trim_start_matches("/nix/store/"));
    assert_eq!(std::fs::read_to_string(c2.join("self")).unwrap().trim(), paths[0]);
    for p in &paths {
        c.stdout(&["nix-store", "--verify-path", p]);
    }
    match &builder {
        Builder::Bridge(b) => {
            let want = if t == Transport::Ssh { "--serve --write" } else { "--stdio" };
            assert!(b.command_lines().iter().all(|l| l == want), "{:?}", b.command_lines());
        }
        Builder::Socket(_) => {}
    }
    if t == Transport::Ssh {
        // Serve 2.7 with enforce-determinism false: Nix 2.13–2.34, the rule of 2.17–2.34 by
        // default (and right here), said in the log.
        assert!(builder.log_text().contains("Nix 2.17–2.34"), "{}", builder.log_text());
    }

    // vouch's signed realisations, as Nix 2.26 registered them (`DRV^*`).
    for step in ca_steps(&state) {
        let json = c.stdout(&["nix", "realisation", "info", "--json", &format!("{step}^*")]);
        assert_signed(&json, &step);
    }
    let drv = |a: &str| c.instantiate("/srv/closure.nix", a);

    // vouch verify on the host, from the `.drv` files and from 2.26's derivation JSON.
    let manifest = image_dir().join("manifest.json");
    let host_policy = tests::policy::simulated(&c.srv(), &[&state], &[&state], &manifest);
    let (hp, traces) = (host_policy.to_str().unwrap(), state.join("cache"));
    let (traces, store) = (traces.to_str().unwrap(), c.store_dir());
    for step in ["c2", "multi", "ia"] {
        let d = drv(step);
        assert_verifies(&[
            "--policy",
            hp,
            "--traces",
            traces,
            "--drv-dir",
            store.to_str().unwrap(),
            &d,
        ]);
        let json = c.srv().join(format!("{step}.json"));
        std::fs::write(&json, c.stdout(&["nix", "derivation", "show", "-r", &d])).unwrap();
        assert_verifies(&[
            "--policy",
            hp,
            "--traces",
            traces,
            "--show-derivation",
            json.to_str().unwrap(),
            &d,
        ]);
    }
    // `--expect-local` where the client is: vouch in the chroot asks Nix 2.26 for the outputs.
    std::fs::copy(&manifest, c.srv().join("manifest.json")).unwrap();
    let inner = Path::new("/srv/manifest.json");
    let policy = tests::policy::simulated(&c.srv(), &[&state], &[&state], inner);
    let vouch = c.srv().join("vouch");
    if std::fs::hard_link(vouch_bin(), &vouch).is_err() {
        std::fs::copy(vouch_bin(), &vouch).unwrap();
    }
    for step in ["c2", "multi"] {
        let p = c.inside(&policy);
        let args = ["/srv/vouch", "verify", "--policy", &p, "--traces", "/srv/state/cache"];
        let out = c.output(&[&args[..], &["--expect-local", &drv(step)]].concat());
        assert_eq!(out.status.code(), Some(0), "--expect-local {step}: {}", text(&out));
    }
}

#[test]
fn nix_2_26_over_unix_socket() {
    nix_2_26_builds_through(Transport::Unix);
}

#[test]
fn nix_2_26_over_ssh_ng() {
    nix_2_26_builds_through(Transport::SshNg);
}

#[test]
fn nix_2_26_over_ssh_serve_protocol() {
    nix_2_26_builds_through(Transport::Ssh);
}

/// The host's Nix 2.8 builds the same closure over `unix://`; `--expect-local` reads what it
/// registered in the host's store.
#[test]
fn nix_2_8_over_unix_socket() {
    let _vms = vms();
    let s = Scratch::new();
    let file = s.write("closure.nix", &closure_nix(&nonce()));
    let state = s.state();
    let image = image_dir();
    let server = SocketServer::start(
        &vouch_bin(),
        &state,
        &s.dir.path().join("b.sock"),
        &["--trusted-user", "root"],
        &[("VOUCH_IMAGE_DIR", image.as_os_str())],
    );
    let machine = server.machine("ca-derivations");
    let mut cmd = std::process::Command::new("nix-build");
    cmd.env("NIX_CONFIG", NIX_CONFIG).args(remote_argv(file.to_str().unwrap(), &machine));
    let paths = paths_of(&cmd.output().unwrap(), &server.log_text());
    assert_eq!(paths, local_build(&file, ATTRS, &s.dir.path().join("local")), "2.8's own");
    for step in ca_steps(&state) {
        let info = nix(&["nix", "realisation", "info", "--json", &step]);
        assert_signed(&String::from_utf8_lossy(&info.stdout), &step);
    }
    let policy =
        tests::policy::simulated(s.dir.path(), &[&state], &[&state], &image.join("manifest.json"));
    let (p, traces) = (policy.to_str().unwrap(), state.join("cache"));
    let traces = traces.to_str().unwrap();
    for step in ["c2", "multi", "ia"] {
        let d = s.instantiate(&file, step);
        assert_verifies(&["--policy", p, "--traces", traces, "--expect-local", &d]);
        let json = s.dir.path().join(format!("{step}.json"));
        std::fs::write(&json, nix(&["nix", "show-derivation", "-r", &d]).stdout).unwrap();
        assert_verifies(&[
            "--policy",
            p,
            "--traces",
            traces,
            "--show-derivation",
            json.to_str().unwrap(),
            &d,
        ]);
    }
}

/// Nix ≥ 2.16 sends a builder that does not trust it the `.drv` closure and `BuildPaths` (not
/// `BuildDerivation`) for input-addressed steps: 2.26 as an untrusted client gets `ia` built from
/// its `.drv` closure, at the path Nix computes (and `fod` by `BuildDerivation`: its output is
/// content-addressed). 2 VMs.
#[test]
fn nix_2_26_untrusted_client_builds_input_addressed_steps_by_drv() {
    let _vms = vms();
    let c = ChrootNix::new();
    c.write("closure.nix", &closure_nix(&nonce()), false);
    let state = c.srv().join("state");
    // The operator trusts `nobody`'s connections only; the client here is uid 0 in the chroot.
    let untrusted: &[&str] = &["--trusted-user", "nobody"];
    let image = image_dir();
    let s = SocketServer::start(
        &vouch_bin(),
        &state,
        &c.run_dir().join("b.sock"),
        untrusted,
        &[("VOUCH_IMAGE_DIR", image.as_os_str())],
    );
    let store = format!("unix://{}?real={}", c.inside(&s.socket), c.inside(&s.real));
    let info = text(&c.output(&["nix", "store", "info", "--store", &store]));
    assert!(info.contains("Trusted: 0"), "an untrusted client: {info}");
    let machine = format!("{store} x86_64-linux - 1 1 ca-derivations");
    let out = c.output(&[
        "nix-build",
        "/srv/closure.nix",
        "--no-out-link",
        "--max-jobs",
        "0",
        "--builders",
        &machine,
        "-A",
        "ia",
    ]);
    assert!(out.status.success(), "{}\n{}", text(&out), s.log_text());
    assert!(s.log_text().contains("BuildPathsWithResults"), "{}", s.log_text());
    let mut local = c.command_in("nix-local", &[], &["nix-build", "/srv/closure.nix", "-A", "ia"]);
    let local = test_support::nix::stdout(local.arg("--no-out-link"));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), local.trim());
}
