//! The transparency log on real files: C2SP tiles and bundles, idempotent and concurrent
//! appends, a crash between tiles and checkpoint, proofs, a forked log and a rollback detected,
//! the witness's add-checkpoint rules, and a monitor finding two outputs for one derivation.
//! (Go's independent implementation checks the same files in `tlog_go.rs`.)

use std::collections::BTreeMap;
use std::path::Path;

use build_trace::job::NarHash;
use build_trace::tlog::entry::LoggedOutput;
use build_trace::tlog::monitor::{Monitor, MonitorEvent};
use build_trace::tlog::note::add_signatures;
use build_trace::tlog::proof::{CheckpointHistory, LogTrust};
use build_trace::tlog::tiles::{bundle_path, tile_path, TileSource};
use build_trace::tlog::witness::{request_body, Witness};
use build_trace::tlog::{
    CosignerKey, DirTiles, LogEntry, LogKey, LogView, LogWriter, NoteVerifierKey, TlogError,
};

const ORIGIN: &str = "ci.example/vouch/log";

fn key() -> LogKey {
    LogKey::from_seed(ORIGIN, [1; 32]).unwrap()
}

fn trust(witnesses: &[&CosignerKey], quorum: usize) -> LogTrust {
    LogTrust {
        logs: vec![NoteVerifierKey::parse(key().vkey()).unwrap()],
        witnesses: witnesses.iter().map(|w| NoteVerifierKey::parse(&w.vkey()).unwrap()).collect(),
        quorum,
    }
}

/// Entry `i` for derivation `drv` with output content `out`.
fn entry(i: u32, drv: u32, out: u8) -> LogEntry {
    let mut statement = [0u8; 32];
    statement[..4].copy_from_slice(&i.to_be_bytes());
    LogEntry {
        drv: nix_formats::StorePath::parse(
            &format!("/nix/store/{:032}-d{drv}.drv", drv).replace('0', "a"),
        )
        .unwrap(),
        statement,
        evidence: Some([out; 32]),
        jws: None,
        outputs: BTreeMap::from([(
            "out".to_string(),
            LoggedOutput {
                path: nix_formats::StorePath::parse(&format!(
                    "/nix/store/{}{}-o{drv}",
                    "b".repeat(31),
                    out % 2
                ))
                .unwrap(),
                nar_hash: NarHash([out; 32]),
                nar_size: 100 + u64::from(out),
            },
        )]),
    }
}

fn entries(range: std::ops::Range<u32>) -> Vec<LogEntry> {
    range.map(|i| entry(i, i, 0)).collect()
}

fn writer(dir: &Path) -> LogWriter {
    LogWriter::open(dir, key()).unwrap()
}

#[test]
fn appends_c2sp_tiles_and_proves_every_entry() {
    let t = tempfile::tempdir().unwrap();
    let w = writer(t.path());
    let src = DirTiles::new(t.path());
    let mut seen = Vec::new();
    let mut next = 0;
    for batch in [1, 254, 1, 1, 300, 1, 70] {
        let es = entries(next..next + batch);
        let r = w.append(&es).unwrap();
        assert!(r.iter().all(|r| r.appended));
        assert_eq!(r.last().unwrap().index, u64::from(next + batch - 1));
        next += batch;
        seen.push(LogView::open(&src, &trust(&[], 0)).unwrap().checkpoint().clone());
    }
    assert_eq!(next, 628);
    // Tiles: two full level-0 tiles and bundles, a partial third, a partial level-1 tile.
    for p in [
        tile_path(0, 0, 256),
        tile_path(0, 1, 256),
        tile_path(0, 2, 116),
        tile_path(1, 0, 2),
        bundle_path(0, 256),
        bundle_path(2, 116),
    ] {
        assert!(src.get(&p).unwrap().is_some(), "{p}");
    }
    assert_eq!(src.get(&tile_path(0, 0, 256)).unwrap().unwrap().len(), 8192);
    // Partial tiles of tiles that became full are gone; those of the partial tile stay.
    assert!(
        !t.path().join("tile/0/000.p").exists() && !t.path().join("tile/entries/000.p").exists()
    );
    assert!(src.get(&tile_path(0, 2, 46)).unwrap().is_some());

    let view = LogView::open(&src, &trust(&[], 0)).unwrap();
    for (i, e) in entries(0..628).iter().enumerate() {
        assert_eq!(view.leaf(i as u64).unwrap(), e.to_bytes().unwrap());
        let (j, found) = view.find(&e.entry_id()).unwrap().unwrap();
        assert_eq!((j, &found), (i as u64, e));
    }
    // Every checkpoint on the way is consistent with the last one, and with each other.
    for old in &seen {
        view.consistent_with(old).unwrap();
        LogView::at(&src, old.clone()).consistent_with(view.checkpoint()).unwrap();
    }

    // The same entries appended at once give the same root and the same full tiles.
    let t2 = tempfile::tempdir().unwrap();
    writer(t2.path()).append(&entries(0..628)).unwrap();
    let src2 = DirTiles::new(t2.path());
    let other = LogView::open(&src2, &trust(&[], 0)).unwrap();
    assert_eq!(other.checkpoint().root, view.checkpoint().root);
    for p in [tile_path(0, 1, 256), bundle_path(1, 256), tile_path(1, 0, 2)] {
        assert_eq!(
            std::fs::read(t.path().join(&p)).unwrap(),
            std::fs::read(t2.path().join(&p)).unwrap()
        );
    }
}

