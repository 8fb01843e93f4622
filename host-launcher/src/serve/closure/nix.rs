//! Running the real Nix that schedules a closure: `nix copy` of the uploaded `.drv` closure
//! (through a `file://` cache, [`super::export`]) into the service's private Nix store, then `nix-store --realise` of the derivation
//! there with `max-jobs = 0` (every step goes to a builder of the machines file), the
//! service's own cache as the only substituter, and `--log-format internal-json`, whose events
//! are handed on as they come ([`super::events`]).
//!
//! Nix runs with a configuration of its own: `NIX_CONF_DIR` and `NIX_USER_CONF_FILES` name an
//! empty file, every setting is given on the command line, and `HOME`/`XDG_CACHE_HOME` are the
//! service's (so no narinfo disk cache of another user answers). Nix and its build hooks run in
//! their own process group: a cancelled build kills the group, the builders see their clients
//! hang up and kill their VMs; and Nix dies with the service (`crate::vm::child`).
//!
//! What is not here: what the events mean for the steps (`super::run`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix_formats::StorePath;

use super::events::{parse_line, Change, Tracker};
use super::export::{closure_in_order, write_cache, ExportError};
use crate::build::Cancel;
use crate::store::StoreView;

/// Why Nix could not be run (a build that fails is not an error here: see [`Realised`]).
#[derive(Debug, thiserror::Error)]
pub enum NixError {
    /// Preparing the private store's directories.
    #[error("preparing {0}")]
    Prepare(PathBuf, #[source] std::io::Error),
    /// Starting a Nix command.
    #[error("starting {0} (is Nix installed? scripts/setup-host.sh installs nix-bin)")]
    Spawn(&'static str, #[source] std::io::Error),
    /// The export stream.
    #[error("exporting the derivation closure")]
    Export(#[source] ExportError),
    /// `nix copy` into the private store failed.
    #[error("nix copy of the derivation closure into the private store failed: {0}")]
    Import(String),
    /// `nix-store --gc` failed.
    #[error("nix-store --gc of the private store failed: {0}")]
    Gc(String),
    /// Reading Nix's output.
    #[error("reading Nix's output")]
    Read(#[source] std::io::Error),
}

/// How the service runs Nix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixDriver {
    /// The private store's root (`local?root=DIR`); `DIR.conf/` holds Nix's empty
    /// configuration and home.
    pub root: PathBuf,
    /// The machines file (`--builders @FILE`).
    pub machines: PathBuf,
    /// The service's cache (the trace store), the only substituter (`file://`).
    pub cache: PathBuf,
    /// Its public key (`trusted-public-keys`).
    pub public_key: String,
}

/// What one `nix-store --realise` said.
#[derive(Debug, Default)]
pub struct Realised {
    /// Whether it exited 0.
    pub success: bool,
    /// Its events, folded.
    pub tracker: Tracker,
    /// The output paths it printed (of the root).
    pub outputs: Vec<StorePath>,
}

impl NixDriver {
    fn store_uri(&self) -> String {
        format!("local?root={}", self.root.display())
    }

    fn conf(&self) -> PathBuf {
        let mut p = self.root.as_os_str().to_owned();
        p.push(".conf");
        p.into()
    }

    /// A `nix-store` command with the service's environment and the private store.
    fn nix_store(&self) -> Result<Command, NixError> {
        let mut cmd = self.nix_command("nix-store")?;
        cmd.arg("--store").arg(self.store_uri());
        Ok(cmd)
    }

    /// `program` (a Nix command) with the service's environment and settings.
    fn nix_command(&self, program: &str) -> Result<Command, NixError> {
        let conf = self.conf();
        let home = conf.join("home");
        for d in [&self.root, &home] {
            std::fs::create_dir_all(d).map_err(|e| NixError::Prepare(d.clone(), e))?;
        }
        let file = conf.join("nix.conf");
        if !file.exists() {
            std::fs::write(&file, b"").map_err(|e| NixError::Prepare(file.clone(), e))?;
        }
        let mut cmd = Command::new(program);
        for v in ["NIX_CONFIG", "NIX_REMOTE", "NIX_PATH", "NIX_STORE_DIR", "NIX_STATE_DIR"] {
            cmd.env_remove(v);
        }
        cmd.env("NIX_CONF_DIR", &conf)
            .env("NIX_USER_CONF_FILES", &file)
            .env("HOME", &home)
            .env("XDG_CACHE_HOME", home.join("cache"));
        let options = [
            ("experimental-features", "nix-command ca-derivations"),
            ("build-users-group", ""),
            ("sandbox", "false"),
            ("require-sigs", "true"),
        ];
        for (k, v) in options {
            cmd.args(["--option", k, v]);
        }
        Ok(cmd)
    }

    /// The release of the Nix that drives closures (`nix-store --version`).
    pub fn version(&self) -> Result<crate::core::NixVersion, String> {
        let out = Command::new("nix-store")
            .arg("--version")
            .output()
            .map_err(|e| format!("running nix-store --version: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        // `nix-store (Nix) 2.8.0`
        let last = text.split_whitespace().last().unwrap_or_default();
        last.parse().map_err(|e| format!("nix-store --version said {:?}: {e}", text.trim()))
    }

    /// Import the `.drv` closure of `drv` (the `.drv` files and their input sources) from
    /// `view` into the private store, through the `file://` cache `DIR.import/` (what either
    /// has already is skipped).
    pub fn import(&self, view: StoreView<'_>, drv: &StorePath) -> Result<(), NixError> {
        let paths = closure_in_order(view, &[drv.clone()].into()).map_err(NixError::Export)?;
        let mut dir = self.root.as_os_str().to_owned();
        dir.push(".import");
        let dir = PathBuf::from(dir);
        write_cache(view, &paths, &dir).map_err(NixError::Export)?;
        let mut copy = self.nix_command("nix")?;
        copy.args(["copy", "--no-check-sigs", "--derivation", "--from"])
            .arg(format!("file://{}", dir.display()))
            .arg("--to")
            .arg(self.store_uri())
            .arg(drv.to_string());
        run(copy, "nix copy").map_err(NixError::Import)
    }

    /// `nix-store --realise drv` in the private store, every step on the builders; each change
    /// the events make goes to `on_change` as it comes. `cancel` kills Nix and its hooks.
    pub fn realise(
        &self,
        drv: &StorePath,
        limits: (u64, u64),
        cancel: &Cancel,
        on_change: &mut dyn FnMut(&Tracker, Change),
    ) -> Result<Realised, NixError> {
        let machines = format!("@{}", self.machines.display());
        let substituter = format!("file://{}", self.cache.display());
        let mut cmd = self.nix_store()?;
        for (k, v) in [
            ("max-jobs", "0"),
            ("builders", machines.as_str()),
            ("substituters", substituter.as_str()),
            ("trusted-public-keys", self.public_key.as_str()),
            ("builders-use-substitutes", "false"),
            ("keep-going", "true"),
            ("connect-timeout", "10"),
        ] {
            cmd.args(["--option", k, v]);
        }
        for (k, v) in [("timeout", limits.0), ("max-silent-time", limits.1)] {
            if v > 0 {
                cmd.args(["--option", k, &v.to_string()]);
            }
        }
        cmd.args(["--log-format", "internal-json", "-v", "--realise"])
            .arg(drv.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // Nix dies with the service, even one killed by SIGKILL (its hooks then see it gone).
        crate::vm::child::die_with_launcher(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| NixError::Spawn("nix-store --realise", e))?;
        let pgid = child.id() as i32;
        let done = Arc::new(AtomicBool::new(false));
        let watcher = watch_cancel(cancel.clone(), done.clone(), pgid);
        let stdout = child.stdout.take().expect("piped");
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut BufReader::new(stdout), &mut s);
            s
        });
        let mut tracker = Tracker::default();
        let stderr = BufReader::new(child.stderr.take().expect("piped"));
        for line in stderr.split(b'\n') {
            let line = line.map_err(NixError::Read)?;
            let line = String::from_utf8_lossy(&line);
            if let Some(event) = parse_line(&line) {
                let change = tracker.apply(event);
                on_change(&tracker, change);
            } else if !line.starts_with("@nix ") && !line.trim().is_empty() {
                tracing::debug!(line = %line, "nix-store");
            }
        }
        let status = child.wait().map_err(NixError::Read)?;
        done.store(true, Ordering::SeqCst);
        let _ = watcher.join();
        let printed = reader.join().unwrap_or_default();
        let outputs = printed.lines().filter_map(|l| StorePath::parse(l.trim()).ok()).collect();
        Ok(Realised { success: status.success(), tracker, outputs })
    }
}

impl NixDriver {
    /// `nix-store --gc` of the private store: what builds copied back and imported `.drv`
    /// closures go (they are in the service's cache and content store).
    pub fn collect_garbage(&self) -> Result<(), NixError> {
        let mut gc = self.nix_store()?;
        gc.arg("--gc");
        run(gc, "nix-store --gc").map_err(NixError::Gc)
    }
}

/// Run `cmd` (`what`) to its end; its stderr, without colours, if it failed (or could not start).
fn run(mut cmd: Command, what: &str) -> Result<(), String> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("starting {what}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    Err(format!("{}: {}", out.status, super::events::strip_ansi(err.trim())))
}

/// Kill process group `pgid` once `cancel` fires, until `done`.
fn watch_cancel(cancel: Cancel, done: Arc<AtomicBool>, pgid: i32) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !done.load(Ordering::SeqCst) {
            if cancel.is_cancelled() {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pgid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

/// A machines file line for this service's own builder: its `unix://` socket (with the
/// directory it unpacks paths into for Nix, `real=`), `jobs` slots, `ca-derivations` and
/// `features`.
pub fn local_machine_line(socket: &Path, real: &Path, jobs: usize, features: &[String]) -> String {
    let mut f = vec!["ca-derivations".to_owned()];
    f.extend(features.iter().cloned());
    format!(
        "unix://{}?real={} {}-linux - {jobs} 1 {}",
        socket.display(),
        real.display(),
        std::env::consts::ARCH,
        f.join(",")
    )
}

/// Write the machines file: this service's builder, then the lines of `--builders FILE`.
pub fn write_machines(file: &Path, local: &str, others: Option<&str>) -> std::io::Result<()> {
    let mut text = format!("{local}\n");
    if let Some(o) = others {
        text.push_str(o);
        text.push('\n');
    }
    let mut f = std::fs::File::create(file)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}
