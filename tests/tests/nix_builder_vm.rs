//! The real Debian Nix 2.8 building through `vouch nix-builder` as a remote builder, every
//! derivation in a fresh VM (KVM where usable, else TCG; evidence simulated here):
//! `ssh-ng://`, `ssh://` and `unix://` builders, a 3-level floating-CA chain with self- and cross
//! references, an input-addressed and a multi-output derivation, a fixed-output derivation,
//! signed realisations (`nix realisation info`), `vouch verify` under an explicit and the
//! default policy, two builders sharing a closure, the limits a `unix://` client sets
//! (`SetOptions`) in the step's statement, and failures (a failing builder, a VM killed
//! mid-build, a socket server stopped mid-build) that leave nothing registered.
//!
//! The Nix 2.8 client is trusted where it builds input-addressed steps (`--trusted` in the ssh
//! command, as the operator's forced command; Nix 2.8's build hook sends `BuildDerivation` for
//! them); the other runs need no trust (content-addressed and fixed-output steps).
//!
//! The tests take a lock so their VMs do not compete for the CPUs; data is kept tiny.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use build_trace::job::Limits;
use test_support::nix::{local_build, sha256_hex, text, CA_PRELUDE};
use test_support::server::SocketServer;
use test_support::vm::{builder_wrapper, image_dir, nix, vouch_bin, Scratch, VmTest, NIX_CONFIG};
use tests::policy::builder_key;

static VMS: Mutex<()> = Mutex::new(());

type Env = VmTest;

fn setup() -> Env {
    VmTest::new(&VMS, "closure.nix", closure_nix)
}

/// A builder wrapper (`remote-program`): `vouch --state-dir STATE nix-builder EXTRA… "$@"`.
fn wrapper(s: &Scratch, name: &str, state: &Path, extra: &str) -> PathBuf {
    builder_wrapper(s.dir.path(), name, state, extra)
}

fn machine(proto: &str, wrapper: &Path, features: &str) -> String {
    format!(
        "{proto}://localhost?remote-program={} x86_64-linux - 1 1 {features}",
        wrapper.display()
    )
}

/// `nix-build --max-jobs 0 --builders MACHINES FILE -A attr…` (everything goes to the builders).
fn nix_build(file: &Path, attrs: &[&str], machines: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new("nix-build");
    cmd.env("NIX_CONFIG", NIX_CONFIG)
        .arg(file)
        .args(["--no-out-link", "--max-jobs", "0", "--builders", machines])
        .args(extra);
    for a in attrs {
        cmd.args(["-A", a]);
    }
    cmd
}

/// [`nix_build`], run to its end.
fn remote_build(file: &Path, attrs: &[&str], machines: &str, extra: &[&str]) -> Output {
    nix_build(file, attrs, machines, extra).output().expect("running nix-build")
}