#[test]
fn appending_again_adds_nothing_and_a_tampered_leaf_is_caught() {
    let t = tempfile::tempdir().unwrap();
    let w = writer(t.path());
    w.append(&entries(0..3)).unwrap();
    let before = std::fs::read(t.path().join("checkpoint")).unwrap();
    // The same statement entry id again (here with another JWS hash): no new leaf.
    let mut again = entry(1, 1, 0);
    again.jws = Some([9; 32]);
    let r = w.append(&[again, entry(1, 1, 0)]).unwrap();
    assert!(r.iter().all(|r| !r.appended && r.index == 1 && r.size == 3), "{r:?}");
    assert_eq!(std::fs::read(t.path().join("checkpoint")).unwrap(), before);

    // A leaf changed on disk no longer proves against the signed root.
    let p = t.path().join(bundle_path(0, 3));
    let mut b = std::fs::read(&p).unwrap();
    let last = b.len() - 2;
    b[last] ^= 1;
    std::fs::write(&p, b).unwrap();
    let src = DirTiles::new(t.path());
    let e = LogView::open(&src, &trust(&[], 0)).unwrap().leaf(2).unwrap_err();
    assert!(matches!(e, TlogError::Proof { .. }), "{e}");
}

#[test]
fn concurrent_writers_each_entry_once() {
    let t = tempfile::tempdir().unwrap();
    std::thread::scope(|s| {
        for k in 0..4u32 {
            let dir = t.path();
            s.spawn(move || {
                let w = writer(dir);
                for i in 0..15 {
                    // Every writer also re-publishes an entry the others publish.
                    w.append(&[entry(k * 100 + i, k * 100 + i, 0), entry(999, 999, 0)]).unwrap();
                }
            });
        }
    });
    let src = DirTiles::new(t.path());
    let view = LogView::open(&src, &trust(&[], 0)).unwrap();
    assert_eq!(view.checkpoint().size, 61);
    let mut ids: Vec<String> =
        (0..61).map(|i| LogEntry::parse(&view.leaf(i).unwrap()).unwrap().entry_id()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 61, "no entry twice");
}

#[test]
fn a_crash_before_the_checkpoint_leaves_the_log_as_it_was() {
    let t = tempfile::tempdir().unwrap();
    let w = writer(t.path());
    w.append(&entries(0..5)).unwrap();
    let src = DirTiles::new(t.path());
    let cp = LogView::open(&src, &trust(&[], 0)).unwrap().checkpoint().clone();
    // What an append of entry 5 writes before its checkpoint, then the process dies.
    let leaf = entry(5, 5, 0).to_bytes().unwrap();
    let (resources, _) =
        build_trace::tlog::writer::grow(&src, 5, &cp.root_hash(), &[leaf]).unwrap();
    for (p, b) in &resources {
        std::fs::create_dir_all(t.path().join(p).parent().unwrap()).unwrap();
        std::fs::write(t.path().join(p), b).unwrap();
    }
    std::fs::write(t.path().join("index").join(entry(5, 5, 0).entry_id()), "5\n").unwrap();
    // Readers still see size 5, and entry 5 is not in the log.
    let view = LogView::open(&src, &trust(&[], 0)).unwrap();
    assert_eq!(view.checkpoint().size, 5);
    assert!(view.find(&entry(5, 5, 0).entry_id()).unwrap().is_none());
    // The next append (another entry) takes leaf 5; entry 5 republished comes after it.
    let r = w.append(&[entry(6, 6, 0), entry(5, 5, 0)]).unwrap();
    assert_eq!((r[0].index, r[1].index, r[1].size), (5, 6, 7));
    let view = LogView::open(&src, &trust(&[], 0)).unwrap();
    view.consistent_with(&cp).unwrap();
    assert_eq!(view.find(&entry(5, 5, 0).entry_id()).unwrap().unwrap().0, 6);
}

