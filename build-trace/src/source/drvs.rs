//! The unresolved derivation graph of a target: from a local store directory, and where that
//! lacks a `.drv`, from remote trace stores, each fetched `.drv` checked against its path.
//!
//! # Algorithm ([`drv_set`])
//!
//! Breadth-first from the target, one round per depth:
//! 1. each derivation not yet had is read from the local directory (`<dir>/<base name>`); a
//!    missing file is not an error yet, any other read error is;
//! 2. the missing ones are fetched at once (the bounded pool) from the first remote store that
//!    has them: `GET drv/<hash>.nar` (what `vouch serve` serves), else `GET <hash>.narinfo` and
//!    the uncompressed NAR its `URL` names (any binary cache holding the `.drv`);
//! 3. the NAR must hold one regular file, the `.drv`'s bytes `B`; the path certifies them: a
//!    `.drv` is text-addressed, so `makeTextPath("<name>.drv", SHA-256(B), references)` — the
//!    references being the input derivations and sources `B` declares — must be the path asked
//!    for, else the answer is refused ([`SourceError::Tampered`]). The narinfo (unsigned, chosen
//!    by the server) only says where the NAR is, and only as a plain path under the store's base
//!    URL (letters, digits, `-._~+=` in non-empty segments other than `.` and `..`): nothing a
//!    server, a proxy or a URL parser could decode or resolve out of the store's prefix;
//! 4. every derivation's input derivations are the next round.
//!
//! A derivation neither has is [`SourceError::MissingDrv`], naming where it was looked for. The
//! verifier checks each derivation against its path again (the graph may come from elsewhere).

use std::collections::BTreeSet;
use std::path::Path;

use nix_formats::derivation::Derivation;
use nix_formats::nar::{NarEvent, NarLimits, NarReader};
use nix_formats::narinfo::NarInfo;
use nix_formats::store_path::make_text_path;
use nix_formats::{Hash, StorePath};

use super::fetch::{FetchError, Fetcher, Kind};
use super::{SourceError, Traces};
use crate::verify::{read_drv_file, DrvSet};

/// The largest `.drv` accepted from a remote store.
pub(crate) const MAX_DRV: u64 = 16 << 20;

/// `target`'s derivation graph: from `local` where it has the `.drv` files, else from the
/// remote stores among `sources` (see the module's algorithm).
pub fn drv_set(
    target: &StorePath,
    local: Option<&Path>,
    sources: &[Traces],
) -> Result<DrvSet, SourceError> {
    let remotes: Vec<&Fetcher> = sources
        .iter()
        .filter_map(|s| match s {
            Traces::Http(h) => Some(h.fetcher()),
            Traces::Dir(_) => None,
        })
        .collect();
    let mut set = DrvSet::new();
    let mut seen: BTreeSet<StorePath> = BTreeSet::from([target.clone()]);
    // Each derivation of the round, with who needs it (for messages).
    let mut round: Vec<(StorePath, Option<StorePath>)> = vec![(target.clone(), None)];
    while !round.is_empty() {
        let mut missing = Vec::new();
        let mut had: Vec<(StorePath, Derivation)> = Vec::new();
        for (p, by) in round {
            let found = local.map(|dir| read_drv_file(dir, &p)).transpose();
            match found.map_err(SourceError::Local)?.flatten() {
                Some(d) => had.push((p, d)),
                None => missing.push((p, by)),
            }
        }
        for (p, by) in fetch_all(missing, &remotes, local)? {
            had.push((p, by));
        }
        let mut next = Vec::new();
        for (p, d) in had {
            for input in d.input_drvs.keys() {
                if seen.insert(input.clone()) {
                    next.push((input.clone(), Some(p.clone())));
                }
            }
            set.insert(p, d);
        }
        round = next;
    }
    Ok(set)
}

/// Fetch `missing` from the first remote that has each, checked (step 3).
fn fetch_all(
    mut missing: Vec<(StorePath, Option<StorePath>)>,
    remotes: &[&Fetcher],
    local: Option<&Path>,
) -> Result<Vec<(StorePath, Derivation)>, SourceError> {
    let mut got = Vec::new();
    for f in remotes {
        if missing.is_empty() {
            break;
        }
        let rels: Vec<(String, Kind)> = missing
            .iter()
            .map(|(p, _)| (format!("drv/{}.nar", p.hash_part()), Kind::Immutable))
            .collect();
        let answers = f.get_all(&rels);
        let mut still = Vec::new();
        let mut via_narinfo = Vec::new();
        for (((p, by), a), (rel, _)) in missing.into_iter().zip(answers).zip(&rels) {
            match a.map_err(SourceError::Fetch)? {
                Some(nar) => got.push(checked(&f.url(rel), &p, &nar)?),
                None => via_narinfo.push((p, by)),
            }
        }
        for ((p, by), found) in via_narinfo.iter().zip(through_narinfo(f, &via_narinfo)?) {
            match found {
                Some(d) => got.push((p.clone(), d)),
                None => still.push((p.clone(), by.clone())),
            }
        }
        missing = still;
    }
    if let Some((p, by)) = missing.into_iter().next() {
        let mut searched: Vec<String> =
            local.map(|d| d.display().to_string()).into_iter().collect();
        searched.extend(remotes.iter().map(|f| f.base().to_owned()));
        return Err(SourceError::MissingDrv {
            drv: p.to_string(),
            needed_by: by.map(|b| b.to_string()),
            searched: if searched.is_empty() { "nowhere".into() } else { searched.join(", ") },
        });
    }
    Ok(got)
}

