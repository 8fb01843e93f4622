//! The database reader against `nix path-info` on the same real store paths (real Nix, real
//! SQLite).

use std::collections::BTreeSet;
use std::process::Command;

use nix_formats::StorePath;

use super::*;
use crate::build::nix_store::{LocalNixStore, NIX_CONFIG};

fn nix(args: &[&str]) -> String {
    let out =
        Command::new(args[0]).args(&args[1..]).env("NIX_CONFIG", NIX_CONFIG).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A fresh text path that references a source path added with it (both registered by Nix),
/// and that source path.
fn fresh_paths() -> (StorePath, StorePath) {
    let t = tempfile::tempdir().unwrap();
    let nonce = format!("{}-{:?}", std::process::id(), std::time::Instant::now());
    let src = t.path().join("src");
    std::fs::write(&src, format!("nix_db test {nonce}\n")).unwrap();
    let added = nix(&["nix-store", "--add", src.to_str().unwrap()]);
    let expr =
        format!("builtins.toFile \"nix-db-test\" \"uses ${{builtins.storePath \"{added}\"}}\"");
    let text = nix(&["nix-instantiate", "--eval", "--read-write-mode", "-E", &expr]);
    (StorePath::parse(text.trim_matches('"')).unwrap(), StorePath::parse(&added).unwrap())
}

#[test]
fn the_database_says_what_nix_path_info_says() {
    let (text, src) = fresh_paths();
    let mut db = NixDb::open().expect("the local Nix database is readable here");
    let roots: BTreeSet<StorePath> = [text.clone()].into();
    for recursive in [false, true] {
        let ours = db.query(&roots, recursive).unwrap();
        let nix = LocalNixStore.query_process(&roots, recursive).unwrap();
        assert_eq!(ours, nix, "recursive: {recursive}");
    }
    let closure = db.query(&roots, true).unwrap();
    assert_eq!(closure.len(), 2, "{closure:?}");
    assert!(closure[&text].references.contains(&src), "{closure:?}");
    assert!(closure[&text].ca.as_deref().is_some_and(|c| c.starts_with("text:sha256:")));
    assert!(closure[&src].ca.as_deref().is_some_and(|c| c.starts_with("fixed:r:sha256:")));
    // What `vouch build` calls goes through the database and agrees too.
    assert_eq!(LocalNixStore.query(&roots, true).unwrap(), closure);
}

#[test]
fn a_path_that_is_not_valid_is_named() {
    let missing =
        StorePath::parse("/nix/store/00000000000000000000000000000000-not-there").unwrap();
    let mut db = NixDb::open().expect("the local Nix database is readable here");
    let e = db.query(&[missing.clone()].into(), true).unwrap_err();
    assert!(matches!(&e, NixDbError::NotValid(p) if *p == missing), "{e}");
    let e = LocalNixStore.query(&[missing].into(), false).unwrap_err();
    assert!(e.0.contains("is not valid in the local Nix store"), "{}", e.0);
}

#[test]
fn an_unreadable_database_is_no_database() {
    let t = tempfile::tempdir().unwrap();
    assert!(NixDb::open_file(t.path().join("absent.sqlite")).is_none());
    let garbage = t.path().join("garbage.sqlite");
    std::fs::write(&garbage, b"this is not an SQLite database, not even its header").unwrap();
    assert!(NixDb::open_file(garbage).is_none());
}
