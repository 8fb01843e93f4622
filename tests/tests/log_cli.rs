//! `vouch log` and `vouch verify` with a transparency log, on the real-Nix closure of the
//! build-trace fixture: `log sync` logs its steps; a witness runs as a real process over HTTP on
//! loopback and cosigns; `vouch verify` requires the policy's witness quorum and then verifies;
//! a forked log (same size, another root, same log key) is refused by the witness and detected
//! by the verifier and by `vouch log monitor`; a step missing from the log is not accepted.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use build_trace::tlog::{DirTiles, LogEntry, LogKey, LogView, LogWriter};
use build_trace::trust::{LogPolicy, TrustModel};
use test_support::http_service::HttpService;
use test_support::nix::text;
use test_support::vm::vouch_bin;
use tests::fixture::Fixture;

fn vouch(state: &Path, args: &[&str]) -> Output {
    Command::new(vouch_bin()).arg("--state-dir").arg(state).args(args).output().unwrap()
}

/// A witness process, ended when dropped.
struct WitnessProc {
    child: Child,
    url: String,
    vkey: String,
}

impl WitnessProc {
    fn start(state: &Path, log_vkey: &str) -> WitnessProc {
        let mut child = Command::new(vouch_bin())
            .arg("--state-dir")
            .arg(state)
            .args(["log", "witness", "--listen", "127.0.0.1:0", "--name", "w1.test/witness"])
            .args(["--log-key", log_vkey])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let vkey = lines.next().unwrap().unwrap();
        let url = lines.next().unwrap().unwrap().strip_prefix("listening on ").unwrap().to_owned();
        WitnessProc { child, url, vkey }
    }
}

impl Drop for WitnessProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn witnessed_log_verify_fork_and_monitor() {
    let sc = Scene::new();
    let witness = WitnessProc::start(&sc.t.path().join("w"), &sc.log_vkey);
    let quorum1 = sc.policy(1, vec![witness.vkey.clone()]);
    let quorum0 = sc.policy(0, vec![]);
    let wargs = ["--witness", witness.url.as_str(), "--witness-key", witness.vkey.as_str()];
    cosigned_log_verifies(&sc, &quorum1, &wargs);
    let leaves = sc.leaves();
    forked_log_is_refused(&sc, &quorum0, &wargs, &leaves);
    step_missing_from_the_log_does_not_count(&sc, &quorum0, &leaves);
}

/// The build-trace fixture's closure, its trace store logged by `log sync` under a new log key,
/// and the verifier's state directory.
struct Scene {
    fx: Fixture,
    t: tempfile::TempDir,
    state: PathBuf,
    log_vkey: String,
    drv_dir: String,
    drv: String,
}

impl Scene {
    fn new() -> Scene {
        let fx = Fixture::new(&["c"]);
        let t = tempfile::tempdir().unwrap();
        let state = t.path().join("s");
        let traces = fx.traces.display().to_string();
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(state.join("log-origin"), "ci.test/vouch\n").unwrap();

        let key = vouch(&state, &["log", "key"]);
        assert!(key.status.success(), "{}", text(&key));
        let log_vkey = String::from_utf8(key.stdout).unwrap().trim().to_owned();
        assert!(log_vkey.starts_with("ci.test/vouch+"), "{log_vkey}");
        let sync = vouch(&state, &["log", "sync", "--traces", &traces]);
        assert!(
            text(&sync).contains(&format!("{} entries appended", fx.steps.len())),
            "{}",
            text(&sync)
        );
        assert!(text(&vouch(&state, &["log", "sync", "--traces", &traces]))
            .contains("0 entries appended"));
        let drv_dir = fx.store_dir.display().to_string();
        let drv = fx.drvs["c"].to_string();
        Scene { fx, t, state, log_vkey, drv_dir, drv }
    }

    /// The fixture's trace store, as `--traces` takes it.
    fn traces(&self) -> String {
        self.fx.traces.display().to_string()
    }

    /// A policy file: the fixture's simulated builder, through the log with `quorum` of
    /// `witnesses`.
    fn policy(&self, quorum: usize, witnesses: Vec<String>) -> String {
        let mut p = self.fx.policy(TrustModel::Leaf("builder:sim".into()));
        p.log = Some(LogPolicy { keys: vec![self.log_vkey.clone()], witnesses, quorum });
        let path = self.t.path().join(format!("policy-{quorum}.toml"));
        std::fs::write(&path, p.to_toml()).unwrap();
        path.display().to_string()
    }

    /// `vouch verify` of the target under `policy` with `traces`, with the state directory
    /// `state`.
    fn verify_with(&self, state: &Path, policy: &str, traces: &str) -> Output {
        let args = [
            "verify",
            "--policy",
            policy,
            "--traces",
            traces,
            "--drv-dir",
            &self.drv_dir,
            &self.drv,
        ];
        vouch(state, &args)
    }

    /// [`Scene::verify_with`] the verifier's own state (which remembers the checkpoints seen).
    fn verify(&self, policy: &str, traces: &str) -> Output {
        self.verify_with(&self.state, policy, traces)
    }

