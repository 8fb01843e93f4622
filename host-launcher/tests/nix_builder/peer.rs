//! Test helpers: the real `vouch nix-builder` process with a scripted protocol peer on its
//! stdin/stdout, a watchdog so a hang fails the test instead of stalling it, wrapper scripts
//! for a real Nix, and NAR/path fixtures. Running Nix, busybox and the guest image come from the
//! workspace's `test-support` crate (`test_support::{nix, vm}`).

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use build_trace::{NarHash, PathInfo};
use host_launcher::core::ValidPathInfo;
use host_launcher::nixproto::wire::{WireRead, WireWrite};
use host_launcher::nixproto::worker::{STDERR_ERROR, STDERR_LAST, WORKER_MAGIC_1, WORKER_MAGIC_2};
use nix_formats::nar::NarWriter;
use nix_formats::store_path::{make_fixed_output_path, FileIngestionMethod};
use nix_formats::StorePath;
use sha2::{Digest, Sha256};

// Each test binary that includes this file uses a part of these.
#[allow(unused_imports)]
pub use test_support::{
    nix::{self, busybox_dir, nix, nonce, require_nix, text, NIX_CONFIG},
    vm::{self, image_dir},
};

/// The `vouch` binary.
pub fn vouch() -> &'static str {
    env!("CARGO_BIN_EXE_vouch")
}

