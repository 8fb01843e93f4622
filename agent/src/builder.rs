//! Running the builder the way Nix does (Nix's `LocalDerivationGoal::initEnv`, `initTmpDir`,
//! `writeStructuredAttrs` and `runChild`), with the log streamed and the limits enforced.
//!
//! What is here:
//! - [`scratch_paths`]: where each output is built (input-addressed: its final path; floating
//!   CA: Nix's `makeFallbackPath` = `makeStorePath("rewrite:<drv>:name:<out>", sha256 of zero,
//!   <output path name>)`) and the placeholder rewrites (`hashPlaceholder(out)` → scratch path).
//! - [`prepare`], a pure function: the environment (`PATH=/path-not-set`,
//!   `HOME=/homeless-shelter`, `NIX_STORE`, `NIX_BUILD_CORES`, the derivation's env with
//!   `passAsFile` attributes moved into `.attr-<nix32(sha256(name))>` files, `NIX_BUILD_TOP`,
//!   `TMPDIR`/`TEMPDIR`/`TMP`/`TEMP`, `PWD`, `NIX_OUTPUT_CHECKED` for fixed outputs, `NIX_LOG_FD=2`,
//!   `TERM=xterm-256color`), `__structuredAttrs` (`.attrs.json` + `.attrs.sh`, no env copy),
//!   `exportReferencesGraph` files, argv (`argv[0]` = base name of the builder) — all with the
//!   placeholder rewrites applied as Nix applies them.
//! - [`run`]: spawn it confined ([`crate::sandbox`]), cwd = the build directory, stdin
//!   `/dev/null`, stdout+stderr on one pipe streamed to a callback; timeout, max-silent and
//!   max-log-size enforced; when the builder exits, its whole process group is killed.
//!
//! What is not here: hashing outputs (`crate::outputs`), receiving inputs.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use build_trace::job::{BasicDerivation, PathInfo};
use nix_formats::{make_store_path, store_path::output_path_name, Hash, StorePath};
use sha2::{Digest, Sha256};

use crate::sandbox::Confinement;

/// Errors preparing the build.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// A computed path is invalid (bad derivation name).
    #[error("computing the scratch path of output `{0}`")]
    Path(String, #[source] nix_formats::store_path::StorePathError),
    /// `__json` is not valid JSON.
    #[error("__structuredAttrs: `__json` is not a JSON object")]
    StructuredAttrs,
    /// `exportReferencesGraph` names a path outside the inputs.
    #[error("exportReferencesGraph: `{0}` is not an input of this derivation")]
    ExportGraph(String),
}