/// Each of `wanted` through its narinfo and the NAR its `URL` names (`None`: 404).
fn through_narinfo(
    f: &Fetcher,
    wanted: &[(StorePath, Option<StorePath>)],
) -> Result<Vec<Option<Derivation>>, SourceError> {
    let rels: Vec<(String, Kind)> = wanted
        .iter()
        .map(|(p, _)| (format!("{}.narinfo", p.hash_part()), Kind::Immutable))
        .collect();
    let mut nars = Vec::new();
    for ((p, _), (rel, a)) in wanted.iter().zip(rels.iter().map(|(r, _)| r).zip(f.get_all(&rels))) {
        let Some(body) = a.map_err(SourceError::Fetch)? else {
            nars.push(None);
            continue;
        };
        nars.push(Some(nar_in_narinfo(&f.url(rel), &body, p)?));
    }
    let fetch: Vec<(String, Kind)> =
        nars.iter().flatten().map(|u| (u.clone(), Kind::Immutable)).collect();
    let mut answers = f.get_all(&fetch).into_iter().zip(fetch.iter());
    let mut out = Vec::with_capacity(wanted.len());
    for ((p, _), nar) in wanted.iter().zip(&nars) {
        if nar.is_none() {
            out.push(None);
            continue;
        }
        let (a, (rel, _)) = answers.next().expect("one answer per NAR URL");
        let bytes = a.map_err(SourceError::Fetch)?.ok_or_else(|| {
            SourceError::Fetch(FetchError::Missing {
                url: f.url(rel),
                expected: format!("the NAR of {p} its narinfo names"),
            })
        })?;
        out.push(Some(checked(&f.url(rel), p, &bytes)?.1));
    }
    Ok(out)
}

/// Where the `.drv` `p`'s NAR is, by its narinfo `body` (from `url`): the narinfo's `URL`, a
/// path relative to the cache (step 2). It must describe `p`, uncompressed, and its `URL` must be
/// [a plain path in the cache](is_cache_path).
pub(crate) fn nar_in_narinfo(url: &str, body: &[u8], p: &StorePath) -> Result<String, SourceError> {
    let garbled =
        |problem: String| SourceError::Fetch(FetchError::Garbled { url: url.to_owned(), problem });
    let info = std::str::from_utf8(body)
        .map_err(|e| e.to_string())
        .and_then(|t| NarInfo::parse(t).map_err(|e| e.to_string()))
        .map_err(garbled)?;
    if info.store_path != *p {
        return Err(garbled(format!("describes {}, not {p}", info.store_path)));
    }
    if !matches!(info.compression.as_deref(), None | Some("none")) {
        return Err(garbled(format!(
            "the .drv's NAR is compressed ({}); only uncompressed NARs are read",
            info.compression.unwrap_or_default()
        )));
    }
    if !is_cache_path(&info.url) {
        return Err(garbled(format!("URL `{}` is not a path in this cache", info.url)));
    }
    Ok(info.url)
}

/// Whether a narinfo's `URL` is a plain path inside the cache, whatever a server or a proxy in
/// front of it makes of it: `/`-separated segments of ASCII letters, digits and `-._~+=`, none
/// empty, `.` or `..` (what Nix writes: `nar/<hash>.nar`). Nothing is left to decode or resolve:
/// no `%` (`%2e%2e` and `..%2f` resolve out of the prefix in URL parsers and servers that
/// decode), no `\` (a `/` to WHATWG parsers), no query, fragment, scheme, space or control
/// character (sent as other bytes, or not at all).
fn is_cache_path(rel: &str) -> bool {
    rel.split('/').all(|seg| {
        !matches!(seg, "" | "." | "..")
            && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~+=".contains(&b))
    })
}

