//! Encodings of the records both protocols carry: store paths, path infos, basic derivations,
//! build results, build options and `SetOptions`, per protocol version.
//!
//! Every decoder validates what it reads (store paths parse, hashes are SHA-256, enum tags are
//! known) and says which field was wrong. Encoders exist for both directions so the test client
//! and the golden-vector tests use the same code as the server.
//!
//! What is not here: message framing and op dispatch (`worker`, `serve`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};

use build_trace::{NarHash, PathInfo};
use nix_formats::hash::{Hash, HashAlgo, HashError};
use nix_formats::store_path::StorePathError;
use nix_formats::StorePath;

use super::action::{
    BuildMode, BuildOptions, BuildResult, BuildStatus, BuiltOutput, ClientOptions,
};
use super::version::{minor, ClientProfile, ProtoVersion, Protocol, RealisationFormat};
use super::wire::{WireError, WireRead, WireWrite};
use crate::core::{LegacyRealisation, ValidPathInfo};

/// Why a record could not be decoded or encoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The stream failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A field that must be a store path is not one.
    #[error("{what} is not a valid store path")]
    StorePath {
        /// Which field.
        what: &'static str,
        /// Why.
        #[source]
        source: StorePathError,
    },
    /// A hash field does not parse as SHA-256.
    #[error("{what} is not a SHA-256 hash")]
    Hash {
        /// Which field.
        what: &'static str,
        /// Why.
        #[source]
        source: HashError,
    },
    /// Some other field has a bad value.
    #[error("{what}: {problem}")]
    Field {
        /// Which field.
        what: &'static str,
        /// What is wrong.
        problem: String,
    },
}

type CResult<T> = Result<T, CodecError>;

fn field(what: &'static str, problem: impl Into<String>) -> CodecError {
    CodecError::Field { what, problem: problem.into() }
}

/// A full store path.
pub fn read_store_path(r: &mut impl Read, what: &'static str) -> CResult<StorePath> {
    let s = r.read_string(what)?;
    StorePath::parse(&s).map_err(|source| CodecError::StorePath { what, source })
}

/// A store path or `""`.
pub fn read_opt_store_path(r: &mut impl Read, what: &'static str) -> CResult<Option<StorePath>> {
    let s = r.read_string(what)?;
    if s.is_empty() {
        return Ok(None);
    }
    StorePath::parse(&s).map(Some).map_err(|source| CodecError::StorePath { what, source })
}

/// A set of full store paths.
pub fn read_store_path_set(r: &mut impl Read, what: &'static str) -> CResult<BTreeSet<StorePath>> {
    let n = r.read_count(what)?;
    let mut set = BTreeSet::new();
    for _ in 0..n {
        set.insert(read_store_path(r, what)?);
    }
    Ok(set)
}

/// Write a set of store paths (sorted, as Nix's `StorePathSet`).
pub fn write_store_path_set<'a>(
    w: &mut impl Write,
    paths: impl IntoIterator<Item = &'a StorePath, IntoIter: ExactSizeIterator>,
) -> CResult<()> {
    let it = paths.into_iter();
    w.write_u64(it.len() as u64)?;
    for p in it {
        w.write_str(&p.to_string())?;
    }
    Ok(())
}

fn parse_nar_hash(s: &str, what: &'static str) -> CResult<NarHash> {
    let h = Hash::parse_any(s, Some(HashAlgo::Sha256))
        .map_err(|source| CodecError::Hash { what, source })?;
    h.sha256_bytes().map(NarHash).map_err(|source| CodecError::Hash { what, source })
}

