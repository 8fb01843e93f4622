//! `vouch`: the host launcher.
//!
//! The CLI is one of three peer front-ends (with the Nix protocols and HTTP): each parses what
//! it is asked into the core's request (`host_launcher::core::BuildRequest`) and answers from
//! its result; the core never sees a command line or a socket. This file only parses arguments,
//! sets up logging, dispatches, and prints an error chain once.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod cli;

/// Attested Nix builds in confidential VMs.
#[derive(Debug, Parser)]
#[command(name = "vouch", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: cli::Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build one resolved derivation in a fresh VM.
    Build(cli::build::Args),
    /// Serve Nix as a remote builder (`ssh-ng://` runs `--stdio`, `ssh://` runs `--serve --write`,
    /// `unix://PATH` reaches `--listen PATH`).
    NixBuilder(cli::nix_builder::Args),
    /// The hosted CI service: HTTP build API and Nix binary cache (`docs/ci-service.md`).
    Serve(cli::serve::Args),
    /// Verify a closure's build traces under a trust policy.
    Verify(cli::verify::Args),
    /// Rebuild the fewest steps of a closure so that it verifies under a (stricter) trust
    /// policy, one step at a time in a fresh VM, replanning after each (docs/trust-policy.md).
    Rebuild(cli::rebuild::Args),
    /// Build or measure the guest image.
    #[command(subcommand)]
    Image(cli::image::Command),
    /// Report what this host can do (SNP, KVM, QEMU, OVMF, vsock), one line per check with its
    /// fix.
    Doctor(cli::doctor::Args),
    /// SEV-SNP host setup (`vouch snp certs fetch`: this host's AMD certificates).
    #[command(subcommand)]
    Snp(cli::snp::Command),
    /// Build a tiny derivation in a VM and verify it as a third party would; prints a report.
    Selftest(cli::selftest::Args),
    /// Check or show a raw SEV-SNP attestation report.
    #[command(subcommand)]
    Evidence(cli::evidence::Command),
    /// Check a trace store's signed records against its statements (`audit`).
    #[command(subcommand)]
    Cache(cli::cache::Command),
    /// The transparency log: its key, witnesses, cosigning and monitoring.
    #[command(subcommand)]
    Log(cli::log::Command),
    /// Show stored build traces.
    #[command(subcommand)]
    Trace(cli::trace::Command),
    /// Write (`init`) or validate and explain (`check`) a trust policy.
    #[command(subcommand)]
    Policy(cli::policy::Command),
    /// This host's public keys for trust policies (`show`).
    #[command(subcommand)]
    Key(cli::key::Command),
    /// Export the in-toto / SLSA provenance of an output (`--sign`: as DSSE envelopes), or
    /// check a signed one (`vouch provenance verify`).
    Provenance(cli::provenance::Args),
    /// Benchmarks (`vouch bench vm`: where a build step's time goes). Only in a `vouch` built
    /// with the `bench` feature; needs the bench image.
    #[cfg(feature = "bench")]
    #[command(subcommand)]
    Bench(cli::bench::Command),
}

fn main() -> ExitCode {
    cli::exit::quiet_broken_pipe();
    let cli = cli::exit::parse_with_state_dir_help::<Cli>(Cli::command());
    cli::init_logging(&cli.global);
    let result = match cli.command {
        Command::Build(args) => cli::build::run(args, &cli.global),
        Command::NixBuilder(args) => cli::nix_builder::run(args, &cli.global),
        Command::Serve(args) => cli::serve::run(args, &cli.global),
        Command::Verify(args) => cli::verify::run(args, &cli.global),
        Command::Rebuild(args) => cli::rebuild::run(args, &cli.global),
        Command::Image(cmd) => cli::image::run(cmd, &cli.global),
        Command::Doctor(args) => cli::doctor::run(args, &cli.global),
        Command::Snp(cmd) => cli::snp::run(cmd, &cli.global),
        Command::Selftest(args) => cli::selftest::run(args, &cli.global),
        Command::Evidence(cmd) => cli::evidence::run(cmd, &cli.global),
        Command::Cache(cmd) => cli::cache::run(cmd, &cli.global),
        Command::Trace(cmd) => cli::trace::run(cmd, &cli.global),
        Command::Log(cmd) => cli::log::run(cmd, &cli.global),
        Command::Policy(cmd) => cli::policy::run(cmd, &cli.global),
        Command::Key(cmd) => cli::key::run(cmd, &cli.global),
        Command::Provenance(args) => cli::provenance::run(args, &cli.global),
        #[cfg(feature = "bench")]
        Command::Bench(cmd) => cli::bench::run(cmd, &cli.global),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            cli::print_error_chain(err.as_ref());
            ExitCode::from(cli::exit::USAGE)
        }
    }
}
