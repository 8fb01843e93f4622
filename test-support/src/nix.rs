//! The real Nix for tests: one configuration (`NIX_CONFIG`), running Nix programs with it, the
//! busybox directory every test derivation builds with, and unique names per run.
//!
//! A missing tool makes the test **fail** with a message saying how to install it (never skip):
//! these tests compare against the real Nix 2.8.0 and busybox-static that
//! `scripts/setup-host.sh` installs.
//!
//! What is not here: Nix expressions (each test writes its own) and anything about vouch itself.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The Nix configuration every test command gets (through `NIX_CONFIG`): CA and impure
/// derivations on, no substituters (or every build waits on the network), no sandbox and no
/// build users (tests run as whoever runs them).
pub const NIX_CONFIG: &str = "experimental-features = nix-command ca-derivations impure-derivations
substituters =
sandbox = false
build-users-group =
";

const INSTALL: &str = "scripts/setup-host.sh installs it (apt-get install nix-bin busybox-static)";

/// Fail (not skip) when `tool` is not on `PATH`; `how` says how to get it.
pub fn require_tool(tool: &str, how: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success());
    assert!(found.unwrap_or(false), "`{tool}` is required for this test: {how}");
}

/// Fail (not skip) when Nix is missing.
pub fn require_nix() {
    require_tool("nix", INSTALL);
}

/// A `Command` for a Nix program with [`NIX_CONFIG`].
pub fn command(program: &str) -> Command {
    let mut c = Command::new(program);
    c.env("NIX_CONFIG", NIX_CONFIG);
    c
}

/// Run `cmd` with [`NIX_CONFIG`] and return its output, successful or not; panics only when it
/// cannot be started (naming it and how to install Nix).
pub fn output(cmd: &mut Command) -> Output {
    cmd.env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} ({e}): {INSTALL}"))
}

/// [`output`] of `argv[0] argv[1..]`.
pub fn nix(argv: &[&str]) -> Output {
    output(Command::new(argv[0]).args(&argv[1..]))
}

/// [`output`], panicking with its stderr unless it succeeded.
pub fn run(cmd: &mut Command) -> Output {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// [`run`], returning stdout as text.
pub fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).expect("Nix printed non-UTF-8")
}

/// stdout and stderr of a command, as one text (for assertion messages and searches).
pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Make `dir` the busybox directory test derivations build with: `busybox` (a copy of the
/// static `/bin/busybox`) and `sh` → `busybox`. Nix expressions import it as
/// `builtins.path { path = ./bb; name = "busybox"; }`. Returns `dir`.
pub fn busybox_dir(dir: &Path) -> PathBuf {
    let busybox = Path::new("/bin/busybox");
    assert!(busybox.is_file(), "/bin/busybox is missing: {INSTALL}");
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    std::fs::copy(busybox, dir.join("busybox")).expect("copying /bin/busybox");
    let sh = dir.join("sh");
    if !sh.exists() {
        std::os::unix::fs::symlink("busybox", &sh).expect("symlinking sh");
    }
    dir.to_path_buf()
}

/// Build `attrs` of the Nix file `file` with the host's Nix, locally, in a store of its own
/// (`--store DIR`, a chroot store: Nix builds in its sandbox there); the output paths, one per
/// attribute output, as `nix-build` prints them. What a remote builder's outputs must equal.
pub fn local_build(file: &Path, attrs: &[&str], store: &Path) -> Vec<String> {
    let mut cmd = Command::new("nix-build");
    cmd.arg("--store").arg(store).arg(file).arg("--no-out-link");
    for a in attrs {
        cmd.args(["-A", a]);
    }
    stdout(&mut cmd).lines().map(str::to_owned).collect()
}

/// The `let` bindings test expressions start with: `bb` (the busybox directory of
/// [`busybox_dir`], at `./bb`), `sys`, and `ca name attrs script`, a floating content-addressed
/// derivation (recursive SHA-256) built by busybox `sh -c script`, with extra `attrs`.
pub const CA_PRELUDE: &str = r#"  bb = builtins.path { path = ./bb; name = "busybox"; };
  sys = builtins.currentSystem;
  ca = name: attrs: script: derivation ({
    inherit name; system = sys; builder = "${bb}/sh"; args = [ "-c" script ];
    __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
  } // attrs);
"#;

/// The SHA-256 of `data` in base16 (with `sha256sum`, as a fixed-output derivation declares it).
pub fn sha256_hex(data: &[u8]) -> String {
    use std::io::Write;
    use std::process::Stdio;
    let mut c = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running sha256sum");
    c.stdin.take().expect("its stdin").write_all(data).expect("writing to sha256sum");
    let out = c.wait_with_output().expect("sha256sum");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().next().expect("sha256sum printed a hash").to_owned()
}

/// A string unique to this process and moment (process id, seconds, nanoseconds), so every run
/// instantiates new derivations. Valid in store path names.
pub fn nonce() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{}-{}-{}", std::process::id(), t.as_secs(), t.subsec_nanos())
}