    /// The log's entries, in order.
    fn leaves(&self) -> Vec<LogEntry> {
        let src = DirTiles::new(&self.fx.traces.join("log"));
        let view = LogView::open(&src, &log_trust(&self.log_vkey)).unwrap();
        (0..view.checkpoint().size)
            .map(|i| LogEntry::parse(&view.leaf(i).unwrap()).unwrap())
            .collect()
    }

    /// A copy of the trace store at `name` whose log, signed with the same log key, holds
    /// `entries` instead.
    fn relogged(&self, name: &str, entries: &[LogEntry]) -> PathBuf {
        let dir = self.t.path().join(name);
        copy_dir(&self.fx.traces, &dir);
        std::fs::remove_dir_all(dir.join("log")).unwrap();
        let skey = std::fs::read_to_string(self.state.join("keys/log.note-key")).unwrap();
        LogWriter::open(&dir.join("log"), LogKey::from_skey(&skey).unwrap())
            .unwrap()
            .append(entries)
            .unwrap();
        dir
    }
}

/// Not cosigned, the quorum is not met; cosigned by the witness over HTTP, the closure
/// verifies, from the directory and through `vouch serve`.
fn cosigned_log_verifies(sc: &Scene, quorum1: &str, wargs: &[&str]) {
    let traces = sc.traces();
    let v = sc.verify(quorum1, &traces);
    assert_eq!(v.status.code(), Some(1), "{}", text(&v));
    assert!(
        text(&v).contains("cosigned by 0 trusted witness(es) [], the policy needs 1"),
        "{}",
        text(&v)
    );
    let c = vouch(&sc.state, &[&["log", "cosign", "--traces", &traces][..], wargs].concat());
    assert!(c.status.success() && text(&c).contains(": cosigned"), "{}", text(&c));
    let v = sc.verify(quorum1, &traces);
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));
    assert!(text(&v).contains("VERIFIED"), "{}", text(&v));
    // The same over HTTP: `vouch serve` serves the log at `/log/` beside its cache, and the
    // verifier reads checkpoint, tiles and index from there (`--traces http://…`).
    let serve_state = sc.t.path().join("serve-state");
    std::fs::create_dir(&serve_state).unwrap();
    copy_dir(&sc.fx.traces, &serve_state.join("cache"));
    let server =
        HttpService::start(&vouch_bin(), &serve_state, &sc.t.path().join("serve.log"), &[]);
    let v = sc.verify(quorum1, &server.url());
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));
    assert!(text(&v).contains("VERIFIED"), "{}", text(&v));
}

/// A fork (the same log key signs another history of the same size, `leaves` reversed): the
/// witness refuses to cosign it, the verifier that saw the other history refuses it, and so
/// does a monitor that followed the log.
fn forked_log_is_refused(sc: &Scene, quorum0: &str, wargs: &[&str], leaves: &[LogEntry]) {
    let reversed: Vec<LogEntry> = leaves.iter().rev().cloned().collect();
    let fork_s = sc.relogged("fork", &reversed).display().to_string();
    let c = vouch(&sc.state, &[&["log", "cosign", "--traces", &fork_s][..], wargs].concat());
    assert_eq!(c.status.code(), Some(1), "{}", text(&c));
    assert!(text(&c).contains("refused (409)"), "{}", text(&c));
    let v = sc.verify(quorum0, &fork_s);
    assert_eq!(v.status.code(), Some(1), "{}", text(&v));
    assert!(text(&v).contains("forked log"), "{}", text(&v));
    let mstate = sc.t.path().join("m");
    let monitor = |src: &str| vouch(&mstate, &["log", "monitor", src, "--log-key", &sc.log_vkey]);
    let m = monitor(&sc.traces());
    assert_eq!(m.status.code(), Some(0), "{}", text(&m));
    assert_eq!(
        text(&m).matches("\nentry ").count() + usize::from(text(&m).starts_with("entry ")),
        sc.fx.steps.len(),
        "{}",
        text(&m)
    );
    let m = monitor(&fork_s);
    assert_eq!(m.status.code(), Some(1), "{}", text(&m));
    assert!(text(&m).contains("INCONSISTENT"), "{}", text(&m));
}

/// A step published without the log does not count: a store whose log lacks the target's step
/// (the last of `leaves`) does not verify, naming why.
fn step_missing_from_the_log_does_not_count(sc: &Scene, quorum0: &str, leaves: &[LogEntry]) {
    let partial = sc.relogged("partial", &leaves[..leaves.len() - 1]);
    let fresh = sc.t.path().join("fresh-state");
    let v = sc.verify_with(&fresh, quorum0, partial.to_str().unwrap());
    assert_eq!(v.status.code(), Some(1), "{}", text(&v));
    assert!(text(&v).contains("not in log ci.test/vouch"), "{}", text(&v));
}

fn log_trust(vkey: &str) -> build_trace::tlog::proof::LogTrust {
    build_trace::tlog::proof::LogTrust {
        logs: vec![build_trace::tlog::NoteVerifierKey::parse(vkey).unwrap()],
        ..Default::default()
    }
}

fn copy_dir(from: &Path, to: &Path) {
    let ok = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap().success();
    assert!(ok, "cp -a {} {}", from.display(), to.display());
}
