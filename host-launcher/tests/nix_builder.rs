//! `vouch nix-builder` without VMs: the real binary behind a real Nix 2.8 (`nix store ping`,
//! `nix copy` over `ssh-ng://` and `ssh://`, `nix path-info`), and a scripted protocol peer for
//! what a well-behaved Nix never does (hang up mid-NAR, corrupt uploads, unknown operations).
//! Every check of the content store goes through a fresh builder process, as Nix starts one per
//! connection.

#[path = "nix_builder/peer.rs"]
mod peer;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use host_launcher::nixproto::serve::SERVE_MAGIC_1;
use host_launcher::nixproto::version::{ClientProfile, Protocol, FEATURE_REALISATION_WITH_PATH};
use host_launcher::nixproto::wire::{FramedWriter, WireRead, WireWrite};
use host_launcher::nixproto::{types, BuildStatus};
use nix_formats::StorePath;
use peer::*;

const LIMIT: Duration = Duration::from_secs(120);

fn files(state: &Path, sub: &str) -> usize {
    std::fs::read_dir(state.join("store").join(sub)).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn worker_handshake_old_and_new_clients() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    // Nix 2.8: protocol 1.34, no trust flag, no features.
    let mut p = Peer::spawn(&state, &["--stdio"], LIMIT);
    let (ver, trusted, feats) = p.worker_handshake(0x122, &[]);
    assert!(ver.starts_with("vouch "), "{ver}");
    assert_eq!((trusted, feats.len()), (None, 0));
    assert!(p.finish().0.success());
    // Nix 2.20: 1.37, not trusted (2) unless the operator says so (1).
    let mut p = Peer::spawn(&state, &["--stdio"], LIMIT);
    assert_eq!(p.worker_handshake(0x125, &[]).1, Some(2));
    p.finish();
    let mut p = Peer::spawn(&state, &["--trusted", "--stdio"], LIMIT);
    assert_eq!(p.worker_handshake(0x125, &[]).1, Some(1));
    p.finish();
    // Nix ≥ 2.35: 1.38 with features; the intersection is negotiated.
    let mut p = Peer::spawn(&state, &["--trusted", "--stdio"], LIMIT);
    let (_, trusted, feats) =
        p.worker_handshake(0x127, &[FEATURE_REALISATION_WITH_PATH, "something-else"]);
    assert_eq!(trusted, Some(1));
    assert_eq!(feats, vec![FEATURE_REALISATION_WITH_PATH.to_string()]);
    p.finish();
    // A client older than Nix 2.8 gets a clear error, not a hang.
    let mut p = Peer::spawn(&state, &["--stdio"], LIMIT);
    p.w().write_u64(0x6e697863).unwrap();
    p.w().write_u64(0x121).unwrap();
    p.w().write_u64(0).unwrap();
    p.w().write_u64(0).unwrap();
    p.w().flush().unwrap();
    assert_eq!(p.from.read_u64().unwrap(), 0x6478696f);
    p.from.read_u64().unwrap();
    p.from.read_string("version").unwrap();
    let err = p.stderr_loop().unwrap_err();
    assert!(err.contains("1.34") && err.contains("1.33"), "{err}");
    let (st, _) = p.finish();
    assert!(!st.success());
}

#[test]
fn nix_store_ping_both_protocols() {
    require_nix();
    let d = tempfile::tempdir().unwrap();
    let w = wrapper(d.path(), "builder", &d.path().join("state"), &[]);
    for proto in ["ssh-ng", "ssh"] {
        let store = format!("{proto}://localhost?remote-program={}", w.display());
        let out = nix(&["nix", "store", "ping", "--store", &store]);
        assert!(out.status.success(), "{proto}: {}", text(&out));
        // Only the worker protocol tells the client a version.
        if proto == "ssh-ng" {
            assert!(text(&out).contains("Version: vouch"), "{}", text(&out));
        }
    }
}

