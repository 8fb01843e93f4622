//! Who `vouch nix-builder` trusts, without VMs: the real binary on stdin/stdout and on a socket,
//! scripted protocol peers and the real Nix 2.8.
//!
//! - the handshake's `trusted` flag says what the operator configured (`--trusted`,
//!   `--trusted-user` by the peer's uid), never "trusted" by default;
//! - a client vouch does not trust cannot upload a path that has neither a content address nor
//!   a signature by a `--trusted-public-key`, over either protocol and from a real `nix copy`:
//!   the error names the rule, and nothing of the batch is registered;
//! - a trusted client's unsigned upload stays in its own session: another connection, and a
//!   later process, do not see it, and it is gone when the session ends;
//! - an untrusted client's input-addressed `BuildDerivation` is refused naming the rule, and
//!   `BuildPathsWithResults` answers per derived path.
//!
//! Every check of the shared store goes through another connection or process.

#[path = "nix_builder/peer.rs"]
mod peer;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use host_launcher::nixproto::version::{ClientProfile, Protocol};
use host_launcher::nixproto::wire::{FramedWriter, WireRead, WireWrite};
use host_launcher::nixproto::{types, BuildStatus};
use peer::*;
use test_support::server::SocketServer;

const LIMIT: Duration = Duration::from_secs(120);
/// Part of the message that names the upload rule.
const UPLOAD_RULE: &str =
    "neither a content address nor a signature by a key this builder trusts (--trusted-public-key)";
/// Part of the message that names the build rule.
const BUILD_RULE: &str = "only from its .drv closure (BuildPaths)";

/// `AddToStoreNar` (39) of `nar` at `info`; the server's answer.
fn upload(
    p: &mut Peer,
    info: &host_launcher::core::ValidPathInfo,
    nar: &[u8],
) -> Result<(), String> {
    p.add_to_store_nar(info, nar, None);
    p.stderr_loop()
}

fn socket_server(dir: &Path, name: &str, extra: &[&str]) -> SocketServer {
    let state = dir.join(format!("state-{name}"));
    SocketServer::start(Path::new(vouch()), &state, &dir.join(format!("{name}.sock")), extra, &[])
}

#[test]
fn the_handshake_says_whether_the_operator_trusts_the_client() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    // stdin/stdout (ssh): `--trusted` in the key's forced command, else not trusted.
    for (args, want) in [(&["--stdio"][..], 2), (&["--trusted", "--stdio"][..], 1)] {
        let mut p = Peer::spawn(&state, args, LIMIT);
        assert_eq!(p.worker_handshake(0x125, &[]).1, Some(want), "{args:?}");
        p.finish();
    }
    // A socket: by the peer's uid (this test runs as root, uid 0).
    let me = ::nix::unistd::getuid().as_raw().to_string();
    let name = ::nix::unistd::User::from_uid(::nix::unistd::getuid()).unwrap().unwrap().name;
    for (extra, want) in [
        (vec![], 2),
        (vec!["--trusted-user", "4242"], 2),
        (vec!["--trusted-user", &me], 1),
        (vec!["--trusted-user", "4242", "--trusted-user", &name], 1),
    ] {
        let server = socket_server(d.path(), "t", &extra);
        let mut p = Peer::connect(&server.socket, LIMIT);
        assert_eq!(p.worker_handshake(0x126, &[]).1, Some(want), "{extra:?}");
        let (st, log) = server.stop("TERM");
        assert!(st.success() && log.contains(&format!("trusted={}", want == 1)), "{log}");
    }
    // A user that does not exist, and `--trusted` on a socket, are refused at start.
    for args in [
        &["--listen", "x.sock", "--trusted-user", "no-such-user-here"][..],
        &["--listen", "x.sock", "--trusted"],
    ] {
        let out = std::process::Command::new(vouch())
            .arg("--state-dir")
            .arg(&state)
            .arg("nix-builder")
            .args(args)
            .current_dir(d.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(text(&out).contains("--trusted"), "{}", text(&out));
    }
}