/// Why the builder did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum BuildFailure {
    /// Could not start it.
    #[error("starting builder `{0}`")]
    Spawn(String, #[source] std::io::Error),
    /// Writing the build directory files failed.
    #[error("writing {0} into the build directory")]
    Files(String, #[source] std::io::Error),
    /// Ran too long.
    #[error("building of '{drv}' timed out after {secs} seconds")]
    Timeout {
        /// Derivation.
        drv: String,
        /// Limit.
        secs: u64,
    },
    /// Silent too long.
    #[error("'{drv}' timed out after {secs} seconds of silence")]
    MaxSilent {
        /// Derivation.
        drv: String,
        /// Limit.
        secs: u64,
    },
    /// Logged too much.
    #[error("'{drv}' killed after writing more than {bytes} bytes of log output")]
    LogLimit {
        /// Derivation.
        drv: String,
        /// Limit.
        bytes: u64,
    },
    /// Exited unsuccessfully.
    #[error("builder for '{drv}' {how}")]
    Failed {
        /// Derivation.
        drv: String,
        /// "failed with exit code N" / "was killed by signal N".
        how: String,
    },
    /// The log pipe failed.
    #[error("reading the builder's log")]
    Log(#[source] std::io::Error),
    /// A resource limit of the sandbox was hit (memory, processes, tmpfs).
    #[error("builder for '{drv}' stopped: {hit}")]
    Limit {
        /// Derivation.
        drv: String,
        /// Which limit.
        hit: crate::sandbox::LimitHit,
    },
}

/// `hashPlaceholder(output)`: `/` + nix32(sha256("nix-output:" + output)).
pub fn hash_placeholder(output: &str) -> String {
    let d = Sha256::digest(format!("nix-output:{output}").as_bytes());
    format!("/{}", nix_formats::base32::encode(&d))
}

/// Output name → scratch path, and the placeholder rewrites in application order.
pub type Scratch = (BTreeMap<String, StorePath>, Vec<(String, String)>);

/// Scratch path per output and the rewrites (placeholder → scratch path), as Nix computes them
/// when no output is valid yet (always true in a fresh VM).
pub fn scratch_paths(drv: &BasicDerivation, drv_path: &StorePath) -> Result<Scratch, PrepareError> {
    let mut scratch = BTreeMap::new();
    let mut rewrites = Vec::new();
    for (name, out) in &drv.outputs {
        let p = match &out.path {
            Some(p) => p.clone(),
            None => make_store_path(
                &format!("rewrite:{}:name:{name}", drv_path.base_name()),
                &Hash::sha256([0; 32]),
                &output_path_name(&drv.name, name),
            )
            .map_err(|e| PrepareError::Path(name.clone(), e))?,
        };
        rewrites.push((hash_placeholder(name), p.to_string()));
        scratch.insert(name.clone(), p);
    }
    // Nix keeps rewrites in a std::map: applied in key order.
    rewrites.sort();
    Ok((scratch, rewrites))
}

/// Nix's `rewriteStrings`: each rewrite in order, replacing all occurrences.
pub fn rewrite(s: &str, rewrites: &[(String, String)]) -> String {
    let mut out = s.to_owned();
    for (from, to) in rewrites {
        if !from.is_empty() && out.contains(from.as_str()) {
            out = out.replace(from.as_str(), to);
        }
    }
    out
}

/// Everything needed to exec the builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// Program to exec (the derivation's builder, not rewritten, as Nix).
    pub program: String,
    /// `argv[0]`: base name of the builder.
    pub argv0: String,
    /// Arguments (rewritten).
    pub args: Vec<String>,
    /// Environment (rewritten).
    pub env: BTreeMap<String, String>,
    /// Files to create in the build directory: (file name, contents).
    pub files: Vec<(String, Vec<u8>)>,
}

fn shell_escape(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn sh_simple(v: &serde_json::Value) -> Option<String> {
    use serde_json::Value::*;
    match v {
        String(s) => Some(shell_escape(s)),
        Number(n) => n
            .as_i64()
            .map(|i| i.to_string())
            .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| (f as i64).to_string())),
        Null => Some("''".into()),
        Bool(b) => Some(if *b { "1".into() } else { std::string::String::new() }),
        _ => None,
    }
}

fn is_sh_var_name(k: &str) -> bool {
    let mut c = k.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

/// Nix's `writeStructuredAttrsShell`.
pub fn structured_attrs_shell(json: &serde_json::Map<String, serde_json::Value>) -> String {
    let mut out = String::new();
    for (key, value) in json {
        if !is_sh_var_name(key) {
            continue;
        }
        if let Some(s) = sh_simple(value) {
            out += &format!("declare {key}={s}\n");
        } else if let Some(arr) = value.as_array() {
            let items: Option<Vec<String>> = arr.iter().map(sh_simple).collect();
            if let Some(items) = items {
                let s2: String = items.iter().map(|i| format!("{i} ")).collect();
                out += &format!("declare -a {key}=({s2})\n");
            }
        } else if let Some(obj) = value.as_object() {
            let items: Option<Vec<String>> = obj
                .iter()
                .map(|(k2, v2)| sh_simple(v2).map(|s| format!("[{}]={s} ", shell_escape(k2))))
                .collect();
            if let Some(items) = items {
                out += &format!("declare -A {key}=({})\n", items.concat());
            }
        }
    }
    out
}

/// Nix's `makeValidityRegistration(paths, false, false)` for `exportReferencesGraph`.
fn validity_registration(
    paths: &BTreeSet<StorePath>,
    closure: &BTreeMap<StorePath, PathInfo>,
) -> String {
    let mut s = String::new();
    for p in paths {
        let refs = closure.get(p).map(|i| &i.references);
        s += &format!("{p}\n\n{}\n", refs.map_or(0, |r| r.len()));
        for r in refs.into_iter().flatten() {
            s += &format!("{r}\n");
        }
    }
    s
}

/// The closure of `roots` (store paths as the derivation's environment names them).
fn closure_of(
    roots: &[String],
    closure: &BTreeMap<StorePath, PathInfo>,
) -> Result<BTreeSet<StorePath>, PrepareError> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<&StorePath> = roots
        .iter()
        .map(|r| {
            match StorePath::parse(r) {
                Ok(p) => closure.get_key_value(&p).map(|(k, _)| k),
                Err(_) => None,
            }
            .ok_or_else(|| PrepareError::ExportGraph(r.clone()))
        })
        .collect::<Result<_, _>>()?;
    while let Some(p) = todo.pop() {
        let info = closure.get(p).ok_or_else(|| PrepareError::ExportGraph(p.to_string()))?;
        if seen.insert(p.clone()) {
            todo.extend(&info.references);
        }
    }
    Ok(seen)
}

