//! The trace store writer and reader: layout, idempotence, refusal of a NAR that does not match
//! (nothing becomes visible), divergent builds kept side by side, concurrent writers, and laut's
//! signature index read the way laut's verifier reads it.
//! (Nix reading the store is tested on real Nix output in `tests/tests/closure.rs`.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use build_trace::job::{BasicDerivation, CaRule, DrvOutput, Job, Limits, NarHash, PathInfo};
use build_trace::statement::{Measurement, OutputInfo, Statement};
use build_trace::store::{StepRecord, StoreError, TraceSource, TraceStore};
use nix_formats::signing::SecretKey;
use nix_formats::StorePath;

const SRC: &str = "/nix/store/3mj0m6kd4p0w2yzkx1yvq5fgylrbshzc-busybox";
const OUT: &str = "/nix/store/fib9f3qwvznq3m047cv9kmy5lffsrny7-step";

fn sp(p: &str) -> StorePath {
    StorePath::parse(p).unwrap()
}

fn statement(job_id: &str, nar: &[u8]) -> Statement {
    let drv = BasicDerivation {
        name: "step".into(),
        outputs: BTreeMap::from([(
            "out".into(),
            DrvOutput { path: None, hash_algo: "r:sha256".into(), hash: String::new() },
        )]),
        input_srcs: BTreeSet::from([sp(SRC)]),
        system: "x86_64-linux".into(),
        builder: format!("{SRC}/sh"),
        args: vec!["-c".into(), "echo hi > $out".into()],
        env: BTreeMap::from([(
            "out".into(),
            "/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9".into(),
        )]),
    };
    let drv_path = drv.drv_path().unwrap();
    let closure = BTreeMap::from([(
        sp(SRC),
        PathInfo {
            nar_hash: NarHash([1; 32]),
            nar_size: 10,
            references: BTreeSet::new(),
            ca: None,
        },
    )]);
    let job = Job::new(
        job_id,
        drv_path,
        drv,
        closure,
        Limits::default(),
        CaRule::SelfRefPositions,
        false,
        BTreeSet::from(["out".to_string()]),
    );
    let out = OutputInfo {
        path: sp(OUT),
        nar_hash: NarHash::of(nar),
        nar_size: nar.len() as u64,
        references: BTreeSet::new(),
        ca: Some("fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s".into()),
    };
    let launch = build_trace::Launch::new(job.digest().unwrap(), 1, 2048, job.network);
    Statement::new(
        launch,
        job,
        BTreeMap::new(),
        BTreeMap::from([("out".to_string(), out)]),
        Measurement([7; 48]),
        "test",
    )
}

fn put(
    store: &TraceStore,
    st: &Statement,
    nar: &Path,
) -> Result<build_trace::store::PutResult, StoreError> {
    put_by(store, st, nar, &SecretKey::from_seed("store-test-1", [5; 32]))
}

fn put_by(
    store: &TraceStore,
    st: &Statement,
    nar: &Path,
    key: &SecretKey,
) -> Result<build_trace::store::PutResult, StoreError> {
    let rec = StepRecord {
        statement: st,
        evidence: None,
        evidence_kind: "none",
        nars: BTreeMap::from([("out".to_string(), nar.to_path_buf())]),
    };
    store.put_step(&rec, key)
}

/// A fresh store and two NAR files of one step's two divergent builds (`first`, `second`).
fn two_builds() -> (tempfile::TempDir, TraceStore, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let store = TraceStore::create(&dir.path().join("c")).unwrap();
    let (n1, n2) = (dir.path().join("1.nar"), dir.path().join("2.nar"));
    std::fs::write(&n1, b"first").unwrap();
    std::fs::write(&n2, b"second").unwrap();
    (dir, store, n1, n2)
}