#[test]
fn a_forked_log_and_a_rollback_are_detected() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // One log key, two histories: [e0, e1] and [e0, e2]. Same size, different roots.
    writer(a.path()).append(&entries(0..2)).unwrap();
    writer(b.path()).append(&[entry(0, 0, 0), entry(2, 2, 0)]).unwrap();
    let state = tempfile::tempdir().unwrap();
    let history = CheckpointHistory::new(state.path());
    let (sa, sb) = (DirTiles::new(a.path()), DirTiles::new(b.path()));
    let va = LogView::open(&sa, &trust(&[], 0)).unwrap();
    history.accept(&va, &trust(&[], 0)).unwrap();
    let vb = LogView::open(&sb, &trust(&[], 0)).unwrap();
    assert_eq!(va.checkpoint().size, vb.checkpoint().size);
    let e = history.accept(&vb, &trust(&[], 0)).unwrap_err().to_string();
    assert!(
        e.contains("two checkpoints of size 2 with different roots") && e.contains("forked"),
        "{e}"
    );
    assert!(state.path().join("ci.example%2Fvouch%2Flog.conflict-2").exists());

    // Log A grows to 3 and is accepted; B (now at 3 too, after e3) is a rollback of nothing
    // but a fork again; a B that never grew is an older tree with another prefix.
    writer(a.path()).append(&entries(3..4)).unwrap();
    let va = LogView::open(&sa, &trust(&[], 0)).unwrap();
    history.accept(&va, &trust(&[], 0)).unwrap();
    let e = history.accept(&vb, &trust(&[], 0)).unwrap_err().to_string();
    assert!(e.contains("no consistency proof from size 2 to 3"), "{e}");
    // The honest log's own older checkpoint is fine (stale, consistent).
    history.accept(&LogView::at(&sa, va.checkpoint().clone()), &trust(&[], 0)).unwrap();
}

#[test]
fn a_witness_cosigns_only_consistent_growth() {
    let t = tempfile::tempdir().unwrap();
    let w = writer(&t.path().join("log"));
    let wk = CosignerKey::from_seed("witness.example/w1", [4; 32]).unwrap();
    let witness = Witness::new(
        wk.clone(),
        vec![NoteVerifierKey::parse(key().vkey()).unwrap()],
        &t.path().join("witness"),
    )
    .unwrap();
    let src = DirTiles::new(&t.path().join("log"));
    w.append(&entries(0..3)).unwrap();
    let v3 = LogView::open(&src, &trust(&[], 0)).unwrap();
    let note3 = v3.checkpoint().note.clone();
    let r = witness.add_checkpoint(&request_body(0, &[], &note3), 1_700_000_000);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let cosigned = add_signatures(&note3, std::str::from_utf8(&r.body).unwrap()).unwrap();
    let cp = trust(&[&wk], 1).verify(&cosigned).unwrap();
    assert_eq!(cp.cosigned_by["witness.example/w1"], 1_700_000_000);

    w.append(&entries(3..300)).unwrap();
    let v = LogView::open(&src, &trust(&[], 0)).unwrap();
    let note = v.checkpoint().note.clone();
    let proof = v.prove_consistency(3).unwrap();
    // Wrong old size: 409 with the size it cosigned last.
    let r = witness.add_checkpoint(&request_body(0, &[], &note), 1);
    assert_eq!(
        (r.status, r.content_type, r.body.as_slice()),
        (409, "text/x.tlog.size", &b"3\n"[..])
    );
    // A bad proof: 422.
    let mut bad = proof.clone();
    bad[0].0[0] ^= 1;
    assert_eq!(witness.add_checkpoint(&request_body(3, &bad, &note), 1).status, 422);
    // The right proof: 200, and the record moves on; replaying the old one is refused.
    assert_eq!(witness.add_checkpoint(&request_body(3, &proof, &note), 2).status, 200);
    assert_eq!(witness.add_checkpoint(&request_body(3, &[], &note3), 3).status, 409);
    assert_eq!(witness.add_checkpoint(&request_body(300, &[], &note3), 3).status, 400);
    // A fork at the same size: 409. Unknown origin: 404. Not signed by the log: 403.
    let fork = tempfile::tempdir().unwrap();
    let mut other = entries(0..299);
    other.push(entry(7000, 7000, 1));
    writer(fork.path()).append(&other).unwrap();
    let fork_note = std::fs::read(fork.path().join("checkpoint")).unwrap();
    assert_eq!(witness.add_checkpoint(&request_body(300, &[], &fork_note), 4).status, 409);
    let stranger = LogKey::from_seed("other.example/log", [5; 32]).unwrap();
    let sn = stranger.sign_checkpoint(1, &build_trace::tlog::Hash([0; 32])).unwrap();
    assert_eq!(witness.add_checkpoint(&request_body(0, &[], &sn), 4).status, 404);
    let impostor = LogKey::from_seed(ORIGIN, [6; 32]).unwrap();
    let forged = impostor.sign_checkpoint(301, &build_trace::tlog::Hash([0; 32])).unwrap();
    assert_eq!(witness.add_checkpoint(&request_body(300, &[], &forged), 4).status, 403);
    assert_eq!(witness.add_checkpoint(b"old x\n\n", 4).status, 400);
    assert_eq!(witness.last(ORIGIN).unwrap().unwrap().size, 300);
}

