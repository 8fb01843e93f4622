//! Helpers for the VM tests: the real `vouch` binary, the guest image, a scratch area with the
//! busybox directory for a real Nix ([`crate::nix`]), a CA derivation file, and checks that
//! nothing was registered.
//!
//! Missing tools make tests **fail** with a message saying how to get them (never skip).
//! What is not here: starting VMs (the `vouch` binary does) or Nix configuration.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

use crate::nix::busybox_dir;
// The Nix helpers the VM tests import from here.
pub use crate::nix::{nix, nonce, require_tool, NIX_CONFIG};

/// The `vouch` binary of this build (`$VOUCH_BIN` overrides).
pub fn vouch_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VOUCH_BIN") {
        return p.into();
    }
    // target/<profile>/deps/<test exe> → target/<profile>/vouch
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe.parent().and_then(Path::parent).map(|d| d.join("vouch")).expect("target dir");
    assert!(
        bin.is_file(),
        "{} not found: build it first (`cargo build -p host-launcher`; scripts/test-all.sh does)",
        bin.display()
    );
    bin
}

/// A builder wrapper at `dir/name` (what a `remote-program` or a forced command runs):
/// `VOUCH_IMAGE_DIR=… vouch --state-dir STATE nix-builder EXTRA… "$@"`. Returns its path.
pub fn builder_wrapper(dir: &Path, name: &str, state: &Path, extra: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    let script = format!(
        "#!/bin/sh\nVOUCH_IMAGE_DIR='{}' exec '{}' --state-dir '{}' nix-builder {extra} \"$@\"\n",
        image_dir().display(),
        vouch_bin().display(),
        state.display()
    );
    std::fs::write(&p, script).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// The public key (`name:base64`) of the one Nix signing key in the vouch state directory
/// `state` (`<state>/keys/<name>.public`).
pub fn public_key_of(state: &Path) -> String {
    let file = std::fs::read_dir(state.join("keys"))
        .expect("the state directory's keys")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".public"))
        .unwrap_or_else(|| panic!("no public key in {}/keys", state.display()));
    std::fs::read_to_string(file).unwrap().trim().to_owned()
}

/// vouch's cache outside the checkout: `$VOUCH_CACHE`, else `~/.cache/vouch` (the guest
/// kernel and image, the Nix 2.26 chroot).
pub fn vouch_cache() -> PathBuf {
    std::env::var_os("VOUCH_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cache/vouch")
    })
}

/// The guest image directory (`$VOUCH_IMAGE_DIR`, else `$VOUCH_CACHE/image`, else
/// `~/.cache/vouch/image`); panics with instructions if it is not built.
pub fn image_dir() -> PathBuf {
    built_image("VOUCH_IMAGE_DIR", "image", "scripts/build-image.sh")
}

/// The bench image (its agent built with the `bench` feature): `$VOUCH_BENCH_IMAGE_DIR`, else
/// `<cache>/bench-image`. Only tests of the agent's `vouch.bench=` modes use it.
pub fn bench_image_dir() -> PathBuf {
    built_image("VOUCH_BENCH_IMAGE_DIR", "bench-image", "scripts/build-image.sh --bench")
}

/// `$<var>`, else `<cache>/<name>`; panics naming `how` to build it if it holds no image.
fn built_image(var: &str, name: &str, how: &str) -> PathBuf {
    let dir = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| vouch_cache().join(name));
    assert!(
        dir.join("manifest.json").is_file(),
        "no image in {}: run {how} (scripts/test-all.sh does) or set {var}",
        dir.display()
    );
    dir
}

/// [`vouch_bin`], checked to have `vouch bench` (the `bench` feature; `cargo test --workspace`
/// and `scripts/build-image.sh --bench` build it so).
pub fn bench_vouch_bin() -> PathBuf {
    let bin = vouch_bin();
    let ok =
        Command::new(&bin).args(["bench", "--help"]).output().is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{} has no `vouch bench`: build it with `cargo build -p host-launcher --features bench` \
         (scripts/build-image.sh --bench does)",
        bin.display()
    );
    bin
}

/// What a VM test starts from: its file's VM lock (tests in one file take turns), a scratch
/// area with one Nix file written under a fresh nonce, and a builder state directory.
#[derive(Debug)]
pub struct VmTest {
    _vms: MutexGuard<'static, ()>,
    /// The scratch area.
    pub s: Scratch,
    /// The nonce the Nix file was written with.
    pub n: String,
    /// The Nix file.
    pub file: PathBuf,
    /// The builder's state directory.
    pub state: PathBuf,
}

impl VmTest {
    /// Take `lock` (a poisoned one too: one failed test must not fail the rest), then write
    /// `name` with `nix(nonce)` in a fresh scratch area.
    pub fn new(lock: &'static Mutex<()>, name: &str, nix: impl FnOnce(&str) -> String) -> VmTest {
        let vms = lock.lock().unwrap_or_else(|e| e.into_inner());
        let s = Scratch::new();
        let n = nonce();
        let file = s.write(name, &nix(&n));
        let state = s.state();
        VmTest { _vms: vms, s, n, file, state }
    }
}