fn files(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.insert(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    out
}

#[test]
fn writes_the_documented_layout_idempotently() {
    let dir = tempfile::tempdir().unwrap();
    let store = TraceStore::create(&dir.path().join("c")).unwrap();
    let nar = dir.path().join("out.nar");
    std::fs::write(&nar, b"nar bytes").unwrap();
    let st = statement("job-1", b"nar bytes");
    let first = put(&store, &st, &nar).unwrap();
    let layout = files(store.root());
    let second = put(&store, &st, &nar).unwrap();
    assert_eq!(first, second);
    assert_eq!(files(store.root()), layout, "writing twice changes nothing");
    assert!(first.diverged.is_empty());
    let drv_base = st.job.drv_path.base_name();
    let nar_file = format!("nar/{}.nar", nix_formats::base32::encode(&NarHash::of(b"nar bytes").0));
    for f in [
        "nix-cache-info".to_string(),
        "fib9f3qwvznq3m047cv9kmy5lffsrny7.narinfo".to_string(),
        nar_file.clone(),
        format!("build-trace-v2/{drv_base}/out.doi"),
        format!("vouch/v1/steps/{drv_base}/{}/statement.json", first.entry),
        format!("vouch/v1/by-output/fib9f3qwvznq3m047cv9kmy5lffsrny7/{drv_base}/{}", first.entry),
    ] {
        assert!(layout.contains(&f), "{f} missing from {layout:#?}");
    }
    assert!(layout
        .iter()
        .any(|f| f.starts_with("realisations/sha256:") && f.ends_with("!out.doi")));
    assert!(!layout.iter().any(|f| f.starts_with("vouch/v1/tmp/")), "no temporary files left");
    let narinfo =
        std::fs::read_to_string(store.root().join("fib9f3qwvznq3m047cv9kmy5lffsrny7.narinfo"))
            .unwrap();
    let info = nix_formats::narinfo::NarInfo::parse(&narinfo).unwrap();
    assert_eq!(info.url, nar_file);
    let key = SecretKey::from_seed("store-test-1", [5; 32]).public_key();
    assert_eq!(info.count_valid_signatures(&[key]).unwrap(), 1);
    // The records it returns are the ones it wrote: the same signatures, so a caller answers
    // its client with them instead of signing again.
    let returned = &first.records["out"];
    assert_eq!(returned.narinfo.sigs, info.sigs);
    let written =
        std::fs::read_to_string(store.root().join(format!("build-trace-v2/{drv_base}/out.doi")))
            .unwrap();
    assert_eq!(returned.build_trace.as_ref().unwrap().value_json(), written);
    let entries = store.entries(&st.job.drv_path).unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].parse_statement().unwrap(), st);
    assert_eq!(entries[0].jws.len(), 1);
    assert_eq!(store.entries_for_output(&sp(OUT)).unwrap(), entries);
}

/// A step published without cache entries (a build that read one client's private inputs):
/// its step entry and index are there and its records are signed, but no narinfo or
/// realisation tells the cache's clients, or a later resolution, about its outputs.
#[test]
fn a_step_only_publication_writes_no_cache_entries() {
    let dir = tempfile::tempdir().unwrap();
    let store = TraceStore::create(&dir.path().join("c")).unwrap();
    let nar = dir.path().join("out.nar");
    std::fs::write(&nar, b"nar bytes").unwrap();
    let st = statement("job-1", b"nar bytes");
    let rec = StepRecord {
        statement: &st,
        evidence: None,
        evidence_kind: "none",
        nars: BTreeMap::from([("out".to_string(), nar.clone())]),
    };
    let key = SecretKey::from_seed("store-test-1", [5; 32]);
    let only = store.put_step_as(&rec, &key, build_trace::store::Publication::StepOnly).unwrap();
    assert!(only.step_dir.join("statement.json").exists());
    assert!(!only.records["out"].narinfo.sigs.is_empty(), "the records are signed");
    let layout = files(store.root());
    assert!(!layout.iter().any(|f| f.ends_with(".narinfo") || f.ends_with(".doi")), "{layout:?}");
    assert_eq!(store.published_output(&st.job.drv_path, "out"), None);
    // Published with its cache entries afterwards, the same step gains them.
    put(&store, &st, &nar).unwrap();
    assert!(files(store.root()).iter().any(|f| f.ends_with(".narinfo")));
}

#[test]
fn a_nar_that_does_not_match_leaves_nothing_visible() {
    let dir = tempfile::tempdir().unwrap();
    let store = TraceStore::create(&dir.path().join("c")).unwrap();
    let before = files(store.root());
    let nar = dir.path().join("out.nar");
    std::fs::write(&nar, b"other bytes").unwrap();
    let err = put(&store, &statement("job-1", b"nar bytes"), &nar).unwrap_err();
    assert!(matches!(err, StoreError::Nar { .. }), "{err}");
    assert_eq!(files(store.root()), before);
}

#[test]
fn divergent_builds_sit_side_by_side_and_first_records_are_kept() {
    let (_dir, store, n1, n2) = two_builds();
    let s1 = statement("job-1", b"first");
    let s2 = statement("job-2", b"second");
    let r1 = put(&store, &s1, &n1).unwrap();
    let narinfo = store.root().join("fib9f3qwvznq3m047cv9kmy5lffsrny7.narinfo");
    let first_narinfo = std::fs::read(&narinfo).unwrap();
    let r2 = put(&store, &s2, &n2).unwrap();
    // Per output: this build's own NAR hash, the kept narinfo and the hash it names.
    let d = &r2.diverged["out"];
    assert_eq!(d.nar_hash, NarHash::of(b"second"), "the build's own hash");
    assert_eq!(d.published_nar_hash, Some(NarHash::of(b"first")), "the kept narinfo's");
    assert_eq!(d.kept, vec!["fib9f3qwvznq3m047cv9kmy5lffsrny7.narinfo".to_string()]);
    assert_eq!(std::fs::read(&narinfo).unwrap(), first_narinfo, "the narinfo stays the first");
    // The new trace is recorded, as divergent; the first is not.
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(r2.step_dir.join("divergent.json")).unwrap())
            .unwrap();
    assert_eq!(rec["outputs"]["out"]["nar_hash"], NarHash::of(b"second").to_string());
    assert_eq!(rec["outputs"]["out"]["published_nar_hash"], NarHash::of(b"first").to_string());
    assert!(!r1.step_dir.join("divergent.json").exists());
    assert_eq!(store.entries(&s1.job.drv_path).unwrap().len(), 2);
    assert_eq!(store.entries_for_output(&sp(OUT)).unwrap().len(), 2);
}