/// The derivation in `nar` (from `url`), which must be exactly the `.drv` at path `p`.
pub(crate) fn checked(
    url: &str,
    p: &StorePath,
    nar: &[u8],
) -> Result<(StorePath, Derivation), SourceError> {
    let garbled =
        |problem: String| SourceError::Fetch(FetchError::Garbled { url: url.to_owned(), problem });
    let bytes = single_file(nar).map_err(garbled)?;
    let name = p.drv_name().map_err(|e| garbled(e.to_string()))?;
    let drv = Derivation::from_aterm(&bytes)
        .map_err(|e| garbled(format!("not a derivation: {}", crate::error_chain(&e))))?;
    let got = make_text_path(
        &format!("{name}.drv"),
        &Hash::sha256(nix_formats::hash::sha256(&bytes)),
        &drv.references(),
    )
    .map_err(|e| garbled(e.to_string()))?;
    if got != *p {
        return Err(SourceError::Tampered {
            url: url.to_owned(),
            drv: p.to_string(),
            got: got.to_string(),
        });
    }
    Ok((p.clone(), drv))
}

/// The contents of a NAR of one regular file.
pub(crate) fn single_file(nar: &[u8]) -> Result<Vec<u8>, String> {
    let limits = NarLimits {
        max_file_size: MAX_DRV,
        max_total_size: MAX_DRV + 4096,
        ..NarLimits::default()
    };
    let mut r = NarReader::new(nar, limits);
    let err = |e: nix_formats::nar::NarError| format!("not a NAR: {}", crate::error_chain(&e));
    let size = match r.next_event().map_err(err)? {
        Some(NarEvent::Regular { size, .. }) => size,
        other => return Err(format!("not a NAR of one regular file (starts with {other:?})")),
    };
    // The file is inside `nar`: a larger size is a lie, refused before it is allocated.
    if size > nar.len() as u64 {
        return Err(format!("not a NAR: its file claims {size} bytes, the NAR has {}", nar.len()));
    }
    let mut out = vec![0u8; usize::try_from(size).map_err(|e| e.to_string())?];
    let mut at = 0;
    while at < out.len() {
        match r.read_contents(&mut out[at..]).map_err(err)? {
            0 => return Err("not a NAR: the file ends early".into()),
            n => at += n,
        }
    }
    r.validate_to_end().map_err(err)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nar_of_anything_but_one_file_is_refused() {
        let mut w = nix_formats::nar::NarWriter::new(Vec::new()).unwrap();
        w.regular(false, b"Derive([])").unwrap();
        assert_eq!(single_file(&w.into_inner()).unwrap(), b"Derive([])");
        let mut w = nix_formats::nar::NarWriter::new(Vec::new()).unwrap();
        w.symlink(b"/etc").unwrap();
        assert!(single_file(&w.into_inner()).unwrap_err().contains("one regular file"));
        assert!(single_file(b"garbage").unwrap_err().contains("not a NAR"));
    }

    /// Found by the `trace_source` fuzz target (`fuzz/seeds/trace_source/regress-nar-size-alloc`):
    /// the buffer for the `.drv` was allocated at the size the NAR claimed (up to 16 MiB) before
    /// any of it was read: a 448-byte answer cost 512 KiB.
    #[test]
    fn a_file_size_past_the_nar_allocates_nothing() {
        let mut w = nix_formats::nar::NarWriter::new(Vec::new()).unwrap();
        w.regular(false, b"Derive([])").unwrap();
        let mut nar = w.into_inner();
        let at = nar.windows(8).position(|w| w == b"contents").unwrap() + 8;
        nar[at..at + 8].copy_from_slice(&(8u64 << 20).to_le_bytes());
        let e = single_file(&nar).unwrap_err();
        assert!(e.contains("claims 8388608 bytes"), "{e}");
        // (The seed's replay in `tests/fuzz_seeds.rs` measures the heap under the target's bound.)
    }

    /// The old rule (not absolute, no `..`, no `://`) let through a control character (found by
    /// the `trace_source` target's URL oracle: `regress-narinfo-url-control-char`) and `%2e%2e`
    /// segments, which resolve out of the store's prefix (found in review; the oracle fails on
    /// `regress-narinfo-url-encoded-dot-dot` against it).
    #[test]
    fn a_narinfo_url_is_a_plain_path_in_the_cache() {
        for ok in ["nar/0a1b.nar", "drv/x.nar", "x", "a..b/c~d+e=f_g-h.nar"] {
            assert!(is_cache_path(ok), "{ok:?} refused");
        }
        for bad in [
            "",
            "/nar/x.nar",
            "../x",
            "nar/../../x",
            "nar/%2e%2e/%2e%2e/x",
            "nar/..%2fx",
            "nar\\..\\x",
            "nar/x?y",
            "nar/x#y",
            "http://h/x.nar",
            "nar//x",
            "nar/./x",
            "nar/x\u{10}",
            "nar/ x",
            "nar/x/",
        ] {
            assert!(!is_cache_path(bad), "{bad:?} accepted");
        }
    }
}