#[test]
fn an_untrusted_client_cannot_upload_what_vouch_cannot_certify() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    let victim = fake_path("dep", 1);
    let evil = nar_of(b"the attacker's bytes");
    let (ca_nar, other) = (nar_of(b"a source"), nar_of(b"unused"));
    let ca = recursive_ca_info("source", &ca_nar, &ca_nar);

    // Worker protocol, one path: refused, naming the rule; the session goes on.
    let mut p = Peer::spawn(&state, &["--stdio", &key_arg()], LIMIT);
    p.worker_handshake(0x125, &[]);
    let err = upload(&mut p, &info_for(&victim, &evil, &[]), &evil).unwrap_err();
    assert!(err.contains(UPLOAD_RULE) && err.contains(&victim.to_string()), "{err}");
    // Signed by a key the operator did not name: the same.
    let mut by_stranger = info_for(&victim, &evil, &[]);
    let stranger = nix_formats::signing::SecretKey::from_seed("stranger-1", [9; 32]);
    let fp = nix_formats::narinfo::fingerprint(
        &victim,
        &nix_formats::Hash::sha256(by_stranger.info.nar_hash.0),
        by_stranger.info.nar_size,
        &BTreeSet::new(),
    );
    by_stranger.sigs.insert(stranger.sign(fp.as_bytes()).to_string());
    assert!(upload(&mut p, &by_stranger, &evil).unwrap_err().contains(UPLOAD_RULE));
    // A batch with a content-addressed path and an unsigned one: nothing of it registered.
    p.w().write_u64(44).unwrap();
    p.w().write_u64(0).unwrap();
    p.w().write_u64(1).unwrap();
    let mut payload = Vec::new();
    payload.write_u64(2).unwrap();
    types::write_upload_info(&mut payload, &ca).unwrap();
    payload.extend_from_slice(&ca_nar);
    types::write_upload_info(&mut payload, &info_for(&victim, &evil, &[])).unwrap();
    payload.extend_from_slice(&evil);
    let mut fw = FramedWriter::new(p.w());
    fw.write_all(&payload).unwrap();
    fw.finish().unwrap();
    p.w().flush().unwrap();
    assert!(p.stderr_loop().unwrap_err().contains(UPLOAD_RULE));
    // What vouch can certify is for anyone: content-addressed, or signed by the operator's key.
    upload(&mut p, &ca, &ca_nar).unwrap();
    let signed_other = signed(info_for(&fake_path("signed", 2), &other, &[]));
    upload(&mut p, &signed_other, &other).unwrap();
    assert!(p.finish().0.success());
    let want = BTreeSet::from([ca.path.to_string(), signed_other.path.to_string()]);
    assert_eq!(valid_in(&state, &[&victim, &ca.path, &signed_other.path]), want);

    // Serve protocol: no error channel; the rule goes to stderr and the process exits.
    let mut p = Peer::spawn(&state, &["--serve", "--write"], LIMIT);
    p.serve_handshake(0x207);
    p.w().write_u64(9).unwrap();
    types::write_upload_info(p.w(), &info_for(&victim, &evil, &[])).unwrap();
    p.w().write_all(&evil).unwrap();
    p.w().flush().unwrap();
    assert!(p.at_eof());
    let (st, err) = p.finish();
    assert!(!st.success() && err.contains(UPLOAD_RULE), "{err}");
    assert!(valid_in(&state, &[&victim]).is_empty());

    // A real Nix 2.8 `nix copy` of an input-addressed closure: the user sees the rule.
    require_nix();
    let (top, _) = local_closure(d.path(), "u");
    let w = wrapper(d.path(), "untrusted", &state, &[]);
    let out = nix(&[
        "nix",
        "copy",
        "--to",
        &format!("ssh-ng://localhost?remote-program={}", w.display()),
        &top,
    ]);
    assert!(!out.status.success() && text(&out).contains(UPLOAD_RULE), "{}", text(&out));
}