/// Compute the builder's environment, arguments and build-directory files (see module doc).
pub fn prepare(
    drv: &BasicDerivation,
    rewrites: &[(String, String)],
    closure: &BTreeMap<StorePath, PathInfo>,
    fixed_output: bool,
    cores: u64,
    build_dir: &str,
) -> Result<Prepared, PrepareError> {
    let mut env = BTreeMap::new();
    let mut files = Vec::new();
    env.insert("PATH".into(), "/path-not-set".into());
    env.insert("HOME".into(), "/homeless-shelter".into());
    env.insert("NIX_STORE".into(), nix_formats::STORE_DIR.into());
    env.insert("NIX_BUILD_CORES".into(), cores.to_string());
    let structured = drv.env.get("__json");
    if structured.is_none() {
        derivation_env(drv, rewrites, build_dir, &mut env, &mut files);
    }
    for k in ["NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"] {
        env.insert(k.into(), build_dir.into());
    }
    if fixed_output {
        env.insert("NIX_OUTPUT_CHECKED".into(), "1".into());
    }
    env.insert("NIX_LOG_FD".into(), "2".into());
    env.insert("TERM".into(), "xterm-256color".into());

    if let Some(json) = structured {
        files.extend(structured_attrs_files(json, drv, rewrites, closure)?);
        env.insert("NIX_ATTRS_SH_FILE".into(), format!("{build_dir}/.attrs.sh"));
        env.insert("NIX_ATTRS_JSON_FILE".into(), format!("{build_dir}/.attrs.json"));
    } else if let Some(spec) = drv.env.get("exportReferencesGraph") {
        // Pairs of words: file name, store path.
        let words: Vec<&str> = spec.split_whitespace().collect();
        for pair in words.chunks(2) {
            if let [fname, root] = pair {
                let paths = closure_of(&[root.to_string()], closure)?;
                files
                    .push((fname.to_string(), validity_registration(&paths, closure).into_bytes()));
            }
        }
    }

    let env =
        env.into_iter().map(|(k, v)| (rewrite(&k, rewrites), rewrite(&v, rewrites))).collect();
    let argv0 = Path::new(&drv.builder)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| drv.builder.clone());
    Ok(Prepared {
        program: drv.builder.clone(),
        argv0,
        args: drv.args.iter().map(|a| rewrite(a, rewrites)).collect(),
        env,
        files,
    })
}

/// Without structured attributes: the derivation's environment, each variable named in
/// `passAsFile` written to a build-directory file instead (`<name>Path` names it).
fn derivation_env(
    drv: &BasicDerivation,
    rewrites: &[(String, String)],
    build_dir: &str,
    env: &mut BTreeMap<String, String>,
    files: &mut Vec<(String, Vec<u8>)>,
) {
    let pass_as_file: BTreeSet<&str> =
        drv.env.get("passAsFile").map(|s| s.split_whitespace().collect()).unwrap_or_default();
    for (k, v) in &drv.env {
        if pass_as_file.contains(k.as_str()) {
            let fname =
                format!(".attr-{}", nix_formats::base32::encode(&Sha256::digest(k.as_bytes())));
            files.push((fname.clone(), rewrite(v, rewrites).into_bytes()));
            env.insert(format!("{k}Path"), format!("{build_dir}/{fname}"));
        } else {
            env.insert(k.clone(), v.clone());
        }
    }
}