#[test]
fn nix_copy_uploads_are_verified_and_kept_between_processes() {
    require_nix();
    let d = tempfile::tempdir().unwrap();
    let (top, all) = local_closure(d.path(), "a");
    // Signed by a key the builders trust: certified, so they go to the shared store.
    sign_locally(d.path(), &all);
    let key = key_arg();
    for (proto, name) in [("ssh-ng", "ng"), ("ssh", "legacy")] {
        let state = d.path().join(format!("state-{name}"));
        let w = wrapper(d.path(), name, &state, &[&key]);
        let url = format!("{proto}://localhost?remote-program={}", w.display());
        // Each `nix` command is a new builder process (a new connection): what the first
        // received, the next serve.
        copy_round_trip(&url, &top, &all, &d.path().join(format!("back-{name}")));
        assert_eq!(files(&state, "tmp"), 0);
        assert_eq!(files(&state, "nar"), 3);
    }
}

#[test]
fn two_processes_upload_at_once() {
    require_nix();
    let d = tempfile::tempdir().unwrap();
    let (top_a, all_a) = local_closure(d.path(), "a");
    let (top_b, all_b) = local_closure(d.path(), "b");
    sign_locally(d.path(), &[all_a.clone(), all_b.clone()].concat());
    let state = d.path().join("state");
    let w = wrapper(d.path(), "builder", &state, &[&key_arg()]);
    let url = format!("ssh-ng://localhost?remote-program={}", w.display());
    let spawn = |top: &str| {
        Command::new("nix")
            .args(["copy", "--to", &url, top])
            .env("NIX_CONFIG", NIX_CONFIG)
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (spawn(&top_a), spawn(&top_b));
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
    let mut all: Vec<String> = all_a.into_iter().chain(all_b).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 4, "busybox and dep are shared");
    let paths: Vec<StorePath> = all.iter().map(|p| StorePath::parse(p).unwrap()).collect();
    let refs: Vec<&StorePath> = paths.iter().collect();
    assert_eq!(valid_in(&state, &refs).len(), 4);
    assert_eq!(files(&state, "nar"), 4, "each path stored once");
}

#[test]
fn hang_up_mid_nar_registers_nothing() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    let a = fake_path("half", 1);
    let b = fake_path("whole", 2);
    let nar = nar_of(&[42u8; 100_000]);
    // Signed by a key the builder trusts: paths any client may upload to the shared store.
    let key = key_arg();
    let info_for = |p: &StorePath, nar: &[u8], refs: &[&StorePath]| signed(info_for(p, nar, refs));

    // AddToStoreNar: the client hangs up after half the NAR.
    let mut p = Peer::spawn(&state, &["--stdio", &key], LIMIT);
    p.worker_handshake(0x122, &[]);
    p.add_to_store_nar(&info_for(&a, &nar, &[]), &nar, Some(nar.len() / 2));
    p.hang_up();
    let (st, err) = p.finish();
    assert!(!st.success() && err.contains("nothing of it was registered"), "{st}: {err}");

    // AddMultipleToStore: a complete first path, then the hang-up inside the second NAR.
    let mut p = Peer::spawn(&state, &["--stdio", &key], LIMIT);
    p.worker_handshake(0x122, &[]);
    p.w().write_u64(44).unwrap();
    p.w().write_u64(0).unwrap();
    p.w().write_u64(1).unwrap();
    let mut payload = Vec::new();
    payload.write_u64(2).unwrap();
    types::write_upload_info(&mut payload, &info_for(&b, &nar, &[])).unwrap();
    payload.extend_from_slice(&nar);
    types::write_upload_info(&mut payload, &info_for(&a, &nar, &[])).unwrap();
    payload.extend_from_slice(&nar[..1000]);
    let mut fw = FramedWriter::new(p.w());
    fw.write_all(&payload).unwrap();
    fw.flush().unwrap();
    p.hang_up();
    let (st, _) = p.finish();
    assert!(!st.success());

    // Serve protocol AddToStoreNar (raw NAR): the same.
    let mut p = Peer::spawn(&state, &["--serve", "--write", &key], LIMIT);
    p.serve_handshake(0x207);
    p.w().write_u64(9).unwrap();
    types::write_upload_info(p.w(), &info_for(&a, &nar, &[])).unwrap();
    p.w().write_all(&nar[..5000]).unwrap();
    p.hang_up();
    let (st, _) = p.finish();
    assert!(!st.success());

    assert!(
        valid_in(&state, &[&a, &b]).is_empty(),
        "nothing registered, not even the complete first path"
    );
    assert_eq!(files(&state, "nar"), 0);
    assert_eq!(files(&state, "tmp"), 0);
}

