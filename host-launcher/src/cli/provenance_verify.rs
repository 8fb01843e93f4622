//! `vouch provenance verify ENVELOPE`: check a DSSE envelope of `vouch provenance --sign`
//! (`build_trace::provenance::open_envelope`): a signature by one of the given Nix keys (default:
//! the state directory's public keys) over the in-toto Statement v1 of SLSA Provenance v1 it
//! carries. Exit 0 when it checks out, 1 when no signature verifies, 2 for a malformed file.
//! Also the launcher key `vouch provenance --sign` signs with ([`launcher_key`]).

use std::path::PathBuf;
use std::process::ExitCode;

use build_trace::provenance::{open_envelope, ProvenanceError};
use nix_formats::signing::{PublicKey, SecretKey};

use super::{exit, CmdResult, Global};

/// Subcommands of `vouch provenance`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Check a signed provenance envelope (`vouch provenance --sign`).
    Verify(VerifyArgs),
}

/// Arguments of `vouch provenance verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The DSSE envelope (one JSON object per line; `-` for stdin).
    pub envelope: PathBuf,
    /// A public key that may sign (`name:base64`, Nix's format; repeatable). Default: the state
    /// directory's (`<state dir>/keys/*.public`).
    #[arg(long = "key", value_name = "NAME:KEY")]
    pub keys: Vec<String>,
}

/// Why the keys or the envelope could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// No key, or several, and none named.
    #[error("{0}")]
    Choice(String),
    /// A key file or line is unreadable or malformed.
    #[error("cannot use the key {0}: {1}")]
    Bad(String, String),
}

/// The state directory's Nix signing key `name`, else its only one.
pub fn launcher_key(global: &Global, name: Option<&str>) -> Result<SecretKey, KeyError> {
    let dir = global.state_dir().join("keys");
    let names = key_files(&dir, ".secret");
    let name = match (name, names.as_slice()) {
        (Some(n), _) => n.to_owned(),
        (None, [one]) => one.clone(),
        (None, []) => {
            return Err(KeyError::Choice(format!(
                "no signing key in {} (a build makes one)",
                dir.display()
            )))
        }
        (None, many) => {
            return Err(KeyError::Choice(format!(
                "several keys in {}: name one with --key-name ({})",
                dir.display(),
                many.join(", ")
            )))
        }
    };
    let file = dir.join(format!("{name}.secret"));
    let text = std::fs::read_to_string(&file)
        .map_err(|e| KeyError::Bad(file.display().to_string(), e.to_string()))?;
    SecretKey::parse(text.trim())
        .map_err(|e| KeyError::Bad(file.display().to_string(), e.to_string()))
}

/// Key names in `dir` with files ending in `ext`, sorted.
fn key_files(dir: &std::path::Path, ext: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter_map(|n| n.strip_suffix(ext).map(str::to_owned))
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

pub fn run(cmd: Command, global: &Global) -> CmdResult {
    let Command::Verify(args) = cmd;
    let mut lines = args.keys.clone();
    if lines.is_empty() {
        let dir = global.state_dir().join("keys");
        for n in key_files(&dir, ".public") {
            let f = dir.join(format!("{n}.public"));
            lines.push(
                std::fs::read_to_string(&f)
                    .map_err(|e| KeyError::Bad(f.display().to_string(), e.to_string()))?,
            );
        }
    }
    let keys = lines
        .iter()
        .map(|l| {
            PublicKey::parse(l.trim()).map_err(|e| KeyError::Bad(l.trim().into(), e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() {
        return Err(Box::new(KeyError::Choice("no public key: give --key NAME:KEY".into())));
    }
    let text = if args.envelope == std::path::Path::new("-") {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(&args.envelope)?
    };
    let mut rejected = false;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match open_envelope(line.as_bytes(), &keys) {
            Ok((st, signers)) => {
                for s in st["subject"].as_array().into_iter().flatten() {
                    let name = s["name"].as_str().unwrap_or("?");
                    println!(
                        "ok {name} (signed by {}; builder {})",
                        signers.join(", "),
                        st["predicate"]["runDetails"]["builder"]["id"].as_str().unwrap_or("?")
                    );
                }
            }
            Err(e @ ProvenanceError::Unsigned(_)) => {
                println!("NOT VERIFIED: {e}");
                rejected = true;
            }
            Err(e) => return Err(Box::new(e)),
        }
    }
    Ok(ExitCode::from(if rejected { exit::REJECTED } else { exit::OK }))
}
