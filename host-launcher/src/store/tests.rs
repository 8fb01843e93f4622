//! Content store tests: real SQLite, real files, several store instances (and a second process
//! for pins) at once.

use std::collections::BTreeSet;
use std::io::Read;

use build_trace::NarHash;
use nix_formats::ca::SelfRefRule;
use nix_formats::nar::NarWriter;
use nix_formats::store_path::{make_fixed_output_path, FileIngestionMethod};
use nix_formats::{Hash, StorePath};
use sha2::{Digest, Sha256};

use super::*;
use crate::core::{UploadError, UploadSource, ValidPathInfo};

pub(super) const RULES: &[SelfRefRule] = &[SelfRefRule::ZeroAndPositions, SelfRefRule::ZeroOnly];

pub(super) fn nar_of(contents: &[u8]) -> Vec<u8> {
    let mut w = NarWriter::new(Vec::new()).unwrap();
    w.regular(false, contents).unwrap();
    w.into_inner()
}

pub(super) fn path(name: &str, seed: u8) -> StorePath {
    StorePath::from_parts([seed; 20], name).unwrap()
}

pub(super) fn info(p: &StorePath, nar: &[u8], refs: &[&StorePath]) -> ValidPathInfo {
    ValidPathInfo {
        path: p.clone(),
        info: build_trace::PathInfo {
            nar_hash: NarHash::of(nar),
            nar_size: nar.len() as u64,
            references: refs.iter().map(|r| (*r).clone()).collect(),
            ca: None,
        },
        deriver: None,
        registration_time: 0,
        ultimate: false,
        sigs: BTreeSet::from(["somekey:bogus".to_string()]),
    }
}

/// An in-memory batch.
pub(super) struct Mem {
    items: Vec<(ValidPathInfo, Vec<u8>)>,
    cur: Option<std::io::Cursor<Vec<u8>>>,
}

impl Mem {
    pub(super) fn new(items: Vec<(ValidPathInfo, Vec<u8>)>) -> Self {
        let mut items = items;
        items.reverse();
        Mem { items, cur: None }
    }
}

impl UploadSource for Mem {
    fn next_path(&mut self) -> Result<Option<ValidPathInfo>, UploadError> {
        Ok(self.items.pop().map(|(i, nar)| {
            self.cur = Some(std::io::Cursor::new(nar));
            i
        }))
    }
    fn nar(&mut self) -> &mut dyn Read {
        self.cur.as_mut().unwrap()
    }
}

pub(super) fn open(dir: &std::path::Path, max: u64) -> ContentStore {
    ContentStore::open(dir, StoreConfig { max_bytes: max }).unwrap()
}

pub(super) fn files_in(dir: &std::path::Path, sub: &str) -> usize {
    fs::read_dir(dir.join(sub)).unwrap().count()
}

#[test]
fn upload_is_checked_then_served() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path(), 1 << 30);
    let a = path("a", 1);
    let nar = nar_of(b"hello");
    let got = s
        .add(&mut Mem::new(vec![(info(&a, &nar, &[]), nar.clone())]), RULES, Origin::Upload)
        .unwrap();
    assert_eq!(got, vec![a.clone()]);
    assert_eq!(
        s.query_valid(&BTreeSet::from([a.clone(), path("b", 2)]), false).unwrap(),
        BTreeSet::from([a.clone()])
    );
    let (i, mut f) = s.open_nar(&a).unwrap().unwrap();
    let mut back = Vec::new();
    f.read_to_end(&mut back).unwrap();
    assert_eq!(back, nar);
    assert_eq!(i.info.nar_size, nar.len() as u64);
    assert_eq!(i.sigs.len(), 1);
    // A second store instance (another session) sees it.
    let s2 = open(d.path(), 1 << 30);
    assert!(s2.path_info(&a).unwrap().is_some());
}

