//! Booting one VM up to its agent's `Ready`: the half of a step that does not need the job, so
//! a warm pool ([`crate::pool`]) can do it before the job exists.
//!
//! ```text
//! BootContext::prepare(cfg) -> BootContext        // image, mode, attester setup, vsock backend
//! new_launch(vcpus, memory_mib, network) -> Launch // a fresh 32-byte nonce from the OS
//! boot(&ctx, LaunchRequest, cfg, on_started) -> Result<BootedVm, StepError>
//! ```
//! [`boot`] checks the image files against the manifest, writes the QEMU command line for the launch (its HOST_DATA on SNP's command line; on
//! SNP the image must list a measurement for the launch's vCPU count and model), starts QEMU
//! (a networked launch's in its filtered namespace), accepts the channel within the boot
//! timeout, and speaks the boot half of the conversation
//! ([`super::conversation::hello_and_launch`]). Every wait has its deadline, a cancelled
//! launcher kills the VM ([`Watchdog`]), and a failure kills QEMU and the vsock daemon and
//! removes the run directory (the [`BootedVm`]'s fields are dropped in that order).
//!
//! What is not here: the job, retries and checks (`super::host`, `super::check`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use build_trace::evidence::SimulatedRoot;
use build_trace::launch::Launch;
use channel::messages::{AttesterKind, Setup, SimulatedSetup};
use vm_image::image::{files, Manifest};

use super::conversation::{hello_and_launch, Greeting};
use super::watch::ChannelWatch;
use super::{LauncherConfig, StepError};
use crate::vm::egress::{self, Egress};
use crate::vm::network::NetworkGrant;
use crate::vm::runner::{describe_exit, Vm};
use crate::vm::vsock::{detect_backend, Backend, Channel, Stream, VsockError};
use crate::vm::{choose_mode, host_cbitpos, qemu_argv, HostCaps, Mode, QemuSpec, SnpLaunch};
use crate::vm::{VsockDevice, SNP_POLICY};

/// What every boot of one launcher shares.
#[derive(Debug, Clone)]
pub struct BootContext {
    /// The image's manifest (its files were checked against it).
    pub manifest: Arc<Manifest>,
    /// The mode VMs run in.
    pub mode: Mode,
    /// The attester material the agent gets (the simulated signer, off SNP).
    pub setup: Setup,
    /// This host's simulated root (off SNP), which the outcome's evidence is checked under.
    pub sim_root: Option<Arc<SimulatedRoot>>,
    /// The vsock backend.
    pub backend: Backend,
}

impl BootContext {
    /// Load the image's manifest (each boot checks the files against it), choose the mode (SNP: run the host's preflight checks), load
    /// or make the simulated root, find the vsock backend.
    pub fn prepare(cfg: &LauncherConfig) -> Result<BootContext, StepError> {
        let manifest = Manifest::load(&cfg.image_dir)
            .map_err(|e| StepError::Image(cfg.image_dir.clone(), e))?;
        let caps = HostCaps::probe();
        let mode = choose_mode(cfg.mode, &caps, manifest.snp.is_some())?;
        if mode == Mode::Snp {
            // Fail within a second, naming the fix, rather than after a whole build in the VM.
            let vcek =
                cfg.snp_vcek.clone().or_else(|| std::env::var_os("VOUCH_SNP_VCEK").map(Into::into));
            crate::snp::checks::preflight(&crate::snp::checks::ProbeConfig {
                qemu: &cfg.qemu,
                image_dir: &cfg.image_dir,
                state_dir: &cfg.state_dir,
                vcek: vcek.as_deref(),
                manifest: Some(&manifest),
            })?;
        }
        let (setup, sim_root) = if mode == Mode::Snp {
            (Setup::default(), None)
        } else {
            let root = SimulatedRoot::load_or_generate(&cfg.simulated_root_dir()).map_err(|e| {
                StepError::Io(
                    "simulated SNP root".into(),
                    std::io::Error::other(build_trace::error_chain(&e)),
                )
            })?;
            (simulated_setup(&root, &manifest)?, Some(Arc::new(root)))
        };
        let backend = detect_backend(caps.vhost_vsock)?;
        Ok(BootContext { manifest: Arc::new(manifest), mode, setup, sim_root, backend })
    }

