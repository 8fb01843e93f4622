//! The local Nix store as an [`InputSource`], and reading `.drv` files for `vouch build`.
//!
//! Path infos come from the store's SQLite database, read-only (`super::nix_db`), or, where that
//! is not possible, from `nix path-info --json --recursive` (one process for the whole closure);
//! NARs from our NAR writer over `/nix/store/…`
//! (what `nix-store --dump` prints, without a process). A path whose bytes were changed after
//! registration yields a NAR whose hash differs from its path info: the guest refuses it.
//!
//! What is not here: registering anything in the Nix store (`vouch build --import` does that
//! through Nix itself).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;
use std::process::Command;

use build_trace::job::{BasicDerivation, NarHash, PathInfo};
use nix_formats::derivation::Derivation;
use nix_formats::nar::NarDump;
use nix_formats::{Hash, HashAlgo, StorePath};

use super::{InputSource, InputSourceError};

/// `NIX_CONFIG` for every Nix command vouch runs: no substituters (no network), the features
/// CA derivations need.
pub const NIX_CONFIG: &str = "experimental-features = nix-command ca-derivations\nsubstituters =\n";

/// The local Nix store.
#[derive(Debug, Clone, Default)]
pub struct LocalNixStore;

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct PathInfoJson {
    path: StorePath,
    #[serde(default)]
    valid: Option<bool>,
    nar_hash: Option<String>,
    nar_size: Option<u64>,
    #[serde(default)]
    references: BTreeSet<StorePath>,
    #[serde(default)]
    ca: Option<String>,
}

fn err(msg: impl Into<String>) -> InputSourceError {
    InputSourceError(msg.into(), None)
}

pub(super) fn parse_nar_hash(path: &StorePath, s: &str) -> Result<NarHash, InputSourceError> {
    let h = Hash::parse_any(s, Some(HashAlgo::Sha256))
        .map_err(|e| err(format!("{path}: NAR hash {s:?}: {e}")))?;
    let mut out = [0u8; 32];
    if h.algo() != HashAlgo::Sha256 {
        return Err(err(format!("{path}: NAR hash {s:?} is not SHA-256")));
    }
    out.copy_from_slice(h.digest());
    Ok(NarHash(out))
}

impl LocalNixStore {
    /// The path infos of `paths` (and of their closure with `recursive`): from the Nix
    /// database if it can be read (`super::nix_db`), else from `nix path-info`.
    pub fn query(
        &self,
        paths: &BTreeSet<StorePath>,
        recursive: bool,
    ) -> Result<BTreeMap<StorePath, PathInfo>, InputSourceError> {
        if paths.is_empty() {
            return Ok(BTreeMap::new());
        }
        match super::nix_db::NixDb::open() {
            Some(mut db) => Ok(db.query(paths, recursive)?),
            None => self.query_process(paths, recursive),
        }
    }

    /// Run `nix path-info --json [--recursive] paths…`.
    pub fn query_process(
        &self,
        paths: &BTreeSet<StorePath>,
        recursive: bool,
    ) -> Result<BTreeMap<StorePath, PathInfo>, InputSourceError> {
        if paths.is_empty() {
            return Ok(BTreeMap::new());
        }
        let mut cmd = Command::new("nix");
        cmd.env("NIX_CONFIG", NIX_CONFIG).args(["path-info", "--json"]);
        if recursive {
            cmd.arg("--recursive");
        }
        let out = cmd.args(paths.iter().map(ToString::to_string)).output().map_err(|e| {
            InputSourceError(
                "running `nix path-info` (is Nix installed?)".into(),
                Some(Box::new(e)),
            )
        })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let msg: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("warning:")).collect();
            return Err(err(format!("`nix path-info` failed: {}", msg.join("; "))));
        }
        let infos: Vec<PathInfoJson> = serde_json::from_slice(&out.stdout).map_err(|e| {
            InputSourceError("parsing `nix path-info --json`".into(), Some(Box::new(e)))
        })?;
        let mut map = BTreeMap::new();
        for i in infos {
            if i.valid == Some(false) {
                return Err(err(format!("{} is not valid in the local Nix store", i.path)));
            }
            let hash =
                i.nar_hash.as_deref().ok_or_else(|| err(format!("{}: no narHash", i.path)))?;
            let info = PathInfo {
                nar_hash: parse_nar_hash(&i.path, hash)?,
                nar_size: i.nar_size.ok_or_else(|| err(format!("{}: no narSize", i.path)))?,
                references: i.references,
                ca: i.ca.filter(|c| !c.is_empty()),
            };
            map.insert(i.path, info);
        }
        for p in paths {
            if !map.contains_key(p) {
                return Err(err(format!("{p} is not valid in the local Nix store")));
            }
        }
        Ok(map)
    }
}