#[test]
fn concurrent_writers_of_one_step_agree() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("c");
    let nar = dir.path().join("out.nar");
    std::fs::write(&nar, b"nar bytes").unwrap();
    let st = statement("job-1", b"nar bytes");
    // Each writer signs with its own key: one entry, carrying every writer's JWS.
    let keys: Vec<SecretKey> =
        (0..4u8).map(|i| SecretKey::from_seed(&format!("writer{i}-1"), [i + 1; 32])).collect();
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = keys
            .iter()
            .map(|key| {
                let (root, st, nar) = (&root, &st, &nar);
                s.spawn(move || {
                    put_by(&TraceStore::create(root).unwrap(), st, nar, key).map(|r| r.entry)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        results.iter().all(|r| r.as_ref().ok() == results[0].as_ref().ok() && r.is_ok()),
        "{results:?}"
    );
    let entries = TraceStore::open(&root).unwrap().entries(&st.job.drv_path).unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].jws.len(), keys.len(), "no writer's signature is lost");
    let hash = st.job.drv_path.hash_part();
    let index = std::fs::read(root.join("traces").join(hash)).unwrap();
    for key in &keys {
        assert_eq!(laut_accepts(&index, hash, key).len(), 1, "{}", key.name());
    }
}

/// What laut's verifier does with `traces/<input hash>` (its `signature_verify` step), written
/// out independently of `build_trace::jws`: the kid's head must be the first 16 hex digits of
/// SHA-256 of the key's SPKI DER, the Ed25519 signature must verify strictly over
/// `header.payload`, `in.rdrv_aterm_ca` must be the input hash and `out.nix` an object whose
/// outputs carry a `path`. Returns (kid, output paths) of the signatures `key` made.
fn laut_accepts(index: &[u8], input_hash: &str, key: &SecretKey) -> Vec<(String, Vec<String>)> {
    use base64::Engine;
    use sha2::Digest;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let public: [u8; 32] = key.public_key().to_bytes();
    let mut spki = vec![0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
    spki.extend_from_slice(&public);
    let head = hex::encode(sha2::Sha256::digest(&spki))[..16].to_string();
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&public).unwrap();
    let body: serde_json::Value = serde_json::from_slice(index).unwrap();
    let mut accepted = Vec::new();
    for sig in body["signatures"].as_array().unwrap() {
        let parts: Vec<&str> = sig.as_str().unwrap().split('.').collect();
        let [h, p, s] = parts[..] else { panic!("not a compact JWS: {sig}") };
        let header: serde_json::Value = serde_json::from_slice(&b64.decode(h).unwrap()).unwrap();
        let kid = header["kid"].as_str().unwrap().to_string();
        if kid.split_once(':').map(|(_, t)| t) != Some(head.as_str()) {
            continue;
        }
        let sig = ed25519_dalek::Signature::from_slice(&b64.decode(s).unwrap()).unwrap();
        vk.verify_strict(format!("{h}.{p}").as_bytes(), &sig).expect("signature verifies");
        let payload: serde_json::Value = serde_json::from_slice(&b64.decode(p).unwrap()).unwrap();
        assert_eq!(payload["in"]["rdrv_aterm_ca"], input_hash);
        let outs = payload["out"]["nix"].as_object().expect("out.nix is an object");
        let paths = outs.values().map(|o| o["path"].as_str().unwrap().to_string()).collect();
        accepted.push((kid, paths));
    }
    accepted
}

