//! A trace store read over HTTP(S): `vouch serve`, or any server of a trace store directory
//! (`docs/trace-store.md`), the verifier's [`TraceSource`] like the directory itself.
//!
//! # Algorithm ([`HttpTraces::entries`])
//!
//! HTTP has no directory listing, so a step's entries are found through laut's signature index:
//! 1. `GET traces/<hash part of the drv path>` (always asked of the server: it grows): every JWS
//!    of every entry of the step; 404 is "no trace".
//! 2. Each JWS's payload names the SHA-256 of its statement (`vouch.statement`, read without
//!    verifying anything); the entry id is its first 32 hex digits. JWS naming the same statement
//!    belong to one entry; a JWS naming none (not vouch's) is skipped.
//! 3. For every entry at once (the bounded pool): `GET vouch/v1/steps/<drv>/<entry>/statement.json`
//!    (required) and `…/evidence.json` (404: none), `<drv>` the drv path's base name with a `?`
//!    (legal in store path names) sent as `%3F`. Both are immutable, so the local cache may
//!    answer.
//!
//! Nothing here is trusted: the verifier judges each entry exactly as one read from a directory
//! (statement, evidence, signatures, links). A hostile server can withhold entries (the verdict is
//! then "no trace", or another entry's), never forge one the policy accepts. An entry written
//! without a JWS in laut's index is not found over HTTP (`vouch trace reindex` rebuilds it).
//!
//! [`HttpTraces::entries_for_output`] reads the output's narinfo for its `Deriver` (unsigned and
//! chosen by the server: a hint) and keeps the entries of that step whose statements produced the
//! output. [`HttpTiles`] reads the transparency log under `log/`.

use std::collections::BTreeMap;

use nix_formats::narinfo::NarInfo;
use nix_formats::StorePath;

use super::fetch::{Fetcher, Kind};
use crate::store::{StoreError, TraceEntry, TraceSource};
use crate::tlog::{TileSource, TlogError};

/// laut's signature index under the store root (`store/laut_index.rs` writes it).
const LAUT_INDEX: &str = "traces";

/// A remote trace store.
#[derive(Debug, Clone)]
pub struct HttpTraces {
    fetch: Fetcher,
}

impl HttpTraces {
    /// The store that `fetch` reads.
    pub fn new(fetch: Fetcher) -> HttpTraces {
        HttpTraces { fetch }
    }

    /// Its client (shared pool and cache).
    pub fn fetcher(&self) -> &Fetcher {
        &self.fetch
    }

    /// Its transparency log.
    pub fn tiles(&self) -> HttpTiles {
        HttpTiles { fetch: self.fetch.clone() }
    }
}

/// The entries laut's index `body` (from `url`) lists: entry id (32 lowercase hex digits, the
/// first half of the statement digest its JWS name) → its JWS, in index order, without repeats.
pub(crate) fn entries_in_index(
    url: &str,
    body: &[u8],
) -> Result<BTreeMap<String, Vec<String>>, StoreError> {
    #[derive(serde::Deserialize)]
    struct Index {
        signatures: Vec<String>,
    }
    let index: Index = serde_json::from_slice(body).map_err(|e| {
        garbled(url, format!("not laut's signature index {{\"signatures\": [JWS, …]}}: {e}"))
    })?;
    let mut by_entry: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for jws in index.signatures {
        let Some(digest) = crate::jws::statement_digest_of(&jws) else { continue };
        let list = by_entry.entry(hex::encode(&digest[..16])).or_default();
        if !list.contains(&jws) {
            list.push(jws);
        }
    }
    Ok(by_entry)
}

/// The directory of entry `entry` of step `drv_path`, relative to the store's base URL:
/// `vouch/v1/steps/<base name>/<entry>`, the base name as one URL path segment: a store path
/// name may hold `?` (Nix allows it), which would start a query, so it is sent as `%3F`.
pub(crate) fn entry_dir(drv_path: &StorePath, entry: &str) -> String {
    let base = drv_path.base_name().replace('?', "%3F");
    format!("{}/steps/{base}/{entry}", crate::store::VOUCH_DIR)
}

/// The deriver an output's narinfo `body` (from `url`) names, if it describes `out_path` (a
/// narinfo describing another path names no deriver of it). The deriver is unsigned and chosen
/// by the server: a hint.
pub(crate) fn deriver_hint(
    url: &str,
    body: &[u8],
    out_path: &StorePath,
) -> Result<Option<StorePath>, StoreError> {
    let text = std::str::from_utf8(body).map_err(|e| garbled(url, e.to_string()))?;
    let info = NarInfo::parse(text).map_err(|e| garbled(url, e.to_string()))?;
    Ok(info.deriver.filter(|_| info.store_path == *out_path))
}

