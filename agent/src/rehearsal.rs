//! A rehearsal of one step over synthetic data, run by a pool VM before its job exists.
//!
//! Under TCG (QEMU's emulator) code that runs for the first time in a VM is translated before it
//! runs, and in a warm-pool step that translation was a large part of job setup and of output
//! hashing (measured in `docs/benchmarks.md`: parsing the job took 40–50 ms the first time and
//! 3 ms the second). A VM launched without a job (a pool VM) therefore runs, after it accepted its
//! launch and before it says `Ready`, the agent's step code once over synthetic data in a scratch
//! directory of its own ([`rehearse`]):
//! 1. encode, parse and validate a job for a floating content-addressed derivation (its
//!    derivation path recomputed), and check it against the launch;
//! 2. receive, unpack and check one content-addressed input NAR (64 KiB) through the framing, from
//!    memory, and recompute its content address;
//! 3. compute the builder's environment and files;
//! 4. hash an output (a small file) with the scratch-path rewriting, and stream its NAR into a
//!    discarding sink;
//! 5. build, validate and encode a statement and its REPORT_DATA, and sign a zero SHA-384 digest
//!    with a constant, public P-384 key (the simulated attester's ECDSA code, not its key);
//! 6. delete the scratch directory.
//!
//! Then [`rehearse_builder`] runs one process the way the builder will run, confined (cgroup,
//! namespaces, root, ids, seccomp: `crate::sandbox`): the agent's own binary, bound read-only
//! into the builder's root for the occasion, with `--version`; then the binding is removed.
//!
//! What it never touches: the store, the build directory's contents, the channel to the host,
//! and the attester (the simulated key signs the job's statement and nothing else). Nothing it
//! computes is kept: the job that follows starts from the same state, with warmer caches. Under
//! KVM or SEV-SNP it costs a few milliseconds of the pool VM's idle time and gains little.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::Path;

use build_trace::job::{
    BasicDerivation, CaRule, DrvOutput, Job, JobError, Limits, NarHash, PathInfo,
};
use build_trace::launch::Launch;
use build_trace::statement::{Measurement, Statement, StatementError};
use channel::messages::NarBegin;
use channel::proto::{FrameReader, FrameWriter, Kind, ProtoError};
use nix_formats::content_address::ContentAddress;
use nix_formats::store_path::{make_fixed_output_path, FileIngestionMethod};
use nix_formats::{Hash, StorePath};

use crate::sandbox::{Confinement, Groundwork, SandboxError, SandboxSpec};
use crate::{builder, inputs, outputs};

/// Bytes of the synthetic input file.
const INPUT_BYTES: usize = 64 << 10;