#[test]
fn laut_index_lists_every_signature_of_the_step() {
    let (_dir, store, n1, n2) = two_builds();
    let (k1, k2) =
        (SecretKey::from_seed("store-test-1", [5; 32]), SecretKey::from_seed("other-1", [6; 32]));
    let s1 = statement("job-1", b"first");
    let hash = s1.job.drv_path.hash_part();
    let index = store.root().join("traces").join(hash);
    put_by(&store, &s1, &n1, &k1).unwrap();
    let one = std::fs::read(&index).unwrap();
    assert_eq!(laut_accepts(&one, hash, &k1).len(), 1);
    put_by(&store, &s1, &n1, &k1).unwrap();
    assert_eq!(std::fs::read(&index).unwrap(), one, "writing again changes nothing");
    // A second key signs the same entry; a divergent build is a second entry.
    put_by(&store, &s1, &n1, &k2).unwrap();
    put_by(&store, &statement("job-2", b"second"), &n2, &k1).unwrap();
    let all = std::fs::read(&index).unwrap();
    let by_k1 = laut_accepts(&all, hash, &k1);
    let by_k2 = laut_accepts(&all, hash, &k2);
    assert_eq!((by_k1.len(), by_k2.len()), (2, 1), "{}", String::from_utf8_lossy(&all));
    assert!(by_k1.iter().chain(&by_k2).all(|(_, paths)| paths == &[OUT.to_string()]));
    assert!(by_k2[0].0.starts_with("other-1:"));
    // Another step's hash finds nothing of these.
    assert!(laut_accepts(&all, hash, &SecretKey::from_seed("x-1", [9; 32])).is_empty());
    // A lost index (a store from before it existed) is rebuilt the same from the steps.
    std::fs::remove_dir_all(store.root().join("traces")).unwrap();
    std::fs::create_dir_all(store.root().join("vouch/v1/steps/not-a-step")).unwrap();
    assert_eq!(store.reindex_laut().unwrap(), 1);
    assert_eq!(std::fs::read(&index).unwrap(), all);
}

#[test]
fn concurrent_writers_of_different_builds_all_reach_the_laut_index() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("c");
    let jobs: Vec<_> = (0..8)
        .map(|i| {
            let nar = dir.path().join(format!("{i}.nar"));
            std::fs::write(&nar, format!("build {i}")).unwrap();
            (statement(&format!("job-{i}"), format!("build {i}").as_bytes()), nar)
        })
        .collect();
    std::thread::scope(|s| {
        for (st, nar) in &jobs {
            let root = &root;
            s.spawn(move || put(&TraceStore::create(root).unwrap(), st, nar).unwrap());
        }
    });
    let hash = jobs[0].0.job.drv_path.hash_part();
    let index = std::fs::read(root.join("traces").join(hash)).unwrap();
    let key = SecretKey::from_seed("store-test-1", [5; 32]);
    assert_eq!(laut_accepts(&index, hash, &key).len(), jobs.len());
}

#[test]
fn an_attached_log_gets_each_entry_once_and_the_verifier_sees_only_logged_entries() {
    use build_trace::tlog::proof::LogTrust;
    use build_trace::tlog::source::LoggedTraces;
    use build_trace::tlog::{DirTiles, LogKey, LogView, NoteVerifierKey};
    let dir = tempfile::tempdir().unwrap();
    let log_key = LogKey::from_seed("test.example/log", [8; 32]).unwrap();
    let trust = LogTrust {
        logs: vec![NoteVerifierKey::parse(log_key.vkey()).unwrap()],
        ..LogTrust::default()
    };
    let nar = dir.path().join("out.nar");
    std::fs::write(&nar, b"first").unwrap();
    // A step written before the store had a log, then the log attached and brought up to date.
    let root = dir.path().join("c");
    let st0 = statement("job-0", b"first");
    put(&TraceStore::create(&root).unwrap(), &st0, &nar).unwrap();
    let store = TraceStore::create(&root).unwrap().with_log(log_key.clone()).unwrap();
    assert_eq!(store.log_missing().unwrap(), 1);
    assert_eq!(store.log_missing().unwrap(), 0);
    // A new step is appended by put_step itself, once.
    let st1 = statement("job-1", b"first");
    let r = put(&store, &st1, &nar).unwrap();
    let logged = r.log.unwrap();
    assert_eq!((logged.index, logged.size, logged.appended), (1, 2, true));
    let again = put(&store, &st1, &nar).unwrap().log.unwrap();
    assert_eq!((again.index, again.size, again.appended), (1, 2, false));

    let src = DirTiles::new(&root.join("log"));
    let view = LogView::open(&src, &trust).unwrap();
    let logged = LoggedTraces::new(&store, view);
    let drv = &st1.job.drv_path;
    assert_eq!(logged.entries(drv).unwrap().len(), 2);
    assert!(logged.left_out().is_empty());
    // An entry the log does not have is left out, with the reason.
    let st2 = statement("job-2", b"first");
    put(&TraceStore::create(&root).unwrap(), &st2, &nar).unwrap();
    assert_eq!(logged.entries(drv).unwrap().len(), 2);
    let left = logged.left_out();
    assert!(
        left.len() == 1 && left[0].contains("not in log test.example/log at size 2"),
        "{left:?}"
    );
    assert!(logged.describe().contains("entries left out"), "{}", logged.describe());
}
