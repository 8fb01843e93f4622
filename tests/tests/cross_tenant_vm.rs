//! Cross-tenant input poisoning (issue 12, item 2), end to end: two clients of one `vouch
//! nix-builder` (one content store), the real Nix 2.8 as the victim, a real VM for its build.
//!
//! Client B (trusted, as Nix's build hook needs) builds `top` remotely on `dep`, which it built
//! itself. Client A, not trusted, first uploads other bytes under `dep`'s path name (it can
//! compute the name from B's expression). Before the fix vouch registered A's upload in the
//! shared store, B's `nix copy` of the inputs skipped `dep` as already valid, and B's `top` was
//! built from A's bytes and signed. Now A's upload is refused naming the rule, B's build reads
//! B's own `dep`, and what B uploaded (and what was built from it) stays in B's session; the
//! trace store keeps `top`'s step but no cache entry for it. 1 VM.

use std::collections::BTreeSet;
use std::io::{BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use host_launcher::core::ValidPathInfo;
use host_launcher::nixproto::types;
use host_launcher::nixproto::wire::{FramedWriter, WireRead, WireWrite};
use host_launcher::nixproto::worker::{STDERR_ERROR, STDERR_LAST, WORKER_MAGIC_1, WORKER_MAGIC_2};
use nix_formats::nar::NarWriter;
use nix_formats::StorePath;
use test_support::nix::{nonce, text};
use test_support::vm::{builder_wrapper, nix, vouch_bin, Scratch, NIX_CONFIG};

/// A NAR of a directory holding one file `data`.
fn dir_nar(data: &[u8]) -> Vec<u8> {
    let mut w = NarWriter::new(Vec::new()).unwrap();
    w.dir_start().unwrap();
    w.entry(b"data").unwrap();
    w.regular(false, data).unwrap();
    w.entry_end().unwrap();
    w.dir_end().unwrap();
    w.into_inner()
}

/// A worker-protocol client (as Nix 2.20, protocol 1.37) of `vouch nix-builder ARGS…` on the
/// state directory `state`, after its handshake.
struct Client {
    child: Child,
    w: ChildStdin,
    r: BufReader<ChildStdout>,
    /// The handshake's trusted flag.
    trusted: u64,
}

impl Client {
    fn start(state: &Path, args: &[&str]) -> Client {
        let mut child = Command::new(vouch_bin())
            .arg("--state-dir")
            .arg(state)
            .arg("nix-builder")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut w = child.stdin.take().unwrap();
        let mut r = BufReader::new(child.stdout.take().unwrap());
        for word in [WORKER_MAGIC_1, 0x125, 0, 0] {
            w.write_u64(word).unwrap();
        }
        w.flush().unwrap();
        assert_eq!(r.read_u64().unwrap(), WORKER_MAGIC_2);
        r.read_u64().unwrap();
        r.read_string("version").unwrap();
        let trusted = r.read_u64().unwrap();
        assert_eq!(r.read_u64().unwrap(), STDERR_LAST);
        Client { child, w, r, trusted }
    }

    /// `STDERR_LAST`, or the message of `STDERR_ERROR`.
    fn answer(&mut self) -> Result<(), String> {
        match self.r.read_u64().unwrap() {
            STDERR_LAST => Ok(()),
            STDERR_ERROR => {
                self.r.read_string("type").unwrap();
                self.r.read_u64().unwrap();
                self.r.read_string("name").unwrap();
                Err(self.r.read_string("message").unwrap())
            }
            other => panic!("unexpected answer {other:#x}"),
        }
    }

    /// `AddToStoreNar` of `nar` at `path`, unsigned, without a content address.
    fn upload(&mut self, path: &StorePath, nar: &[u8]) -> Result<(), String> {
        let info = ValidPathInfo {
            path: path.clone(),
            info: build_trace::PathInfo {
                nar_hash: build_trace::NarHash::of(nar),
                nar_size: nar.len() as u64,
                references: Default::default(),
                ca: None,
            },
            deriver: None,
            registration_time: 0,
            ultimate: false,
            sigs: Default::default(),
        };
        self.w.write_u64(39).unwrap(); // AddToStoreNar
        types::write_upload_info(&mut self.w, &info).unwrap();
        self.w.write_u64(0).unwrap(); // repair
        self.w.write_u64(1).unwrap(); // dontCheckSigs, as Nix's hook sends it
        let mut fw = FramedWriter::new(&mut self.w);
        fw.write_all(nar).unwrap();
        fw.finish().unwrap();
        self.w.flush().unwrap();
        self.answer()
    }

    /// `QueryValidPaths`.
    fn valid(&mut self, paths: &[&str]) -> Vec<String> {
        self.w.write_u64(31).unwrap();
        let set: BTreeSet<StorePath> = paths.iter().map(|p| StorePath::parse(p).unwrap()).collect();
        types::write_store_path_set(&mut self.w, &set).unwrap();
        self.w.write_u64(0).unwrap();
        self.w.flush().unwrap();
        self.answer().unwrap();
        self.r.read_string_list("valid").unwrap()
    }

    fn finish(mut self) {
        drop(self.w);
        let mut rest = Vec::new();
        let _ = self.r.read_to_end(&mut rest);
        self.child.wait().unwrap();
    }
}

/// Which of `paths` a new, untrusted builder process (another session) reports valid.
fn shared_valid(state: &Path, paths: &[&str]) -> Vec<String> {
    let mut c = Client::start(state, &["--stdio"]);
    let valid = c.valid(paths);
    c.finish();
    valid
}

#[test]
fn an_untrusted_client_cannot_poison_the_inputs_of_another_clients_build() {
    let s = Scratch::new();
    let n = nonce();
    let file = s.write(
        "victim.nix",
        &format!(
            r#"let
  bb = builtins.path {{ path = ./bb; name = "busybox"; }};
  mk = name: script: derivation {{ inherit name; system = builtins.currentSystem; builder = "${{bb}}/sh"; args = [ "-c" script ]; }};
in rec {{
  dep = mk "tenant-dep" "mkdir $out; echo b-{n} > $out/data";
  top = mk "tenant-top" "mkdir $out; cat ${{dep}}/data > $out/data";
}}"#
        ),
    );
    let f = file.to_str().unwrap();
    let state = s.state();

    // B builds `dep` itself (locally); A knows its path from the expression.
    let out = nix(&["nix-build", f, "-A", "dep", "--no-out-link"]);
    assert!(out.status.success(), "{}", text(&out));
    let dep = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let dep_path = StorePath::parse(&dep).unwrap();

    // A, not trusted: its upload of other bytes under that name is refused, naming the rule.
    let poison = dir_nar(b"poisoned by a\n");
    let mut a = Client::start(&state, &["--stdio"]);
    assert_eq!(a.trusted, 2, "A is told it is not trusted");
    let err =
        a.upload(&dep_path, &poison).expect_err("an unsigned upload without a content address");
    a.finish();
    assert!(
        err.contains("neither a content address nor a signature by a key this builder trusts"),
        "{err}"
    );
    assert!(shared_valid(&state, &[&dep]).is_empty(), "nothing of A's upload registered");

    // B, trusted (`--trusted` in its key's forced command), builds `top` on the builder: its
    // hook uploads B's own `dep`, and `top` holds B's bytes.
    let w = builder_wrapper(s.dir.path(), "b", &state, "--trusted");
    let machines = format!("ssh-ng://localhost?remote-program={} x86_64-linux - 1 1", w.display());
    let out = Command::new("nix-build")
        .env("NIX_CONFIG", NIX_CONFIG)
        .args([f, "-A", "top", "--no-out-link", "--max-jobs", "0", "--builders", &machines])
        .output()
        .unwrap();
    assert!(out.status.success(), "B's remote build: {}", text(&out));
    let top = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let data = std::fs::read_to_string(Path::new(&top).join("data")).unwrap();
    assert_eq!(data.trim(), format!("b-{n}"), "B's build used B's dep, not A's bytes");

    // What B uploaded unsigned, and `top` built from it, stayed in B's session: another client
    // sees neither (it would upload its own), and B's overlay is gone with its session.
    assert!(shared_valid(&state, &[&dep, &top]).is_empty());
    let sessions = std::fs::read_dir(state.join("store/sessions")).unwrap();
    assert_eq!(sessions.count(), 0);
    // The step itself is published (B is trusted): its statement names B's dep by NAR hash.
    let steps = std::fs::read_dir(state.join("cache/vouch/v1/steps")).unwrap();
    let names: Vec<String> =
        steps.map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert!(names.iter().any(|n| n.ends_with("-tenant-top.drv")), "{names:?}");
    // …but `top` read B's private `dep`, so the cache vouches for it to nobody else: no narinfo
    // (a client substituting from the cache would get bytes only B's upload vouched for).
    let top_hash = StorePath::parse(&top).unwrap().hash_part().to_owned();
    assert!(!state.join(format!("cache/{top_hash}.narinfo")).exists());
}