#[test]
fn bad_uploads_register_nothing() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path(), 1 << 30);
    let a = path("a", 1);
    let b = path("b", 2);
    let nar = nar_of(b"hello");
    let good_b = (info(&b, &nar, &[]), nar.clone());

    // Wrong NAR hash (the other path of the batch is fine: nothing of the batch is registered).
    let mut wrong = info(&a, &nar, &[]);
    wrong.info.nar_hash.0[0] ^= 1;
    let err = s
        .add(&mut Mem::new(vec![good_b.clone(), (wrong, nar.clone())]), RULES, Origin::Upload)
        .unwrap_err();
    let msg = build_trace::error_chain(&err);
    assert!(
        msg.contains("NAR hash mismatch") && msg.contains("nothing of this upload was registered"),
        "{msg}"
    );

    // Declared size larger than the NAR.
    let mut long = info(&a, &nar, &[]);
    long.info.nar_size += 8;
    let mut padded = nar.clone();
    padded.extend_from_slice(&[0; 8]);
    let err = s.add(&mut Mem::new(vec![(long, padded)]), RULES, Origin::Upload).unwrap_err();
    assert!(
        matches!(err, StoreError::Upload { ref problem, .. } if matches!(**problem, UploadProblem::BadNar { .. })),
        "{err:?}"
    );

    // Not a NAR at all.
    let junk = b"not a nar at all".to_vec();
    let err = s
        .add(&mut Mem::new(vec![(info(&a, &junk, &[]), junk)]), RULES, Origin::Upload)
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Upload { ref problem, .. } if matches!(**problem, UploadProblem::BadNar { .. })),
        "{err:?}"
    );

    // A reference that is nowhere.
    let err = s
        .add(
            &mut Mem::new(vec![(info(&a, &nar, &[&path("zzz", 9)]), nar.clone())]),
            RULES,
            Origin::Upload,
        )
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Upload { ref problem, .. } if matches!(**problem, UploadProblem::MissingReference { .. }))
    );

    assert!(s.query_valid(&BTreeSet::from([a.clone(), b.clone()]), false).unwrap().is_empty());
    assert_eq!(files_in(d.path(), "nar"), 0);
    assert_eq!(files_in(d.path(), "tmp"), 0);

    // References within the batch, in any order, are fine.
    let batch = vec![(info(&a, &nar, &[&b, &a]), nar.clone()), good_b];
    s.add(&mut Mem::new(batch), RULES, Origin::Upload).unwrap();
    let ia = s.path_info(&a).unwrap().unwrap();
    assert_eq!(ia.info.references, BTreeSet::from([a.clone(), b.clone()]), "self-reference kept");
}

#[test]
fn content_addresses_are_recomputed() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path(), 1 << 30);
    let nar = nar_of(b"content-addressed");
    let h = Hash::sha256(Sha256::digest(&nar).into());
    let p =
        make_fixed_output_path("ca", FileIngestionMethod::Recursive, &h, &BTreeSet::new(), false)
            .unwrap();
    let mut good = info(&p, &nar, &[]);
    good.info.ca = Some(format!("fixed:r:{h}"));
    // The same claim for different contents (a correct NAR hash of other bytes).
    let other = nar_of(b"something else");
    let mut lie = info(&p, &other, &[]);
    lie.info.ca = good.info.ca.clone();
    let err = s.add(&mut Mem::new(vec![(lie, other)]), RULES, Origin::Upload).unwrap_err();
    let msg = build_trace::error_chain(&err);
    assert!(msg.contains("claims content address") && msg.contains(&p.to_string()), "{msg}");
    // A claim that does not parse.
    let mut bad = good.clone();
    bad.info.ca = Some("fixed:nonsense".into());
    let err = s.add(&mut Mem::new(vec![(bad, nar.clone())]), RULES, Origin::Upload).unwrap_err();
    assert!(
        matches!(err, StoreError::Upload { ref problem, .. } if matches!(**problem, UploadProblem::BadContentAddress(_)))
    );
    // A right claim on the wrong path name.
    let mut wrong_path = good.clone();
    wrong_path.path = path("ca", 3);
    let err =
        s.add(&mut Mem::new(vec![(wrong_path, nar.clone())]), RULES, Origin::Upload).unwrap_err();
    assert!(
        matches!(err, StoreError::Upload { ref problem, .. } if matches!(**problem, UploadProblem::ContentAddress { .. }))
    );
    assert!(s.path_info(&p).unwrap().is_none());
    s.add(&mut Mem::new(vec![(good, nar)]), RULES, Origin::Upload).unwrap();
    assert!(s.path_info(&p).unwrap().unwrap().info.ca.is_some());
}

