//! Options that `vouch build`, `vouch nix-builder` and `vouch serve` share, and the engine they
//! make ([`EngineArgs`]: the trace store, the build limits ([`LimitArgs`]), how VMs are
//! launched ([`VmArgs`]), the signing key's name ([`KeyArgs`])); for the two long-running
//! builders also their content store and client Nix release ([`BuilderArgs`]). One definition,
//! so the commands accept the same flags with the same meaning; only the defaults of the three
//! Nix limits differ (a remote builder never runs unbounded, see `docs/nix-remote-builder.md`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use build_trace::job::Limits;
use host_launcher::build::LauncherConfig;
use host_launcher::core::keys::KeyNameError;
use host_launcher::core::publish::default_trace_store;
use host_launcher::core::{Engine, KeyNaming, NixVersion, PublishConfig};
use host_launcher::pool::{self, Pool, PoolConfig, ShutdownOnDrop};
use host_launcher::store::{StoreConfig, DEFAULT_MAX_BYTES};
use host_launcher::vm::{egress, Mode};

/// Build limits. Unset flags take the command's defaults ([`LimitArgs::limits`]).
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Kill the builder after this many seconds (0 = no limit) [default: vouch build: 0;
    /// nix-builder: 10800, where the client sets none].
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Kill the builder after this many seconds without log output (0 = no limit) [default:
    /// vouch build: 0; nix-builder: 3600, where the client sets none].
    #[arg(long, value_name = "SECS")]
    pub max_silent_time: Option<u64>,
    /// Kill the builder after this many bytes of log (0 = no limit) [default: vouch build: 0;
    /// nix-builder: 67108864, where the client sets none].
    #[arg(long, value_name = "BYTES")]
    pub max_log_size: Option<u64>,
    /// NIX_BUILD_CORES in the VM (0 = the VM's vCPUs).
    #[arg(long, default_value_t = 0)]
    pub cores: u64,
    /// The builder's memory limit in MiB (cgroup memory.max; 0 = guest RAM minus 256 MiB). The
    /// guest's RAM is raised if the limit needs more.
    #[arg(long, default_value_t = 0, value_name = "MIB")]
    pub max_memory: u64,
    /// Most processes and threads the builder may have at once (0 = 4096).
    #[arg(long, default_value_t = 0)]
    pub max_processes: u64,
    /// Size of each tmpfs the builder writes to (/build, new store paths, /tmp) in MiB
    /// (0 = half the guest RAM).
    #[arg(long, default_value_t = 0, value_name = "MIB")]
    pub tmpfs_size: u64,
    /// Build fixed-output derivations that declare md5 or sha1 hashes (refused by default).
    #[arg(long)]
    pub allow_weak_hashes: bool,
}

impl LimitArgs {
    /// The limits, with `defaults` for the timeout, silence and log limits not given.
    pub fn limits(&self, defaults: &Limits) -> Limits {
        Limits {
            timeout_s: self.timeout.unwrap_or(defaults.timeout_s),
            max_silent_s: self.max_silent_time.unwrap_or(defaults.max_silent_s),
            max_log_bytes: self.max_log_size.unwrap_or(defaults.max_log_bytes),
            cores: self.cores,
            memory_bytes: self.max_memory << 20,
            max_processes: self.max_processes,
            tmpfs_bytes: self.tmpfs_size << 20,
        }
    }
}

/// How the build VMs are launched.
#[derive(Debug, Clone, clap::Args)]
pub struct VmArgs {
    /// VM mode (default: the best this host can: snp > kvm > tcg).
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Image directory (default: $VOUCH_IMAGE_DIR, else $VOUCH_CACHE/image).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Guest RAM in MiB (raised if --max-memory needs more).
    #[arg(long, default_value_t = 2048, value_name = "MIB")]
    pub memory: u32,
    /// Guest vCPUs (SNP: the image must be measured for this count, `vouch image build
    /// --vcpu-counts`).
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// The QEMU binary.
    #[arg(long, env = "VOUCH_QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Fail a step whose guest sends nothing (it heartbeats every 2 s) or takes no input for
    /// this many seconds; the VM is killed and the step retried once in a fresh VM.
    #[arg(long, default_value_t = 60, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub stall_timeout: u64,
    /// Fail a step whose agent has not said hello this many seconds after QEMU started.
    #[arg(long, default_value_t = 120, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub boot_timeout: u64,
    /// This host's VCEK certificate (SNP mode).
    #[arg(long, env = "VOUCH_SNP_VCEK")]
    pub snp_vcek: Option<PathBuf>,
    /// Let fixed-output builders reach this IPv4 address or CIDR although it is in a range they
    /// are denied (loopback, link-local, RFC 1918, CGNAT, multicast, this host's addresses);
    /// repeatable. See docs/threat-model.md.
    #[arg(long, value_name = "CIDR", value_parser = egress::parse_allowed)]
    pub allow_egress: Vec<ipnet::Ipv4Net>,
    /// UNSAFE: run fixed-output builders' VMs with QEMU's unfiltered user networking in this
    /// host's network namespace, where they reach its loopback services (10.0.2.2), its private
    /// networks and cloud metadata. Only for hosts that cannot give each such VM a filtered
    /// namespace (no root, no nftables), and only for derivations you trust.
    #[arg(long)]
    pub unfiltered_network: bool,
}

impl VmArgs {
    /// The launcher configuration (`limits`: the sandbox limits' allow-weak-hashes flag).
    pub fn launcher(&self, state_dir: &Path, limits: &LimitArgs) -> LauncherConfig {
        let mut cfg = LauncherConfig::new(
            self.image.clone().unwrap_or_else(vm_image::default_image_dir),
            state_dir.to_owned(),
        );
        cfg.mode = self.mode;
        cfg.memory_mib = self.memory;
        cfg.vcpus = self.cpus;
        cfg.qemu = self.qemu.clone();
        cfg.stall_timeout = Duration::from_secs(self.stall_timeout);
        cfg.boot_timeout = Duration::from_secs(self.boot_timeout);
        cfg.snp_vcek = self.snp_vcek.clone();
        cfg.allow_weak_fixed_hashes = limits.allow_weak_hashes;
        cfg.egress = egress::EgressPolicy::new(self.allow_egress.clone(), self.unfiltered_network);
        cfg
    }
}

/// The name of the Nix key steps are signed with.
#[derive(Debug, Clone, clap::Args)]
pub struct KeyArgs {
    /// Name of this host's signing key (default: the state directory's `key-name` file, else
    /// `<hostname>-1`, or `<hostname>-simulated-1` for simulated evidence). Several vouch hosts
    /// on one machine need different names. A key that signs simulated evidence must say
    /// `simulated` in its name.
    #[arg(long, env = "VOUCH_KEY_NAME", value_name = "NAME")]
    pub key_name: Option<String>,
}

impl KeyArgs {
    /// The naming rule: this flag, else the state directory's setting.
    pub fn naming(&self, state_dir: &Path) -> Result<KeyNaming, KeyNameError> {
        match &self.key_name {
            Some(n) => KeyNaming::named(n),
            None => KeyNaming::from_state_dir(state_dir),
        }
    }
}

/// What makes the engine of every builder: where steps are published, the limits, the VMs and
/// the signing key.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// Trace store directory: where built steps are published, a Nix binary cache (default:
    /// `<state-dir>/cache`). `--cache` is an old name for it.
    #[arg(long = "traces", alias = "cache", value_name = "DIR")]
    pub traces: Option<PathBuf>,
    /// Build limits.
    #[command(flatten)]
    pub limits: LimitArgs,
    /// VM settings.
    #[command(flatten)]
    pub vm: VmArgs,
    /// Signing key.
    #[command(flatten)]
    pub key: KeyArgs,
}

