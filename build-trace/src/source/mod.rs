//! Where traces come from, by one name: a trace store directory (`DIR` or `file://DIR`) or a
//! remote one (`http(s)://HOST[:PORT][/prefix]`: `vouch serve`, or any server of a trace store
//! directory). [`Traces::open`] gives a [`TraceSource`] for either, so the verifier does not care
//! which; [`drv_set`] reads a target's unresolved derivation graph from a local store directory
//! and fetches what it lacks from the remote stores, checking each `.drv` against its path.
//!
//! ```no_run
//! use build_trace::source::{FetchOptions, Traces};
//! use build_trace::store::TraceSource;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let traces = Traces::open("http://127.0.0.1:8080", &FetchOptions::default())?;
//! let drv = nix_formats::StorePath::parse("/nix/store/00000000000000000000000000000000-x.drv")?;
//! let entries = traces.entries(&drv)?; // raw entries, for the verifier to judge
//! # Ok(()) }
//! ```
//!
//! Remote reads run on a bounded pool of threads ([`FetchOptions::jobs`]) and files whose URL
//! always names the same bytes are kept in a local cache by content hash
//! ([`FetchOptions::cache_dir`]). A remote store is trusted for nothing: what it serves is
//! judged like a directory's entries, and a `.drv` must hash to its path. A bad or missing
//! answer is an error naming the URL ([`FetchError`]); 404 for an optional file is "absent".
//! An `https://` store's certificate must chain to Mozilla's roots, or to the CA files given
//! instead ([`TlsRoots`]: `--tls-ca`, else `SSL_CERT_FILE`); a TLS failure is named as one.
//!
//! What is not here: the verification ([`crate::verify`]), the directory's own reader and
//! writer ([`crate::store`]).

mod cache;
mod drvs;
mod fetch;
mod http;
mod tls;

use std::path::{Path, PathBuf};

use nix_formats::StorePath;

pub use cache::BlobCache;
pub use drvs::drv_set;
pub use fetch::{FetchError, FetchOptions, Fetcher, Kind};
pub use http::{HttpTiles, HttpTraces};
pub use tls::{CaFileError, TlsRoots, SSL_CERT_FILE};

use crate::store::{StoreError, TraceEntry, TraceSource, TraceStore};

/// The pure readers of a remote store's answers, for the `trace_source` fuzz target
/// ([`crate::fuzzing::source`]).
pub(crate) mod parse {
    pub(crate) use super::cache::digest_of_link;
    pub(crate) use super::drvs::{checked, nar_in_narinfo, single_file, MAX_DRV};
    pub(crate) use super::http::{deriver_hint, entries_in_index, entry_dir};
}
use crate::tlog::{DirTiles, TileSource};

/// Why traces could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Neither a directory nor a supported URL.
    #[error("`{0}` names no trace store: give a directory, file://DIR or http(s)://HOST[:PORT][/prefix]")]
    Location(String),
    /// A trace store directory could not be opened.
    #[error("trace store {0}")]
    Open(String, #[source] StoreError),
    /// A remote store gave no usable answer.
    #[error("remote trace store")]
    Fetch(#[source] FetchError),
    /// A CA file for `https://` stores cannot be used.
    #[error("trusting a CA for {0}")]
    TlsCa(String, #[source] CaFileError),
    /// A remote store served a `.drv` other than the one its path names.
    #[error(
        "{url} served a derivation that is not {drv}: its contents and references hash to {got}"
    )]
    Tampered {
        /// What was fetched.
        url: String,
        /// The path asked for.
        drv: String,
        /// The path those bytes have.
        got: String,
    },
    /// A derivation is nowhere.
    #[error("derivation {drv}{} is not in {searched}", needed_by.as_ref().map(|n| format!(" (needed by {n})")).unwrap_or_default())]
    MissingDrv {
        /// Which.
        drv: String,
        /// Who needs it.
        needed_by: Option<String>,
        /// Where it was looked for.
        searched: String,
    },
    /// A local `.drv` could not be read, or does not parse.
    #[error("local derivation")]
    Local(#[source] crate::verify::VerifyError),
}

/// Where a trace store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A directory (`DIR` or `file://DIR`).
    Dir(PathBuf),
    /// `http://…` or `https://…`, without a trailing `/`.
    Http(String),
}