#[test]
fn eviction_keeps_pinned_and_referenced_paths() {
    let d = tempfile::tempdir().unwrap();
    let nar = nar_of(&[7u8; 1000]);
    let size = nar.len() as u64;
    let writer = open(d.path(), size * 3);
    let (a, b, c) = (path("a", 1), path("b", 2), path("c", 3));
    // b refers to a; c is independent.
    writer
        .add(
            &mut Mem::new(vec![
                (info(&a, &nar, &[]), nar.clone()),
                (info(&b, &nar, &[&a]), nar.clone()),
                (info(&c, &nar, &[]), nar.clone()),
            ]),
            RULES,
            Origin::Upload,
        )
        .unwrap();
    drop(writer); // its pins go with it

    // Another session pins c (a live pin in another store instance).
    let pinner = open(d.path(), size * 3);
    pinner.pin(&BTreeSet::from([c.clone()])).unwrap();

    // A pin held by a process that has died does not count.
    let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    let ghost = owner::ProcessId {
        boot_id: owner::ProcessId::current().boot_id,
        pid: child.id(),
        start_ticks: owner::start_ticks(child.id()).unwrap(),
    };
    {
        let conn = db::open(&d.path().join("index.sqlite")).unwrap();
        let id = db::add_owner(&conn, &ghost).unwrap();
        db::pin(&conn, id, &b).unwrap();
    }
    let s = open(d.path(), size * 3);
    // While the ghost lives, b is pinned: a (referenced by b) and b stay, c is pinned: full.
    let err = s.evict(size).unwrap_err();
    assert!(matches!(err, StoreError::Full { .. }), "{err:?}");
    child.kill().unwrap();
    child.wait().unwrap();
    // Now b can go, then a (no longer referenced); c stays.
    let ev = s.evict(size * 2).unwrap();
    assert_eq!(ev.paths, vec![b.to_string(), a.to_string()]);
    assert_eq!(
        s.query_valid(&BTreeSet::from([a, b, c.clone()]), false).unwrap(),
        BTreeSet::from([c.clone()])
    );
    assert_eq!(files_in(d.path(), "nar"), 1);
    // A new upload that does not fit next to the pinned c is refused, registering nothing.
    let big = nar_of(&[1u8; 2500]);
    let e = path("e", 5);
    let err =
        s.add(&mut Mem::new(vec![(info(&e, &big, &[]), big)]), RULES, Origin::Upload).unwrap_err();
    assert!(matches!(err, StoreError::Full { .. }), "{err:?}");
    assert!(s.path_info(&e).unwrap().is_none());
    drop(pinner);
    assert_eq!(files_in(d.path(), "tmp"), 0);
}

#[test]
fn crash_leftovers_are_cleaned_on_open() {
    let d = tempfile::tempdir().unwrap();
    drop(open(d.path(), 1 << 20));
    // A NAR renamed into place by a writer that died before its commit, and a half-received
    // upload of a dead process.
    fs::write(d.path().join("nar/aaaa-1-1-0.nar"), b"orphan").unwrap();
    fs::write(d.path().join("tmp/999999999-1-1-0"), b"half").unwrap();
    let live = d.path().join(format!("tmp/{}-1-7", owner::ProcessId::current().tag()));
    fs::write(&live, b"in progress").unwrap();
    let _s = open(d.path(), 1 << 20);
    assert_eq!(files_in(d.path(), "nar"), 0);
    assert!(!d.path().join("tmp/999999999-1-1-0").exists());
    assert!(live.exists(), "a live process's temporary file is left alone");
}

#[test]
fn concurrent_sessions_upload_the_same_paths() {
    let d = tempfile::tempdir().unwrap();
    let nars: Vec<(StorePath, Vec<u8>)> =
        (0..20u8).map(|i| (path(&format!("p{i}"), i + 1), nar_of(&[i; 5000]))).collect();
    std::thread::scope(|scope| {
        for t in 0..4 {
            let nars = &nars;
            let dir = d.path();
            scope.spawn(move || {
                let s = open(dir, 1 << 30);
                let mut items: Vec<_> =
                    nars.iter().map(|(p, n)| (info(p, n, &[]), n.clone())).collect();
                if t % 2 == 1 {
                    items.reverse();
                }
                s.add(&mut Mem::new(items), RULES, Origin::Upload).unwrap();
            });
        }
    });
    let s = open(d.path(), 1 << 30);
    let all: BTreeSet<_> = nars.iter().map(|(p, _)| p.clone()).collect();
    assert_eq!(s.query_valid(&all, false).unwrap(), all);
    assert_eq!(files_in(d.path(), "nar"), 20, "no duplicate NAR files");
    assert_eq!(s.used_bytes().unwrap(), nars.iter().map(|(_, n)| n.len() as u64).sum::<u64>());
}

#[test]
fn many_processes_opening_a_new_index_at_once_all_succeed() {
    // Nix starts one builder per derivation: their first opens race to switch the file to WAL.
    for round in 0..10 {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("index.sqlite");
        let start = std::sync::Barrier::new(8);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    start.wait();
                    db::open(&file).unwrap_or_else(|e| panic!("round {round}: {e}"));
                });
            }
        });
    }
}
