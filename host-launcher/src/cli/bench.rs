//! `vouch bench vm`: the per-step time split and its baselines (see `host_launcher::bench`), and
//! `vouch bench boot`. Only with the `bench` feature; both default to the bench image
//! (`vm_image::default_bench_image_dir`).

use std::path::PathBuf;
use std::process::ExitCode;

use host_launcher::build::LauncherConfig;
use host_launcher::vm::Mode;

use super::{CmdResult, Global};

/// Subcommands of `vouch bench`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Boot the image with extra kernel command-line words (e.g. `vouch.bench=panic`) and say
    /// how the VM ended (for tests and boot measurements; builds never use it).
    Boot {
        /// Words appended to the image's command line.
        #[arg(long, default_value = "vouch.bench=poweroff")]
        append: String,
        /// Kill the VM after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Image directory (default: the bench image; the real image's agent refuses
        /// `vouch.bench=`).
        #[arg(long)]
        image: Option<PathBuf>,
    },
    /// Boot, transfer, build, hash, attest: a trivial step against its baselines.
    Vm {
        /// Runs per measurement (medians are reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// MiB sent through the channel for the throughput and hashing measurements.
        #[arg(long, default_value_t = 32)]
        mib: u64,
        /// Independent steps in the batch measurement (0: none).
        #[arg(long, default_value_t = 50)]
        batch: usize,
        /// Steps at once in the batch (vouch's pool size and threads; Nix's --max-jobs).
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        /// VM mode (default: automatic; snp is measured as kvm).
        #[arg(long, value_enum)]
        mode: Option<Mode>,
        /// Bench image directory (its agent built with the `bench` feature:
        /// `scripts/build-image.sh --bench`).
        #[arg(long)]
        image: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Echo the console of every step's VM to stderr (the agent's lines carry the guest's
        /// uptime: where a step's guest time goes).
        #[arg(long)]
        console: bool,
    },
}

/// Run `vouch bench …`.
pub fn run(cmd: Command, global: &Global) -> CmdResult {
    let (params, mode, image, json, console) = match cmd {
        Command::Vm { runs, mib, batch, jobs, mode, image, json, console } => {
            let params = host_launcher::bench::BenchParams {
                runs: runs.max(1),
                mib: mib.max(1),
                batch_steps: batch,
                jobs: jobs.max(1),
            };
            (params, mode, image, json, console)
        }
        Command::Boot { append, timeout, image } => {
            let cfg = LauncherConfig::new(
                image.unwrap_or_else(vm_image::default_bench_image_dir),
                global.state_dir(),
            );
            let r =
                host_launcher::bench::boot(&cfg, &append, std::time::Duration::from_secs(timeout))?;
            println!("console:\n{}", r.console);
            println!(
                "VM {} after {:.3} s{}",
                r.status,
                r.seconds,
                if r.ended_by_itself { "" } else { " (killed at the timeout)" }
            );
            return Ok(if r.ended_by_itself { ExitCode::SUCCESS } else { ExitCode::from(1) });
        }
    };
    let mut cfg = LauncherConfig::new(
        image.unwrap_or_else(vm_image::default_bench_image_dir),
        global.state_dir(),
    );
    cfg.mode = mode;
    cfg.echo_console = console;
    let r = host_launcher::bench::run(&cfg, params, &mut |s| eprintln!("vouch bench: {s}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    let label = if r.mode == "tcg" { " (TCG: emulated CPU)" } else { "" };
    println!("mode: {}{label}; {} runs each, medians", r.mode, r.runs);
    println!(
        "bare VM: guest uptime at /init {:.3} s; host: start to first console line {:.3} s, start to exit {:.3} s",
        r.bare_init_uptime_s, r.bare_boot_to_init_s, r.bare_total_s
    );
    println!(
        "step: guest uptime at agent ready {:.3} s ({:+.0} % vs bare /init); host: start to hello {:.3} s",
        r.step_ready_uptime_s,
        (r.step_ready_uptime_s / r.bare_init_uptime_s - 1.0) * 100.0,
        r.step_boot_s
    );
    println!(
        "      job setup {:.3} s, input transfer {:.3} s ({} bytes), build {:.3} s, hashing {:.3} s, attestation {:.3} s, output transfer {:.3} s, host checks {:.3} s, total {:.3} s, latency {:.3} s",
        r.step_job_setup_s, r.step_input_transfer_s, r.step_input_bytes, r.step_build_s, r.step_hashing_s, r.step_attestation_s,
        r.step_output_transfer_s, r.step_verification_s, r.step_total_s, r.step_latency_s
    );
    println!(
        "warm step (pool VM): latency {:.3} s: input closure query + VM taken {:.3} s, job setup {:.3} s, input transfer {:.3} s, build {:.3} s, outputs (hash, attest, send) {:.3} s, host checks {:.3} s, power-off until QEMU exited {:.3} s (launch check {:.3} s before the job)",
        r.warm_latency_s, r.warm_prepare_s, r.warm_job_setup_s, r.warm_input_transfer_s, r.warm_build_s, r.warm_outputs_s,
        r.warm_verification_s, r.warm_power_off_s, r.warm_launch_s
    );
    println!(
        "nix-build (sandbox {}): {:.3} s; cold step / nix-build = {:.1}x; warm step / nix-build = {:.1}x; warm / cold = {:.2}x",
        r.nix_sandbox,
        r.nix_build_s,
        r.step_latency_s / r.nix_build_s,
        r.warm_latency_s / r.nix_build_s,
        r.warm_latency_s / r.step_latency_s
    );
    if r.batch_steps > 0 {
        println!(
            "batch: {} independent steps, {} at once: vouch (warm pool of {}) {:.2} s, nix-build --max-jobs {} {:.2} s; ratio {:.1}x",
            r.batch_steps, r.batch_jobs, r.batch_jobs, r.batch_vouch_s, r.batch_jobs, r.batch_nix_s,
            r.batch_vouch_s / r.batch_nix_s
        );
    }
    println!(
        "channel: raw {:.1} MiB/s; in-guest SHA-256 {:.1} MiB/s; host SHA-256 {:.1} MiB/s (guest/host {:.3}x)",
        r.raw_channel_mib_s, r.guest_hash_mib_s, r.host_hash_mib_s, r.guest_hash_mib_s / r.host_hash_mib_s
    );
    Ok(ExitCode::SUCCESS)
}
