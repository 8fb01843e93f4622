//! Signing a step's Nix records with the launcher's ed25519 key.
//!
//! What is here: the launcher's key on disk ([`load_or_generate_key`]: a Nix secret-key file,
//! mode 0600, with its public key beside it) and, for a checked statement, the signed records a
//! plain Nix reads ([`StepRecords`]): per output a Nix ≤ 2.34 realisation (id
//! `sha256:<hash modulo>!<out>`), a Nix ≥ 2.35 build-trace entry (resolved drv path + output),
//! and a narinfo. The record formats and fingerprints are `nix-formats`'
//! ([`nix_formats::realisation`], [`nix_formats::narinfo`], [`nix_formats::signing`]).
//!
//! Realisations are made only for content-addressed steps (floating CA, fixed output) and only
//! with keys that follow from the statement: the Nix ≤ 2.34 id from the basic derivation's hash
//! modulo, the Nix ≥ 2.35 key from the drv path once it is checked to be the basic derivation's
//! own path. A fixed-output derivation that Nix sends **unresolved** over the build hook (its
//! input sources replaced by the whole input closure, so its drv path is not the basic
//! derivation's) still gets the Nix ≤ 2.34 realisation — a fixed output's hash modulo depends
//! only on its declared hash — but no Nix ≥ 2.35 entry, since nothing here can check which
//! derivation its drv path names (and Nix looks up neither for outputs whose paths it knows). An
//! input-addressed step's Nix ≤ 2.34 id would need the unresolved derivation graph, and Nix
//! does not look realisations up for input-addressed outputs anyway.
//!
//! Only with the `producer` feature (a verifier makes no keys and signs nothing).
//!
//! What is not here: where the records are stored ([`crate::store`]) or the laut JWS
//! ([`crate::jws`]).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix_formats::narinfo::NarInfo;
use nix_formats::realisation::{BuildTraceEntry, LegacyRealisation};
use nix_formats::resolve::resolve;
use nix_formats::signing::{SecretKey, SigningError};
use nix_formats::Hash;

use crate::job::{NarHash, StepKind};
use crate::statement::{Statement, StatementError};

/// Why a key could not be loaded or records could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The key file does not parse.
    #[error("key file {path}")]
    Key {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: SigningError,
    },
    /// The key name is not usable as a Nix key name and file name.
    #[error("key name `{0}` must be non-empty without `:`, `/` or white space")]
    KeyName(String),
    /// The file holds a key with another name.
    #[error("key file {path} holds key `{found}`, not `{expected}`")]
    WrongName {
        /// The file.
        path: PathBuf,
        /// The name asked for.
        expected: String,
        /// The name in the file.
        found: String,
    },
    /// A key file could not be read or written.
    #[error("key file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The secret key file is readable by others.
    #[error("secret key file {0} is readable by group or others (chmod 600 it)")]
    Permissions(PathBuf),
    /// The statement is malformed.
    #[error("statement")]
    Statement(#[source] StatementError),
    /// The records cannot be computed for the statement's derivation.
    #[error("derivation {drv}: {problem}")]
    Derivation {
        /// The drv path.
        drv: String,
        /// What failed.
        problem: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SignError + '_ {
    move |source| SignError::Io { path: path.to_path_buf(), source }
}

/// The launcher's key `<state_dir>/keys/<name>.secret` (mode 0600; `<name>.public` beside it),
/// generated on first use. For hosts without SEV-SNP the name comes from
/// [`crate::evidence::nix_key_name`] (`<host>-simulated-1`). A secret key file readable by
/// group or others is refused. Safe against concurrent first use by several processes.
pub fn load_or_generate_key(state_dir: &Path, name: &str) -> Result<SecretKey, SignError> {
    if name.is_empty() || name.contains([':', '/']) || name.chars().any(char::is_whitespace) {
        return Err(SignError::KeyName(name.into()));
    }
    let dir = state_dir.join("keys");
    let secret = dir.join(format!("{name}.secret"));
    let public = dir.join(format!("{name}.public"));
    match fs::read_to_string(&secret) {
        Ok(text) => {
            let mode = fs::metadata(&secret).map_err(io_err(&secret))?.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(SignError::Permissions(secret));
            }
            let key = SecretKey::parse(&text)
                .map_err(|source| SignError::Key { path: secret.clone(), source })?;
            if key.name() != name {
                return Err(SignError::WrongName {
                    path: secret,
                    expected: name.into(),
                    found: key.name().into(),
                });
            }
            if !public.exists() {
                crate::store::write_atomic(&public, key.public_key().to_string().as_bytes())
                    .map_err(io_err(&public))?;
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            let key = SecretKey::generate(name);
            // Write under a temporary name, then link into place: racing processes end up with
            // one key, and nobody reads a half-written file.
            let tmp = dir.join(format!(".{name}.secret.{}", std::process::id()));
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_err(&tmp))?;
            f.write_all(key.to_file_string().as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(io_err(&tmp))?;
            let linked = fs::hard_link(&tmp, &secret);
            let _ = fs::remove_file(&tmp);
            match linked {
                Ok(()) => {
                    crate::store::write_atomic(&public, key.public_key().to_string().as_bytes())
                        .map_err(io_err(&public))?;
                    Ok(key)
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    load_or_generate_key(state_dir, name)
                }
                Err(e) => Err(io_err(&secret)(e)),
            }
        }
        Err(e) => Err(io_err(&secret)(e)),
    }
}

/// The signed Nix records of one output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputRecords {
    /// Nix ≤ 2.34 realisation (content-addressed steps only).
    pub legacy: Option<LegacyRealisation>,
    /// Nix ≥ 2.35 build-trace entry (content-addressed steps only).
    pub build_trace: Option<BuildTraceEntry>,
    /// The narinfo (URL and file fields to be filled in by the store writer).
    pub narinfo: NarInfo,
}