/// [`nix_build`] of `attr` in the background: its streamed log is read until `marker` appears,
/// then `act` gets the pid of the build's QEMU (announced in the log before); the rest of the
/// log is read to the end. Returns nix-build's exit status and its whole log.
fn interrupt_build(
    file: &Path,
    attr: &str,
    machines: &str,
    marker: &str,
    act: impl FnOnce(u32),
) -> (std::process::ExitStatus, String) {
    let mut child: Child = nix_build(file, &[attr], machines, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running nix-build");
    let err = BufReader::new(child.stderr.take().unwrap());
    let t0 = Instant::now();
    let (mut qemu, mut act, mut seen) = (None, Some(act), String::new());
    for line in err.lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if let Some(i) = line.find("QEMU pid ") {
            qemu = line[i + 9..].trim_end_matches(')').parse::<u32>().ok();
        }
        if line.contains(marker) {
            let pid = qemu.expect("QEMU pid announced before the builder started");
            if let Some(act) = act.take() {
                act(pid);
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "took too long: {seen}");
    }
    assert!(act.is_none(), "`{marker}` never appeared: {seen}");
    (child.wait().unwrap(), seen)
}

/// The test derivations. `c1` → `c2` → `c3`: floating CA, self-references (`echo $out`) and
/// references across levels; `multi`: two CA outputs, `out` refers to `dev`, `dev` to `c1`;
/// `ia`: input-addressed; `fod`: fixed-output (flat SHA-256 of `fixed-<nonce>`).
fn closure_nix(n: &str) -> String {
    let fod_hash = sha256_hex(format!("fixed-{n}").as_bytes());
    format!(
        r#"let
{CA_PRELUDE}in rec {{
  c1 = ca "nb-c1" {{}} "set -e; mkdir $out; echo {n} > $out/n; echo $out > $out/self; echo built c1";
  c2 = ca "nb-c2" {{}} "set -e; mkdir $out; cat ${{c1}}/n > $out/n; echo ${{c1}} > $out/up; echo $out > $out/self";
  c3 = ca "nb-c3" {{}} "set -e; mkdir $out; echo ${{c2}} ${{c1}} > $out/refs";
  multi = ca "nb-multi" {{ outputs = [ "out" "dev" ]; }} "set -e; mkdir $out $dev; echo ${{c1}} > $dev/c1; echo $dev > $out/dev";
  ia = derivation {{
    name = "nb-ia"; system = sys; builder = "${{bb}}/sh";
    args = [ "-c" "set -e; mkdir $out; echo {n} > $out/n; echo ${{bb}} > $out/bb" ];
  }};
  fod = derivation {{
    name = "nb-fod-{n}"; system = sys; builder = "${{bb}}/sh";
    args = [ "-c" "printf fixed-{n} > $out" ];
    outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "{fod_hash}";
  }};
  left = ca "nb-left" {{ requiredSystemFeatures = [ "vouch-a" ]; }} "mkdir $out; echo left {n} > $out/x";
  right = ca "nb-right" {{ requiredSystemFeatures = [ "vouch-b" ]; }} "mkdir $out; echo right {n} > $out/x";
  joined = ca "nb-joined" {{ requiredSystemFeatures = [ "vouch-a" ]; }} "mkdir $out; echo ${{left}} ${{right}} > $out/both";
  fails = ca "nb-fails" {{}} "echo about to fail; exit 3";
  slow = ca "nb-slow" {{}} "echo started {n}; ${{bb}}/busybox sleep 600";
}}
"#
    )
}

/// The step directories (drv base names) in a builder's trace store.
fn steps(state: &Path) -> Vec<String> {
    let d = state.join("cache/vouch/v1/steps");
    let mut v: Vec<String> = std::fs::read_dir(&d)
        .map(|r| {
            r.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The limits in the statements of a builder's steps (the job, hence HOST_DATA, records them).
fn step_limits(state: &Path) -> Vec<Limits> {
    steps(state)
        .iter()
        .map(|step| {
            let dir = state.join("cache/vouch/v1/steps").join(step);
            let entry = std::fs::read_dir(&dir).unwrap().next().unwrap().unwrap().path();
            let bytes = std::fs::read(entry.join("statement.json")).unwrap();
            build_trace::Statement::from_canonical_bytes(&bytes).unwrap().job.limits
        })
        .collect()
}

/// A policy accepting the simulated roots of `states`, and requiring besides that a signature
/// by the Nix key of one of `keys_of` (none: evidence alone).
fn policy(s: &Scratch, states: &[&Path], keys_of: &[&Path]) -> PathBuf {
    tests::policy::simulated(s.dir.path(), states, keys_of, &image_dir().join("manifest.json"))
}

fn verify(policy: Option<&Path>, traces: &[&Path], drv: &str) -> Output {
    let mut cmd = Command::new(vouch_bin());
    cmd.arg("verify");
    if let Some(p) = policy {
        cmd.arg("--policy").arg(p);
    }
    for t in traces {
        cmd.arg("--traces").arg(t.join("cache"));
    }
    cmd.arg(drv).output().unwrap()
}

/// Resolved derivations built for CA steps carry vouch's signature in the client's store (Nix
/// registers unsigned realisations of its own for input-addressed ones, which vouch does not
/// sign: their output paths are static).
fn assert_signed_realisations(state: &Path) -> usize {
    let mut n = 0;
    for base in steps(state) {
        let drv = format!("/nix/store/{base}");
        let info = nix(&["nix", "realisation", "info", "--json", &drv]);
        let t = String::from_utf8_lossy(&info.stdout).into_owned();
        if base.ends_with("-nb-ia.drv") {
            assert!(
                !t.contains("-simulated-1:"),
                "no vouch realisation for an input-addressed step: {t}"
            );
            continue;
        }
        assert!(
            info.status.success() && t.contains("-simulated-1:"),
            "vouch's signature on the realisation of {drv}: {t}"
        );
        n += 1;
    }
    n
}

fn check_outputs(out: &Output, state: &Path) -> Vec<String> {
    assert!(out.status.success(), "remote build failed:\n{}", text(out));
    let paths: Vec<String> =
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
    for p in &paths {
        let v = nix(&["nix-store", "--verify-path", p]);
        assert!(v.status.success(), "{p}: {}", text(&v));
        // The builder's content store has it too (a new builder process serves it).
        assert!(state.join("store/index.sqlite").is_file());
    }
    paths
}

/// Build `attrs` with the builder `machines`, check the outputs arrived, that they are those of
/// a local build by the same Nix, that the CA steps carry vouch's signed realisations (`signed`
/// of them), and that `vouch verify` accepts `verify_attr` under a policy naming the builder's
/// simulated root and key. Returns the output paths and the client's log.
fn build_and_verify(
    e: &Env,
    attrs: &[&str],
    machines: &str,
    extra: &[&str],
    signed: usize,
    verify_attr: &str,
) -> (Vec<String>, String) {
    let out = remote_build(&e.file, attrs, machines, extra);
    let paths = check_outputs(&out, &e.state);
    assert_eq!(paths.len(), attrs.len(), "{paths:?}");
    let local = local_build(&e.file, attrs, &e.s.dir.path().join("local-store"));
    assert_eq!(paths, local, "the builder's outputs are a local Nix build's");
    assert_eq!(assert_signed_realisations(&e.state), signed);
    let p = policy(&e.s, &[&e.state], &[&e.state]);
    let v = verify(Some(&p), &[&e.state], &e.s.instantiate(&e.file, verify_attr));
    assert_eq!(v.status.code(), Some(0), "verify {verify_attr}: {}", text(&v));
    (paths, text(&out))
}

const CHAIN: &[&str] = &["c3", "multi.out", "multi.dev", "ia"];

#[test]
fn ssh_ng_builds_ca_chain_ia_and_multi_output_and_the_closure_verifies() {
    let e = setup();
    let w = wrapper(&e.s, "builder", &e.state, "--trusted");
    let m = machine("ssh-ng", &w, "ca-derivations");
    // Steps: c1, c2, c3, multi, ia; four of them content-addressed with signed realisations.
    let (paths, log) = build_and_verify(&e, CHAIN, &m, &[], 4, "c3");
    assert_eq!(steps(&e.state).len(), 5, "{:?}", steps(&e.state));
    assert!(log.contains("built c1"), "the builder log reached the client: {log}");
    assert!(log.contains("in a vouch VM"), "{log}");
    // c3 refers to c2 and c1; c2 to itself and c1.
    let c3 = paths.iter().find(|p| p.ends_with("-nb-c3")).expect("c3 built");
    let refs = String::from_utf8(nix(&["nix-store", "-qR", c3]).stdout).unwrap();
    assert!(
        refs.lines().any(|l| l.ends_with("-nb-c2")) && refs.lines().any(|l| l.ends_with("-nb-c1")),
        "{refs}"
    );

    // vouch verify: accepted under a policy naming the simulated root and vouch's key,
    // rejected under the default policy (simulated evidence).
    let p = policy(&e.s, &[&e.state], &[&e.state]);
    for attr in ["multi", "ia"] {
        let v = verify(Some(&p), &[&e.state], &e.s.instantiate(&e.file, attr));
        assert_eq!(v.status.code(), Some(0), "verify {attr}: {}", text(&v));
    }
    let v = verify(None, &[&e.state], &e.s.instantiate(&e.file, "c3"));
    // The default policy: refused, either because the image has no SEV-SNP measurement to pin
    // (exit 2, naming the fix) or because the evidence is simulated.
    let t = text(&v);
    let refused = (v.status.code() == Some(2) && t.contains("--image-manifest"))
        || (v.status.code() == Some(1) && t.to_lowercase().contains("simulated"));
    assert!(refused, "default policy: {t}");
}

#[test]
fn ssh_serve_builds_the_same() {
    let e = setup();
    // No --client-nix-version: the serve protocol's version says Nix 2.8–2.34, and the build
    // options Nix 2.8 sends (enforce-determinism true) say ≤ 2.12, so the CA self-reference
    // rule of 2.8 (c1 and c2 refer to themselves). The sandbox limits are the operator's
    // defaults (Nix sends none of them).
    let w = wrapper(
        &e.s,
        "builder",
        &e.state,
        "--trusted --max-memory 700 --max-processes 1234 --tmpfs-size 300",
    );
    build_and_verify(&e, CHAIN, &machine("ssh", &w, "ca-derivations"), &[], 4, "c3");
    // Every step ran under the configured limits; Nix sends 0 for its own limits, so vouch's
    // defaults apply.
    for l in step_limits(&e.state) {
        assert_eq!((l.memory_bytes, l.max_processes, l.tmpfs_bytes), (700 << 20, 1234, 300 << 20));
        assert_eq!((l.timeout_s, l.max_silent_s, l.max_log_bytes), (10800, 3600, 64 << 20));
    }
}

#[test]
fn unix_socket_builder_applies_the_clients_limits_and_stops_cleanly() {
    let e = setup();
    let server = SocketServer::start(
        &vouch_bin(),
        &e.state,
        &e.s.dir.path().join("b.sock"),
        &[],
        &[("VOUCH_IMAGE_DIR", image_dir().as_os_str())],
    );
    let m = server.machine("ca-derivations");
    // Over `unix://` Nix sends SetOptions with its settings: `max-silent-time` (here as
    // `--option`, as nix.conf would set it) and `timeout` (`--timeout`) become the step's limits.
    let limits = ["--option", "max-silent-time", "1234", "--timeout", "4321"];
    let (_, log) = build_and_verify(&e, &["c1"], &m, &limits, 1, "c1");
    assert!(log.contains("built c1"), "the builder log reached the client: {log}");
    let l = step_limits(&e.state);
    assert_eq!(l.len(), 1);
    assert_eq!((l[0].timeout_s, l[0].max_silent_s), (4321, 1234), "{l:?}");
    // The client's max-build-log-size is 0 (none): vouch's default; its `cores` (this machine's
    // CPUs) is capped at the VM's one vCPU.
    assert_eq!((l[0].max_log_bytes, l[0].cores), (64 << 20, 1), "{l:?}");
    assert!(server.log_text().contains("timeout_s=4321 max_silent_s=1234"));

    // SIGTERM mid-build: the VM is killed, the client told why, nothing registered, the socket
    // removed.
    let socket = server.socket.clone();
    let mut stopped = None;
    let (status, log) = interrupt_build(&e.file, "slow", &m, &format!("started {}", e.n), |qemu| {
        stopped = Some((server.stop("TERM"), qemu));
    });
    let ((st, server_log), qemu) = stopped.unwrap();
    assert!(st.success(), "{st}: {server_log}");
    assert!(!status.success());
    assert!(log.contains("the builder is shutting down"), "{log}");
    assert!(!Path::new(&format!("/proc/{qemu}")).exists(), "QEMU {qemu} outlived the server");
    assert!(!socket.exists(), "{server_log}");
    assert_eq!(stored(&e.state, "-nb-slow"), 0);
    assert_eq!(steps(&e.state).len(), 1, "only c1");
}

#[test]
fn fixed_output_derivation_runs_networked_or_says_why_not() {
    let e = setup();
    let w = wrapper(&e.s, "builder", &e.state, "");
    let out = remote_build(&e.file, &["fod"], &machine("ssh-ng", &w, "ca-derivations"), &[]);
    if out.status.success() {
        let p = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            format!("fixed-{}", e.n),
            "accepted by its declared hash"
        );
    } else {
        let t = text(&out);
        assert!(
            t.contains("networked fixed-output variant is not available"),
            "an honest reason: {t}"
        );
        assert!(steps(&e.state).is_empty());
    }
}

#[test]
fn two_builders_share_a_closure_and_it_verifies() {
    let e = setup();
    let (sa, sb) = (e.s.dir.path().join("state-a"), e.s.dir.path().join("state-b"));
    // Two vouch hosts on one machine need two key names, or a policy cannot tell their keys
    // apart: one named by flag, one by its state directory's setting.
    let wa = wrapper(&e.s, "builder-a", &sa, "--key-name builder-a-simulated-1");
    std::fs::create_dir_all(&sb).unwrap();
    std::fs::write(sb.join("key-name"), "builder-b-simulated-1\n").unwrap();
    let wb = wrapper(&e.s, "builder-b", &sb, "");
    let machines = format!(
        "{} ; {}",
        machine("ssh-ng", &wa, "ca-derivations,vouch-a vouch-a"),
        machine("ssh-ng", &wb, "ca-derivations,vouch-b vouch-b")
    );
    let out = remote_build(&e.file, &["joined"], &machines, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let (a, b) = (steps(&sa), steps(&sb));
    assert_eq!(a.len(), 2, "left and joined on builder a: {a:?}");
    assert_eq!(b.len(), 1, "right on builder b: {b:?}");
    assert!(b[0].ends_with("nb-right.drv"));
    assert_eq!(builder_key(&sa).0, "builder-a-simulated-1");
    assert_eq!(builder_key(&sb).0, "builder-b-simulated-1");
    // Every step: simulated evidence of either builder and the key of either builder.
    let p = policy(&e.s, &[&sa, &sb], &[&sa, &sb]);
    let joined = e.s.instantiate(&e.file, "joined");
    let v = verify(Some(&p), &[&sa, &sb], &joined);
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));
    // One builder's traces alone do not cover the closure.
    let v = verify(Some(&p), &[&sa], &joined);
    assert_eq!(v.status.code(), Some(1), "{}", text(&v));
    // Only builder a's key: the step built on b is not accepted (the keys are told apart).
    let only_a = policy(&e.s, &[&sa, &sb], &[&sa]);
    let v = verify(Some(&only_a), &[&sa, &sb], &joined);
    assert_eq!(v.status.code(), Some(1), "{}", text(&v));
    assert!(
        text(&v).contains("nb-right"),
        "the step from builder b is the one refused: {}",
        text(&v)
    );
}

/// Valid paths in a builder's content store whose name ends with `suffix`.
fn stored(state: &Path, suffix: &str) -> usize {
    let out = Command::new("sqlite3")
        .arg(state.join("store/index.sqlite"))
        .arg(format!("SELECT count(*) FROM paths WHERE path LIKE '%{suffix}'"))
        .output()
        .expect("sqlite3 (scripts/setup-host.sh installs it)");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn failures_are_reported_and_register_nothing() {
    let e = setup();
    let w = wrapper(&e.s, "builder", &e.state, "");
    let m = machine("ssh-ng", &w, "ca-derivations");

    // A builder that fails.
    let out = remote_build(&e.file, &["fails"], &m, &[]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("failed: vouch:") && t.contains("about to fail"), "{t}");
    assert_eq!(stored(&e.state, "-nb-fails"), 0);
    assert!(steps(&e.state).is_empty());

    // A VM killed mid-build: the QEMU pid is in the streamed log.
    let (status, seen) = interrupt_build(&e.file, "slow", &m, &format!("started {}", e.n), |pid| {
        assert!(Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());
    });
    assert!(!status.success());
    assert!(seen.contains("failed: vouch:") && seen.contains("nothing was registered"), "{seen}");
    assert_eq!(stored(&e.state, "-nb-slow"), 0);
    assert!(steps(&e.state).is_empty());
}
