//! Whole-closure builds of the CI service, scheduled by a real Nix.
//!
//! # Algorithm
//!
//! For a submitted derivation with input derivations (`POST /v1/builds`, its `.drv` closure
//! uploaded with `nix copy --derivation`):
//! 1. **Check** before queueing (`super::submission`): every derivation of the graph hashes to
//!    its path; an input-addressed one declares the paths its hash modulo gives, a deferred one
//!    none (refused otherwise, whoever asks); a fixed-output one only for a caller with a
//!    token. The build gets one step per derivation, in dependency order.
//! 2. **Import** ([`nix::NixDriver::import`]): the `.drv` closure (the `.drv` files and input
//!    sources, from the content store) goes into the service's private Nix store
//!    (`local?root=<state dir>/serve/nix`) with `nix-store --import`, so Nix's own checks
//!    (`checkDerivationOutputs`) see the `.drv` files too.
//! 3. **Schedule** ([`nix::NixDriver::realise`]): `nix-store --realise` in that store with
//!    `max-jobs = 0`, `--builders @<state dir>/serve/machines` (this service's own builder,
//!    [`local`], `--jobs` slots, and the lines of `serve --builders FILE`: other vouch hosts),
//!    the service's own cache (`file://` of its trace store) as the only substituter with its key
//!    in `trusted-public-keys`, `keep-going`, and `--log-format internal-json`. Nix resolves
//!    content-addressed and deferred steps itself, sends each step to a builder, substitutes
//!    what the cache already has. Nix is the scheduler; this module only reads what it says.
//! 4. **Follow** ([`events`]): `actBuild` events name each step and its machine, log lines go
//!    to the step of their activity, resolutions name the resolved derivation, error messages
//!    name failed steps. Step states change as the events come.
//! 5. **Traces** ([`traces`]): a step built by this service's own builder was published by the
//!    engine as every build here is (statement and evidence checked by the launcher). A step
//!    built elsewhere is fetched from that builder's trace store, verified under the service's
//!    trust policy, and only then published and signed here (the one publish step).
//! 6. **Result**: a step not built and not failed was reused (substituted from the cache, or
//!    already valid); a step not built whose input failed fails, naming the step it waited for.
//!    The build's state is its root step's.
//!
//! What is not here: the queue and the steps' records (`super::builds`), the builders
//! themselves (`crate::nixbuilder`).

pub mod events;
pub mod export;
pub mod local;
pub mod nix;
pub mod traces;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use build_trace::trust::{PreparedPolicy, TrustPolicy};
use nix_formats::signing::PublicKey;
use nix_formats::StorePath;

use crate::core::{Derivations, Engine};
use crate::store::StoreConfig;

pub use traces::{BuilderTraces, TraceLocation};

