//! Checking the log (verifier side): a checkpoint under the trust policy's log and witness keys,
//! consistency with the checkpoints seen before, and inclusion of an entry.

use std::fs;
use std::path::{Path, PathBuf};

use tlog_tiles::{Hash, RecordProof, TreeProof};

use super::entry::LogEntry;
use super::note::{Checkpoint, NoteVerifierKey};
use super::tiles::{indexed, read_bundle};
use super::tiles::{TileSource, TreeHashes, CHECKPOINT, TILE_WIDTH};
use super::{io_err, origin_file_name, TlogError};

/// Which logs and witnesses a verifier trusts (from the trust policy's `[log]` table).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogTrust {
    /// Log keys (each named after its log's origin).
    pub logs: Vec<NoteVerifierKey>,
    /// Witness cosigning keys.
    pub witnesses: Vec<NoteVerifierKey>,
    /// How many distinct witnesses must have cosigned a checkpoint.
    pub quorum: usize,
}

impl LogTrust {
    /// Check a checkpoint note under these keys.
    pub fn verify(&self, note: &[u8]) -> Result<Checkpoint, TlogError> {
        Checkpoint::verify(note, &self.logs, &self.witnesses, self.quorum)
    }
}

/// A log read through a checkpoint the verifier accepted.
#[derive(Debug)]
pub struct LogView<'a> {
    src: &'a dyn TileSource,
    cp: Checkpoint,
    hashes: TreeHashes<'a>,
}

fn proof_err(what: String) -> impl FnOnce(tlog_tiles::Error) -> TlogError {
    move |e| TlogError::Proof { what, problem: e.to_string() }
}

impl<'a> LogView<'a> {
    /// Read and check `src`'s checkpoint under `trust`.
    pub fn open(src: &'a dyn TileSource, trust: &LogTrust) -> Result<LogView<'a>, TlogError> {
        let cp = trust.verify(&src.need(CHECKPOINT)?)?;
        Ok(LogView::at(src, cp))
    }

    /// `src` read through `cp` (already checked).
    pub fn at(src: &'a dyn TileSource, cp: Checkpoint) -> LogView<'a> {
        let hashes = TreeHashes::new(src, cp.size);
        LogView { src, cp, hashes }
    }

    /// The checkpoint.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.cp
    }

    /// The source.
    pub fn source(&self) -> &'a dyn TileSource {
        self.src
    }

    /// The inclusion proof of leaf `i`.
    pub fn prove(&self, i: u64) -> Result<RecordProof, TlogError> {
        tlog_tiles::prove_record(self.cp.size, i, &self.hashes)
            .map_err(proof_err(format!("inclusion proof of leaf {i} in {}", self.describe())))
    }

    /// The entry at leaf `i`, with its inclusion proof checked against the signed root.
    pub fn leaf(&self, i: u64) -> Result<Vec<u8>, TlogError> {
        if i >= self.cp.size {
            return Err(TlogError::Proof {
                what: format!("leaf {i}"),
                problem: format!("beyond the checkpoint's size {}", self.cp.size),
            });
        }
        let leaf = read_bundle(self.src, i / TILE_WIDTH, self.cp.size)?
            .swap_remove((i % TILE_WIDTH) as usize);
        let proof = self.prove(i)?;
        check_inclusion(&proof, &self.cp, i, &leaf)?;
        Ok(leaf)
    }

    /// The logged entry of a statement (by its entry id), proven included; `None` when the log
    /// does not index it below the checkpoint's size.
    pub fn find(&self, entry_id: &str) -> Result<Option<(u64, LogEntry)>, TlogError> {
        let Some(i) = indexed(self.src, entry_id)?.filter(|&i| i < self.cp.size) else {
            return Ok(None);
        };
        let entry = LogEntry::parse(&self.leaf(i)?)?;
        if entry.entry_id() != entry_id {
            return Err(TlogError::Corrupt {
                path: format!("{}/index/{entry_id}", self.src.describe()),
                problem: format!("leaf {i} is the entry of another statement"),
            });
        }
        Ok(Some((i, entry)))
    }

    /// The consistency proof from the tree of `older` size to this checkpoint.
    pub fn prove_consistency(&self, older: u64) -> Result<TreeProof, TlogError> {
        if older == 0 || older == self.cp.size {
            return Ok(Vec::new());
        }
        tlog_tiles::prove_tree(self.cp.size, older, &self.hashes).map_err(proof_err(format!(
            "consistency proof from size {older} to {} of {}",
            self.cp.size,
            self.describe()
        )))
    }

