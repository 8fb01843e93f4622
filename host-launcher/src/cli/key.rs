//! `vouch key show`: this host's public keys, as a trust policy names them: each Nix signing
//! key's public-key line (`<state dir>/keys/<name>.public`, what `[keys]` and Nix's
//! `trusted-public-keys` take), the name the next build signs with, and the simulated SNP
//! root's id (what `simulated_roots` takes). Nothing secret is read.

use std::path::Path;
use std::process::ExitCode;

use build_trace::evidence::{SimulatedRoot, SIMULATED_ROOT_DIR};
use host_launcher::core::KeyNaming;

use super::{CmdResult, Global};

/// Subcommands of `vouch key`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print the Nix public-key lines and the simulated root's id (for a trust policy).
    Show(ShowArgs),
}

/// Arguments of `vouch key show`.
#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// What `vouch key show` found.
#[derive(Debug, serde::Serialize)]
struct Keys {
    state_dir: String,
    /// Nix public-key lines (`name:base64`), by key name.
    nix_keys: std::collections::BTreeMap<String, String>,
    /// The key name the next build signs with: (genuine SEV-SNP, simulated evidence).
    signing_name: SigningName,
    /// The simulated root's key id (hex SHA-256 of its ARK's SubjectPublicKeyInfo), if any.
    simulated_root: Option<String>,
}

#[derive(Debug, serde::Serialize)]
struct SigningName {
    sev_snp: Option<String>,
    simulated: Option<String>,
}

/// Why `vouch key show` failed (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum KeyCmdError {
    #[error("{path}: cannot read")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn public_keys(dir: &Path) -> Result<std::collections::BTreeMap<String, String>, KeyCmdError> {
    let read_err = |source| KeyCmdError::Read { path: dir.to_owned(), source };
    let mut out = std::collections::BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(read_err(e)),
    };
    for e in entries {
        let p = e.map_err(read_err)?.path();
        let Some(name) =
            p.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".public"))
        else {
            continue;
        };
        let line = std::fs::read_to_string(&p)
            .map_err(|source| KeyCmdError::Read { path: p.clone(), source })?;
        out.insert(name.to_owned(), line.trim().to_owned());
    }
    Ok(out)
}

pub fn run(cmd: Command, global: &Global) -> CmdResult {
    let Command::Show(args) = cmd;
    let state = global.state_dir();
    let naming = KeyNaming::from_state_dir(&state)?;
    let root_dir = state.join(SIMULATED_ROOT_DIR);
    let simulated_root = match SimulatedRoot::load(&root_dir) {
        Ok(r) => Some(r.key_id().to_string()),
        Err(_) if !root_dir.exists() => None,
        Err(e) => return Err(e.into()),
    };
    let keys = Keys {
        state_dir: state.display().to_string(),
        nix_keys: public_keys(&state.join("keys"))?,
        signing_name: SigningName {
            sev_snp: naming.name(false).ok(),
            simulated: naming.name(true).ok(),
        },
        simulated_root,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&keys)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("state directory: {}", keys.state_dir);
    if keys.nix_keys.is_empty() {
        println!("no Nix signing key yet in {}/keys (the first build makes it)", keys.state_dir);
    }
    for (name, line) in &keys.nix_keys {
        println!("Nix public key {name}: {line}");
        println!("  trust policy:  [keys] \"{name}\" = \"{line}\"");
        println!("  nix.conf:      extra-trusted-public-keys = {line}");
    }
    let names = &keys.signing_name;
    println!(
        "next build signs as: {} (SEV-SNP), {} (simulated evidence)",
        names.sev_snp.as_deref().unwrap_or("-"),
        names.simulated.as_deref().unwrap_or("- (the configured name does not say `simulated`)")
    );
    match &keys.simulated_root {
        Some(id) => {
            println!("simulated SNP root {}: {id}", root_dir.display());
            println!("  trust policy:  simulated_roots = [\"{id}\"]  (SIMULATED: proves nothing about hardware)");
        }
        None => println!(
            "no simulated SNP root in {} (a host without SEV-SNP makes it on its first build)",
            root_dir.display()
        ),
    }
    Ok(ExitCode::SUCCESS)
}