/// With structured attributes (`json`, the `__json` variable): `.attrs.sh` and `.attrs.json`,
/// with the outputs' placeholders and each `exportReferencesGraph` entry's closure filled in.
fn structured_attrs_files(
    json: &str,
    drv: &BasicDerivation,
    rewrites: &[(String, String)],
    closure: &BTreeMap<StorePath, PathInfo>,
) -> Result<[(String, Vec<u8>); 2], PrepareError> {
    let mut obj: serde_json::Map<String, serde_json::Value> = match serde_json::from_str(json) {
        Ok(serde_json::Value::Object(o)) => o,
        _ => return Err(PrepareError::StructuredAttrs),
    };
    let outputs: serde_json::Map<String, serde_json::Value> = drv
        .outputs
        .keys()
        .map(|o| (o.clone(), serde_json::Value::String(rewrite(&hash_placeholder(o), rewrites))))
        .collect();
    obj.insert("outputs".into(), serde_json::Value::Object(outputs));
    if let Some(serde_json::Value::Object(graphs)) = obj.get("exportReferencesGraph").cloned() {
        for (key, roots) in graphs {
            let roots: Vec<String> = roots
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            let paths = closure_of(&roots, closure)?;
            let infos: Vec<serde_json::Value> = paths
                .iter()
                .map(|p| {
                    let i = &closure[p];
                    serde_json::json!({
                        "path": p,
                        "narHash": i.nar_hash.to_string(),
                        "narSize": i.nar_size,
                        "references": i.references,
                    })
                })
                .collect();
            obj.insert(key, serde_json::Value::Array(infos));
        }
    }
    let sh = structured_attrs_shell(&obj);
    let dumped = serde_json::to_string(&obj).map_err(|_| PrepareError::StructuredAttrs)?;
    Ok([
        (".attrs.sh".into(), rewrite(&sh, rewrites).into_bytes()),
        (".attrs.json".into(), rewrite(&dumped, rewrites).into_bytes()),
    ])
}

/// Limits enforced while the builder runs (0 = none).
#[derive(Debug, Clone, Copy, Default)]
pub struct RunLimits {
    /// Wall-clock seconds.
    pub timeout_s: u64,
    /// Seconds without log output.
    pub max_silent_s: u64,
    /// Log bytes.
    pub max_log_bytes: u64,
}

/// Write the build-directory files, owned by the builder.
pub fn write_files(
    build_dir: &Path,
    files: &[(String, Vec<u8>)],
    who: &Confinement,
) -> Result<(), BuildFailure> {
    for (name, data) in files {
        let p = build_dir.join(name);
        std::fs::write(&p, data).map_err(|e| BuildFailure::Files(name.clone(), e))?;
        let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644));
        if nix::unistd::geteuid().is_root() {
            nix::unistd::chown(&p, Some(who.uid.into()), Some(who.gid.into()))
                .map_err(|e| BuildFailure::Files(name.clone(), e.into()))?;
        }
    }
    Ok(())
}

