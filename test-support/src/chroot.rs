//! A second real Nix for tests: Debian trixie's Nix 2.26.3, in a chroot beside the host's
//! Debian bookworm Nix 2.8.0 ([`crate::nix`]).
//!
//! The chroot (debootstrap's minbase, `nix-bin` and `socat`) is made once by
//! `scripts/nix-chroot.sh` and cached outside the checkout: `$VOUCH_NIX_CHROOT`, else
//! `$VOUCH_CACHE/nix-2.26-chroot`, else `~/.cache/vouch/nix-2.26-chroot`. The first test that
//! needs it runs the script if the cache is missing or stale; the script holds a lock, so tests
//! that start together wait for one creation.
//!
//! Each test gets a [`ChrootNix`]: a host directory of its own whose parts are bound over the
//! chroot's `/nix` (a fresh, empty Nix store: tests never share one, and the cached chroot is
//! never written), `/run/vouch` (sockets a vouch on the host listens on), `/srv` (expressions,
//! the busybox directory, scripts) and `/tmp`. Every command runs in a private mount namespace
//! of its own (`unshare --mount`) that also binds `/proc` and `/dev`: the mounts exist while the
//! command runs and vanish with its last process, also when a test fails or is killed, and no
//! other process sees them. Needs root (mounts, `chroot`).
//!
//! Also here: the `remote-program` a client in the chroot uses for `ssh-ng://` and `ssh://`
//! ([`ChrootNix::remote_program`]), which does what ssh does: it sends its command line and
//! joins its stdio to a socket where [`crate::bridge::StdioBridge`] runs the builder.
//!
//! What is not here: vouch itself, or the host's Nix ([`crate::nix`]).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::nix::{busybox_dir, NIX_CONFIG};

/// The cache key `scripts/nix-chroot.sh` writes into `.vouch-stamp`.
const STAMP: &str = "vouch nix chroot 1: debootstrap minbase trixie + nix-bin socat";

/// Mount points in the chroot, made by the script: per-test directory part → chroot path.
const BINDS: [(&str, &str); 4] =
    [("nix", "/nix"), ("run", "/run/vouch"), ("srv", "/srv"), ("tmp", "/tmp")];