impl Location {
    /// Parse `DIR`, `file://DIR` or `http(s)://HOST[:PORT][/prefix]`.
    pub fn parse(s: &str) -> Result<Location, SourceError> {
        let bad = || SourceError::Location(s.to_owned());
        if let Some(dir) = s.strip_prefix("file://") {
            return if dir.is_empty() { Err(bad()) } else { Ok(Location::Dir(dir.into())) };
        }
        for scheme in ["http://", "https://"] {
            if let Some(rest) = s.strip_prefix(scheme) {
                let host = rest.split('/').next().unwrap_or_default();
                if host.is_empty() || s.contains(['?', '#']) || s.chars().any(char::is_whitespace) {
                    return Err(bad());
                }
                return Ok(Location::Http(s.trim_end_matches('/').to_owned()));
            }
        }
        if s.is_empty() || s.contains("://") {
            return Err(bad());
        }
        Ok(Location::Dir(s.into()))
    }
}

/// A trace store, local or remote.
#[derive(Debug)]
pub enum Traces {
    /// A directory.
    Dir(Box<TraceStore>),
    /// Over HTTP(S).
    Http(HttpTraces),
}

impl Traces {
    /// Open the store at `uri` (see [`Location::parse`]). A remote store must answer
    /// `nix-cache-info`, so a wrong address fails here, naming the URL.
    pub fn open(uri: &str, opts: &FetchOptions) -> Result<Traces, SourceError> {
        Traces::open_at(&Location::parse(uri)?, opts)
    }

    /// Open the store at `loc`.
    pub fn open_at(loc: &Location, opts: &FetchOptions) -> Result<Traces, SourceError> {
        match loc {
            Location::Dir(d) => TraceStore::open(d)
                .map(|s| Traces::Dir(Box::new(s)))
                .map_err(|e| SourceError::Open(d.display().to_string(), e)),
            Location::Http(base) => {
                let f =
                    Fetcher::new(base, opts).map_err(|e| SourceError::TlsCa(base.clone(), e))?;
                f.need("nix-cache-info", Kind::Fresh, "a binary cache's nix-cache-info")
                    .map_err(SourceError::Fetch)?;
                Ok(Traces::Http(HttpTraces::new(f)))
            }
        }
    }

    /// Where it is: the directory, or the base URL.
    pub fn location(&self) -> String {
        match self {
            Traces::Dir(s) => s.root().display().to_string(),
            Traces::Http(h) => h.fetcher().base().to_owned(),
        }
    }

    /// The directory, for a local store.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            Traces::Dir(s) => Some(s.root()),
            Traces::Http(_) => None,
        }
    }

    /// Another file of `entry`'s directory (e.g. `times.json`), if there is one: optional
    /// extras, read as they are (a remote error is logged and reads as absent).
    pub fn entry_file(&self, entry: &TraceEntry, name: &str) -> Option<Vec<u8>> {
        match self {
            Traces::Dir(_) => std::fs::read(Path::new(&entry.location).join(name)).ok(),
            Traces::Http(h) => {
                let f = h.fetcher();
                let rel = entry.location.strip_prefix(f.base())?.trim_start_matches('/');
                f.get(&format!("{rel}/{name}"), Kind::Immutable)
                    .inspect_err(|e| tracing::warn!("{}", crate::error_chain(e)))
                    .ok()
                    .flatten()
            }
        }
    }

    /// Its transparency log (`log/`).
    pub fn tiles(&self) -> Box<dyn TileSource> {
        match self {
            Traces::Dir(s) => Box::new(DirTiles::new(&s.root().join(crate::tlog::LOG_DIR))),
            Traces::Http(h) => Box::new(h.tiles()),
        }
    }

    fn inner(&self) -> &dyn TraceSource {
        match self {
            Traces::Dir(s) => s.as_ref(),
            Traces::Http(h) => h,
        }
    }
}

impl TraceSource for Traces {
    fn entries(&self, drv_path: &StorePath) -> Result<Vec<TraceEntry>, StoreError> {
        self.inner().entries(drv_path)
    }

    fn entries_for_output(&self, out_path: &StorePath) -> Result<Vec<TraceEntry>, StoreError> {
        self.inner().entries_for_output(out_path)
    }

    fn describe(&self) -> String {
        self.inner().describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        let dir = |s: &str| Location::Dir(s.into());
        assert_eq!(Location::parse("/var/cache").unwrap(), dir("/var/cache"));
        assert_eq!(Location::parse("rel/dir").unwrap(), dir("rel/dir"));
        assert_eq!(Location::parse("file:///var/cache").unwrap(), dir("/var/cache"));
        let http = |s: &str| Location::Http(s.into());
        assert_eq!(Location::parse("http://h:8080/").unwrap(), http("http://h:8080"));
        assert_eq!(Location::parse("https://h/p/q/").unwrap(), http("https://h/p/q"));
        for bad in
            ["", "file://", "s3://bucket", "http://", "http:///x", "http://h/?a=1", "ssh://h"]
        {
            assert!(
                matches!(Location::parse(bad), Err(SourceError::Location(_))),
                "{bad:?} accepted"
            );
        }
    }
}
