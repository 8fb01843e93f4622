//! What `vouch verify` checks beyond paths (issue 12, item 5): the bytes a user actually has.
//! A path says nothing about the content of an input-addressed output, so after a closure
//! verifies, `--check-local` hashes the target's outputs in a local store directory and
//! `--check-cache URL` hashes the NARs a binary cache serves for them; each NAR hash must be one
//! the policy accepted for that path ([`VerifiedClosure::nar_hashes`]).
//!
//! Not here: the closure verification itself, or inputs of the target (their bytes were what
//! the accepted traces say when the target was built; what the user has of them is not read).

use std::io::Read;
use std::path::Path;

use build_trace::job::NarHash;
use build_trace::verify::VerifiedClosure;
use nix_formats::narinfo::NarInfo;
use nix_formats::StorePath;

/// Why bytes could not be checked (no verdict: exit 2).
#[derive(Debug, thiserror::Error)]
pub enum BytesError {
    /// A local path could not be serialised.
    #[error("cannot read {path} to hash it")]
    Local {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: nix_formats::nar::DumpError,
    },
    /// The cache could not be read.
    #[error("cannot fetch {url}: {problem}")]
    Fetch {
        /// What was fetched.
        url: String,
        /// What went wrong.
        problem: String,
    },
}

/// The mismatches between the NAR hashes of the target's outputs under `store_dir` and the
/// accepted ones (empty: all match).
pub fn check_local(v: &VerifiedClosure, store_dir: &Path) -> Result<Vec<String>, BytesError> {
    let mut bad = Vec::new();
    for (path, accepted) in &v.nar_hashes {
        let p = StorePath::parse(path)
            .map_err(|e| BytesError::Fetch { url: path.clone(), problem: e.to_string() })?;
        let file = store_dir.join(p.base_name());
        let digest = nix_formats::nar::hash_path(&file)
            .map_err(|source| BytesError::Local { path: file.display().to_string(), source })?;
        let got = NarHash(digest.sha256).to_string();
        if !accepted.contains(&got) {
            bad.push(format!(
                "the local bytes of {path} ({}) have NAR hash {got}; the accepted build's is {}",
                file.display(),
                accepted.join(" or ")
            ));
        }
    }
    Ok(bad)
}

/// The mismatches between the NARs `cache` (`http(s)://` or `file://`) serves for the target's
/// outputs and the accepted NAR hashes (empty: all match). Only uncompressed NARs are read.
pub fn check_cache(v: &VerifiedClosure, cache: &str) -> Result<Vec<String>, BytesError> {
    let cache = cache.trim_end_matches('/');
    let mut bad = Vec::new();
    for (path, accepted) in &v.nar_hashes {
        let p = StorePath::parse(path)
            .map_err(|e| BytesError::Fetch { url: path.clone(), problem: e.to_string() })?;
        let info_url = format!("{cache}/{}.narinfo", p.hash_part());
        let mut text = String::new();
        fetch(&info_url)?.read_to_string(&mut text).map_err(|e| fetch_err(&info_url, e))?;
        let info = NarInfo::parse(&text).map_err(|e| fetch_err(&info_url, e))?;
        if info.store_path != p {
            bad.push(format!("{info_url} describes {}, not {path}", info.store_path));
            continue;
        }
        match info.compression.as_deref() {
            None | Some("none") => {}
            Some(other) => {
                return Err(fetch_err(
                    &info_url,
                    format!("compression `{other}`: only uncompressed NARs are checked"),
                ))
            }
        }
        let nar_url = format!("{cache}/{}", info.url);
        let digest =
            nix_formats::nar::hash_nar(fetch(&nar_url)?).map_err(|e| fetch_err(&nar_url, e))?;
        let got = NarHash(digest.sha256).to_string();
        if !accepted.contains(&got) {
            bad.push(format!(
                "the bytes {nar_url} serves for {path} have NAR hash {got}; the accepted build's \
                 is {}",
                accepted.join(" or ")
            ));
        }
    }
    Ok(bad)
}

fn fetch_err(url: &str, e: impl ToString) -> BytesError {
    BytesError::Fetch { url: url.to_owned(), problem: e.to_string() }
}

/// A reader of `url`'s body.
fn fetch(url: &str) -> Result<Box<dyn Read>, BytesError> {
    if let Some(p) = url.strip_prefix("file://") {
        let f = std::fs::File::open(p).map_err(|e| fetch_err(url, e))?;
        return Ok(Box::new(f));
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(fetch_err(url, "not an http(s):// or file:// URL"));
    }
    let resp = ureq::get(url).call().map_err(|e| fetch_err(url, e))?;
    Ok(Box::new(resp.into_body().into_reader()))
}