#[test]
fn a_monitor_reports_new_entries_and_two_outputs_for_one_derivation() {
    let t = tempfile::tempdir().unwrap();
    let w = writer(&t.path().join("log"));
    let src = DirTiles::new(&t.path().join("log"));
    let monitor = Monitor::new(&t.path().join("monitor"));
    w.append(&[entry(0, 0, 0), entry(1, 1, 0)]).unwrap();
    let r = monitor.follow(&src, &trust(&[], 0)).unwrap();
    assert_eq!((r.from, r.to, r.events.len(), r.has_conflicts()), (0, 2, 2, false));
    assert!(monitor.follow(&src, &trust(&[], 0)).unwrap().events.is_empty());
    // Another build of derivation 1 with the same outputs is no conflict; with others it is,
    // also across runs of the monitor.
    w.append(&[entry(2, 1, 0)]).unwrap();
    assert!(!monitor.follow(&src, &trust(&[], 0)).unwrap().has_conflicts());
    w.append(&[entry(3, 1, 1), entry(4, 4, 0)]).unwrap();
    let r = monitor.follow(&src, &trust(&[], 0)).unwrap();
    assert_eq!((r.from, r.to), (3, 5));
    let conflicts: Vec<&MonitorEvent> =
        r.events.iter().filter(|e| matches!(e, MonitorEvent::Conflict { .. })).collect();
    assert_eq!(conflicts.len(), 1, "{:?}", r.events);
    assert!(matches!(conflicts[0], MonitorEvent::Conflict { earlier: 1, index: 3, .. }));
    // A log rewritten under the monitor (same key, other history) is an error.
    std::fs::remove_dir_all(t.path().join("log")).unwrap();
    let w = writer(&t.path().join("log"));
    w.append(&entries(10..16)).unwrap();
    let e = monitor.follow(&src, &trust(&[], 0)).unwrap_err();
    assert!(matches!(e, TlogError::Inconsistent { .. }), "{e}");
}

#[test]
fn log_policies_name_real_keys_and_a_reachable_quorum() {
    use build_trace::trust::TrustPolicy;
    let w = CosignerKey::from_seed("w.example/witness", [9; 32]).unwrap();
    let policy = |keys: &str, witnesses: &str, quorum: usize| {
        TrustPolicy::from_toml(&format!(
            "require = \"key:k-1\"\n[keys]\n\"k-1\" = \"k-1:VUYbT40EiqxQ8DDKsJ/c9NK0yyRRy+wb6+5kY20F++g=\"\n\
             [log]\nkeys = [{keys}]\nwitnesses = [{witnesses}]\nquorum = {quorum}\n"
        ))
    };
    let (lk, wk) = (format!("{:?}", key().vkey()), format!("{:?}", w.vkey()));
    let p = policy(&lk, &wk, 1).unwrap();
    let trust = p.log.unwrap().trust().unwrap();
    assert_eq!((trust.logs.len(), trust.witnesses.len(), trust.quorum), (1, 1, 1));
    for (k, ws, q, why) in [
        (lk.as_str(), wk.as_str(), 2, "quorum 2 of 1 distinct witnesses"),
        (wk.as_str(), "", 0, "is not a log (Ed25519 note) key"),
        (lk.as_str(), lk.as_str(), 1, "is not a witness (cosignature/v1) key"),
        ("", "", 0, "names no log key"),
        ("\"x+00000000+AQ==\"", "", 0, "[log]"),
    ] {
        let e = policy(k, ws, q).unwrap_err().to_string();
        assert!(e.contains(why), "{k} {ws} {q}: {e}");
    }
}
