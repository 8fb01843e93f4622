//! The host's keys and their names: the Nix signing key's name ([`KeyNaming`]), the
//! transparency log's key and origin ([`log_key`]), and this host's name, their default.
//!
//! Signing-key names: `<host>-1`, or `<host>-simulated-1` when the evidence is simulated, so a
//! plain Nix user sees the difference. Several vouch hosts on one machine (separate state
//! directories) need different key names, or a trust policy — which maps key names to keys —
//! cannot name both: [`KeyNaming`] takes a name from `--key-name` or the state directory's
//! `key-name` file. A name that signs simulated evidence must say `simulated` (as a word of the
//! name, e.g. `ci-a-simulated-1`); any other is refused.
//!
//! The log key is `<state dir>/keys/log.note-key`, made on first use for the origin in
//! `<state dir>/log-origin`, else `<hostname>/vouch`.
//!
//! What is not here: using them ([`super::publish`]), key files themselves
//! (`build_trace::sign`, `build_trace::tlog`).

use std::path::{Path, PathBuf};

use build_trace::evidence::nix_key_name;
use build_trace::tlog::{LogKey, TlogError};
use vm_image::image::Manifest;

use crate::build::LauncherConfig;
use crate::vm::{choose_mode, HostCaps, Mode};

/// This host's name (`/proc/sys/kernel/hostname`, else `vouch`): the default of signing-key
/// names, log origins and witness names.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "vouch".into())
}

/// The state directory's key-name setting: one line, the name.
pub const KEY_NAME_FILE: &str = "key-name";

/// Why a key name is refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyNameError {
    /// Not a name Nix accepts.
    #[error("invalid key name {0:?}: it must be non-empty, without `:`, `/` or whitespace")]
    Invalid(String),
    /// A name without the simulated marker for simulated evidence.
    #[error("key name {name:?} does not say `simulated`, but this host's evidence is simulated (no SEV-SNP): a name like {suggestion:?} keeps the difference visible to Nix users and trust policies")]
    NotMarkedSimulated {
        /// The configured name.
        name: String,
        /// A name that would do.
        suggestion: String,
    },
    /// The state directory's setting could not be read.
    #[error("reading the key name from {0}")]
    Io(PathBuf, #[source] std::io::Error),
}

/// Whether `name` says `simulated` as one of its words (split at anything not alphanumeric).
pub fn says_simulated(name: &str) -> bool {
    name.split(|c: char| !c.is_ascii_alphanumeric()).any(|w| w.eq_ignore_ascii_case("simulated"))
}

/// How this host names its Nix signing key (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyNaming {
    configured: Option<String>,
}

impl KeyNaming {
    /// The default: `<hostname>-1`, or `<hostname>-simulated-1` for simulated evidence.
    pub fn host_default() -> Self {
        KeyNaming { configured: None }
    }

    /// Always `name` (checked against the evidence kind by [`Self::name`]).
    pub fn named(name: &str) -> Result<Self, KeyNameError> {
        let name = name.trim();
        if name.is_empty() || name.contains([':', '/']) || name.chars().any(char::is_whitespace) {
            return Err(KeyNameError::Invalid(name.to_owned()));
        }
        Ok(KeyNaming { configured: Some(name.to_owned()) })
    }

    /// The name in `<state_dir>/key-name` if that file exists, else the default.
    pub fn from_state_dir(state_dir: &Path) -> Result<Self, KeyNameError> {
        let file = state_dir.join(KEY_NAME_FILE);
        match std::fs::read_to_string(&file) {
            Ok(text) => Self::named(text.trim()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::host_default()),
            Err(e) => Err(KeyNameError::Io(file, e)),
        }
    }