impl EngineArgs {
    /// The engine, with `defaults` for the limits not given. A key name that cannot sign this
    /// host's evidence is refused here, before any VM runs or anything is served.
    pub fn engine(&self, state_dir: &Path, defaults: &Limits) -> Result<Engine, super::CmdError> {
        let launcher = self.vm.launcher(state_dir, &self.limits);
        let key_naming = self.key.naming(state_dir)?;
        key_naming.check_for(&launcher)?;
        let trace_store = self.traces.clone().unwrap_or_else(|| default_trace_store(state_dir));
        Ok(Engine {
            launcher,
            limits: self.limits.limits(defaults),
            publish: PublishConfig { state_dir: state_dir.to_owned(), trace_store, key_naming },
        })
    }
}

/// What the long-running builders (`vouch nix-builder`, `vouch serve`) share: the content store's
/// bound, the client's Nix release, and the engine's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct BuilderArgs {
    /// Most NAR bytes the content store keeps (suffixes K, M, G, T); least recently used paths
    /// that no running session or build pins are evicted beyond it.
    #[arg(long, default_value_t = DEFAULT_MAX_BYTES.to_string(), value_parser = parse_size, value_name = "BYTES")]
    pub store_max_size: String,
    /// The Nix release the clients run (e.g. 2.8), where neither the protocol version (serve
    /// protocol 2.7 = Nix 2.8–2.34, worker 1.35 = 2.15–2.18) nor the request says: it decides
    /// the self-reference rule of content-addressed output paths.
    #[arg(long, value_name = "X.Y")]
    pub client_nix_version: Option<NixVersion>,
    /// Keep N VMs booted ahead of jobs (`serve`, `nix-builder --listen`): each takes one job
    /// that fits it, then powers off; never reused [default: what a quarter of the host's
    /// available memory holds, at most 4; 0: none].
    #[arg(long, value_name = "N")]
    pub pool: Option<usize>,
    /// Replace a pool VM that waited this many seconds for a job with a fresh one.
    #[arg(long, default_value_t = 600, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub pool_idle: u64,
    /// Trace store, limits (vouch's defaults where the client sets none: always over
    /// `ssh-ng://`), VM and key.
    #[command(flatten)]
    pub engine: EngineArgs,
}