    /// Check that `older` (an accepted checkpoint of the same log) and this one are views of one
    /// append-only log: same root at the same size, else a consistency proof from the smaller
    /// to the larger, computed from the tiles (of the larger tree, when `older` is larger).
    pub fn consistent_with(&self, older: &Checkpoint) -> Result<(), TlogError> {
        let cp = &self.cp;
        let inconsistent =
            |problem: String| TlogError::Inconsistent { origin: cp.origin.clone(), problem };
        if older.origin != cp.origin {
            return Err(inconsistent(format!("compared with a checkpoint of {}", older.origin)));
        }
        let (small, large) = if older.size <= cp.size { (older, cp) } else { (cp, older) };
        if small.size == large.size {
            return if small.root == large.root {
                Ok(())
            } else {
                Err(inconsistent(format!(
                    "two checkpoints of size {} with different roots {} and {} (a forked log: \
                     different users are shown different histories)",
                    small.size,
                    small.root_hash(),
                    large.root_hash()
                )))
            };
        }
        if small.size == 0 {
            return Ok(());
        }
        let view = LogView::at(self.src, large.clone());
        let proof = view.prove_consistency(small.size).map_err(|e| {
            inconsistent(format!(
                "no consistency proof from size {} to {}: {}",
                small.size,
                large.size,
                crate::error_chain(&e)
            ))
        })?;
        check_consistency(&proof, large, small).map_err(|e| inconsistent(crate::error_chain(&e)))
    }

    fn describe(&self) -> String {
        format!("{} ({})", self.cp.origin, self.src.describe())
    }
}

/// Check an inclusion proof of `leaf` at index `i` against `cp`.
pub fn check_inclusion(
    proof: &RecordProof,
    cp: &Checkpoint,
    i: u64,
    leaf: &[u8],
) -> Result<(), TlogError> {
    let h = tlog_tiles::record_hash(leaf);
    if proof.len() > 63 {
        return Err(TlogError::Proof {
            what: format!("leaf {i}"),
            problem: "proof too long".into(),
        });
    }
    tlog_tiles::check_record(proof, cp.size, cp.root_hash(), i, h)
        .map_err(proof_err(format!("inclusion of leaf {i} in {} at size {}", cp.origin, cp.size)))
}

/// Check a consistency proof from `small` to `large`.
pub fn check_consistency(
    proof: &TreeProof,
    large: &Checkpoint,
    small: &Checkpoint,
) -> Result<(), TlogError> {
    consistency(proof, large.size, &large.root_hash(), small.size, &small.root_hash()).map_err(
        |problem| TlogError::Proof {
            what: format!(
                "consistency of {} from size {} to {}",
                large.origin, small.size, large.size
            ),
            problem,
        },
    )
}

/// RFC 6962 consistency of the tree (`n`, `nh`) with the larger (`t`, `th`) by `proof`.
pub fn consistency(proof: &[Hash], t: u64, th: &Hash, n: u64, nh: &Hash) -> Result<(), String> {
    if n > t {
        return Err(format!("old size {n} is larger than the new size {t}"));
    }
    if proof.len() > 63 {
        return Err("proof too long".into());
    }
    if n == 0 || n == t {
        return match (proof.is_empty(), n == 0 || nh == th) {
            (true, true) => Ok(()),
            (false, _) => Err("the proof must be empty".into()),
            (true, false) => Err("same size, different roots".into()),
        };
    }
    tlog_tiles::check_tree(&proof.to_vec(), t, *th, n, *nh).map_err(|e| e.to_string())
}

/// The checkpoints a verifier (or monitor) accepted, one file per origin under `dir`
/// (`<state dir>/tlog/<origin>`): the largest consistent one it saw.
#[derive(Debug, Clone)]
pub struct CheckpointHistory {
    dir: PathBuf,
}

impl CheckpointHistory {
    /// History under `dir`.
    pub fn new(dir: &Path) -> CheckpointHistory {
        CheckpointHistory { dir: dir.to_path_buf() }
    }

    /// The file of `origin`.
    pub fn path(&self, origin: &str) -> PathBuf {
        self.dir.join(origin_file_name(origin))
    }

    /// The last checkpoint accepted for `origin`, checked against the log keys of `trust`.
    pub fn last(&self, origin: &str, trust: &LogTrust) -> Result<Option<Checkpoint>, TlogError> {
        let p = self.path(origin);
        match fs::read(&p) {
            Ok(note) => {
                let cp = Checkpoint::verify(&note, &trust.logs, &[], 0)?;
                Ok(Some(cp))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &p)(e)),
        }
    }

    /// Accept `view`'s checkpoint: it must be consistent with the last one accepted for its
    /// origin, and replaces it when larger. A conflicting checkpoint is kept beside the file
    /// (`<origin>.conflict-<size>`) as evidence, and the error names both.
    pub fn accept(&self, view: &LogView<'_>, trust: &LogTrust) -> Result<(), TlogError> {
        fs::create_dir_all(&self.dir).map_err(io_err("create", &self.dir))?;
        let cp = view.checkpoint();
        let _lock = super::lock_file(&self.dir.join(".lock"))?;
        let path = self.path(&cp.origin);
        if let Some(old) = self.last(&cp.origin, trust)? {
            if let Err(e) = view.consistent_with(&old) {
                let name = format!("{}.conflict-{}", origin_file_name(&cp.origin), cp.size);
                let evidence = self.dir.join(name);
                let _ = crate::store::write_atomic(&evidence, &cp.note);
                return Err(e);
            }
            if old.size >= cp.size {
                return Ok(());
            }
        }
        crate::store::write_atomic(&path, &cp.note).map_err(io_err("write", &path))
    }
}
