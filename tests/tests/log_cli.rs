//! `vouch log` and `vouch verify` with a transparency log, on the real-Nix closure of the
//! build-trace fixture: `log sync` logs its steps; a witness runs as a real process over HTTP on
//! loopback and cosigns; `vouch verify` requires the policy's witness quorum and then verifies;
//! a forked log (same size, another root, same log key) is refused by the witness and detected
//! by the verifier and by `vouch log monitor`; a step missing from the log is not accepted.

use std::io::{BufRead, BufReader};
use std::path::Path;
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
    let fx = Fixture::new(&["c"]);
    let t = tempfile::tempdir().unwrap();
    let (state, wstate, mstate) = (t.path().join("s"), t.path().join("w"), t.path().join("m"));
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
    assert!(
        text(&vouch(&state, &["log", "sync", "--traces", &traces])).contains("0 entries appended")
    );

    let witness = WitnessProc::start(&wstate, &log_vkey);
    let policy_with = |quorum: usize, witnesses: Vec<String>| {
        let mut p = fx.policy(TrustModel::Leaf("builder:sim".into()));
        p.log = Some(LogPolicy { keys: vec![log_vkey.clone()], witnesses, quorum });
        let path = t.path().join(format!("policy-{quorum}.toml"));
        std::fs::write(&path, p.to_toml()).unwrap();
        path.display().to_string()
    };
    let quorum1 = policy_with(1, vec![witness.vkey.clone()]);
    let quorum0 = policy_with(0, vec![]);
    let drv_dir = fx.store_dir.display().to_string();
    let drv = fx.drvs["c"].to_string();
    let verify = |policy: &str, traces: &str| {
        let args = ["verify", "--policy", policy, "--traces", traces, "--drv-dir", &drv_dir, &drv];
        vouch(&state, &args)
    };

    // Not cosigned yet: the quorum is not met.
    let v = verify(&quorum1, &traces);
    assert_eq!(v.status.code(), Some(1), "{}", text(&v));
    assert!(
        text(&v).contains("cosigned by 0 trusted witness(es) [], the policy needs 1"),
        "{}",
        text(&v)
    );
    // Cosigned by the witness over HTTP: verified.
    let wargs = ["--witness", witness.url.as_str(), "--witness-key", witness.vkey.as_str()];
    let c = vouch(&state, &[&["log", "cosign", "--traces", &traces][..], &wargs].concat());
    assert!(c.status.success() && text(&c).contains(": cosigned"), "{}", text(&c));
    let v = verify(&quorum1, &traces);
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));
    assert!(text(&v).contains("VERIFIED"), "{}", text(&v));
    // The same over HTTP: `vouch serve` serves the log at `/log/` beside its cache, and the
    // verifier reads checkpoint, tiles and index from there (`--traces http://…`).
    let serve_state = t.path().join("serve-state");
    std::fs::create_dir(&serve_state).unwrap();
    copy_dir(&fx.traces, &serve_state.join("cache"));
    let server = HttpService::start(&vouch_bin(), &serve_state, &t.path().join("serve.log"), &[]);
    let v = verify(&quorum1, &server.url());
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));
    assert!(text(&v).contains("VERIFIED"), "{}", text(&v));
    drop(server);

    // A fork: the same log key signs another history of the same size (leaves reversed).
    let fork = t.path().join("fork");
    copy_dir(&fx.traces, &fork);
    std::fs::remove_dir_all(fork.join("log")).unwrap();
    let src = DirTiles::new(&fx.traces.join("log"));
    let view = LogView::open(&src, &log_trust(&log_vkey)).unwrap();
    let mut leaves: Vec<LogEntry> = (0..view.checkpoint().size)
        .map(|i| LogEntry::parse(&view.leaf(i).unwrap()).unwrap())
        .collect();
    leaves.reverse();
    let skey = std::fs::read_to_string(state.join("keys/log.note-key")).unwrap();
    LogWriter::open(&fork.join("log"), LogKey::from_skey(&skey).unwrap())
        .unwrap()
        .append(&leaves)
        .unwrap();
    let fork_s = fork.display().to_string();
    // The witness refuses to cosign it; the verifier, which saw the other history, refuses it.
    let c = vouch(&state, &[&["log", "cosign", "--traces", &fork_s][..], &wargs].concat());
    assert_eq!(c.status.code(), Some(1), "{}", text(&c));
    assert!(text(&c).contains("refused (409)"), "{}", text(&c));
    let v = verify(&quorum0, &fork_s);
    assert_eq!(v.status.code(), Some(1), "{}", text(&v));
    assert!(text(&v).contains("forked log"), "{}", text(&v));
    // A monitor that followed the log reports the fork too.
    let monitor = |src: &str| vouch(&mstate, &["log", "monitor", src, "--log-key", &log_vkey]);
    let m = monitor(&traces);
    assert_eq!(m.status.code(), Some(0), "{}", text(&m));
    assert_eq!(
        text(&m).matches("\nentry ").count() + usize::from(text(&m).starts_with("entry ")),
        fx.steps.len(),
        "{}",
        text(&m)
    );
    let m = monitor(&fork_s);
    assert_eq!(m.status.code(), Some(1), "{}", text(&m));
    assert!(text(&m).contains("INCONSISTENT"), "{}", text(&m));

    // A step published without the log does not count: a store whose log lacks the target's
    // step does not verify, naming why.
    let partial = t.path().join("partial");
    copy_dir(&fx.traces, &partial);
    std::fs::remove_dir_all(partial.join("log")).unwrap();
    let first = leaves.iter().rev().take(leaves.len() - 1).cloned().collect::<Vec<_>>();
    LogWriter::open(&partial.join("log"), LogKey::from_skey(&skey).unwrap())
        .unwrap()
        .append(&first)
        .unwrap();
    let fresh = t.path().join("fresh-state");
    let args = [
        "verify",
        "--policy",
        &quorum0,
        "--traces",
        partial.to_str().unwrap(),
        "--drv-dir",
        &drv_dir,
        &drv,
    ];
    let v = vouch(&fresh, &args);
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
