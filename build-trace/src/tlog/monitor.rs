//! Following a log (a monitor): every new entry since the last checkpoint accepted, checked
//! against the authenticated level-0 tiles, and every derivation logged with two different
//! output maps.
//!
//! State, in the monitor's directory: the last checkpoint accepted per origin (a
//! [`CheckpointHistory`]) and `<origin>.outputs`, one line per entry seen
//! (`<leaf index> <drv path> <SHA-256 of its out lines>`), so a conflict with an entry seen in an
//! earlier run is still found. Entries are processed before the new checkpoint is recorded: a
//! run that fails part way is repeated from the same size next time (entries already in the
//! outputs file are not added twice).

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tlog_tiles::{HashReader, TileHashReader};

use super::entry::LogEntry;
use super::proof::{CheckpointHistory, LogTrust, LogView};
use super::tiles::read_bundle;
use super::tiles::{AuthTiles, TileSource, TILE_WIDTH};
use super::{io_err, origin_file_name, TlogError};

/// What a monitor saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MonitorEvent {
    /// A new entry.
    Entry {
        /// Its leaf index.
        index: u64,
        /// The entry.
        entry: LogEntry,
    },
    /// A derivation logged before with other outputs.
    Conflict {
        /// The derivation.
        drv: String,
        /// The leaf that logged it first with other outputs.
        earlier: u64,
        /// This leaf.
        index: u64,
    },
}

/// One run of a monitor over one log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorReport {
    /// The log.
    pub origin: String,
    /// The size it had seen before.
    pub from: u64,
    /// The size it has now seen.
    pub to: u64,
    /// What it saw, in leaf order.
    pub events: Vec<MonitorEvent>,
}

impl MonitorReport {
    /// Whether a derivation was logged with two different output maps.
    pub fn has_conflicts(&self) -> bool {
        self.events.iter().any(|e| matches!(e, MonitorEvent::Conflict { .. }))
    }
}

/// A monitor's state directory.
#[derive(Debug, Clone)]
pub struct Monitor {
    dir: PathBuf,
}

fn outputs_digest(e: &LogEntry) -> String {
    let mut h = Sha256::new();
    for (name, o) in &e.outputs {
        h.update(format!("{name} {} {} {}\n", o.path, o.nar_hash, o.nar_size));
    }
    hex::encode(h.finalize())
}

impl Monitor {
    /// A monitor keeping its state in `dir`.
    pub fn new(dir: &Path) -> Monitor {
        Monitor { dir: dir.to_path_buf() }
    }

    /// Read `src`'s checkpoint under `trust`, check it against the last one accepted, report the
    /// entries added since, and record it. An inconsistent checkpoint is an error (kept as
    /// evidence beside the history, see [`CheckpointHistory::accept`]).
    pub fn follow(
        &self,
        src: &dyn TileSource,
        trust: &LogTrust,
    ) -> Result<MonitorReport, TlogError> {
        let view = LogView::open(src, trust)?;
        let cp = view.checkpoint().clone();
        let history = CheckpointHistory::new(&self.dir);
        let last = history.last(&cp.origin, trust)?;
        if let Some(old) = &last {
            view.consistent_with(old)?;
        }
        let from = last.as_ref().map_or(0, |l| l.size).min(cp.size);
        let outputs_path = self.dir.join(format!("{}.outputs", origin_file_name(&cp.origin)));
        let mut seen = load_outputs(&outputs_path)?;
        let mut events = Vec::new();
        let tiles = AuthTiles(src);
        let auth = TileHashReader::new(cp.size, cp.root_hash(), &tiles);
        let mut new_lines = String::new();
        let mut i = from;
        while i < cp.size {
            let n = i / TILE_WIDTH;
            let bundle = read_bundle(src, n, cp.size)?;
            let end = ((n + 1) * TILE_WIDTH).min(cp.size);
            let idx: Vec<u64> = (i..end).map(|k| tlog_tiles::stored_hash_index(0, k)).collect();
            let hashes = auth.read_hashes(&idx).map_err(|e| TlogError::Proof {
                what: format!("level-0 tile {n} of {}", cp.origin),
                problem: e.to_string(),
            })?;
            for (k, h) in (i..end).zip(hashes) {
                let leaf = &bundle[(k % TILE_WIDTH) as usize];
                if tlog_tiles::record_hash(leaf) != h {
                    return Err(TlogError::Inconsistent {
                        origin: cp.origin.clone(),
                        problem: format!(
                            "entry {k} of the entry bundle is not the leaf the tree holds"
                        ),
                    });
                }
                let entry = LogEntry::parse(leaf)?;
                let digest = outputs_digest(&entry);
                let list = seen.entry(entry.drv.to_string()).or_default();
                if let Some((earlier, _)) = list.iter().find(|(_, d)| *d != digest) {
                    events.push(MonitorEvent::Conflict {
                        drv: entry.drv.to_string(),
                        earlier: *earlier,
                        index: k,
                    });
                }
                if !list.iter().any(|(j, _)| *j == k) {
                    list.push((k, digest.clone()));
                    new_lines.push_str(&format!("{k} {} {digest}\n", entry.drv));
                }
                events.push(MonitorEvent::Entry { index: k, entry });
            }
            i = end;
        }
        fs::create_dir_all(&self.dir).map_err(io_err("create", &self.dir))?;
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&outputs_path)
            .map_err(io_err("open", &outputs_path))?;
        f.write_all(new_lines.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(io_err("write", &outputs_path))?;
        history.accept(&view, trust)?;
        Ok(MonitorReport { origin: cp.origin, from, to: cp.size, events })
    }
}

type Seen = BTreeMap<String, Vec<(u64, String)>>;

fn load_outputs(path: &Path) -> Result<Seen, TlogError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Seen::new()),
        Err(e) => return Err(io_err("read", path)(e)),
    };
    let mut seen: Seen = BTreeMap::new();
    let mut dedup = HashSet::new();
    for line in text.lines() {
        let parsed = match line.split(' ').collect::<Vec<_>>()[..] {
            [i, drv, digest] => i.parse::<u64>().ok().map(|i| (i, drv, digest)),
            _ => None,
        };
        let Some((i, drv, digest)) = parsed else {
            return Err(TlogError::Corrupt {
                path: path.display().to_string(),
                problem: format!("line {line:?}"),
            });
        };
        if dedup.insert(i) {
            seen.entry(drv.to_owned()).or_default().push((i, digest.to_owned()));
        }
    }
    Ok(seen)
}