impl BuilderArgs {
    /// The engine (limits: [`host_launcher::core::request::builder_limits`] where the flags
    /// set none) and the content store's settings.
    pub fn config(&self, state_dir: &Path) -> Result<(Engine, StoreConfig), super::CmdError> {
        let max_bytes = size_bytes(&self.store_max_size)?;
        let engine =
            self.engine.engine(state_dir, &host_launcher::core::request::builder_limits())?;
        Ok((engine, StoreConfig { max_bytes }))
    }
}

impl BuilderArgs {
    /// Start the warm pool that `--pool` asks for (or its default size) for `engine`'s
    /// launcher, and give it to the launcher. `None` for size 0, or when VMs cannot be
    /// prepared (no image, no SNP preflight): said loudly, and builds then boot on demand and
    /// report the error themselves, while the server serves what needs no VM. Dropping the
    /// handle shuts the pool down (every pool VM killed).
    pub fn start_pool(&self, engine: &mut Engine) -> Option<ShutdownOnDrop> {
        let size = self.pool.unwrap_or_else(|| pool::default_size(engine.launcher.memory_mib));
        if size == 0 {
            return None;
        }
        let cfg = PoolConfig { size, idle: Duration::from_secs(self.pool_idle), boot_parallel: 2 };
        match Pool::start(&engine.launcher, cfg) {
            Ok(pool) => {
                engine.launcher.pool = Some(pool.clone());
                Some(ShutdownOnDrop(pool))
            }
            Err(e) => {
                tracing::warn!(
                    "no warm VM pool (builds boot on demand): {}",
                    build_trace::error_chain(&e)
                );
                None
            }
        }
    }
}

/// `123`, `10K`, `512M`, `20G`, `1T` (powers of 1024).
fn parse_size(s: &str) -> Result<String, String> {
    size_bytes(s).map(|n| n.to_string())
}