/// A scratch area for one test: Nix expressions, a state directory, a cache.
#[derive(Debug)]
pub struct Scratch {
    /// Temporary directory (removed on drop).
    pub dir: tempfile::TempDir,
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Scratch {
    /// A new scratch area with the busybox directory (`bb/busybox`, `bb/sh` → busybox).
    pub fn new() -> Scratch {
        require_tool("nix-instantiate", "apt-get install nix-bin (scripts/setup-host.sh)");
        require_tool(
            "qemu-system-x86_64",
            "scripts/setup-host.sh installs QEMU 10 from bookworm-backports",
        );
        let dir = tempfile::tempdir().expect("tempdir");
        busybox_dir(&dir.path().join("bb"));
        Scratch { dir }
    }

    /// The vouch state directory of this test.
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The binary cache / trace store of this test.
    pub fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// Write a Nix file into the scratch area.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// `nix-instantiate file -A attr` → drv path.
    pub fn instantiate(&self, file: &Path, attr: &str) -> String {
        let out = nix(&["nix-instantiate", file.to_str().unwrap(), "-A", attr]);
        assert!(
            out.status.success(),
            "nix-instantiate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// `vouch build <args>` with this test's state and cache.
    pub fn vouch_build(&self, drv: &str, extra: &[&str]) -> Output {
        self.vouch_build_under(&[], drv, extra).1
    }

    /// [`Self::vouch_build`] run by `wrapper` (e.g. `ip netns exec NS`, which `exec`s vouch):
    /// the process id and the output.
    pub fn vouch_build_under(&self, wrapper: &[&str], drv: &str, extra: &[&str]) -> (u32, Output) {
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(vouch_bin());
                c
            }
            None => Command::new(vouch_bin()),
        };
        cmd.arg("--state-dir")
            .arg(self.state())
            .args(["build", drv, "--cache"])
            .arg(self.cache())
            .args(extra);
        cmd.env("VOUCH_IMAGE_DIR", image_dir());
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        let child = cmd.spawn().expect("running vouch");
        let pid = child.id();
        (pid, child.wait_with_output().expect("running vouch"))
    }

    /// Assert that nothing of a failed step was kept: no narinfo, no NAR, no step in the cache,
    /// no staging directory.
    pub fn assert_nothing_registered(&self) {
        let cache = self.cache();
        if cache.exists() {
            let narinfos: Vec<_> = std::fs::read_dir(&cache)
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".narinfo"))
                .collect();
            assert!(narinfos.is_empty(), "narinfos registered: {narinfos:?}");
            for sub in ["nar", "vouch/v1/steps", "realisations"] {
                let d = cache.join(sub);
                if d.exists() {
                    assert_eq!(
                        std::fs::read_dir(&d).unwrap().count(),
                        0,
                        "{} is not empty",
                        d.display()
                    );
                }
            }
        }
        let tmp = self.state().join("tmp");
        if tmp.exists() {
            let left: Vec<_> =
                std::fs::read_dir(&tmp).unwrap().filter_map(|e| e.ok()).map(|e| e.path()).collect();
            assert!(left.is_empty(), "staging left behind: {left:?}");
        }
    }
}

/// A CA derivation file: `mk name script` builds with the busybox `sh` (floating CA, recursive
/// SHA-256); `data` is a text input; `nonce` makes every run new.
pub fn ca_nix(nonce: &str) -> String {
    format!(
        r#"let
  bb = builtins.path {{ path = ./bb; name = "busybox"; }};
  data = builtins.toFile "data-{nonce}" "input data {nonce}\n";
  mkWith = extra: name: script: derivation ({{
    inherit name; system = builtins.currentSystem; builder = "${{bb}}/sh"; args = [ "-c" script ];
    __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
  }} // extra);
  mk = mkWith {{ }};
in rec {{
  inherit data;
  top = mk "vm-top" "set -e; mkdir $out; echo {nonce} > $out/nonce; cat ${{data}} > $out/copied; echo ${{data}} > $out/ref; echo $out > $out/self; echo built";
  timeout = mk "vm-timeout" "echo sleeping; ${{bb}}/busybox sleep 600";
  loud = mk "vm-loud" "while :; do echo yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy; done";
  fails = mk "vm-fails" "echo about to fail; exit 3";
  slow = mk "vm-slow" "echo started; ${{bb}}/busybox sleep 600";
  reads = mk "vm-reads" "mkdir $out; cat ${{data}} > $out/copied";
  chained = mk "vm-chained" "mkdir $out; cat ${{top}}/nonce > $out/n";
  multi = mkWith {{ outputs = [ "out" "dev" ]; }} "vm-multi"
    "mkdir $out $dev; echo {nonce} > $out/n; echo $out > $out/self; echo $out > $dev/out; echo $dev > $dev/self";
}}
"#
    )
}