    /// The measurement (hex) the evidence of a VM of `launch` must show: on SNP the image's
    /// for its vCPU count and model, else the simulated one.
    pub fn expected_measurement(&self, launch: &Launch) -> Result<String, StepError> {
        match (&self.manifest.snp, self.mode) {
            (Some(snp), Mode::Snp) => {
                let vcpus = u32::try_from(launch.vcpus).unwrap_or(u32::MAX);
                snp.measurement_for(vcpus, &snp.params.vcpu_type).map(str::to_owned).ok_or_else(
                    || {
                        StepError::Request(format!(
                            "the image has no SNP measurement for {vcpus} vCPU {} (it has {}): \
                             rebuild it with `vouch image build --vcpu-counts …` or use --cpus",
                            snp.params.vcpu_type,
                            snp.shapes()
                        ))
                    },
                )
            }
            _ => Ok(self.manifest.simulated_measurement.clone()),
        }
    }
}

fn simulated_setup(root: &SimulatedRoot, manifest: &Manifest) -> Result<Setup, StepError> {
    let key = root.vcek_key_pkcs8().map_err(|e| {
        StepError::Io("simulated VCEK key".into(), std::io::Error::other(e.to_string()))
    })?;
    let p = root.platform();
    Ok(Setup {
        simulated: Some(SimulatedSetup {
            vcek_key_pkcs8: base64::engine::general_purpose::STANDARD.encode(key),
            chip_id: hex::encode(p.chip_id),
            tcb: [p.tcb.bootloader, p.tcb.tee, p.tcb.snp, p.tcb.microcode],
            measurement: manifest.simulated_measurement.clone(),
        }),
    })
}

/// A launch of `vcpus` vCPUs and `memory_mib` MiB with a fresh random nonce (from the OS's
/// generator: 256 bits, so two launches never share one).
pub fn new_launch(vcpus: u32, memory_mib: u32, network: bool) -> Launch {
    use rand_core::RngCore;
    let mut nonce = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut nonce);
    Launch::new(nonce, u64::from(vcpus), u64::from(memory_mib), network)
}

/// One VM to boot.
#[derive(Debug)]
pub struct LaunchRequest {
    /// The launch document (HOST_DATA is its hash).
    pub launch: Launch,
    /// The NIC grant of a networked launch (only a fixed-output job has one).
    pub network: Option<NetworkGrant>,
    /// A networked launch's filtered namespace tools (`None`: unfiltered, unsafe).
    pub egress: Option<egress::Tools>,
    /// A boot ahead of its job (a pool's): QEMU boots at low CPU priority ([`BACKGROUND_NICE`])
    /// so it never slows a running step, and gets normal priority back once its agent is
    /// ready. Only where this process may raise priorities again (root); else ignored.
    pub background: bool,
}

/// The nice value of a background boot.
pub const BACKGROUND_NICE: i32 = 10;

/// Give every thread of process `pid` the nice value `value` (`renice`, which acts on one
/// thread per id on Linux, over `/proc/<pid>/task`).
fn renice(pid: u32, value: i32) -> std::io::Result<()> {
    let tids: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    let st = std::process::Command::new("renice")
        .args(["-n", &value.to_string(), "-p"])
        .args(&tids)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()?;
    if st.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("renice {}", describe_exit(&st))))
    }
}

/// A booted VM whose agent accepted its launch and waits for its one job. Dropping it kills
/// QEMU, then the vsock daemon, then removes the namespace and the run directory.
#[derive(Debug)]
pub struct BootedVm {
    /// QEMU (declared first: dropped, i.e. killed, first).
    pub vm: Vm,
    // Held for their `Drop`s, in this order: the vsock daemon, the namespace, the directory.
    _chan: Channel,
    _egress: Option<Egress>,
    _run_dir: tempfile::TempDir,
    pub(crate) stream: Stream,
    /// The launch it accepted.
    pub launch: Launch,
    /// What the agent said at boot.
    pub(crate) greeting: Greeting,
    /// The mode.
    pub mode: Mode,
}

impl BootedVm {
    /// The attester the agent found.
    pub fn attester(&self) -> AttesterKind {
        self.greeting.attester
    }

    /// When the agent became ready.
    pub fn ready_at(&self) -> Instant {
        self.greeting.ready_at
    }

    /// Whether QEMU is still running.
    pub fn alive(&self) -> bool {
        self.vm.exited().is_none()
    }

    /// A second handle to the channel, on which the agent waits for its job (for tests of the
    /// agent's one-job rule; a step speaks through [`crate::build::run_step`]).
    pub fn channel(&self) -> std::io::Result<Stream> {
        self.stream.try_clone()
    }
}