/// Why whole-closure builds could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClosureError {
    /// The service's own builder.
    #[error("starting the service's builder")]
    Local(#[source] local::LocalError),
    /// `--builders FILE`.
    #[error("reading --builders {0}")]
    Builders(PathBuf, #[source] std::io::Error),
    /// The machines file.
    #[error("writing the machines file {0}")]
    Machines(PathBuf, #[source] std::io::Error),
    /// The trust policy.
    #[error("the trust policy for builders' traces")]
    Policy(#[source] build_trace::trust::PolicyError),
}

/// A closure build: the graph, and its derivations in dependency order (one step each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosureJob {
    /// The submitted derivation and its input derivations.
    pub derivations: Derivations,
    /// Every derivation of the graph, each after its inputs (the root last).
    pub order: Vec<StorePath>,
    /// Nix's `timeout` for each step (0: the builders' default).
    pub timeout: u64,
    /// Nix's `max-silent-time` for each step (0: the builders' default).
    pub max_silent_time: u64,
}

/// How the service builds closures (the operator's settings).
#[derive(Debug, Clone, Default)]
pub struct ClosureConfig {
    /// Other vouch builders, in Nix's machines format (`serve --builders FILE`).
    pub builders_file: Option<PathBuf>,
    /// Where each builder's traces are (`--builder-traces MACHINE=LOCATION`), and the CA roots
    /// for `https://` ones.
    pub builder_traces: BuilderTraces,
    /// The trust policy for their traces (`--policy FILE`); default: the default policy
    /// pinning the guest image's manifest.
    pub policy: Option<PathBuf>,
}

/// The service's closure machinery: its Nix, its own builder, the policy and the builders'
/// trace locations.
#[derive(Debug)]
pub struct Closures {
    /// How Nix runs.
    pub driver: nix::NixDriver,
    /// The machine name of the service's own builder (as Nix's events name it).
    pub local_machine: String,
    /// The release of the Nix that resolves and builds closures (why it is not known): its
    /// self-reference rule is that of every floating-CA step of a closure build.
    pub nix_version: Result<crate::core::NixVersion, String>,
    /// The policy other builders' traces must satisfy (why there is none: the default
    /// policy needs a guest image manifest with an SEV-SNP measurement).
    pub policy: Result<PreparedPolicy, String>,
    /// Where other builders' traces are (remote files cached in
    /// `<state dir>/serve/trace-cache`, by content hash).
    pub traces: BuilderTraces,
    /// Where NARs downloaded from remote builders wait for the publish step
    /// (`<state dir>/serve/trace-downloads`, emptied at start).
    pub downloads: PathBuf,
    local: Mutex<local::LocalBuilder>,
    /// Closure builds running now; the last one out collects the private store's garbage.
    running: Mutex<usize>,
}

/// The service's builder socket: `DIR/builder.sock`, or where a Unix socket's path fits (108
/// bytes) when that is too long: the temporary directory, named after `DIR`.
fn socket_path(dir: &Path) -> PathBuf {
    let p = dir.join("builder.sock");
    if p.as_os_str().len() < 100 {
        return p;
    }
    use sha2::Digest;
    let h = sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes());
    let tag: String = h[..8].iter().map(|b| format!("{b:02x}")).collect();
    std::env::temp_dir().join(format!("vouch-serve-{tag}.sock"))
}

/// The default policy (`docs/trust-policy.md`), pinning the guest image's manifest.
fn default_policy(engine: &Engine) -> Result<PreparedPolicy, String> {
    let manifest = engine.launcher.image_dir.join("manifest.json");
    TrustPolicy::default_for(&[manifest.display().to_string()])
        .and_then(|p| p.prepare())
        .map_err(|e| format!("the default trust policy: {}", build_trace::error_chain(&e)))
}

/// The machines of a machines file's `lines` (each line's first field; `#` comments skipped).
fn machine_names(lines: &str) -> Vec<&str> {
    lines
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default())
        .filter_map(|l| l.split_whitespace().next())
        .collect()
}

/// Say which builders of `--builders` have no trace location (their steps cannot be accepted)
/// and which trace locations name no builder (a typo: never used).
fn warn_unmatched(others: &str, traces: &BuilderTraces) {
    let names = machine_names(others);
    for m in names.iter().filter(|m| traces.of(m).is_none()) {
        tracing::warn!(
            machine = m,
            "no --builder-traces for this builder: steps it builds will fail"
        );
    }
    for m in traces.machines.keys().filter(|m| !names.contains(&m.as_str())) {
        tracing::warn!(machine = %m, "--builder-traces names a machine no line of --builders names");
    }
}

/// One closure build's hold on its private store ([`Closures::enter`]).
#[derive(Debug)]
pub struct Running<'a> {
    closures: &'a Closures,
    /// The Nix (and private store) of this build.
    pub driver: nix::NixDriver,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut n = self.closures.running.lock().unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        if *n == 0 {
            // Nothing else uses the store while the count is held at zero: everything in it is
            // either in the service's cache (outputs) or uploaded (`.drv` files, sources).
            if let Err(e) = self.driver.collect_garbage() {
                tracing::warn!(
                    "collecting the private Nix store's garbage: {}",
                    build_trace::error_chain(&e)
                );
            }
        }
    }
}

