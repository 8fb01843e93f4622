//! The link check: a step's input closure must consist of accepted outputs of its inputs
//! (same NAR hash, size and references, not only the same path) and of content-addressed
//! paths whose recomputed content address produces exactly their path, all reachable from the
//! step's direct inputs.
//! Not here: which outputs were accepted (the parent module builds [`Known`] step by step).

use std::collections::{BTreeSet, HashMap};

use super::graph::Dependencies;

use nix_formats::StorePath;

use super::outcome::{BrokenLink, LinkCheck};
use crate::job::NarHash;
use crate::statement::Statement;

/// What an accepted output is, as far as dependents are concerned.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Facts {
    pub nar_hash: NarHash,
    pub nar_size: u64,
    pub references: BTreeSet<StorePath>,
}

/// Accepted facts per output path, each with the unresolved derivation whose accepted trace
/// gave it (several when accepted builds of one path diverge, or two derivations produced one
/// content-addressed path).
#[derive(Debug, Default)]
pub(crate) struct Known {
    by_path: HashMap<StorePath, Vec<(StorePath, Facts)>>,
}

impl Known {
    /// Record that `producer`'s accepted trace gives `path` these facts.
    pub(crate) fn insert(&mut self, path: &StorePath, producer: &StorePath, facts: &Facts) {
        let list = self.by_path.entry(path.clone()).or_default();
        if !list.iter().any(|(p, f)| p == producer && f == facts) {
            list.push((producer.clone(), facts.clone()));
        }
    }

    /// What a step whose (transitive) input derivations are `deps` may link to.
    pub(crate) fn admitted<'a>(&'a self, deps: Dependencies<'a>) -> Admitted<'a> {
        Admitted { known: self, deps }
    }
}

/// The accepted facts one step may link to: those of its own dependencies only.
#[derive(Debug)]
pub(crate) struct Admitted<'a> {
    known: &'a Known,
    deps: Dependencies<'a>,
}

impl Admitted<'_> {
    /// The admitted facts of `path` (`None`: no dependency of the step produced it).
    fn get(&self, path: &StorePath) -> Option<Vec<&Facts>> {
        let all = self.known.by_path.get(path)?;
        let mine: Vec<&Facts> =
            all.iter().filter(|(p, _)| self.deps.contains(p)).map(|(_, f)| f).collect();
        (!mine.is_empty()).then_some(mine)
    }
}

/// Check the statement's input closure against `direct` inputs and the accepted outputs of the
/// step's dependencies.
pub(crate) fn check_links(
    st: &Statement,
    direct: &BTreeSet<StorePath>,
    known: &Admitted<'_>,
    allow_weak_hashes: bool,
) -> Result<(), Box<BrokenLink>> {
    let closure = &st.job.closure;
    let mut reachable: BTreeSet<&StorePath> = BTreeSet::new();
    let mut todo: Vec<&StorePath> = direct.iter().collect();
    while let Some(p) = todo.pop() {
        if !reachable.insert(p) {
            continue;
        }
        let info = closure.get(p).ok_or_else(|| {
            BrokenLink::new(
                LinkCheck::InputUnaccounted,
                format!("input {p} is missing from the input closure"),
            )
        })?;
        todo.extend(info.references.iter().filter(|r| !reachable.contains(r)));
    }
    if let Some(extra) = closure.keys().find(|p| !reachable.contains(p)) {
        return Err(BrokenLink::new(
            LinkCheck::ExtraInput,
            format!(
                "the input closure holds {extra}, which no accepted input of the step references"
            ),
        )
        .expected("only the direct inputs and what they reference", extra));
    }
    for p in reachable {
        let info = &closure[p];
        let facts = Facts {
            nar_hash: info.nar_hash,
            nar_size: info.nar_size,
            references: info.references.clone(),
        };
        if let Some(accepted) = known.get(p) {
            if accepted.contains(&&facts) {
                continue;
            }
            let a = accepted[0];
            let (what, exp, got) = if a.nar_hash != facts.nar_hash {
                ("NAR hash", a.nar_hash.to_string(), facts.nar_hash.to_string())
            } else if a.nar_size != facts.nar_size {
                ("NAR size", a.nar_size.to_string(), facts.nar_size.to_string())
            } else {
                ("references", format!("{:?}", a.references), format!("{:?}", facts.references))
            };
            return Err(BrokenLink::new(
                LinkCheck::InputNarHash,
                format!("input {p} was built with a different {what} than the accepted output of its derivation"),
            )
            .expected(exp, got));
        }
        let Some(ca) = st.input_cas.get(p) else {
            return Err(BrokenLink::new(
                LinkCheck::InputUnaccounted,
                format!(
                    "input {p} is neither an accepted output of a dependency nor content-addressed"
                ),
            ));
        };
        if !allow_weak_hashes {
            refuse_weak(&format!("input {p}"), ca)?;
        }
        check_source(p, ca, &info.references)?;
    }
    Ok(())
}

/// A content-addressed input: its `ca` (recomputed by the guest), name and references must
/// produce exactly its path.
fn check_source(
    path: &StorePath,
    ca: &str,
    references: &BTreeSet<StorePath>,
) -> Result<(), Box<BrokenLink>> {
    let bad = |msg: String| BrokenLink::new(LinkCheck::SourceAddress, msg);
    let want = crate::ownership::content_addressed_path(path, ca, references)
        .map_err(|e| bad(format!("input {path}: {e}")))?;
    if want != *path {
        return Err(bad(format!("the content address of input {path} does not produce its path"))
            .expected(want, path));
    }
    Ok(())
}

/// A content address by MD5 or SHA-1 names contents a collision can replace: refused unless the
/// policy allows weak hashes (`fixed_output.allow_weak_hashes`), for inputs as for fixed
/// outputs.
pub(crate) fn refuse_weak(what: &str, ca: &str) -> Result<(), Box<BrokenLink>> {
    let algo = match nix_formats::content_address::ContentAddress::parse(ca) {
        Ok(nix_formats::content_address::ContentAddress::Fixed { hash, .. }) => hash.algo(),
        Ok(nix_formats::content_address::ContentAddress::Text { hash }) => hash.algo(),
        // A malformed address fails the path check that follows, with its reason.
        Err(_) => return Ok(()),
    };
    if matches!(algo, nix_formats::HashAlgo::Md5 | nix_formats::HashAlgo::Sha1) {
        return Err(BrokenLink::new(
            LinkCheck::WeakHash,
            format!("{what} is content-addressed by a {algo} hash, which the policy refuses"),
        )
        .expected("sha256 or sha512", algo));
    }
    Ok(())
}