/// A wrapper script that runs `vouch --state-dir STATE nix-builder ARGS… "$@"` (what
/// `remote-program=` points at: Nix 2.8 runs `bash -c "PROG --stdio"` for `localhost`).
pub fn wrapper(dir: &Path, name: &str, state: &Path, extra: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let log = dir.join(format!("{name}.log"));
    let script = format!(
        "#!/bin/sh\nexec '{}' --state-dir '{}' -v nix-builder {} \"$@\" 2>>'{}'\n",
        vouch(),
        state.display(),
        extra.join(" "),
        log.display()
    );
    std::fs::write(&p, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// The Nix signing key the tests' builders trust (`--trusted-public-key`, [`key_arg`]): paths
/// it signed are certified, so any client may upload them to the shared store.
pub fn test_key() -> nix_formats::signing::SecretKey {
    nix_formats::signing::SecretKey::from_seed("vouch-test-1", [7; 32])
}

/// `--trusted-public-key=…` of [`test_key`].
pub fn key_arg() -> String {
    format!("--trusted-public-key={}", test_key().public_key())
}

/// `info` with [`test_key`]'s signature over its fingerprint.
pub fn signed(mut info: ValidPathInfo) -> ValidPathInfo {
    let fp = nix_formats::narinfo::fingerprint(
        &info.path,
        &nix_formats::Hash::sha256(info.info.nar_hash.0),
        info.info.nar_size,
        &info.info.references,
    );
    info.sigs.insert(test_key().sign(fp.as_bytes()).to_string());
    info
}

/// Sign `paths` in the local Nix store with [`test_key`] (`nix store sign`), so that `nix
/// copy` sends them with its signature.
pub fn sign_locally(dir: &Path, paths: &[String]) {
    let key = dir.join("test-key.sec");
    std::fs::write(&key, test_key().to_file_string()).unwrap();
    let mut args = vec!["nix", "store", "sign", "--key-file", key.to_str().unwrap()];
    args.extend(paths.iter().map(String::as_str));
    let out = nix(&args);
    assert!(out.status.success(), "nix store sign: {}", text(&out));
}

/// Which of `paths` a fresh, untrusted builder process on `state` reports valid.
pub fn valid_in(state: &Path, paths: &[&StorePath]) -> BTreeSet<String> {
    let mut p = Peer::spawn(state, &["--stdio"], Duration::from_secs(120));
    p.worker_handshake(0x122, &[]);
    let v = p.query_valid(paths);
    let (st, err) = p.finish();
    assert!(st.success(), "{err}");
    v
}

/// A NAR of one regular file.
pub fn nar_of(contents: &[u8]) -> Vec<u8> {
    let mut w = NarWriter::new(Vec::new()).unwrap();
    w.regular(false, contents).unwrap();
    w.into_inner()
}

/// A fake store path.
pub fn fake_path(name: &str, seed: u8) -> StorePath {
    StorePath::from_parts([seed; 20], name).unwrap()
}

/// Upload info for `nar` at `path`.
pub fn info_for(path: &StorePath, nar: &[u8], refs: &[&StorePath]) -> ValidPathInfo {
    ValidPathInfo {
        path: path.clone(),
        info: PathInfo {
            nar_hash: NarHash::of(nar),
            nar_size: nar.len() as u64,
            references: refs.iter().map(|r| (*r).clone()).collect(),
            ca: None,
        },
        deriver: None,
        registration_time: 0,
        ultimate: false,
        sigs: BTreeSet::new(),
    }
}

/// Upload info for `nar` at the path of `name` with the content address `fixed:r:sha256` of
/// `claimed` (the NAR itself for an honest claim, other bytes for a lie).
pub fn recursive_ca_info(name: &str, claimed: &[u8], nar: &[u8]) -> ValidPathInfo {
    let h = nix_formats::Hash::sha256(Sha256::digest(claimed).into());
    let path =
        make_fixed_output_path(name, FileIngestionMethod::Recursive, &h, &BTreeSet::new(), false)
            .unwrap();
    let mut info = info_for(&path, nar, &[]);
    info.info.ca = Some(format!("fixed:r:{h}"));
    info
}

/// A scripted peer of `vouch nix-builder`: a process it started (`--stdio`, `--serve`) or a
/// connection to a `--listen` socket.
pub struct Peer {
    pub child: Option<Child>,
    pub to: Option<Box<dyn Write + Send>>,
    pub from: BufReader<Box<dyn Read + Send>>,
    pub stderr_file: PathBuf,
    /// The connection, for a socket peer (to shut it down).
    sock: Option<UnixStream>,
    done: Arc<AtomicBool>,
}

impl Peer {
    /// Start `vouch --state-dir STATE nix-builder ARGS…`; it is killed after `limit`.
    pub fn spawn(state: &Path, args: &[&str], limit: Duration) -> Peer {
        let stderr_file = state.with_extension(format!("stderr-{}", nonce()));
        let err = std::fs::File::create(&stderr_file).unwrap();
        let mut child = Command::new(vouch())
            .arg("--state-dir")
            .arg(state)
            .arg("-v")
            .arg("nix-builder")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .unwrap();
        let to: Box<dyn Write + Send> = Box::new(child.stdin.take().unwrap());
        let from: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let from = BufReader::new(from);
        let done = Arc::new(AtomicBool::new(false));
        let pid = child.id() as i32;
        let flag = done.clone();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            while t0.elapsed() < limit {
                if flag.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if !flag.load(Ordering::Relaxed) {
                eprintln!("watchdog: the builder process hung; killing it");
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
        });
        Peer { child: Some(child), to: Some(to), from, stderr_file, sock: None, done }
    }

    /// Connect to a `vouch nix-builder --listen` socket (reads time out after `limit`).
    pub fn connect(socket: &Path, limit: Duration) -> Peer {
        let s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(limit)).unwrap();
        let from: Box<dyn Read + Send> = Box::new(s.try_clone().unwrap());
        Peer {
            child: None,
            to: Some(Box::new(s.try_clone().unwrap())),
            from: BufReader::new(from),
            stderr_file: PathBuf::new(),
            sock: Some(s.try_clone().unwrap()),
            done: Arc::new(AtomicBool::new(true)),
        }
    }

    /// The server's input.
    pub fn w(&mut self) -> &mut Box<dyn Write + Send> {
        self.to.as_mut().expect("the connection is still open")
    }

    /// Close our sending side (the client hangs up).
    pub fn hang_up(&mut self) {
        if let Some(mut w) = self.to.take() {
            let _ = w.flush();
        }
        if let Some(s) = &self.sock {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
    }

    /// Worker handshake as a Nix client of `version` with `features` (≥ 1.38); returns the
    /// server's version string, trusted flag (if any) and features.
    pub fn worker_handshake(
        &mut self,
        version: u64,
        features: &[&str],
    ) -> (String, Option<u64>, Vec<String>) {
        self.w().write_u64(WORKER_MAGIC_1).unwrap();
        self.w().write_u64(version).unwrap();
        self.w().flush().unwrap();
        assert_eq!(self.from.read_u64().unwrap(), WORKER_MAGIC_2);
        let server = self.from.read_u64().unwrap();
        assert_eq!(server, 0x126, "server speaks 1.38");
        let v = version.min(server) & 0xff;
        let mut feats = Vec::new();
        if v >= 38 {
            let f: Vec<String> = features.iter().map(|s| s.to_string()).collect();
            self.w().write_strings(&f).unwrap();
            self.w().flush().unwrap();
            feats = self.from.read_string_list("features").unwrap();
        }
        self.w().write_u64(0).unwrap(); // cpu affinity
        self.w().write_u64(0).unwrap(); // reserve space
        self.w().flush().unwrap();
        let ver = self.from.read_string("version").unwrap();
        let trusted = if v >= 35 { Some(self.from.read_u64().unwrap()) } else { None };
        self.expect_last();
        (ver, trusted, feats)
    }

    /// `QueryValidPaths` (31) on this worker connection.
    pub fn query_valid(&mut self, paths: &[&StorePath]) -> BTreeSet<String> {
        self.w().write_u64(31).unwrap();
        let set: BTreeSet<StorePath> = paths.iter().map(|p| (*p).clone()).collect();
        host_launcher::nixproto::types::write_store_path_set(self.w(), &set).unwrap();
        self.w().write_u64(0).unwrap();
        self.w().flush().unwrap();
        self.expect_last();
        self.from.read_string_set("valid").unwrap()
    }

    /// Send `AddToStoreNar` (39) with a framed NAR, optionally only its first `cut` bytes.
    pub fn add_to_store_nar(&mut self, info: &ValidPathInfo, nar: &[u8], cut: Option<usize>) {
        use host_launcher::nixproto::wire::FramedWriter;
        self.w().write_u64(39).unwrap();
        host_launcher::nixproto::types::write_upload_info(self.w(), info).unwrap();
        self.w().write_u64(0).unwrap(); // repair
        self.w().write_u64(1).unwrap(); // dontCheckSigs: vouch checks anyway
        let mut fw = FramedWriter::new(self.w());
        match cut {
            Some(n) => {
                fw.write_all(&nar[..n]).unwrap();
                fw.flush().unwrap();
            }
            None => {
                fw.write_all(nar).unwrap();
                fw.finish().unwrap();
            }
        }
        self.w().flush().unwrap();
    }

    /// Serve-protocol handshake as a client of `version` (2.x); returns the server's version.
    pub fn serve_handshake(&mut self, version: u64) -> u64 {
        use host_launcher::nixproto::serve::{SERVE_MAGIC_1, SERVE_MAGIC_2};
        self.w().write_u64(SERVE_MAGIC_1).unwrap();
        self.w().write_u64(version).unwrap();
        self.w().flush().unwrap();
        assert_eq!(self.from.read_u64().unwrap(), SERVE_MAGIC_2);
        self.from.read_u64().unwrap()
    }

    /// Read STDERR messages up to `STDERR_LAST` (log messages skipped) or an error.
    pub fn stderr_loop(&mut self) -> Result<(), String> {
        loop {
            match self.from.read_u64().unwrap() {
                STDERR_LAST => return Ok(()),
                STDERR_ERROR => {
                    let _ty = self.from.read_string("type").unwrap();
                    let _lvl = self.from.read_u64().unwrap();
                    let _name = self.from.read_string("name").unwrap();
                    let msg = self.from.read_string("msg").unwrap();
                    let _pos = self.from.read_u64().unwrap();
                    let n = self.from.read_u64().unwrap();
                    for _ in 0..n {
                        self.from.read_u64().unwrap();
                        self.from.read_string("trace").unwrap();
                    }
                    return Err(msg);
                }
                0x6f6c6d67 => {
                    self.from.read_string("next").unwrap();
                }
                0x53545254 => {
                    for _ in 0..3 {
                        self.from.read_u64().unwrap();
                    }
                    self.from.read_string("text").unwrap();
                    self.skip_fields();
                    self.from.read_u64().unwrap();
                }
                0x53544f50 => {
                    self.from.read_u64().unwrap();
                }
                0x52534c54 => {
                    self.from.read_u64().unwrap();
                    self.from.read_u64().unwrap();
                    self.skip_fields();
                }
                other => panic!("unexpected STDERR message {other:#x}"),
            }
        }
    }

    fn skip_fields(&mut self) {
        let n = self.from.read_u64().unwrap();
        for _ in 0..n {
            match self.from.read_u64().unwrap() {
                0 => {
                    self.from.read_u64().unwrap();
                }
                _ => {
                    self.from.read_string("field").unwrap();
                }
            }
        }
    }

    /// Expect `STDERR_LAST`.
    pub fn expect_last(&mut self) {
        if let Err(e) = self.stderr_loop() {
            panic!("unexpected error from the builder: {e}");
        }
    }

    /// Close stdin and wait for the process; returns (exit status, stderr text).
    pub fn finish(mut self) -> (std::process::ExitStatus, String) {
        self.to = None;
        let mut rest = Vec::new();
        let _ = self.from.read_to_end(&mut rest);
        let status = self.child.as_mut().expect("a builder process").wait().unwrap();
        self.done.store(true, Ordering::Relaxed);
        (status, std::fs::read_to_string(&self.stderr_file).unwrap_or_default())
    }

    /// Whether the server closed its end (EOF on stdout).
    pub fn at_eof(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.from.read(&mut b), Ok(0))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A closure built by the local Nix: busybox (a content-addressed `builtins.path` source), `dep`
/// and `top` (input-addressed, `top` refers to `dep`). Returns (top, all three paths).
pub fn local_closure(d: &Path, tag: &str) -> (String, Vec<String>) {
    busybox_dir(&d.join("bb"));
    let file = d.join(format!("closure-{tag}.nix"));
    std::fs::write(
        &file,
        format!(
            r#"let
  bb = builtins.path {{ path = ./bb; name = "busybox"; }};
  mk = name: script: derivation {{ inherit name; system = builtins.currentSystem; builder = "${{bb}}/sh"; args = [ "-c" script ]; }};
in rec {{
  dep = mk "up-dep" "mkdir $out; echo {n} > $out/data";
  top-{tag} = mk "up-top-{tag}" "mkdir $out; echo ${{dep}} ${{bb}} > $out/ref; echo {tag} > $out/tag";
}}"#,
            n = nonce_shared(d)
        ),
    )
    .unwrap();
    let out =
        nix(&["nix-build", "--no-out-link", file.to_str().unwrap(), "-A", &format!("top-{tag}")]);
    assert!(out.status.success(), "local nix-build: {}", text(&out));
    let top = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let req = nix(&["nix-store", "-qR", &top]);
    let all: Vec<String> =
        String::from_utf8(req.stdout).unwrap().lines().map(str::to_owned).collect();
    assert_eq!(all.len(), 3, "{all:?}");
    (top, all)
}

/// One nonce per scratch directory (so two closures in one test share `dep`).
pub fn nonce_shared(d: &Path) -> String {
    let f = d.join("nonce");
    if let Ok(n) = std::fs::read_to_string(&f) {
        return n;
    }
    let n = nonce();
    std::fs::write(&f, &n).unwrap();
    n
}

pub fn path_infos(store: &str, paths: &[String]) -> serde_json::Value {
    let mut args = vec!["nix", "path-info", "--json"];
    if !store.is_empty() {
        args.extend(["--store", store]);
    }
    args.extend(paths.iter().map(String::as_str));
    let out = nix(&args);
    assert!(out.status.success(), "nix path-info {store}: {}", text(&out));
    let mut v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for e in v.as_array_mut().unwrap() {
        let o = e.as_object_mut().unwrap();
        o.remove("registrationTime");
        o.remove("deriver");
        o.remove("signatures");
        o.remove("ultimate");
    }
    v
}

/// `nix copy` the closure of `top` (the paths `all`) to the store `url` and back into the fresh
/// store `back`: the builder answers with the client's NAR hashes, sizes, references and
/// content addresses, and Nix re-checks NAR hashes (and content addresses) on import.
pub fn copy_round_trip(url: &str, top: &str, all: &[String], back: &Path) {
    let out = nix(&["nix", "copy", "--to", url, top]);
    assert!(out.status.success(), "nix copy --to {url}: {}", text(&out));
    assert_eq!(path_infos(url, all), path_infos("", all), "{url}");
    let back = back.to_str().unwrap();
    let out = nix(&["nix", "copy", "--no-check-sigs", "--from", url, "--to", back, top]);
    assert!(out.status.success(), "nix copy --from {url}: {}", text(&out));
    let out = nix(&["nix-store", "--store", back, "--verify-path", top]);
    assert!(out.status.success(), "{}", text(&out));
}