#[test]
fn corrupted_uploads_are_rejected_with_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    let nar = nar_of(b"the real contents");
    let other = nar_of(b"other contents");
    let a = fake_path("corrupt", 1);
    // Signed by a key the builder trusts (so the content checks are what refuses them).
    let key = key_arg();
    let info_for = |p: &StorePath, nar: &[u8], refs: &[&StorePath]| signed(info_for(p, nar, refs));

    let mut p = Peer::spawn(&state, &["--stdio", &key], LIMIT);
    p.worker_handshake(0x122, &[]);
    // Wrong NAR hash (signed as declared).
    let mut wrong = info_for(&a, &nar, &[]);
    wrong.info.nar_hash = info_for(&a, &other, &[]).info.nar_hash;
    let wrong = signed(wrong);
    p.add_to_store_nar(&wrong, &nar, None);
    let err = p.stderr_loop().unwrap_err();
    assert!(err.contains("NAR hash mismatch") && err.contains(&a.to_string()), "{err}");
    // A content address the contents do not reproduce.
    let lie = recursive_ca_info("claims-ca", &other, &nar);
    p.add_to_store_nar(&lie, &nar, None);
    let err = p.stderr_loop().unwrap_err();
    assert!(
        err.contains("claims content address")
            && err.contains("nothing of this upload was registered"),
        "{err}"
    );
    // A reference to a path that is nowhere.
    p.add_to_store_nar(&info_for(&a, &nar, &[&fake_path("absent", 9)]), &nar, None);
    let err = p.stderr_loop().unwrap_err();
    assert!(err.contains("absent") && err.contains("neither in vouch's content store"), "{err}");
    // More bytes than the declared NAR size: refused before anything is committed.
    let mut longer = nar.clone();
    longer.extend_from_slice(&[0u8; 16]);
    p.add_to_store_nar(&info_for(&a, &nar, &[]), &longer, None);
    let err = p.stderr_loop().unwrap_err();
    assert!(err.contains("after its last NAR"), "{err}");
    // The session goes on: a good upload after the bad ones works.
    p.add_to_store_nar(&info_for(&a, &nar, &[]), &nar, None);
    p.expect_last();
    let (st, _) = p.finish();
    assert!(st.success());
    assert_eq!(valid_in(&state, &[&a, &lie.path]), BTreeSet::from([a.to_string()]));

    // Serve protocol: no error channel; the message goes to stderr and the process exits.
    let b = fake_path("corrupt-serve", 3);
    let mut p = Peer::spawn(&state, &["--serve", "--write", &key], LIMIT);
    p.serve_handshake(0x207);
    let mut wrong = info_for(&b, &nar, &[]);
    wrong.info.nar_hash.0[0] ^= 0xff;
    let wrong = signed(wrong);
    p.w().write_u64(9).unwrap();
    types::write_upload_info(p.w(), &wrong).unwrap();
    p.w().write_all(&nar).unwrap();
    p.w().flush().unwrap();
    assert!(p.at_eof(), "the server ends the session");
    let (st, err) = p.finish();
    assert!(!st.success() && err.contains("NAR hash mismatch"), "{err}");
    assert!(valid_in(&state, &[&b]).is_empty());
}