/// The bytes of a size like `20G` (see [`parse_size`]).
fn size_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("{s:?}: unknown size suffix (use K, M, G or T)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size like 20G"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cmd {
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        vm: VmArgs,
        #[command(flatten)]
        key: KeyArgs,
    }

    fn parse(args: &[&str]) -> Cmd {
        Cmd::try_parse_from(std::iter::once("cmd").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn limits_take_the_commands_defaults_only_where_not_given() {
        let builder = host_launcher::core::request::builder_limits();
        let c = parse(&["--max-memory", "64", "--max-processes", "32", "--tmpfs-size", "16"]);
        let l = c.limits.limits(&builder);
        assert_eq!((l.memory_bytes, l.max_processes, l.tmpfs_bytes), (64 << 20, 32, 16 << 20));
        assert_eq!((l.timeout_s, l.max_silent_s, l.max_log_bytes), (10800, 3600, 64 << 20));
        assert_eq!(c.limits.limits(&Limits::default()).timeout_s, 0, "vouch build: none");
        let c = parse(&["--timeout", "0", "--max-log-size", "5", "--allow-weak-hashes"]);
        let l = c.limits.limits(&builder);
        assert_eq!((l.timeout_s, l.max_silent_s, l.max_log_bytes), (0, 3600, 5));
        let cfg = c.vm.launcher(Path::new("/state"), &c.limits);
        assert!(cfg.allow_weak_fixed_hashes);
        assert_eq!(cfg.stall_timeout, Duration::from_secs(60));
        assert_eq!(cfg.boot_timeout, Duration::from_secs(120));
        assert_eq!(cfg.infra_retries, 1);
    }

    #[test]
    fn vm_flags_reach_the_launcher() {
        let c = parse(&[
            "--stall-timeout",
            "5",
            "--boot-timeout",
            "7",
            "--qemu",
            "/opt/q",
            "--cpus",
            "2",
            "--memory",
            "512",
            "--mode",
            "tcg",
        ]);
        let cfg = c.vm.launcher(Path::new("/state"), &c.limits);
        assert_eq!(
            (cfg.stall_timeout, cfg.boot_timeout),
            (Duration::from_secs(5), Duration::from_secs(7))
        );
        assert_eq!(cfg.qemu, Path::new("/opt/q"));
        assert_eq!((cfg.vcpus, cfg.memory_mib, cfg.mode), (2, 512, Some(Mode::Tcg)));
        assert!(cfg.egress.allowed().is_empty() && !cfg.egress.unfiltered(), "filtered by default");
        let c = parse(&["--allow-egress", "10.1.0.0/16", "--allow-egress", "10.1.2.3"]);
        let cfg = c.vm.launcher(Path::new("/state"), &c.limits);
        assert_eq!(cfg.egress.allowed(), ["10.1.0.0/16".parse::<ipnet::Ipv4Net>().unwrap()]);
        assert!(parse(&["--unfiltered-network"])
            .vm
            .launcher(Path::new("/s"), &c.limits)
            .egress
            .unfiltered());
        assert!(Cmd::try_parse_from(["cmd", "--allow-egress", "fd00::/8"]).is_err());
        assert!(
            Cmd::try_parse_from(["cmd", "--stall-timeout", "0"]).is_err(),
            "0 would never wait"
        );
    }

    #[test]
    fn key_name_flag_wins_over_the_state_directory() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("key-name"), "from-file-simulated-1\n").unwrap();
        let c = parse(&["--key-name", "flag-simulated-1"]);
        assert_eq!(c.key.naming(t.path()).unwrap().name(true).unwrap(), "flag-simulated-1");
        let c = parse(&[]);
        assert_eq!(c.key.naming(t.path()).unwrap().name(true).unwrap(), "from-file-simulated-1");
        let c = parse(&["--key-name", "plain-1"]);
        assert!(c.key.naming(t.path()).unwrap().name(true).is_err());
    }

    #[test]
    fn the_trace_store_flag_keeps_its_old_name() {
        #[derive(Debug, Parser)]
        struct Cmd {
            #[command(flatten)]
            engine: EngineArgs,
        }
        let t = tempfile::tempdir().unwrap();
        for flag in ["--traces", "--cache"] {
            let c =
                Cmd::try_parse_from(["cmd", flag, "/t", "--key-name", "k-simulated-1"]).unwrap();
            let engine = c.engine.engine(t.path(), &Limits::default()).unwrap();
            assert_eq!(engine.publish.trace_store, Path::new("/t"), "{flag}");
        }
        let c = Cmd::try_parse_from(["cmd", "--key-name", "k-simulated-1"]).unwrap();
        let engine = c.engine.engine(t.path(), &Limits::default()).unwrap();
        assert_eq!(engine.publish.trace_store, t.path().join("cache"));
    }

    #[test]
    fn sizes() {
        assert_eq!(size_bytes("123").unwrap(), 123);
        assert_eq!(size_bytes("10K").unwrap(), 10 << 10);
        assert_eq!(size_bytes("20g").unwrap(), 20 << 30);
        assert!(size_bytes("12X").is_err());
        assert!(size_bytes("G").is_err());
    }
}