impl Closures {
    /// Start the service's builder (`jobs` slots, `engine`, the content store at `store_dir`)
    /// under `state_dir/serve/`, write the machines file, load the policy.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        cfg: &ClosureConfig,
        engine: &Engine,
        state_dir: &Path,
        store_dir: &Path,
        store_cfg: StoreConfig,
        jobs: usize,
        public_key: &str,
        trusted_keys: &[PublicKey],
        trusted_clients: usize,
    ) -> Result<Closures, ClosureError> {
        let dir = state_dir.join("serve");
        let mut keys = trusted_keys.to_vec();
        keys.extend(PublicKey::parse(public_key).ok());
        let local = local::LocalBuilder::start(
            &socket_path(&dir),
            &dir.join("builder.real"),
            engine.clone(),
            store_dir,
            store_cfg,
            keys,
        )
        .map_err(ClosureError::Local)?;
        let line = nix::local_machine_line(local.socket(), local.real(), jobs, &[]);
        let local_machine = line.split(' ').next().unwrap_or_default().to_owned();
        let others = match &cfg.builders_file {
            Some(f) => {
                Some(std::fs::read_to_string(f).map_err(|e| ClosureError::Builders(f.clone(), e))?)
            }
            None => None,
        };
        warn_unmatched(others.as_deref().unwrap_or_default(), &cfg.builder_traces);
        let machines = dir.join("machines");
        nix::write_machines(&machines, &line, others.as_deref())
            .map_err(|e| ClosureError::Machines(machines.clone(), e))?;
        let policy = match &cfg.policy {
            Some(p) => {
                Ok(TrustPolicy::load(p).and_then(|p| p.prepare()).map_err(ClosureError::Policy)?)
            }
            None => default_policy(engine),
        };
        if let (Err(why), Some(_)) = (&policy, &cfg.builders_file) {
            tracing::warn!("steps built by --builders cannot be accepted: {why}; give --policy");
        }
        let driver = nix::NixDriver {
            root: dir.join("nix"),
            machines,
            cache: engine.publish.trace_store.clone(),
            public_key: public_key.to_owned(),
        };
        // Trusted clients' stores from a previous run: their overlays are gone, so is what
        // their builds imported (nothing is rooted there).
        for n in 0..trusted_clients {
            let mut d = driver.clone();
            d.root = d.root.with_file_name(format!("nix-client-{n}"));
            if d.root.exists() {
                if let Err(e) = d.collect_garbage() {
                    tracing::warn!(store = %d.root.display(), "{}", build_trace::error_chain(&e));
                }
            }
        }
        let mut traces = cfg.builder_traces.clone();
        traces.fetch.cache_dir = Some(dir.join("trace-cache"));
        // Only the holder of the state directory's lock starts closures: what is there is a
        // predecessor's.
        let downloads = dir.join("trace-downloads");
        if let Err(e) = std::fs::remove_dir_all(&downloads) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %downloads.display(), "emptying the NAR downloads: {e}");
            }
        }
        let nix_version = driver.version();
        if let Err(why) = &nix_version {
            tracing::warn!(
                "closure builds with floating-CA steps that name a \"nix_version\" will be \
                 refused: {why}"
            );
        }
        tracing::info!(machines = %driver.machines.display(), store = %driver.root.display(),
                       "closures are scheduled by Nix on the builders of the machines file");
        Ok(Closures {
            driver,
            local_machine,
            nix_version,
            policy,
            traces,
            downloads,
            local: Mutex::new(local),
            running: Mutex::new(0),
        })
    }

    /// Hold a private store for one closure build (import, Nix, traces): the service's, or for
    /// a trusted client's build (which may read its overlay's uploads, which no other client's
    /// build may see, `crate::store::session`) one of that client's own,
    /// `<state dir>/serve/nix-client-<n>`.
    pub fn enter(&self, client: Option<usize>) -> Running<'_> {
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        Running { closures: self, driver: self.driver_for(client) }
    }

    fn driver_for(&self, client: Option<usize>) -> nix::NixDriver {
        let mut d = self.driver.clone();
        if let Some(n) = client {
            d.root = d.root.with_file_name(format!("nix-client-{n}"));
        }
        d
    }

    /// Stop the service's builder (its running builds cancelled).
    pub fn stop(&self) {
        self.local.lock().unwrap_or_else(|e| e.into_inner()).stop();
    }
}
