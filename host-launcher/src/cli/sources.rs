//! `--traces` as `vouch verify`, `vouch trace show` and `vouch provenance` take it: a trace
//! store directory, `file://DIR`, or `http(s)://HOST[:PORT][/prefix]` (`vouch serve`, or any
//! server of a trace store directory), opened through `build_trace::source`. Remote files are
//! fetched `--fetch-jobs` at once and kept in `<state dir>/trace-cache` by content hash
//! (`--no-fetch-cache` skips it). An `https://` store's certificate must chain to Mozilla's
//! roots, or to the CAs of `--tls-ca FILE` (else of `SSL_CERT_FILE`) instead. The `.drv` files a verification needs come from the drv
//! directory, and where it lacks one, from the remote stores, each checked against its path.
//!
//! What is not here: verifying anything (the commands), the fetching itself (build-trace).

use std::path::Path;

use build_trace::source::{FetchOptions, TlsRoots, Traces};
use build_trace::verify::DrvSet;
use host_launcher::core::publish::default_trace_store;
use nix_formats::StorePath;

use super::Global;

/// How remote trace stores are read.
#[derive(Debug, Clone, clap::Args)]
pub struct FetchArgs {
    /// Files fetched at once from a remote trace store (`--traces http(s)://…`).
    #[arg(long, value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub fetch_jobs: u16,
    /// Do not keep fetched files in `<state dir>/trace-cache` (by content hash; only files
    /// whose URL always names the same bytes: statements, evidence, `.drv` files).
    #[arg(long)]
    pub no_fetch_cache: bool,
    /// Trust only the certificate authorities in FILE (PEM: one certificate or a bundle;
    /// repeatable) for `--traces https://…`, instead of Mozilla's built-in roots. Without it,
    /// `SSL_CERT_FILE` (as OpenSSL, curl and Nix read it) is used the same way when set.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Vec<std::path::PathBuf>,
}

impl FetchArgs {
    fn options(&self, global: &Global) -> FetchOptions {
        FetchOptions {
            jobs: usize::from(self.fetch_jobs),
            cache_dir: (!self.no_fetch_cache).then(|| global.state_dir().join("trace-cache")),
            tls_roots: TlsRoots::choose(self.tls_ca.clone(), "--tls-ca"),
            ..FetchOptions::default()
        }
    }
}

/// Open every store in `locations` (default: `<state dir>/cache`).
pub fn open_all(
    locations: &[String],
    fetch: &FetchArgs,
    global: &Global,
) -> Result<Vec<Traces>, build_trace::source::SourceError> {
    let opts = fetch.options(global);
    if locations.is_empty() {
        let dir = default_trace_store(&global.state_dir());
        return Ok(vec![Traces::open_at(&build_trace::source::Location::Dir(dir), &opts)?]);
    }
    locations.iter().map(|l| Traces::open(l, &opts)).collect()
}

/// Open one store (default: `<state dir>/cache`).
pub fn open_one(
    location: Option<&str>,
    fetch: &FetchArgs,
    global: &Global,
) -> Result<Traces, build_trace::source::SourceError> {
    let given: Vec<String> = location.map(str::to_owned).into_iter().collect();
    Ok(open_all(&given, fetch, global)?.remove(0))
}

/// `target`'s derivation graph: `.drv` files from `drv_dir`, the missing ones from the remote
/// stores among `stores` (checked against their paths).
pub fn drv_set(
    target: &StorePath,
    drv_dir: &Path,
    stores: &[Traces],
) -> Result<DrvSet, build_trace::source::SourceError> {
    build_trace::source::drv_set(target, Some(drv_dir), stores)
}
