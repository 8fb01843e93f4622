//! Shared support for the tests that compare `nix-formats` with the real Nix (2.8.0).
//!
//! Once per test binary, [`corpus()`] writes `corpus.nix` and a busybox store directory into a
//! temporary directory, instantiates every attribute with `nix-instantiate`, and builds the roots
//! with `nix-build` under a throw-away signing key and a random `tag`, so that Nix really builds
//! every run. The results (drv paths per attribute, the build log with Nix's "resolved
//! derivation" lines, output paths, key files) are in [`Corpus`]. [`nix()`] runs any Nix command
//! with the same configuration ([`nix`], from the workspace's `test-support` crate).
//!
//! If Nix or busybox is missing, every test using this panics with a message saying so: these
//! tests must not pass silently. Install them with `scripts/setup-host.sh`.
//!
//! The temporary directory is kept after the run (for inspecting `build.log`); directories of
//! runs older than six hours are removed when a new corpus is made.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

use nix_formats::StorePath;

pub use test_support::nix;

/// The name of the throw-away signing key.
pub const KEY_NAME: &str = "nix-formats-test-1";

/// Attributes of `corpus.nix` that get built (their closures cover every built attribute).
pub const BUILD_ROOTS: &[&str] = &["caChain", "iaDeferred", "fodRec", "fodRecSha1"];
/// Attributes that are only instantiated.
pub const EVAL_ONLY: &[&str] = &["noArgs", "impure"];

/// What `corpus()` produced.
#[derive(Debug)]
pub struct Corpus {
    /// Temporary directory holding `corpus.nix`, `bb/`, keys and logs (kept for the run).
    pub dir: PathBuf,
    /// The random tag of this run.
    pub tag: String,
    /// Arguments given to every `nix-instantiate`/`nix-build` of `corpus.nix`.
    pub args: Vec<String>,
    /// `nix --version` output.
    pub nix_version: String,
    /// Attribute name → drv path.
    pub drvs: BTreeMap<String, StorePath>,
    /// Attribute name → output name → output path, for built attributes (from
    /// `nix-store -q --outputs` after the build, so floating CA outputs are the real ones).
    pub outputs: BTreeMap<String, BTreeMap<String, StorePath>>,
    /// The `nix-build -v` log (stderr).
    pub build_log: String,
    /// Nix's "resolved derivation: 'A' -> 'B'" lines: unresolved → resolved drv path.
    pub resolved: BTreeMap<StorePath, StorePath>,
    /// Secret key file (`name:base64`), made by `nix-store --generate-binary-cache-key`.
    pub secret_key: PathBuf,
    /// Public key file.
    pub public_key: PathBuf,
}

impl Corpus {
    /// Drv path of an attribute (panics with the attribute name if unknown).
    pub fn drv(&self, attr: &str) -> &StorePath {
        self.drvs.get(attr).unwrap_or_else(|| panic!("corpus has no attribute {attr:?}"))
    }

    /// Whether the attribute was built.
    pub fn is_built(&self, attr: &str) -> bool {
        self.outputs.contains_key(attr)
    }
}

/// The corpus, made on first use in this test binary.
pub fn corpus() -> &'static Corpus {
    static C: OnceLock<Corpus> = OnceLock::new();
    C.get_or_init(make_corpus)
}

/// Runs a Nix program with the test configuration, panics (with its stderr) unless it
/// succeeds, returns its output.
pub fn run_nix(program: &str, args: &[&str]) -> Output {
    nix::run(Command::new(program).args(args))
}

/// Runs a Nix program and returns its stdout as text (see [`run_nix`]).
pub fn nix(program: &str, args: &[&str]) -> String {
    nix::stdout(Command::new(program).args(args))
}

/// A directory for one test binary's Nix files, kept after the run (see the module docs), with
/// the busybox directory `bb/` in it.
pub fn kept_dir(prefix: &str) -> PathBuf {
    remove_stale(prefix);
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().expect("temp dir").keep();
    nix::busybox_dir(&dir.join("bb"));
    dir
}