#[test]
fn unknown_and_unsupported_operations_get_clean_errors() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    for (op, want) in [(99u64, "unknown worker operation 99"), (7, "operation 7 (AddToStore)")] {
        let mut p = Peer::spawn(&state, &["--stdio"], LIMIT);
        p.worker_handshake(0x122, &[]);
        p.w().write_u64(op).unwrap();
        p.w().flush().unwrap();
        let err = p.stderr_loop().unwrap_err();
        assert!(err.contains(want), "{err}");
        assert!(p.at_eof(), "the connection closes after an operation it cannot skip");
        p.finish();
    }
    for (cmd, want) in [(42u64, "unknown serve command 42"), (6, "serve command 6 (BuildPaths)")] {
        let mut p = Peer::spawn(&state, &["--serve", "--write"], LIMIT);
        p.w().write_u64(SERVE_MAGIC_1).unwrap();
        p.w().write_u64(0x207).unwrap();
        p.w().write_u64(cmd).unwrap();
        p.w().flush().unwrap();
        p.from.read_u64().unwrap();
        p.from.read_u64().unwrap();
        assert!(p.at_eof());
        let (st, err) = p.finish();
        assert!(!st.success() && err.contains(want), "{err}");
    }
    // Serve without --write refuses uploads and builds.
    let mut p = Peer::spawn(&state, &["--serve"], LIMIT);
    p.w().write_u64(SERVE_MAGIC_1).unwrap();
    p.w().write_u64(0x207).unwrap();
    p.w().write_u64(9).unwrap();
    p.w().flush().unwrap();
    let (st, err) = p.finish();
    assert!(!st.success() && err.contains("needs --write"), "{err}");
}

#[test]
fn eviction_never_removes_pinned_paths() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    let nar = nar_of(&[1u8; 2000]);
    let big = nar_of(&[2u8; 4000]);
    let max = "5000";
    let key = key_arg();
    let args = ["--stdio", "--store-max-size", max, &key];
    let upload = |p: &mut Peer, path: &StorePath, nar: &[u8]| {
        p.add_to_store_nar(&signed(info_for(path, nar, &[])), nar, None);
        p.stderr_loop()
    };
    let (pinned, x, y, z) =
        (fake_path("pinned", 1), fake_path("x", 2), fake_path("y", 3), fake_path("z", 4));

    // Session A uploads `pinned` and stays connected (its uploads are pinned while it lives).
    let mut a = Peer::spawn(&state, &args, LIMIT);
    a.worker_handshake(0x122, &[]);
    upload(&mut a, &pinned, &nar).unwrap();
    // Another session uploads x and ends; the next needs room for y: x goes, `pinned` stays.
    let mut b = Peer::spawn(&state, &args, LIMIT);
    b.worker_handshake(0x122, &[]);
    upload(&mut b, &x, &nar).unwrap();
    b.finish();
    let mut c = Peer::spawn(&state, &args, LIMIT);
    c.worker_handshake(0x122, &[]);
    upload(&mut c, &y, &nar).unwrap();
    c.finish();
    assert_eq!(
        valid_in(&state, &[&pinned, &x, &y]),
        BTreeSet::from([pinned.to_string(), y.to_string()])
    );
    // z only fits without `pinned`: refused while A lives, and nothing changes.
    let mut e = Peer::spawn(&state, &args, LIMIT);
    e.worker_handshake(0x122, &[]);
    let err = upload(&mut e, &z, &big).unwrap_err();
    assert!(err.contains("content store is full") && err.contains("pinned"), "{err}");
    e.finish();
    assert_eq!(
        valid_in(&state, &[&pinned, &y, &z]),
        BTreeSet::from([pinned.to_string(), y.to_string()])
    );
    // A ends (its pins die with its process): now z fits.
    a.finish();
    let mut f = Peer::spawn(&state, &args, LIMIT);
    f.worker_handshake(0x122, &[]);
    upload(&mut f, &z, &big).unwrap();
    f.finish();
    assert_eq!(valid_in(&state, &[&pinned, &y, &z]), BTreeSet::from([z.to_string()]));
}

