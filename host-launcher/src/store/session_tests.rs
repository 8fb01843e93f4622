//! Session store tests: the trust rule for uploads, private overlays, and where build outputs
//! go. Real SQLite and files, several sessions over one shared store at once.

use std::collections::BTreeSet;
use std::io::Read;

use nix_formats::signing::SecretKey;
use nix_formats::store_path::{make_fixed_output_path, FileIngestionMethod};
use nix_formats::{Hash, StorePath};
use sha2::{Digest, Sha256};

use super::tests::{files_in, info, nar_of, open, path, Mem, RULES};
use super::*;

fn session(dir: &std::path::Path, trusted: bool, keys: &[&SecretKey]) -> SessionStore {
    let trust =
        ClientTrust { trusted, keys: keys.iter().map(|k| k.public_key()).collect::<Vec<_>>() };
    SessionStore::new(open(dir, 1 << 30), trust).unwrap()
}

/// A content-addressed (`fixed:r:sha256`) path of `nar`, referring to `refs`.
fn ca_item_with(name: &str, nar: &[u8], refs: &[&StorePath]) -> (ValidPathInfo, Vec<u8>) {
    let h = Hash::sha256(Sha256::digest(nar).into());
    let set = refs.iter().map(|r| (*r).clone()).collect();
    let p = make_fixed_output_path(name, FileIngestionMethod::Recursive, &h, &set, false).unwrap();
    let mut i = info(&p, nar, refs);
    i.info.ca = Some(format!("fixed:r:{h}"));
    (i, nar.to_vec())
}

fn ca_item(name: &str, nar: &[u8]) -> (ValidPathInfo, Vec<u8>) {
    ca_item_with(name, nar, &[])
}

/// `item` signed by `key` over its fingerprint.
fn signed(mut item: (ValidPathInfo, Vec<u8>), key: &SecretKey) -> (ValidPathInfo, Vec<u8>) {
    let i = &item.0;
    let fp = nix_formats::narinfo::fingerprint(
        &i.path,
        &Hash::sha256(i.info.nar_hash.0),
        i.info.nar_size,
        &i.info.references,
    );
    item.0.sigs.insert(key.sign(fp.as_bytes()).to_string());
    item
}

fn valid(s: &SessionStore, p: &StorePath) -> bool {
    s.view().query_valid(&BTreeSet::from([p.clone()]), false).unwrap().contains(p)
}

fn read_nar(s: &SessionStore, p: &StorePath) -> Vec<u8> {
    let (_, mut f) = s.view().open_nar(p).unwrap().unwrap();
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    v
}

#[test]
fn an_untrusted_session_shares_only_what_vouch_can_certify() {
    let d = tempfile::tempdir().unwrap();
    let key = SecretKey::from_seed("operator-1", [1; 32]);
    let stranger = SecretKey::from_seed("stranger-1", [2; 32]);
    let a = session(d.path(), false, &[&key]);
    let victim = path("dep", 1);
    let evil = nar_of(b"attacker's bytes");

    // Unsigned, no content address: refused by the rule, nothing of the batch registered.
    let ca = ca_item("source", &nar_of(b"a source"));
    let batch = vec![ca.clone(), (info(&victim, &evil, &[]), evil.clone())];
    let err = a.add(&mut Mem::new(batch), RULES).unwrap_err();
    let msg = build_trace::error_chain(&err);
    assert!(
        msg.contains(&victim.to_string())
            && msg
                .contains("neither a content address nor a signature by a key this builder trusts")
            && msg.contains("nothing of this upload was registered"),
        "{msg}"
    );
    assert!(!valid(&a, &victim) && !valid(&a, &ca.0.path));
    // Signed by a key the operator did not name: the same.
    let by_stranger = signed((info(&victim, &evil, &[]), evil.clone()), &stranger);
    assert!(a.add(&mut Mem::new(vec![by_stranger]), RULES).is_err());

    // Content-addressed, and signed by the operator's key: shared, every session sees them.
    let good = nar_of(b"the real dep");
    let by_key = signed((info(&victim, &good, &[]), good.clone()), &key);
    a.add(&mut Mem::new(vec![ca.clone(), by_key]), RULES).unwrap();
    let b = session(d.path(), false, &[]);
    assert!(valid(&b, &ca.0.path) && valid(&b, &victim));
    assert_eq!(read_nar(&b, &victim), good);
    assert!(!b.view().is_private(&victim));
}