    /// The name to sign evidence of this kind with.
    pub fn name(&self, simulated: bool) -> Result<String, KeyNameError> {
        match &self.configured {
            None => Ok(nix_key_name(&host_name(), simulated)),
            Some(n) if simulated && !says_simulated(n) => Err(KeyNameError::NotMarkedSimulated {
                name: n.clone(),
                suggestion: format!("{}-simulated-1", n.trim_end_matches("-1")),
            }),
            Some(n) => Ok(n.clone()),
        }
    }

    /// Check the name against the evidence kind the launcher `cfg` will produce (the mode it
    /// would choose), before any VM runs.
    pub fn check_for(&self, cfg: &LauncherConfig) -> Result<String, KeyNameError> {
        let image_snp = Manifest::load(&cfg.image_dir).map(|m| m.snp.is_some()).unwrap_or(false);
        let simulated = choose_mode(cfg.mode, &HostCaps::probe(), image_snp)
            .map(|m| m != Mode::Snp)
            .unwrap_or(true);
        self.name(simulated)
    }
}

/// The state directory's origin setting: one line, the log's origin (used when its key is
/// made; default `<hostname>/vouch`).
pub const LOG_ORIGIN_FILE: &str = "log-origin";

/// The origin a new log key gets: `<state dir>/log-origin`, else `<hostname>/vouch`.
pub fn default_origin(state_dir: &Path) -> String {
    std::fs::read_to_string(state_dir.join(LOG_ORIGIN_FILE))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("{}/vouch", host_name()))
}

/// The launcher's log key in `<state dir>/keys/log.note-key`, made on first use for `origin`
/// (else the default origin).
pub fn log_key(state_dir: &Path, origin: Option<&str>) -> Result<LogKey, TlogError> {
    let have = state_dir.join("keys").join(build_trace::tlog::note::LOG_KEY_FILE).exists();
    let origin = match origin {
        Some(o) => Some(o.to_owned()),
        None if have => None,
        None => Some(default_origin(state_dir)),
    };
    LogKey::load_or_generate(state_dir, origin.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_names_keep_the_simulated_marker() {
        let d = KeyNaming::host_default();
        assert_eq!(d.name(true).unwrap(), nix_key_name(&host_name(), true));
        assert_eq!(d.name(false).unwrap(), nix_key_name(&host_name(), false));

        let a = KeyNaming::named("ci-a-simulated-1").unwrap();
        assert_eq!(a.name(true).unwrap(), "ci-a-simulated-1");
        assert_eq!(a.name(false).unwrap(), "ci-a-simulated-1", "conservative on SNP: allowed");
        let plain = KeyNaming::named("ci-a-1").unwrap();
        assert_eq!(plain.name(false).unwrap(), "ci-a-1");
        let e = plain.name(true).unwrap_err().to_string();
        assert!(e.contains("does not say `simulated`") && e.contains("ci-a-simulated-1"), "{e}");
        for sneaky in ["unsimulated-1", "ci-simulatedx-1", "sim-1"] {
            assert!(KeyNaming::named(sneaky).unwrap().name(true).is_err(), "{sneaky}");
        }
        for ok in ["simulated", "a.simulated.b", "SIMULATED-builder"] {
            assert!(KeyNaming::named(ok).unwrap().name(true).is_ok(), "{ok}");
        }
        for bad in ["", "a:b", "a/b", "a b"] {
            assert!(matches!(KeyNaming::named(bad), Err(KeyNameError::Invalid(_))), "{bad:?}");
        }
    }

    #[test]
    fn the_state_directory_can_name_the_key() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(KeyNaming::from_state_dir(t.path()).unwrap(), KeyNaming::host_default());
        std::fs::write(t.path().join(KEY_NAME_FILE), "b-simulated-1\n").unwrap();
        assert_eq!(
            KeyNaming::from_state_dir(t.path()).unwrap().name(true).unwrap(),
            "b-simulated-1"
        );
        std::fs::write(t.path().join(KEY_NAME_FILE), "two words\n").unwrap();
        assert!(KeyNaming::from_state_dir(t.path()).is_err());
    }
}