/// Why a rehearsal failed (the agent says so and goes on: a rehearsal only warms caches).
#[derive(Debug, thiserror::Error)]
pub enum RehearsalError {
    /// The scratch directory.
    #[error("scratch directory {0}")]
    Io(String, #[source] std::io::Error),
    /// Making the synthetic input.
    #[error("the synthetic input")]
    Input(String),
    /// The synthetic job.
    #[error("the synthetic job")]
    Job(#[from] JobError),
    /// Framing.
    #[error("framing")]
    Proto(#[from] ProtoError),
    /// Receiving the input.
    #[error("receiving the synthetic input")]
    Inputs(#[from] inputs::InputError),
    /// The builder's environment.
    #[error("preparing the synthetic build")]
    Prepare(#[from] builder::PrepareError),
    /// Hashing the output.
    #[error("hashing the synthetic output")]
    Outputs(#[from] outputs::OutputError),
    /// The statement.
    #[error("the synthetic statement")]
    Statement(#[from] StatementError),
    /// Confining the rehearsal process.
    #[error("confining the rehearsal process")]
    Sandbox(#[from] SandboxError),
    /// Binding the agent's binary into the builder's root.
    #[error("binding the agent's binary at {0}")]
    Bind(String, #[source] nix::Error),
    /// The rehearsal process.
    #[error("the rehearsal process")]
    Build(#[from] builder::BuildFailure),
}

fn io(what: &Path) -> impl FnOnce(std::io::Error) -> RehearsalError + '_ {
    move |e| RehearsalError::Io(what.display().to_string(), e)
}

/// Run the rehearsal in `dir` (created, and removed afterwards whatever happens), checking the
/// synthetic job against `launch` as a real one would be.
pub fn rehearse(dir: &Path, launch: &Launch) -> Result<(), RehearsalError> {
    let _ = fs::remove_dir_all(dir);
    let result = rehearse_in(dir, launch);
    let removed = fs::remove_dir_all(dir).map_err(io(dir));
    result.and(removed)
}

fn rehearse_in(dir: &Path, launch: &Launch) -> Result<(), RehearsalError> {
    let store = dir.join("store");
    fs::create_dir_all(&store).map_err(io(&store))?;
    let (input, info, nar) = synthetic_input(dir)?;
    let job = synthetic_job(&input, info)?;
    let job = Job::from_canonical_bytes(&job.canonical_bytes()?)?;
    // A pool launch admits any job without network; the answer does not matter here.
    let _ = launch.admits(&job);

    let mut wire = FrameWriter::new(Vec::new());
    wire.send_nar(&NarBegin { path: input.clone(), nar_size: nar.len() as u64 }, &mut &nar[..])?;
    wire.send(Kind::InputsDone, &[])?;
    let wire = std::mem::take(wire.get_mut());
    let received = inputs::receive(&mut FrameReader::new(&wire[..]), &job, &store, &mut |_| {})?;
    let input_cas = inputs::verify_content_addresses(&job, &store, &received)?;

    let (scratch, rewrites) = builder::scratch_paths(&job.drv, &job.drv_path)?;
    builder::prepare(&job.drv, &rewrites, &job.closure, false, 1, "/build")?;
    // A single file (a tree would have to be made writable again before it can be removed).
    let out = store.join(scratch["out"].base_name());
    fs::write(&out, format!("rehearsal {}\n", scratch["out"])).map_err(io(&out))?;
    let hashed = outputs::hash_outputs(&job, &scratch, &store)?;
    let mut sink = FrameWriter::new(std::io::sink());
    for h in hashed.values() {
        let begin = NarBegin { path: h.info.path.clone(), nar_size: h.info.nar_size };
        sink.send_nar(&begin, &mut h.nar())?;
    }
    let statement = Statement::new(
        launch.clone(),
        job,
        input_cas,
        hashed.iter().map(|(n, h)| (n.clone(), h.info.clone())).collect(),
        Measurement([0; 48]),
        crate::session::agent_version(),
    );
    statement.validate()?;
    statement.canonical_bytes()?;
    statement.report_data()?;
    sign_once();
    Ok(())
}

/// ECDSA P-384 over SHA-384, as the simulated attester signs a report, with a key whose secret
/// is this public constant: the signature means nothing and is dropped.
fn sign_once() {
    use p384::ecdsa::signature::hazmat::PrehashSigner;
    use sha2::Digest;
    let digest = sha2::Sha384::digest([0u8; 0x2a0]);
    if let Ok(key) = p384::ecdsa::SigningKey::from_slice(&[0x42; 48]) {
        let _: Result<p384::ecdsa::Signature, _> = key.sign_prehash(&digest);
    }
}

/// Where the agent's binary is bound in the builder's root during [`rehearse_builder`].
const REHEARSAL_EXE: &str = "vouch-rehearsal";

/// Run `/proc/self/exe --version` confined as a builder (see the module docs), in the root
/// that `groundwork` assembled for `store` and `build`.
pub fn rehearse_builder(
    groundwork: &Groundwork,
    store: &Path,
    build: &Path,
) -> Result<(), RehearsalError> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    let spec = SandboxSpec {
        store: store.to_owned(),
        build: build.to_owned(),
        network: false,
        memory_bytes: 0,
        max_processes: 0,
        tmpfs_bytes: 0,
    };
    let confine = Confinement::prepare(&spec, Some(groundwork))?;
    let exe = Path::new(crate::sandbox::root::SANDBOX_ROOT).join(REHEARSAL_EXE);
    fs::write(&exe, b"").map_err(io(&exe))?;
    let bind = |flags, e: &Path| {
        mount(Some("/proc/self/exe"), e, None::<&str>, flags, None::<&str>)
            .map_err(|err| RehearsalError::Bind(e.display().to_string(), err))
    };
    let bound = bind(MsFlags::MS_BIND, &exe).and_then(|()| {
        bind(MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID, &exe)
    });
    let run = bound.and_then(|()| {
        let prepared = builder::Prepared {
            program: format!("/{REHEARSAL_EXE}"),
            argv0: REHEARSAL_EXE.into(),
            args: vec!["--version".into()],
            env: BTreeMap::new(),
            files: Vec::new(),
        };
        let limits = builder::RunLimits { timeout_s: 60, max_silent_s: 0, max_log_bytes: 1 << 16 };
        builder::run(&prepared, "(rehearsal)", build, limits, &confine, &mut |_| {})
            .map_err(RehearsalError::from)
    });
    let _ = umount2(&exe, MntFlags::MNT_DETACH);
    let removed = fs::remove_file(&exe).map_err(io(&exe));
    run.and(removed)
}

/// A content-addressed input: its path, path info and NAR.
fn synthetic_input(dir: &Path) -> Result<(StorePath, PathInfo, Vec<u8>), RehearsalError> {
    let src = dir.join("input");
    let mut f = fs::File::create(&src).map_err(io(&src))?;
    let block: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    for _ in 0..INPUT_BYTES / block.len() {
        f.write_all(&block).map_err(io(&src))?;
    }
    drop(f);
    let mut nar = Vec::new();
    nix_formats::nar::dump_path(&src, &mut nar)
        .map_err(|e| RehearsalError::Input(e.to_string()))?;
    fs::remove_file(&src).map_err(io(&src))?;
    let nar_hash = NarHash::of(&nar);
    let hash = Hash::sha256(nar_hash.0);
    let method = FileIngestionMethod::Recursive;
    let path =
        make_fixed_output_path("vouch-rehearsal-input", method, &hash, &BTreeSet::new(), false)
            .map_err(|e| RehearsalError::Input(e.to_string()))?;
    let ca = ContentAddress::Fixed { method, hash }.to_string();
    let info = PathInfo {
        nar_hash,
        nar_size: nar.len() as u64,
        references: BTreeSet::new(),
        ca: Some(ca),
    };
    Ok((path, info, nar))
}

/// A floating content-addressed job that reads `input`.
fn synthetic_job(input: &StorePath, info: PathInfo) -> Result<Job, RehearsalError> {
    let out = DrvOutput { path: None, hash_algo: "r:sha256".into(), hash: String::new() };
    let builder = format!("{input}/sh");
    let env: BTreeMap<String, String> = [
        ("builder", builder.clone()),
        ("name", "vouch-rehearsal".into()),
        ("out", builder::hash_placeholder("out")),
        ("system", "x86_64-linux".into()),
    ]
    .map(|(k, v)| (k.to_owned(), v))
    .into();
    let drv = BasicDerivation {
        name: "vouch-rehearsal".into(),
        outputs: [("out".to_owned(), out)].into(),
        input_srcs: [input.clone()].into(),
        system: "x86_64-linux".into(),
        builder,
        args: vec!["-c".into(), "echo rehearsal > $out".into()],
        env,
    };
    let drv_path = drv.drv_path()?;
    let job = Job::new(
        "vouch-rehearsal",
        drv_path,
        drv,
        [(input.clone(), info)].into(),
        Limits::default(),
        CaRule::SelfRefPositions,
        false,
        ["out".to_owned()].into(),
    );
    job.validate()?;
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rehearsal_runs_and_leaves_nothing() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("rehearsal");
        let launch = Launch::new([7; 32], 1, 1024, false);
        rehearse(&dir, &launch).unwrap();
        assert!(!dir.exists());
        // Twice in a row (a leftover directory is replaced).
        fs::create_dir_all(dir.join("store/leftover")).unwrap();
        rehearse(&dir, &launch).unwrap();
        assert!(!dir.exists());
    }
}