#[test]
fn a_trusted_session_keeps_what_vouch_cannot_certify_to_itself() {
    let d = tempfile::tempdir().unwrap();
    let a = session(d.path(), true, &[]);
    let sessions = d.path().join("sessions");
    assert_eq!(files_in(d.path(), "sessions"), 1, "a trusted session has an overlay");
    let src = ca_item("source", &nar_of(b"a source"));
    let dep = path("dep", 1);
    let mine = nar_of(b"a's dep");
    // A content-addressed path goes to the shared store; the unsigned one, referring to it,
    // to a's overlay; a content-addressed path referring to the private one stays private too.
    let top = ca_item_with("top", &nar_of(b"top"), &[&dep]);
    let batch = vec![src.clone(), (info(&dep, &mine, &[&src.0.path]), mine.clone()), top.clone()];
    a.add(&mut Mem::new(batch), RULES).unwrap();
    assert!(valid(&a, &dep) && a.view().is_private(&dep) && !a.view().is_private(&src.0.path));
    assert!(a.view().is_private(&top.0.path), "it refers to a private path");
    let closure = a.view().closure(&BTreeSet::from([top.0.path.clone()])).unwrap();
    let want = BTreeSet::from([top.0.path.clone(), dep.clone(), src.0.path.clone()]);
    assert_eq!(closure.keys().cloned().collect::<BTreeSet<_>>(), want);

    // Another session (trusted or not) does not see a's dep, and may hold its own.
    let b = session(d.path(), true, &[]);
    assert!(!valid(&b, &dep) && valid(&b, &src.0.path));
    let theirs = nar_of(b"b's dep");
    b.add(&mut Mem::new(vec![(info(&dep, &theirs, &[]), theirs.clone())]), RULES).unwrap();
    assert_eq!((read_nar(&a, &dep), read_nar(&b, &dep)), (mine.clone(), theirs));
    let c = session(d.path(), false, &[]);
    assert!(!valid(&c, &dep));
    assert!(open(d.path(), 1 << 30).path_info(&dep).unwrap().is_none(), "not in the shared store");

    // Gone with the session.
    drop(a);
    drop(b);
    assert_eq!(std::fs::read_dir(&sessions).unwrap().count(), 0);
    assert!(!valid(&c, &dep));
}

#[test]
fn build_outputs_go_where_the_view_says() {
    let d = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = path("out", 5);
    let nar = nar_of(b"built");
    let file = dir.path().join("out.nar");
    std::fs::write(&file, &nar).unwrap();
    let outputs = || FileUploads::new(vec![(info(&out, &nar, &[]), file.clone())]);

    // Private outputs of a trusted session: in its overlay only.
    let a = session(d.path(), true, &[]);
    a.view().with_private_outputs(true).register_outputs(&mut outputs(), RULES).unwrap();
    assert!(a.view().is_private(&out));
    assert!(!valid(&session(d.path(), false, &[]), &out));
    // Private outputs without an overlay are refused; shared ones are for everyone.
    let b = session(d.path(), false, &[]);
    let err = b.view().with_private_outputs(true).register_outputs(&mut outputs(), RULES);
    assert!(matches!(err, Err(StoreError::Upload { .. })), "{err:?}");
    b.view().register_outputs(&mut outputs(), RULES).unwrap();
    assert!(valid(&session(d.path(), false, &[]), &out));
}

#[test]
fn a_dead_sessions_overlay_is_removed_on_open() {
    let d = tempfile::tempdir().unwrap();
    drop(open(d.path(), 1 << 20));
    let dead = d.path().join("sessions/999999999-1-1-0");
    std::fs::create_dir_all(&dead).unwrap();
    std::fs::write(dead.join("x.nar"), b"left by a crash").unwrap();
    let _s = open(d.path(), 1 << 20);
    assert!(!dead.exists());
}