#[test]
fn a_trusted_clients_unsigned_upload_stays_in_its_session() {
    let d = tempfile::tempdir().unwrap();
    let me = ::nix::unistd::getuid().as_raw().to_string();
    let server = socket_server(d.path(), "b", &["--trusted-user", &me]);
    let state = d.path().join("state-b");
    let x = fake_path("dep", 1);
    let (mine, theirs) = (nar_of(b"a's dep"), nar_of(b"b's dep"));

    // Two trusted sessions at once upload different bytes under one path name: each sees its
    // own, nobody else sees either.
    let mut a = Peer::connect(&server.socket, LIMIT);
    let mut b = Peer::connect(&server.socket, LIMIT);
    for p in [&mut a, &mut b] {
        assert_eq!(p.worker_handshake(0x125, &[]).1, Some(1));
    }
    upload(&mut a, &info_for(&x, &mine, &[]), &mine).unwrap();
    assert_eq!(a.query_valid(&[&x]).len(), 1);
    assert!(b.query_valid(&[&x]).is_empty(), "another session does not see a's upload");
    upload(&mut b, &info_for(&x, &theirs, &[]), &theirs).unwrap();
    for (p, nar) in [(&mut a, &mine), (&mut b, &theirs)] {
        p.w().write_u64(38).unwrap(); // NarFromPath
        p.w().write_str(&x.to_string()).unwrap();
        p.w().flush().unwrap();
        p.expect_last();
        let mut got = vec![0u8; nar.len()];
        std::io::Read::read_exact(&mut p.from, &mut got).unwrap();
        assert_eq!(&got, nar, "each session reads its own bytes");
    }
    // A `unix://` client reads a path from the one directory its URI names (`real=`): there,
    // one name has one tree, and the second session is told so instead of shown a's bytes.
    let path_info = |p: &mut Peer| {
        p.w().write_u64(26).unwrap(); // QueryPathInfo
        p.w().write_str(&x.to_string()).unwrap();
        p.w().flush().unwrap();
        p.stderr_loop()
    };
    path_info(&mut a).unwrap();
    assert_eq!(a.from.read_u64().unwrap(), 1);
    types::read_unkeyed_path_info(&mut a.from, x.clone(), 0x125).unwrap();
    let err = path_info(&mut b).unwrap_err();
    assert!(err.contains("unpacked for another session with other contents"), "{err}");
    assert!(valid_in(&state, &[&x]).is_empty(), "not in the shared store");
    let sessions =
        || std::fs::read_dir(state.join("store/sessions")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(sessions(), 2);
    a.hang_up();
    assert!(a.at_eof());
    b.hang_up();
    assert!(b.at_eof());
    let t0 = std::time::Instant::now();
    while sessions() > 0 {
        assert!(t0.elapsed() < LIMIT, "the overlays outlived their sessions");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (st, log) = server.stop("TERM");
    assert!(st.success(), "{log}");

    // Over ssh (`--trusted` in the forced command): the same, per process.
    let mut p = Peer::spawn(&state, &["--trusted", "--stdio"], LIMIT);
    p.worker_handshake(0x125, &[]);
    upload(&mut p, &info_for(&x, &mine, &[]), &mine).unwrap();
    assert_eq!(p.query_valid(&[&x]).len(), 1);
    assert!(valid_in(&state, &[&x]).is_empty());
    assert!(p.finish().0.success());
}

#[test]
fn an_untrusted_clients_input_addressed_build_derivation_is_refused_naming_the_rule() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    let out = fake_path("ia-out", 3);
    let drv_path = fake_path("ia.drv", 4);
    let output = build_trace::DrvOutput {
        path: Some(out.clone()),
        hash_algo: String::new(),
        hash: String::new(),
    };
    let drv = build_trace::BasicDerivation {
        name: "ia".into(),
        outputs: [("out".to_string(), output)].into(),
        input_srcs: BTreeSet::new(),
        system: "x86_64-linux".into(),
        builder: "/bin/sh".into(),
        args: vec![],
        env: Default::default(),
    };
    let image = ["--image", "/nonexistent-vouch-image"];
    for (trust, want) in
        [(None, BUILD_RULE), (Some("--trusted"), "guest image in /nonexistent-vouch-image")]
    {
        // Worker protocol.
        let mut args = vec!["--stdio"];
        args.extend(trust);
        args.extend(image);
        let mut p = Peer::spawn(&state, &args, LIMIT);
        let (_, _, feats) = p.worker_handshake(0x125, &[]);
        p.w().write_u64(36).unwrap();
        p.w().write_str(&drv_path.to_string()).unwrap();
        types::write_basic_derivation(p.w(), &drv).unwrap();
        p.w().write_u64(0).unwrap();
        p.w().flush().unwrap();
        p.expect_last();
        let profile = ClientProfile::new(Protocol::Worker, 0x125, feats.into_iter().collect());
        let res = types::read_build_result(&mut p.from, &profile).unwrap();
        assert!(!res.status.is_success(), "{trust:?}");
        assert!(res.error_msg.contains(want), "{trust:?}: {}", res.error_msg);
        assert!(p.finish().0.success());
        // Serve protocol (`ssh://`): the same answer.
        let mut args = vec!["--serve", "--write"];
        args.extend(trust);
        args.extend(image);
        let mut p = Peer::spawn(&state, &args, LIMIT);
        p.serve_handshake(0x207);
        p.w().write_u64(8).unwrap();
        p.w().write_str(&drv_path.to_string()).unwrap();
        types::write_basic_derivation(p.w(), &drv).unwrap();
        let options = host_launcher::nixproto::BuildOptions::default();
        types::write_build_options(p.w(), &options, 0x207).unwrap();
        p.w().flush().unwrap();
        let profile = ClientProfile::new(Protocol::Serve, 0x207, BTreeSet::new());
        let res = types::read_build_result(&mut p.from, &profile).unwrap();
        assert!(res.error_msg.contains(want), "serve {trust:?}: {}", res.error_msg);
        p.finish();
    }
    assert!(valid_in(&state, &[&out]).is_empty());

    // BuildPathsWithResults (what Nix ≥ 2.16 sends instead): one result per derived path.
    let mut p = Peer::spawn(&state, &["--stdio"], LIMIT);
    p.worker_handshake(0x125, &[]);
    p.w().write_u64(46).unwrap();
    let wanted = vec![format!("{drv_path}!*"), out.to_string()];
    p.w().write_strings(&wanted).unwrap();
    p.w().write_u64(0).unwrap();
    p.w().flush().unwrap();
    p.expect_last();
    assert_eq!(p.from.read_u64().unwrap(), 2);
    let profile = ClientProfile::new(Protocol::Worker, 0x125, BTreeSet::new());
    for w in &wanted {
        assert_eq!(&p.from.read_string("path").unwrap(), w);
        let res = types::read_build_result(&mut p.from, &profile).unwrap();
        assert_eq!(res.status, BuildStatus::MiscFailure);
        assert!(res.error_msg.contains("is not in vouch's content store"), "{}", res.error_msg);
    }
    let (st, log) = p.finish();
    assert!(st.success(), "{log}");
    assert!(log.contains("upload the .drv closure first"), "{log}");
}

/// The real Nix 2.8 as an untrusted client: its build hook uploads the (content-addressed)
/// inputs and sends `BuildDerivation` for an input-addressed step, which is refused before any
/// VM with the rule in the user's error. No VM: the refusal comes first.
#[test]
fn nix_2_8_untrusted_sees_the_rule_for_an_input_addressed_step() {
    require_nix();
    let d = tempfile::tempdir().unwrap();
    busybox_dir(&d.path().join("bb"));
    let file = d.path().join("ia.nix");
    std::fs::write(
        &file,
        format!(
            r#"let bb = builtins.path {{ path = ./bb; name = "busybox"; }}; in derivation {{
  name = "ia-{}"; system = builtins.currentSystem; builder = "${{bb}}/sh"; args = [ "-c" "mkdir $out" ]; }}"#,
            nonce()
        ),
    )
    .unwrap();
    let state = d.path().join("state");
    let w = wrapper(d.path(), "untrusted", &state, &["--image", "/nonexistent-vouch-image"]);
    let machines = format!("ssh-ng://localhost?remote-program={} x86_64-linux - 1 1", w.display());
    let f = file.to_str().unwrap();
    let out = nix(&["nix-build", f, "--no-out-link", "--max-jobs", "0", "--builders", &machines]);
    let t = text(&out);
    assert!(!out.status.success() && t.contains(BUILD_RULE), "{t}");
    assert!(!t.contains("guest image"), "refused before any VM: {t}");
}