/// Run the prepared builder in `build_dir`; `log` receives its output as it comes.
pub fn run(
    p: &Prepared,
    drv_path: &str,
    build_dir: &Path,
    limits: RunLimits,
    confine: &Confinement,
    log: &mut dyn FnMut(&[u8]),
) -> Result<(), BuildFailure> {
    let (mut child, mut pipe) = spawn(p, build_dir, confine)?;
    let pid = child.id();
    let drv = drv_path.to_owned();
    let st = match watch(&mut child, &mut pipe, &drv, limits, confine, log) {
        Ok(st) => st,
        Err(e) => {
            confine.kill_all(pid);
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    // Nothing of the builder's tree may outlive it (it could change outputs after hashing).
    confine.kill_all(pid);
    drain_nonblocking(&mut pipe, &mut |d| log(d));
    if let Some(hit) = confine.limit_hit(!st.success()) {
        return Err(BuildFailure::Limit { drv, hit });
    }
    if st.success() {
        return Ok(());
    }
    use std::os::unix::process::ExitStatusExt;
    let how = match (st.code(), st.signal()) {
        (Some(c), _) => format!("failed with exit code {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => "failed".to_owned(),
    };
    Err(BuildFailure::Failed { drv, how })
}

/// Start the confined builder in `build_dir`, its stdout and stderr on one pipe: the child and
/// the pipe's read end.
fn spawn(
    p: &Prepared,
    build_dir: &Path,
    confine: &Confinement,
) -> Result<(std::process::Child, std::fs::File), BuildFailure> {
    use std::os::unix::process::CommandExt;
    let (rd, wr): (OwnedFd, OwnedFd) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| BuildFailure::Spawn(p.program.clone(), e.into()))?;
    let wr2 = wr.try_clone().map_err(|e| BuildFailure::Spawn(p.program.clone(), e))?;
    let mut cmd = Command::new(&p.program);
    cmd.arg0(&p.argv0)
        .args(&p.args)
        .env_clear()
        .envs(&p.env)
        .current_dir(build_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(wr))
        .stderr(Stdio::from(wr2));
    confine.apply(&mut cmd);
    let child = cmd.spawn().map_err(|e| BuildFailure::Spawn(p.program.clone(), e))?;
    drop(cmd); // closes our copies of the write end
    Ok((child, std::fs::File::from(rd)))
}

/// Pass the builder's output to `log` until the builder exits: its exit status. Any limit
/// crossed (time, silence, log size, memory or processes) or a failed read is an error, and
/// the caller kills the builder's tree.
fn watch(
    child: &mut std::process::Child,
    pipe: &mut std::fs::File,
    drv: &str,
    limits: RunLimits,
    confine: &Confinement,
    log: &mut dyn FnMut(&[u8]),
) -> Result<std::process::ExitStatus, BuildFailure> {
    let started = Instant::now();
    let mut last_output = started;
    let mut logged = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    let mut eof = false;
    loop {
        let now = Instant::now();
        if limits.timeout_s > 0
            && now.duration_since(started) >= Duration::from_secs(limits.timeout_s)
        {
            return Err(BuildFailure::Timeout { drv: drv.to_owned(), secs: limits.timeout_s });
        }
        if limits.max_silent_s > 0
            && now.duration_since(last_output) >= Duration::from_secs(limits.max_silent_s)
        {
            return Err(BuildFailure::MaxSilent { drv: drv.to_owned(), secs: limits.max_silent_s });
        }
        let readable = !eof && {
            use nix::poll::{poll, PollFd, PollFlags};
            let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
            matches!(poll(&mut fds, 100u16), Ok(n) if n > 0)
        };
        if readable {
            match pipe.read(&mut buf) {
                Ok(0) => eof = true,
                Ok(n) => {
                    last_output = Instant::now();
                    logged += n as u64;
                    if limits.max_log_bytes > 0 && logged > limits.max_log_bytes {
                        return Err(BuildFailure::LogLimit {
                            drv: drv.to_owned(),
                            bytes: limits.max_log_bytes,
                        });
                    }
                    log(&buf[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(BuildFailure::Log(e)),
            }
        }
        if eof {
            std::thread::sleep(Duration::from_millis(5));
        }
        // A memory or process limit hit fails the build at once (a fork bomb never exits).
        if let Some(hit) = confine.limit_hit(false) {
            return Err(BuildFailure::Limit { drv: drv.to_owned(), hit });
        }
        // The builder may exit while something it started still holds the log pipe, or close
        // the pipe and keep running: its own exit decides.
        match child.try_wait() {
            Ok(Some(st)) => return Ok(st),
            Ok(None) => {}
            Err(e) => return Err(BuildFailure::Log(e)),
        }
    }
}

fn drain_nonblocking(pipe: &mut std::fs::File, log: &mut dyn FnMut(&[u8])) {
    use nix::poll::{poll, PollFd, PollFlags};
    let mut buf = [0u8; 8192];
    loop {
        let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
        if !matches!(poll(&mut fds, 0u16), Ok(n) if n > 0) {
            return;
        }
        match pipe.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => log(&buf[..n]),
        }
    }
}

#[cfg(test)]
mod tests;