#[test]
fn build_with_missing_inputs_fails_cleanly_in_both_formats() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    let drv_path = StorePath::parse("/nix/store/0000000000000000000000000000000a-x.drv").unwrap();
    let drv = build_trace::BasicDerivation {
        name: "x".into(),
        outputs: [(
            "out".to_string(),
            build_trace::DrvOutput {
                path: None,
                hash_algo: "r:sha256".into(),
                hash: String::new(),
            },
        )]
        .into(),
        input_srcs: [fake_path("not-uploaded", 5)].into(),
        system: "x86_64-linux".into(),
        builder: "/bin/sh".into(),
        args: vec![],
        env: Default::default(),
    };
    for (version, features) in [(0x122u64, vec![]), (0x126, vec![FEATURE_REALISATION_WITH_PATH])] {
        let mut p = Peer::spawn(&state, &["--stdio"], LIMIT);
        let (_, _, feats) = p.worker_handshake(version, &features);
        p.w().write_u64(36).unwrap();
        p.w().write_str(&drv_path.to_string()).unwrap();
        types::write_basic_derivation(p.w(), &drv).unwrap();
        p.w().write_u64(0).unwrap();
        p.w().flush().unwrap();
        p.expect_last();
        let profile = ClientProfile::new(Protocol::Worker, version, feats.into_iter().collect());
        let res = types::read_build_result(&mut p.from, &profile).unwrap();
        assert_eq!(res.status, BuildStatus::MiscFailure);
        assert!(res.error_msg.contains("not in vouch's content store"), "{}", res.error_msg);
        assert!(res.built_outputs.is_empty());
        assert!(p.finish().0.success());
    }
}

/// The real build hook reaches `BuildDerivation` over both protocols (inputs uploaded and
/// checked first), and a step that cannot run (here: no guest image) fails with vouch's
/// message in Nix's error, registering nothing.
#[test]
fn nix_build_hook_reports_a_step_that_cannot_run() {
    require_nix();
    let d = tempfile::tempdir().unwrap();
    busybox_dir(&d.path().join("bb"));
    let n = nonce();
    let file = d.path().join("ca.nix");
    std::fs::write(
        &file,
        format!(
            r#"let bb = builtins.path {{ path = ./bb; name = "busybox"; }}; in derivation {{
  name = "hook-{n}"; system = builtins.currentSystem; builder = "${{bb}}/sh"; args = [ "-c" "mkdir $out" ];
  __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; }}"#
        ),
    )
    .unwrap();
    for proto in ["ssh-ng", "ssh"] {
        let state = d.path().join(format!("state-{proto}"));
        let w = wrapper(
            d.path(),
            &format!("b-{proto}"),
            &state,
            &["--image", "/nonexistent-vouch-image"],
        );
        let machines = format!(
            "{proto}://localhost?remote-program={} x86_64-linux - 1 1 ca-derivations",
            w.display()
        );
        let out = nix(&[
            "nix-build",
            file.to_str().unwrap(),
            "--no-out-link",
            "--max-jobs",
            "0",
            "--builders",
            &machines,
        ]);
        let t = text(&out);
        assert!(!out.status.success(), "{t}");
        assert!(
            t.contains("failed: vouch: guest image in /nonexistent-vouch-image"),
            "{proto}: {t}"
        );
        // The input (busybox, content-addressed) was uploaded and checked; no output exists.
        let conn = std::process::Command::new("sqlite3")
            .arg(state.join("store/index.sqlite"))
            .arg("SELECT path FROM paths")
            .output()
            .expect("sqlite3 (scripts/setup-host.sh installs it)");
        let rows = String::from_utf8_lossy(&conn.stdout).into_owned();
        assert_eq!(rows.lines().count(), 1, "{rows}");
        assert!(rows.trim().ends_with("-busybox"), "{rows}");
        assert!(!state.join("cache").join("vouch").exists(), "no step published");
    }
}