/// Kills QEMU once its deadline passes or the launcher is cancelled, until stopped (or
/// dropped).
#[derive(Debug)]
pub(crate) struct Watchdog {
    done: Arc<AtomicBool>,
    timed_out: Arc<AtomicBool>,
}

impl Watchdog {
    pub(crate) fn start(pid: u32, deadline: Option<Instant>, cancel: super::Cancel) -> Watchdog {
        let done = Arc::new(AtomicBool::new(false));
        let timed_out = Arc::new(AtomicBool::new(false));
        let (d, t) = (done.clone(), timed_out.clone());
        std::thread::spawn(move || {
            while !d.load(Ordering::SeqCst) {
                let late = deadline.is_some_and(|end| Instant::now() >= end);
                if late || cancel.is_cancelled() {
                    t.store(late, Ordering::SeqCst);
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Watchdog { done, timed_out }
    }

    /// The VM is no longer the watchdog's to kill.
    pub(crate) fn stop(&self) {
        self.done.store(true, Ordering::SeqCst);
    }

    /// Whether the deadline (not a cancellation) killed the VM.
    pub(crate) fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::SeqCst)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Boot a VM for `req` up to its agent's `Ready` (see the module docs). `on_started` gets
/// QEMU's pid as soon as it runs.
pub fn boot(
    ctx: &BootContext,
    req: LaunchRequest,
    cfg: &LauncherConfig,
    on_started: &mut dyn FnMut(u32),
) -> Result<BootedVm, StepError> {
    let mode = ctx.mode;
    let launch_bytes =
        req.launch.canonical_bytes().map_err(|e| StepError::Request(e.to_string()))?;
    // Unix socket paths must stay short: a private directory under $TMPDIR, named after this
    // process so that the next launcher removes it if this one is killed (`crate::recovery`).
    let run_dir = tempfile::Builder::new()
        .prefix(&crate::vm::child::run_dir_prefix())
        .tempdir()
        .map_err(|e| StepError::Io("creating the VM run directory".into(), e))?;
    let manifest = &ctx.manifest;
    // Every launch boots exactly the files the manifest names.
    manifest
        .verify_files(&cfg.image_dir)
        .map_err(|e| StepError::Image(cfg.image_dir.clone(), e))?;
    let port = channel::config::parse_cmdline(&manifest.cmdline)
        .map(|c| c.port)
        .unwrap_or(channel::config::DEFAULT_PORT);
    let mut chan = Channel::prepare(&ctx.backend, run_dir.path(), port)?;
    if mode == Mode::Snp {
        ctx.expected_measurement(&req.launch)?;
    }
    let host_data = build_trace::launch::host_data_of(&launch_bytes);
    let spec = qemu_spec(ctx, cfg, &req.launch, req.network, chan.device().clone(), host_data);
    let argv = qemu_argv(&spec).map_err(|e| StepError::Request(e.to_string()))?;
    // A networked VM's QEMU runs in its own filtered namespace, removed after QEMU is killed.
    let egress = match (&spec.network, &req.egress) {
        (Some(_), Some(tools)) => {
            Some(Egress::create(tools, &cfg.egress).map_err(StepError::from)?)
        }
        _ => None,
    };
    let (program, argv) = match &egress {
        Some(e) => e.command(&cfg.qemu, &argv),
        None => (cfg.qemu.clone(), argv),
    };
    let background = req.background && nix::unistd::geteuid().is_root();
    let (program, argv) = if background { niced(&program, argv) } else { (program, argv) };
    tracing::debug!(?program, ?argv, nonce = %req.launch.nonce, "starting QEMU");
    let console_log = run_dir.path().join("console.log");
    let vm = Vm::spawn(&program, &argv, &console_log, cfg.echo_console)
        .map_err(|e| StepError::Qemu(cfg.qemu.display().to_string(), e))?;
    let started = vm.started();
    // Until the agent is ready, a cancelled launcher kills the VM.
    let watchdog = Watchdog::start(vm.pid(), None, cfg.cancel.clone());
    on_started(vm.pid());

    // Boot watchdog, part one: the connection (part two, the hello, is the channel watch's).
    let connect_within = cfg.boot_timeout.saturating_sub(started.elapsed());
    let stream = chan
        .accept(connect_within, &|| vm.exited().is_none())
        .map_err(|e| not_connected(&vm, e, cfg.boot_timeout))?;
    // QEMU's exit ends the conversation at once. The agent powers off only after we closed the
    // channel (having read its `Bye`; `agent::run`'s linger), so an exit before that is a VM that
    // did not finish: frames of a guest that powered off before our reader caught up were lost
    // with QEMU (the vsock backend drops what it holds; reproduced with a delayed reader).
    if let Ok(s2) = stream.try_clone() {
        vm.on_exit(move || s2.shutdown());
    }
    let watch = ChannelWatch::for_boot(started, cfg.boot_timeout, cfg.stall_timeout);
    let greeted = hello_and_launch(&stream, &watch, mode, &ctx.setup, &launch_bytes);
    watchdog.stop();
    let greeting = greeted.map_err(|e| not_greeted(&vm, &watch, e))?;
    if background {
        if let Err(e) = renice(vm.pid(), 0) {
            // A VM that would run its job at low priority is no use: stop it.
            vm.kill();
            return Err(StepError::Io("giving the booted VM normal CPU priority".into(), e));
        }
    }
    Ok(BootedVm {
        vm,
        _chan: chan,
        _egress: egress,
        _run_dir: run_dir,
        stream,
        launch: req.launch,
        greeting,
        mode,
    })
}

/// What QEMU boots for `launch`: the image's kernel (SNP: with OVMF and `host_data`), its initrd
/// and command line, the launch's size, the channel's device and the NIC grant, if any.
fn qemu_spec(
    ctx: &BootContext,
    cfg: &LauncherConfig,
    launch: &Launch,
    network: Option<NetworkGrant>,
    vsock: VsockDevice,
    host_data: [u8; 32],
) -> QemuSpec {
    let mode = ctx.mode;
    let img = |f: &str| cfg.image_dir.join(f);
    QemuSpec {
        mode,
        kernel: if mode == Mode::Snp { img(files::BZIMAGE) } else { img(files::VMLINUX) },
        initrd: img(files::INITRD),
        cmdline: ctx.manifest.cmdline.clone(),
        memory_mib: u32::try_from(launch.memory_mib).unwrap_or(u32::MAX),
        vcpus: u32::try_from(launch.vcpus).unwrap_or(u32::MAX),
        vsock,
        snp: (mode == Mode::Snp).then(|| SnpLaunch {
            ovmf: img(files::OVMF),
            host_data,
            policy: SNP_POLICY,
            cbitpos: host_cbitpos(),
            reduced_phys_bits: 1,
            cpu_model: ctx
                .manifest
                .snp
                .as_ref()
                .map_or("EPYC-v4".into(), |s| s.params.vcpu_type.clone()),
        }),
        network,
    }
}

/// `program argv…` run at the background boot's nice value.
fn niced(program: &Path, argv: Vec<String>) -> (PathBuf, Vec<String>) {
    let mut a = vec!["-n".to_owned(), BACKGROUND_NICE.to_string()];
    a.push(program.to_string_lossy().into_owned());
    a.extend(argv);
    ("nice".into(), a)
}

/// The error of a boot whose agent never connected (`e`), after QEMU is stopped.
fn not_connected(vm: &Vm, e: VsockError, boot_timeout: Duration) -> StepError {
    let status = vm.exited().or_else(|| vm.kill());
    // Give the stderr reader a moment to collect QEMU's last words.
    std::thread::sleep(Duration::from_millis(50));
    match e {
        VsockError::VmGone => StepError::NoAgent {
            status: status.as_ref().map_or("ended".into(), describe_exit),
            qemu: vm.qemu_stderr(),
            console: vm.console_tail(),
        },
        VsockError::Timeout(_) => StepError::Vsock(VsockError::Timeout(boot_timeout)),
        other => StepError::Vsock(other),
    }
}

/// The error of a boot whose hello or launch failed (`e`), after QEMU is stopped: a stall the
/// watch saw, a VM that ended (unless the guest itself said what went wrong), else `e`.
fn not_greeted(vm: &Vm, watch: &ChannelWatch, e: StepError) -> StepError {
    let ended = vm.exited().or_else(|| vm.wait_timeout(Duration::from_millis(200)));
    vm.kill();
    match (watch.tripped(), ended) {
        (Some(trip), _) => {
            StepError::Stalled { trip, phase: "booted".into(), console: vm.console_tail() }
        }
        (None, Some(st)) if !matches!(e, StepError::Guest { .. }) => StepError::NoAgent {
            status: describe_exit(&st),
            qemu: vm.qemu_stderr(),
            console: vm.console_tail(),
        },
        _ => e,
    }
}