fn garbled(url: &str, problem: String) -> StoreError {
    StoreError::Remote(super::fetch::FetchError::Garbled { url: url.to_owned(), problem })
}

impl TraceSource for HttpTraces {
    fn entries(&self, drv_path: &StorePath) -> Result<Vec<TraceEntry>, StoreError> {
        let rel = format!("{}/{}", LAUT_INDEX, drv_path.hash_part());
        let Some(body) = self.fetch.get(&rel, Kind::Fresh).map_err(StoreError::Remote)? else {
            return Ok(Vec::new());
        };
        let entries = entries_in_index(&self.fetch.url(&rel), &body)?;
        let dirs: Vec<String> = entries.keys().map(|e| entry_dir(drv_path, e)).collect();
        let files: Vec<(String, Kind)> = dirs
            .iter()
            .flat_map(|d| {
                [
                    (format!("{d}/statement.json"), Kind::Immutable),
                    (format!("{d}/evidence.json"), Kind::Immutable),
                ]
            })
            .collect();
        let mut answers = self.fetch.get_all(&files).into_iter();
        let mut out = Vec::with_capacity(dirs.len());
        for ((dir, jws), (st_rel, _)) in
            dirs.iter().zip(entries.into_values()).zip(files.iter().step_by(2))
        {
            let (statement, evidence) = (answers.next(), answers.next());
            let statement =
                statement.expect("two answers per entry").map_err(StoreError::Remote)?;
            let statement = statement.ok_or_else(|| {
                StoreError::Remote(super::fetch::FetchError::Missing {
                    url: self.fetch.url(st_rel),
                    expected: format!("the statement a JWS in {} names", self.fetch.url(&rel)),
                })
            })?;
            let evidence = evidence.expect("two answers per entry").map_err(StoreError::Remote)?;
            out.push(TraceEntry {
                location: self.fetch.url(dir),
                drv_path: drv_path.clone(),
                statement,
                evidence,
                jws,
            });
        }
        Ok(out)
    }

    fn entries_for_output(&self, out_path: &StorePath) -> Result<Vec<TraceEntry>, StoreError> {
        let rel = format!("{}.narinfo", out_path.hash_part());
        let Some(body) = self.fetch.get(&rel, Kind::Immutable).map_err(StoreError::Remote)? else {
            return Ok(Vec::new());
        };
        let Some(deriver) = deriver_hint(&self.fetch.url(&rel), &body, out_path)? else {
            return Ok(Vec::new());
        };
        // The deriver is a hint: keep the entries whose statements really produced the path.
        Ok(self
            .entries(&deriver)?
            .into_iter()
            .filter(|e| {
                e.parse_statement()
                    .map(|s| s.outputs.values().any(|o| o.path == *out_path))
                    .unwrap_or(true)
            })
            .collect())
    }

    fn describe(&self) -> String {
        format!("trace store {}", self.fetch.base())
    }
}

/// The transparency log of a remote trace store (`<base>/log/…`), never cached: its checkpoint
/// changes, and every resource is checked against a signed root anyway.
#[derive(Debug, Clone)]
pub struct HttpTiles {
    fetch: Fetcher,
}

impl TileSource for HttpTiles {
    fn get(&self, path: &str) -> Result<Option<Vec<u8>>, TlogError> {
        let rel = format!("{}/{path}", crate::tlog::LOG_DIR);
        self.fetch.get(&rel, Kind::Fresh).map_err(|e| TlogError::Io {
            op: "fetch",
            path: self.fetch.url(&rel).into(),
            source: std::io::Error::other(e),
        })
    }

    fn describe(&self) -> String {
        self.fetch.url(crate::tlog::LOG_DIR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `trace_source` fuzz target (`fuzz/seeds/trace_source/regress-deriver-question-mark`):
    /// a `?` in a step's name (legal in Nix) started a query, so the server was asked for
    /// another path than the entry's.
    #[test]
    fn a_question_mark_in_a_step_name_is_sent_encoded() {
        let p = StorePath::parse("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-a?b=c.drv").unwrap();
        assert_eq!(
            entry_dir(&p, "00ff"),
            "vouch/v1/steps/0123456789abcdfghijklmnpqrsvwxyz-a%3Fb=c.drv/00ff"
        );
    }
}