fn opt_string(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// `ValidPathInfo` as uploads carry it (worker `AddMultipleToStore`/`AddToStoreNar`, serve
/// `AddToStoreNar`): path, deriver, narHash (base16, no prefix), references, registrationTime,
/// narSize, ultimate, sigs, ca — the worker layout at ≥ 1.16.
pub fn read_upload_info(r: &mut impl Read) -> CResult<ValidPathInfo> {
    let path = read_store_path(r, "path")?;
    read_unkeyed_path_info(r, path, 0x110)
}

/// Write what [`read_upload_info`] reads.
pub fn write_upload_info(w: &mut impl Write, info: &ValidPathInfo) -> CResult<()> {
    w.write_str(&info.path.to_string())?;
    write_unkeyed_path_info(w, info, 0x110)
}

/// The worker's `UnkeyedValidPathInfo` (everything but the path).
pub fn read_unkeyed_path_info(
    r: &mut impl Read,
    path: StorePath,
    version: ProtoVersion,
) -> CResult<ValidPathInfo> {
    let deriver = read_opt_store_path(r, "deriver")?;
    let nar_hash = parse_nar_hash(&r.read_string("narHash")?, "narHash")?;
    let references = read_store_path_set(r, "references")?;
    let registration_time = r.read_u64()?;
    let nar_size = r.read_u64()?;
    let (mut ultimate, mut sigs, mut ca) = (false, BTreeSet::new(), None);
    if minor(version) >= 16 {
        ultimate = r.read_bool()?;
        sigs = r.read_string_set("sigs")?;
        ca = opt_string(r.read_string("ca")?);
    }
    Ok(ValidPathInfo {
        path,
        info: PathInfo { nar_hash, nar_size, references, ca },
        deriver,
        registration_time,
        ultimate,
        sigs,
    })
}

/// Write the worker's `UnkeyedValidPathInfo`.
pub fn write_unkeyed_path_info(
    w: &mut impl Write,
    info: &ValidPathInfo,
    version: ProtoVersion,
) -> CResult<()> {
    w.write_str(&info.deriver.as_ref().map(|d| d.to_string()).unwrap_or_default())?;
    w.write_str(&hex::encode(info.info.nar_hash.0))?;
    write_store_path_set(w, &info.info.references)?;
    w.write_u64(info.registration_time)?;
    w.write_u64(info.info.nar_size)?;
    if minor(version) >= 16 {
        w.write_bool(info.ultimate)?;
        w.write_strings(&info.sigs)?;
        w.write_str(info.info.ca.as_deref().unwrap_or(""))?;
    }
    Ok(())
}

/// The serve protocol's `UnkeyedValidPathInfo` (`QueryPathInfos` answers, after the path).
pub fn write_serve_path_info(
    w: &mut impl Write,
    info: &ValidPathInfo,
    version: ProtoVersion,
) -> CResult<()> {
    w.write_str(&info.deriver.as_ref().map(|d| d.to_string()).unwrap_or_default())?;
    write_store_path_set(w, &info.info.references)?;
    w.write_u64(info.info.nar_size)?; // download size: uncompressed
    w.write_u64(info.info.nar_size)?;
    if minor(version) >= 4 {
        w.write_str(&Hash::sha256(info.info.nar_hash.0).to_string())?;
        w.write_str(info.info.ca.as_deref().unwrap_or(""))?;
        w.write_strings(&info.sigs)?;
    }
    Ok(())
}

/// Read what [`write_serve_path_info`] writes (the path is read by the caller).
pub fn read_serve_path_info(
    r: &mut impl Read,
    path: StorePath,
    version: ProtoVersion,
) -> CResult<ValidPathInfo> {
    let deriver = read_opt_store_path(r, "deriver")?;
    let references = read_store_path_set(r, "references")?;
    let _download_size = r.read_u64()?;
    let nar_size = r.read_u64()?;
    let (mut nar_hash, mut ca, mut sigs) = (NarHash([0; 32]), None, BTreeSet::new());
    if minor(version) >= 4 {
        let h = r.read_string("narHash")?;
        if !h.is_empty() {
            nar_hash = parse_nar_hash(&h, "narHash")?;
        }
        ca = opt_string(r.read_string("ca")?);
        sigs = r.read_string_set("sigs")?;
    }
    Ok(ValidPathInfo {
        path,
        info: PathInfo { nar_hash, nar_size, references, ca },
        deriver,
        registration_time: 0,
        ultimate: false,
        sigs,
    })
}

/// A basic derivation (`BuildDerivation` in both protocols). Its name comes from `drv_path`.
pub fn read_basic_derivation(
    r: &mut impl Read,
    drv_path: &StorePath,
) -> CResult<build_trace::BasicDerivation> {
    let name = drv_path
        .drv_name()
        .map_err(|source| CodecError::StorePath { what: "drvPath", source })?
        .to_owned();
    let n = r.read_count("outputs")?;
    let mut outputs = BTreeMap::new();
    for _ in 0..n {
        let out_name = r.read_string("output name")?;
        let path = read_opt_store_path(r, "output path")?;
        let hash_algo = r.read_string("output hash algorithm")?;
        let hash = r.read_string("output hash")?;
        if outputs
            .insert(out_name.clone(), build_trace::DrvOutput { path, hash_algo, hash })
            .is_some()
        {
            return Err(field("outputs", format!("output `{out_name}` appears twice")));
        }
    }
    let input_srcs = read_store_path_set(r, "inputSrcs")?;
    let system = r.read_string("platform")?;
    let builder = r.read_string("builder")?;
    let args = r.read_string_list("args")?;
    let n = r.read_count("env")?;
    let mut env = BTreeMap::new();
    for _ in 0..n {
        let k = r.read_string("env name")?;
        let v = r.read_string("env value")?;
        env.insert(k, v);
    }
    Ok(build_trace::BasicDerivation { name, outputs, input_srcs, system, builder, args, env })
}

/// Write a basic derivation (client side; tests).
pub fn write_basic_derivation(
    w: &mut impl Write,
    drv: &build_trace::BasicDerivation,
) -> CResult<()> {
    w.write_u64(drv.outputs.len() as u64)?;
    for (name, o) in &drv.outputs {
        w.write_str(name)?;
        w.write_str(&o.path.as_ref().map(ToString::to_string).unwrap_or_default())?;
        w.write_str(&o.hash_algo)?;
        w.write_str(&o.hash)?;
    }
    write_store_path_set(w, &drv.input_srcs)?;
    w.write_str(&drv.system)?;
    w.write_str(&drv.builder)?;
    w.write_strings(&drv.args)?;
    w.write_string_map(&drv.env)?;
    Ok(())
}

/// The worker's build mode.
pub fn read_build_mode(r: &mut impl Read) -> CResult<BuildMode> {
    Ok(match r.read_u64()? {
        0 => BuildMode::Normal,
        1 => BuildMode::Repair,
        2 => BuildMode::Check,
        v => return Err(WireError::BadValue { what: "build mode", value: v }.into()),
    })
}

/// Write a build mode.
pub fn write_build_mode(w: &mut impl Write, m: BuildMode) -> CResult<()> {
    Ok(w.write_u64(match m {
        BuildMode::Normal => 0,
        BuildMode::Repair => 1,
        BuildMode::Check => 2,
    })?)
}

/// The serve protocol's build options.
pub fn read_build_options(r: &mut impl Read, version: ProtoVersion) -> CResult<BuildOptions> {
    let mut o = BuildOptions {
        max_silent_time: r.read_u64()?,
        build_timeout: r.read_u64()?,
        ..Default::default()
    };
    if minor(version) >= 2 {
        o.max_log_size = r.read_u64()?;
    }
    if minor(version) >= 3 {
        o.nr_repeats = r.read_u64()?;
        o.enforce_determinism = r.read_bool()?;
    }
    if minor(version) >= 7 {
        o.keep_failed = r.read_bool()?;
    }
    Ok(o)
}

/// Write the serve protocol's build options.
pub fn write_build_options(
    w: &mut impl Write,
    o: &BuildOptions,
    version: ProtoVersion,
) -> CResult<()> {
    w.write_u64(o.max_silent_time)?;
    w.write_u64(o.build_timeout)?;
    if minor(version) >= 2 {
        w.write_u64(o.max_log_size)?;
    }
    if minor(version) >= 3 {
        w.write_u64(o.nr_repeats)?;
        w.write_bool(o.enforce_determinism)?;
    }
    if minor(version) >= 7 {
        w.write_bool(o.keep_failed)?;
    }
    Ok(())
}

/// The worker's `SetOptions` payload.
pub fn read_client_options(r: &mut impl Read, version: ProtoVersion) -> CResult<ClientOptions> {
    let mut o = ClientOptions {
        keep_failed: r.read_bool()?,
        keep_going: r.read_bool()?,
        try_fallback: r.read_bool()?,
        verbosity: r.read_u64()?,
        max_build_jobs: r.read_u64()?,
        max_silent_time: r.read_u64()?,
        ..Default::default()
    };
    let _use_build_hook = r.read_u64()?;
    o.verbose_build = r.read_bool()?;
    let _log_type = r.read_u64()?;
    let _print_build_trace = r.read_u64()?;
    o.build_cores = r.read_u64()?;
    o.use_substitutes = r.read_bool()?;
    if minor(version) >= 12 {
        o.overrides = r.read_string_map("settings override")?;
    }
    Ok(o)
}

/// Write the worker's `SetOptions` payload (client side; tests).
pub fn write_client_options(
    w: &mut impl Write,
    o: &ClientOptions,
    version: ProtoVersion,
) -> CResult<()> {
    w.write_bool(o.keep_failed)?;
    w.write_bool(o.keep_going)?;
    w.write_bool(o.try_fallback)?;
    w.write_u64(o.verbosity)?;
    w.write_u64(o.max_build_jobs)?;
    w.write_u64(o.max_silent_time)?;
    w.write_u64(1)?; // useBuildHook (obsolete)
    w.write_bool(o.verbose_build)?;
    w.write_u64(0)?; // logType (obsolete)
    w.write_u64(0)?; // printBuildTrace (obsolete)
    w.write_u64(o.build_cores)?;
    w.write_bool(o.use_substitutes)?;
    if minor(version) >= 12 {
        w.write_string_map(&o.overrides)?;
    }
    Ok(())
}

/// A `BuildResult` for this client (worker or serve layout, realisations in its format).
pub fn write_build_result(
    w: &mut impl Write,
    res: &BuildResult,
    client: &ClientProfile,
) -> CResult<()> {
    let v = client.version;
    w.write_u64(res.status as u64)?;
    w.write_str(&res.error_msg)?;
    let times = match client.protocol {
        Protocol::Worker => minor(v) >= 29,
        Protocol::Serve => minor(v) >= 3,
    };
    if times {
        w.write_u64(res.times_built)?;
        w.write_bool(res.is_non_deterministic)?;
        w.write_u64(res.start_time)?;
        w.write_u64(res.stop_time)?;
    }
    if client.protocol == Protocol::Worker && minor(v) >= 37 {
        for t in [res.cpu_user, res.cpu_system] {
            match t {
                None => w.write_u64(0)?,
                Some(us) => {
                    w.write_u64(1)?;
                    w.write_u64(us as u64)?;
                }
            }
        }
    }
    match client.realisation_format() {
        RealisationFormat::None => {}
        RealisationFormat::DrvPathKeyed => {
            w.write_u64(res.built_outputs.len() as u64)?;
            for (name, out) in &res.built_outputs {
                w.write_str(name)?;
                w.write_str(&out.out_path.to_string())?;
                w.write_strings(&out.signatures)?;
            }
        }
        RealisationFormat::LegacyJson => {
            // Outputs without a realisation (input-addressed steps) are left out: Nix ≤ 2.34
            // reads `builtOutputs` only for floating content-addressed derivations.
            let map: BTreeMap<String, String> = res
                .built_outputs
                .values()
                .filter_map(|o| o.legacy.as_ref().map(|l| (l.id.clone(), l.json.clone())))
                .collect();
            w.write_string_map(&map)?;
        }
    }
    Ok(())
}

/// Read a `BuildResult` (client side; tests). Legacy realisations keep their id and JSON; the
/// output path is taken from the JSON's `outPath`.
pub fn read_build_result(r: &mut impl Read, client: &ClientProfile) -> CResult<BuildResult> {
    let v = client.version;
    let code = r.read_u64()?;
    let status = BuildStatus::from_code(code)
        .ok_or(WireError::BadValue { what: "build status", value: code })?;
    let mut res = BuildResult::failure(status, r.read_string("errorMsg")?);
    let times = match client.protocol {
        Protocol::Worker => minor(v) >= 29,
        Protocol::Serve => minor(v) >= 3,
    };
    if times {
        res.times_built = r.read_u64()?;
        res.is_non_deterministic = r.read_bool()?;
        res.start_time = r.read_u64()?;
        res.stop_time = r.read_u64()?;
    }
    if client.protocol == Protocol::Worker && minor(v) >= 37 {
        let mut read_opt = || -> CResult<Option<i64>> {
            match r.read_u64()? {
                0 => Ok(None),
                1 => Ok(Some(r.read_u64()? as i64)),
                t => Err(WireError::BadValue { what: "optional tag", value: t }.into()),
            }
        };
        res.cpu_user = read_opt()?;
        res.cpu_system = read_opt()?;
    }
    match client.realisation_format() {
        RealisationFormat::None => {}
        RealisationFormat::DrvPathKeyed => {
            let n = r.read_count("builtOutputs")?;
            for _ in 0..n {
                let name = r.read_string("output name")?;
                let out_path = read_store_path(r, "outPath")?;
                let signatures = r.read_string_set("signatures")?;
                res.built_outputs.insert(name, BuiltOutput { out_path, signatures, legacy: None });
            }
        }
        RealisationFormat::LegacyJson => {
            for (id, json) in r.read_string_map("builtOutputs")? {
                let (_, name) = id
                    .split_once('!')
                    .ok_or_else(|| field("builtOutputs", format!("id `{id}` has no `!`")))?;
                let v: serde_json::Value = serde_json::from_str(&json)
                    .map_err(|e| field("builtOutputs", format!("realisation JSON: {e}")))?;
                let out = v["outPath"]
                    .as_str()
                    .ok_or_else(|| field("builtOutputs", "realisation JSON has no outPath"))?;
                let out_path = StorePath::from_base_name(out)
                    .or_else(|_| StorePath::parse(out))
                    .map_err(|source| CodecError::StorePath { what: "outPath", source })?;
                let name = name.to_owned();
                res.built_outputs.insert(
                    name,
                    BuiltOutput {
                        out_path,
                        signatures: BTreeSet::new(),
                        legacy: Some(LegacyRealisation { id, json }),
                    },
                );
            }
        }
    }
    Ok(res)
}