impl InputSource for LocalNixStore {
    fn path_info(&self, path: &StorePath) -> Result<PathInfo, InputSourceError> {
        let one: BTreeSet<StorePath> = [path.clone()].into();
        self.query(&one, false)?.remove(path).ok_or_else(|| err(format!("{path}: no path info")))
    }

    fn nar(&self, path: &StorePath) -> Result<Box<dyn Read + Send + '_>, InputSourceError> {
        let on_disk = Path::new(nix_formats::STORE_DIR).join(path.base_name());
        Ok(Box::new(NarDump::new(on_disk)))
    }

    fn closure(
        &self,
        roots: &BTreeSet<StorePath>,
    ) -> Result<BTreeMap<StorePath, PathInfo>, InputSourceError> {
        self.query(roots, true)
    }
}

/// Errors reading a derivation for `vouch build`.
#[derive(Debug, thiserror::Error)]
pub enum DrvError {
    /// Not a `.drv` store path.
    #[error("{0} is not a derivation store path (/nix/store/<hash>-<name>.drv)")]
    NotADrv(String),
    /// Reading failed.
    #[error("reading {0}")]
    Io(String, #[source] std::io::Error),
    /// Parsing failed.
    #[error("parsing {0}")]
    Parse(String, #[source] nix_formats::derivation::DerivationError),
    /// It still has input derivations.
    #[error(
        "{drv} is not resolved: it depends on the outputs of {n} other derivation(s) (e.g. {first}).\n\
         `vouch build` builds one resolved step whose inputs are already in the store. Build the \
         whole graph through Nix instead, with vouch as its remote builder: \
         `nix-build --builders 'ssh-ng://localhost?remote-program=vouch%20nix-builder x86_64-linux - 1 1 ca-derivations' --max-jobs 0 …` \
         (Nix resolves each content-addressed step and sends it to `vouch nix-builder`; see docs/nix-remote-builder.md)."
    )]
    Unresolved {
        /// The drv.
        drv: String,
        /// How many input derivations.
        n: usize,
        /// One of them.
        first: String,
    },
}

/// Read and parse a `.drv` from the store (its path as the user gave it); refuse unresolved
/// ones. Returns the path, parsed, and the basic derivation.
pub fn load_basic_derivation(drv_path: &str) -> Result<(StorePath, BasicDerivation), DrvError> {
    let sp = StorePath::parse(drv_path).map_err(|_| DrvError::NotADrv(drv_path.into()))?;
    if !sp.is_derivation() {
        return Err(DrvError::NotADrv(drv_path.into()));
    }
    let bytes = std::fs::read(drv_path).map_err(|e| DrvError::Io(drv_path.into(), e))?;
    let drv = Derivation::from_aterm(&bytes).map_err(|e| DrvError::Parse(drv_path.into(), e))?;
    if let Some(first) = drv.input_drvs.keys().next() {
        return Err(DrvError::Unresolved {
            drv: drv_path.into(),
            n: drv.input_drvs.len(),
            first: first.to_string(),
        });
    }
    let name = sp.drv_name().map_err(|_| DrvError::NotADrv(drv_path.into()))?;
    let basic = BasicDerivation::from_derivation(name, &drv)
        .expect("a derivation without input derivations is a basic derivation");
    Ok((sp, basic))
}
