//! Benchmark: the transparency log's cost, as ratios to hashing the same entries alone.
//!
//! `cargo bench -p build-trace --bench tlog`. 100 000 step entries (`VOUCH_BENCH_ENTRIES`
//! changes it; ≈ 330 bytes each, like a one-output step) are, in one run, on one thread, CPU
//! time from `/proc/thread-self/schedstat`:
//! - **baseline**: RFC 6962 leaf hashes of every entry (`SHA-256(0x00 || entry)`), the least any
//!   log must compute;
//! - **append (memory)**: the Merkle work of appending them 256 at a time (stored hashes, the
//!   new tiles and entry bundles, the new root), into memory;
//! - **append (files)**: `LogWriter::append` on a real directory, 100 entries per append: lock,
//!   tiles and bundles each written to a temporary file, fsynced and renamed, index files, a
//!   signed checkpoint (1 000 checkpoints);
//! - **append (files, one per step)**: the first 1 000 entries one per append, as `put_step`
//!   publishes them (the per-step price);
//! - **prove + verify**: for every entry, its inclusion proof from the files (tiles read once,
//!   then cached) and its check against the signed root.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use build_trace::job::NarHash;
use build_trace::tlog::entry::LoggedOutput;
use build_trace::tlog::proof::{check_inclusion, LogTrust};
use build_trace::tlog::writer::grow;
use build_trace::tlog::{
    DirTiles, LogEntry, LogKey, LogView, LogWriter, NoteVerifierKey, TileSource, TlogError,
};

mod support;

use support::timed;

#[derive(Debug, Default)]
struct MemTiles(Mutex<HashMap<String, Vec<u8>>>);

impl TileSource for MemTiles {
    fn get(&self, path: &str) -> Result<Option<Vec<u8>>, TlogError> {
        Ok(self.0.lock().unwrap().get(path).cloned())
    }
    fn describe(&self) -> String {
        "memory".into()
    }
}

fn entry(i: u64) -> LogEntry {
    let h = |tag: u8| -> [u8; 32] {
        let mut b = [tag; 32];
        b[..8].copy_from_slice(&i.to_be_bytes());
        b
    };
    LogEntry {
        drv: nix_formats::StorePath::parse(&format!(
            "/nix/store/{}-step-{i}.drv",
            nix_formats::base32::encode(&h(1)[..20])
        ))
        .unwrap(),
        statement: h(2),
        evidence: Some(h(3)),
        jws: Some(h(4)),
        outputs: BTreeMap::from([(
            "out".to_string(),
            LoggedOutput {
                path: nix_formats::StorePath::parse(&format!(
                    "/nix/store/{}-step-{i}",
                    nix_formats::base32::encode(&h(5)[..20])
                ))
                .unwrap(),
                nar_hash: NarHash(h(6)),
                nar_size: 4096 + i,
            },
        )]),
    }
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let n: u64 = std::env::var("VOUCH_BENCH_ENTRIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if bench { 100_000 } else { 600 });
    let one_by_one = n.min(1000);
    let entries: Vec<LogEntry> = (0..n).map(entry).collect();
    let leaves: Vec<Vec<u8>> = entries.iter().map(|e| e.to_bytes().unwrap()).collect();
    let avg = leaves.iter().map(Vec::len).sum::<usize>() / leaves.len();

    let base = timed(|| {
        for l in &leaves {
            std::hint::black_box(tlog_tiles::record_hash(l));
        }
    });

    let mem = MemTiles::default();
    let mem_append = timed(|| {
        let mut root = tlog_tiles::tree_hash(0, &EmptyReader).unwrap();
        let mut size = 0u64;
        for chunk in leaves.chunks(256) {
            let (resources, r) = grow(&mem, size, &root, chunk).unwrap();
            let mut m = mem.0.lock().unwrap();
            m.extend(resources);
            root = r;
            size += chunk.len() as u64;
        }
    });

    let dir = tempfile::tempdir().unwrap();
    let key = LogKey::from_seed("bench.example/log", [1; 32]).unwrap();
    let w = LogWriter::open(&dir.path().join("log"), key.clone()).unwrap();
    let file_append = timed(|| {
        for chunk in entries.chunks(100) {
            w.append(chunk).unwrap();
        }
    });
    let dir1 = tempfile::tempdir().unwrap();
    let w1 = LogWriter::open(&dir1.path().join("log"), key.clone()).unwrap();
    let single = timed(|| {
        for e in &entries[..one_by_one as usize] {
            w1.append(std::slice::from_ref(e)).unwrap();
        }
    });

    let trust =
        LogTrust { logs: vec![NoteVerifierKey::parse(key.vkey()).unwrap()], ..Default::default() };
    let src = DirTiles::new(&dir.path().join("log"));
    let prove = timed(|| {
        let view = LogView::open(&src, &trust).unwrap();
        assert_eq!(view.checkpoint().size, n);
        for (i, l) in leaves.iter().enumerate() {
            let p = view.prove(i as u64).unwrap();
            check_inclusion(&p, view.checkpoint(), i as u64, l).unwrap();
        }
    });

    let ratio =
        |d: (Duration, Duration), b: (Duration, Duration)| d.1.as_secs_f64() / b.1.as_secs_f64();
    println!(
        "tlog: {n} entries of {avg} bytes on average (CPU time of this thread; wall in brackets)"
    );
    println!("  baseline: leaf hashes only      {:>10.1?} [{:.1?}]", base.1, base.0);
    println!(
        "  append (memory, 256 per append) {:>10.1?} [{:.1?}]  {:>7.1}x",
        mem_append.1,
        mem_append.0,
        ratio(mem_append, base)
    );
    println!(
        "  append (files, 100 per append)  {:>10.1?} [{:.1?}]  {:>7.1}x",
        file_append.1,
        file_append.0,
        ratio(file_append, base)
    );
    println!(
        "  prove + verify every entry      {:>10.1?} [{:.1?}]  {:>7.1}x",
        prove.1,
        prove.0,
        ratio(prove, base)
    );
    println!(
        "  append (files, 1 per append), first {one_by_one}: {:.1?} [{:.1?}] = {:.0?} CPU, {:.1?} wall per step; {:.0}x the baseline per entry",
        single.1,
        single.0,
        single.1 / one_by_one as u32,
        single.0 / one_by_one as u32,
        ratio(single, base) * n as f64 / one_by_one as f64
    );
}

struct EmptyReader;

impl tlog_tiles::HashReader for EmptyReader {
    fn read_hashes(&self, _: &[u64]) -> Result<Vec<tlog_tiles::Hash>, tlog_tiles::Error> {
        Ok(Vec::new())
    }
}