/// The signed Nix records of a step, by output name.
pub type StepRecords = BTreeMap<String, OutputRecords>;

fn nix_hash(h: &NarHash) -> Hash {
    Hash::sha256(h.0)
}

/// Sign every Nix record of a step (the statement must already have been checked against its
/// evidence by the caller).
pub fn step_records(st: &Statement, key: &SecretKey) -> Result<StepRecords, SignError> {
    let mut records = unsigned_step_records(st)?;
    for r in records.values_mut() {
        if let Some(l) = &mut r.legacy {
            l.sign(key);
        }
        if let Some(b) = &mut r.build_trace {
            b.sign(key);
        }
        let drv = r.narinfo.deriver.as_ref().map(ToString::to_string).unwrap_or_default();
        r.narinfo.sign(key).map_err(|e| SignError::Derivation { drv, problem: e.to_string() })?;
    }
    Ok(records)
}

/// The Nix records of a step as [`step_records`] makes them, without signatures: which
/// narinfos, realisation ids and build-trace keys a statement produces (the store audit
/// compares a store's records with them).
pub fn unsigned_step_records(st: &Statement) -> Result<StepRecords, SignError> {
    st.validate().map_err(SignError::Statement)?;
    let job = &st.job;
    let kind = job.kind().map_err(|e| SignError::Statement(StatementError::Job(e)))?;
    let drv_err =
        |problem: String| SignError::Derivation { drv: job.drv_path.to_string(), problem };
    // The basic derivation's resolution, and whether the job's drv path is its own path.
    let resolution = if kind == StepKind::InputAddressed {
        None
    } else {
        let drv = job.drv.to_derivation().map_err(|e| drv_err(e.to_string()))?;
        let r =
            resolve(&drv, &job.drv.name, &mut |_, _| None).map_err(|e| drv_err(e.to_string()))?;
        let own_path = r.drv_path == job.drv_path;
        // A floating-CA job's drv path is checked by `Job::validate`; a fixed-output one may
        // be the unresolved drv Nix gave (see the module documentation).
        if !own_path && kind == StepKind::FloatingCa {
            return Err(drv_err(format!("the basic derivation's path is {}", r.drv_path)));
        }
        Some((r, own_path))
    };
    let mut records = BTreeMap::new();
    for (name, out) in &st.outputs {
        let out_path = out.path.clone();
        let mut legacy = None;
        let mut build_trace = None;
        if let Some((r, own_path)) = &resolution {
            if let Some(id) = r.legacy_id(name) {
                legacy = Some(LegacyRealisation::new(id, out_path.clone()));
            }
            if let Some(k) = r.key(name).filter(|_| *own_path) {
                build_trace = Some(BuildTraceEntry::new(k, out_path.clone()));
            }
        }
        let narinfo = NarInfo {
            store_path: out_path,
            url: String::new(),
            compression: Some("none".into()),
            file_hash: None,
            file_size: None,
            nar_hash: nix_hash(&out.nar_hash),
            nar_size: out.nar_size,
            references: out.references.clone(),
            deriver: Some(job.drv_path.clone()),
            system: Some(job.drv.system.clone()),
            sigs: Vec::new(),
            ca: out.ca.clone(),
        };
        records.insert(name.clone(), OutputRecords { legacy, build_trace, narinfo });
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{BasicDerivation, CaRule, DrvOutput, Job, Limits, PathInfo};
    use crate::statement::{Measurement, OutputInfo};
    use nix_formats::content_address::ContentAddress;
    use nix_formats::store_path::FileIngestionMethod;
    use nix_formats::StorePath;
    use std::collections::BTreeSet;

    const TOOL: &str = "/nix/store/0c8mj2k3yp0jx1ksc1b9nclkh3fav40k-fetch-tool";
    const LIB: &str = "/nix/store/1d9nk3l4zq1ky2lsd2c0pdmli4gbw51l-libfetch";
    const UNRESOLVED: &str = "/nix/store/2f0pl4m5ar2lz3mzf3d1qfnmj5hcx62m-src.tar.drv";

    fn sp(p: &str) -> StorePath {
        StorePath::parse(p).unwrap()
    }

    /// A fixed-output step as Nix's build hook sends it for a fetcher with an input derivation
    /// (`TOOL`, which references `LIB`): input sources = the whole input closure, and `drv_path`
    /// the unresolved drv, unless `resolved`.
    fn fod_statement(resolved: bool) -> Statement {
        let hash = Hash::sha256(nix_formats::hash::sha256(b"fetched bytes"));
        let ca = ContentAddress::Fixed { method: FileIngestionMethod::Flat, hash: hash.clone() };
        let out = ca.store_path("src.tar", &BTreeSet::new(), false).unwrap();
        let info = |refs: &[&str]| PathInfo {
            nar_hash: NarHash::of(b"nar"),
            nar_size: 64,
            references: refs.iter().map(|r| sp(r)).collect(),
            ca: None,
        };
        let drv = BasicDerivation {
            name: "src.tar".into(),
            outputs: [(
                "out".to_string(),
                DrvOutput {
                    path: Some(out.clone()),
                    hash_algo: "sha256".into(),
                    hash: hash.to_base16(),
                },
            )]
            .into(),
            input_srcs: [sp(TOOL), sp(LIB)].into(),
            system: "x86_64-linux".into(),
            builder: format!("{TOOL}/bin/fetch"),
            args: vec![],
            env: [("out".to_string(), out.to_string())].into(),
        };
        let drv_path = if resolved { drv.drv_path().unwrap() } else { sp(UNRESOLVED) };
        let closure = [(sp(TOOL), info(&[LIB])), (sp(LIB), info(&[]))].into();
        let job = Job::new(
            "job-fod",
            drv_path,
            drv,
            closure,
            Limits::default(),
            CaRule::SelfRefPositions,
            true,
            ["out".to_string()].into(),
        );
        let output = OutputInfo {
            path: out,
            nar_hash: NarHash::of(b"fetched nar"),
            nar_size: 128,
            references: BTreeSet::new(),
            ca: Some(ca.to_string()),
        };
        let launch = crate::Launch::new(job.digest().unwrap(), 1, 2048, job.network);
        Statement::new(
            launch,
            job,
            BTreeMap::new(),
            [("out".to_string(), output)].into(),
            Measurement([7; 48]),
            "test",
        )
    }

    #[test]
    fn fixed_output_steps_sent_unresolved_get_records_keyed_only_by_what_they_prove() {
        let key = SecretKey::from_seed("host-simulated-1", [3; 32]);
        for resolved in [false, true] {
            let st = fod_statement(resolved);
            let records = step_records(&st, &key)
                .unwrap_or_else(|e| panic!("{resolved}: {e}: {:?}", std::error::Error::source(&e)));
            let out = &records["out"];
            let out_path = &st.outputs["out"].path;
            // The Nix ≤ 2.34 id of a fixed output follows from its declared hash alone.
            let fixed = format!("fixed:out:sha256:{}:{out_path}", st.job.drv.outputs["out"].hash);
            let legacy = out.legacy.as_ref().expect("a legacy realisation");
            assert_eq!(legacy.id.drv_hash, nix_formats::hash::sha256(fixed));
            assert_eq!(legacy.count_valid_signatures(&[key.public_key()]), 1);
            // The Nix ≥ 2.35 key is a drv path: only when it is the basic derivation's own.
            match &out.build_trace {
                Some(b) => {
                    assert!(resolved);
                    assert_eq!(b.key.drv_path, st.job.drv_path);
                }
                None => assert!(!resolved, "the resolved step gets its build-trace entry"),
            }
            assert_eq!(out.narinfo.deriver.as_ref(), Some(&st.job.drv_path));
            assert_eq!(out.narinfo.sigs.len(), 1);
        }
    }

    #[test]
    fn a_floating_ca_step_must_carry_its_own_drv_path() {
        let key = SecretKey::from_seed("host-simulated-1", [3; 32]);
        let mut st = fod_statement(true);
        let o = st.job.drv.outputs.get_mut("out").unwrap();
        (o.path, o.hash_algo, o.hash) = (None, "r:sha256".into(), String::new());
        st.job.network = false;
        st.job.drv_path = sp(UNRESOLVED);
        assert!(step_records(&st, &key).is_err());
    }

    #[test]
    fn key_files_round_trip_and_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_generate_key(dir.path(), "host-simulated-1").unwrap();
        let b = load_or_generate_key(dir.path(), "host-simulated-1").unwrap();
        assert_eq!(a.to_file_string(), b.to_file_string());
        let secret = dir.path().join("keys/host-simulated-1.secret");
        assert_eq!(fs::metadata(&secret).unwrap().permissions().mode() & 0o777, 0o600);
        let public = fs::read_to_string(dir.path().join("keys/host-simulated-1.public")).unwrap();
        assert_eq!(public, a.public_key().to_string());
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_generate_key(dir.path(), "host-simulated-1"),
            Err(SignError::Permissions(_))
        ));
        assert!(matches!(load_or_generate_key(dir.path(), "bad:name"), Err(SignError::KeyName(_))));
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        fs::rename(&secret, dir.path().join("keys/other.secret")).unwrap();
        assert!(matches!(
            load_or_generate_key(dir.path(), "other"),
            Err(SignError::WrongName { .. })
        ));
    }
}