fn make_corpus() -> Corpus {
    let nix_version = nix("nix", &["--version"]).trim().to_owned();
    let dir = kept_dir("nix-formats-corpus-");
    std::fs::write(dir.join("corpus.nix"), include_str!("corpus.nix")).unwrap();

    // Fixed outputs hold "hello <tag>" (flat) or a directory with that file `hello` (recursive).
    let tag = format!("t{}", nix::nonce());
    let content = format!("hello {tag}");
    let flat_hash = nix_formats::hash::HashAlgo::Sha256.digest(&content).to_base16();
    let tree = dir.join("rec-tree");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join("hello"), &content).unwrap();
    let tree_s = tree.to_str().unwrap();
    let rec_hash = nix("nix", &["hash", "path", tree_s]).trim().to_owned();
    let rec_sha1 = nix("nix", &["hash", "path", "--type", "sha1", tree_s]).trim().to_owned();

    let sk = dir.join("secret.key");
    let pk = dir.join("public.key");
    nix(
        "nix-store",
        &["--generate-binary-cache-key", KEY_NAME, sk.to_str().unwrap(), pk.to_str().unwrap()],
    );

    let args: Vec<String> = [
        "--argstr", "tag", &tag, "--argstr", "flatHash", &flat_hash, "--argstr", "recHash",
        &rec_hash, "--argstr", "recSha1", &rec_sha1,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let file = dir.join("corpus.nix");
    let file_s = file.to_str().unwrap();
    let mut base: Vec<&str> = vec![file_s];
    base.extend(args.iter().map(String::as_str));

    // Attribute → drv path (evaluation only), then write the .drv files.
    let expr = format!(
        "builtins.mapAttrs (n: v: v.drvPath) (import {file_s} {{ tag = \"{tag}\"; \
         flatHash = \"{flat_hash}\"; recHash = \"{rec_hash}\"; recSha1 = \"{rec_sha1}\"; }})"
    );
    let eval = ["--eval", "--strict", "--json", "--expr", &expr];
    let json = nix("nix-instantiate", &eval);
    let map: BTreeMap<String, String> = serde_json::from_str(&json).expect("drvPath map");
    let drvs: BTreeMap<String, StorePath> = map
        .into_iter()
        .map(|(k, v)| (k, v.parse().expect("Nix printed an invalid drv path")))
        .collect();
    nix("nix-instantiate", &base);

    let mut build = base.clone();
    for a in BUILD_ROOTS {
        build.extend(["-A", a]);
    }
    let sk_s = sk.to_str().unwrap();
    build.extend(["--no-out-link", "-v", "--option", "secret-key-files", sk_s]);
    let out = run_nix("nix-build", &build);
    let build_log = String::from_utf8_lossy(&out.stderr).into_owned();
    std::fs::write(dir.join("build.log"), &build_log).unwrap();
    let resolved = parse_resolved(&build_log);

    let built: BTreeMap<&String, &StorePath> =
        drvs.iter().filter(|(a, _)| !EVAL_ONLY.contains(&a.as_str())).collect();
    let by_drv = output_maps(built.values().copied());
    let outputs = built.into_iter().map(|(a, d)| (a.clone(), by_drv[d].clone())).collect();
    Corpus {
        dir,
        tag,
        args,
        nix_version,
        drvs,
        outputs,
        build_log,
        resolved,
        secret_key: sk,
        public_key: pk,
    }
}

/// Kept directories outlive their test binary (statics are never dropped); remove those named
/// `<prefix>…` left by runs more than six hours old so that repeated runs do not fill the temp
/// directory.
fn remove_stale(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let stale = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_secs() > 6 * 3600);
        if stale && e.file_name().to_string_lossy().starts_with(prefix) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Output name → path for built derivations, as Nix records them (floating CA included), from
/// `nix build --no-link --json` (a no-op for built derivations).
pub fn output_maps<'a>(
    drvs: impl IntoIterator<Item = &'a StorePath>,
) -> BTreeMap<StorePath, BTreeMap<String, StorePath>> {
    let paths: Vec<String> = drvs.into_iter().map(|d| d.to_string()).collect();
    let mut args = vec!["build", "--no-link", "--json"];
    args.extend(paths.iter().map(String::as_str));
    let v: serde_json::Value = serde_json::from_str(&nix("nix", &args)).unwrap();
    let mut m = BTreeMap::new();
    for entry in v.as_array().expect("nix build --json prints a list") {
        let drv: StorePath = entry["drvPath"].as_str().unwrap().parse().unwrap();
        let outs = entry["outputs"].as_object().unwrap();
        let outs =
            outs.iter().map(|(k, p)| (k.clone(), p.as_str().unwrap().parse().unwrap())).collect();
        m.insert(drv, outs);
    }
    m
}

/// Extracts `resolved derivation: 'A' -> 'B'` pairs from a Nix log.
pub fn parse_resolved(log: &str) -> BTreeMap<StorePath, StorePath> {
    let mut m = BTreeMap::new();
    for line in log.lines() {
        if let Some(rest) = line.strip_prefix("resolved derivation: '") {
            let mut parts = rest.split('\'');
            let (a, b) = (parts.next(), parts.nth(1));
            if let (Some(a), Some(b)) = (a, b) {
                m.insert(a.parse().unwrap(), b.parse().unwrap());
            }
        }
    }
    m
}

/// The strings of a JSON array (as `nix path-info --json` prints references and signatures),
/// each parsed; panics on anything else.
pub fn parsed<T, C>(v: &serde_json::Value) -> C
where
    T: std::str::FromStr,
    T::Err: std::fmt::Debug,
    C: FromIterator<T>,
{
    let items = v.as_array().unwrap_or_else(|| panic!("not a JSON array: {v}"));
    items.iter().map(|s| s.as_str().expect("a JSON string").parse().unwrap()).collect()
}

/// The bytes of a store file.
pub fn read_store_file(p: &StorePath) -> Vec<u8> {
    std::fs::read(p.to_string()).unwrap_or_else(|e| panic!("reading {p}: {e}"))
}