/// The chroot directory, created (by `scripts/nix-chroot.sh`) if it is missing or stale.
pub fn chroot_dir() -> PathBuf {
    let dir = std::env::var_os("VOUCH_NIX_CHROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::vm::vouch_cache().join("nix-2.26-chroot"));
    let stamp = std::fs::read_to_string(dir.join(".vouch-stamp")).unwrap_or_default();
    if stamp.trim() != STAMP {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/nix-chroot.sh");
        let out = Command::new(&script)
            .env("VOUCH_NIX_CHROOT", &dir)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "the Nix 2.26 chroot could not be made ({}; scripts/setup-host.sh makes it, as root \
             with debootstrap and the network):\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir
}

/// One test's Nix 2.26: its own store, `/run/vouch`, `/srv` and `/tmp` in the shared chroot.
#[derive(Debug)]
pub struct ChrootNix {
    root: PathBuf,
    /// The per-test directory (removed on drop): `nix/`, `run/`, `srv/`, `tmp/` and any other
    /// stores ([`Self::command_in`]).
    pub dir: tempfile::TempDir,
}

impl ChrootNix {
    /// A fresh per-test directory with the busybox directory at `/srv/bb`.
    pub fn new() -> ChrootNix {
        let root = chroot_dir();
        let dir = tempfile::tempdir().expect("tempdir");
        for (part, _) in BINDS {
            std::fs::create_dir_all(dir.path().join(part)).unwrap();
        }
        std::fs::create_dir_all(dir.path().join("srv/home")).unwrap();
        busybox_dir(&dir.path().join("srv/bb"));
        ChrootNix { root, dir }
    }

    /// The host path of `/srv`.
    pub fn srv(&self) -> PathBuf {
        self.dir.path().join("srv")
    }

    /// The host path of `/run/vouch` (sockets and `real=` directories go here).
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// The host path of the default store's `/nix/store`.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("nix/store")
    }

    /// The chroot path of a host path under the per-test directory (panics otherwise).
    pub fn inside(&self, host: &Path) -> String {
        let rel = host
            .strip_prefix(self.dir.path())
            .unwrap_or_else(|_| panic!("{} is not in the chroot's directory", host.display()));
        let mut parts = rel.components();
        let first = parts.next().map(|c| c.as_os_str().to_string_lossy().into_owned());
        let (_, at) = BINDS
            .iter()
            .find(|(part, _)| Some(*part) == first.as_deref())
            .unwrap_or_else(|| panic!("{} is not bound into the chroot", host.display()));
        let rest = parts.as_path();
        if rest.as_os_str().is_empty() {
            (*at).to_owned()
        } else {
            format!("{at}/{}", rest.display())
        }
    }

    /// Write a file into `/srv` (mode 0755 if `executable`); its host path.
    pub fn write(&self, name: &str, text: &str, executable: bool) -> PathBuf {
        let p = self.srv().join(name);
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        if executable {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        p
    }

    /// `argv` in the chroot with the default store, Nix's test configuration
    /// ([`NIX_CONFIG`]), `HOME=/srv/home` and nothing else of the caller's environment.
    pub fn command(&self, argv: &[&str]) -> Command {
        self.command_in("nix", &[], argv)
    }

    /// `argv` in the chroot with the store `store` (a directory of the per-test directory,
    /// made if missing, bound over `/nix`) and `env` besides [`Self::command`]'s.
    pub fn command_in(&self, store: &str, env: &[(&str, &str)], argv: &[&str]) -> Command {
        std::fs::create_dir_all(self.dir.path().join(store)).unwrap();
        // One shell in the new namespace: bind, then become the program in the chroot. The
        // namespace (and every mount in it) ends with its last process.
        let script = r#"set -e
root=$1 dir=$2 store=$3; shift 3
mount --rbind /proc "$root/proc"
mount --rbind /dev "$root/dev"
mount --bind "$dir/$store" "$root/nix"
mount --bind "$dir/run" "$root/run/vouch"
mount --bind "$dir/srv" "$root/srv"
mount --bind "$dir/tmp" "$root/tmp"
exec chroot "$root" "$@""#;
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "--", "sh", "-c", script, "sh"])
            .arg(&self.root)
            .arg(self.dir.path())
            .arg(store)
            .args(["env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/srv/home"])
            .arg(format!("NIX_CONFIG={NIX_CONFIG}"))
            .arg("TMPDIR=/tmp");
        for (k, v) in env {
            c.arg(format!("{k}={v}"));
        }
        c.args(argv);
        c
    }

    /// Run [`Self::command`]; its output (panics only if it cannot be started).
    pub fn output(&self, argv: &[&str]) -> Output {
        self.command(argv).output().unwrap_or_else(|e| panic!("running unshare ({e})"))
    }

    /// [`Self::output`], panicking with its stderr unless it succeeded; stdout as text.
    pub fn stdout(&self, argv: &[&str]) -> String {
        crate::nix::stdout(&mut self.command(argv))
    }

    /// `nix --version` in the chroot (`nix (Nix) 2.26.3`).
    pub fn version(&self) -> String {
        self.stdout(&["nix", "--version"]).trim().to_owned()
    }

    /// `nix-instantiate FILE -A attr` in the chroot (`file` a chroot path) → drv path.
    pub fn instantiate(&self, file: &str, attr: &str) -> String {
        self.stdout(&["nix-instantiate", file, "-A", attr]).trim().to_owned()
    }

    /// A `remote-program` at `/srv/<name>` that does what ssh does for Nix: it sends its
    /// command line (`--stdio`, `--serve --write`, …) as one line, then joins its stdin and
    /// stdout to the Unix socket `/run/vouch/<socket>`, where a
    /// [`StdioBridge`](crate::bridge::StdioBridge) runs the builder with that command line.
    /// Returns its chroot path.
    pub fn remote_program(&self, name: &str, socket: &str) -> String {
        let script = format!(
            "#!/bin/sh\n# ssh's part: the command line, then stdio over the connection.\n\
             {{ printf '%s\\n' \"$*\"; exec cat; }} | exec socat - UNIX-CONNECT:/run/vouch/{socket}\n"
        );
        let p = self.write(name, &script, true);
        self.inside(&p)
    }
}

impl Default for ChrootNix {
    fn default() -> Self {
        Self::new()
    }
}
