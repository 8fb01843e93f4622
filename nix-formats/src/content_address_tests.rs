//! Content-address parsing, printing and verification tests (real-Nix checks are in
//! `nix-formats/tests/nar_ca_real_nix.rs`).

use super::*;
use crate::nar::NarWriter;

#[test]
fn parse_and_print() {
    let h = HashAlgo::Sha256.digest(b"x");
    for (s, method) in [
        (
            format!("fixed:r:sha256:{}", h.to_nix32()),
            ContentAddressMethod::Fixed(FileIngestionMethod::Recursive),
        ),
        (
            format!("fixed:sha256:{}", h.to_nix32()),
            ContentAddressMethod::Fixed(FileIngestionMethod::Flat),
        ),
        (format!("text:sha256:{}", h.to_nix32()), ContentAddressMethod::Text),
    ] {
        let ca = ContentAddress::parse(&s).unwrap();
        assert_eq!(ca.method(), method);
        assert_eq!(ca.hash(), &h);
        assert_eq!(ca.to_string(), s);
    }
    // Base16 is accepted and printed back in nix32.
    let ca: ContentAddress = format!("fixed:r:sha256:{}", h.to_base16()).parse().unwrap();
    assert_eq!(ca.to_string(), format!("fixed:r:sha256:{}", h.to_nix32()));
    let sha1 = HashAlgo::Sha1.digest(b"x");
    assert_eq!(
        ContentAddress::parse(&format!("fixed:sha1:{}", sha1.to_nix32())).unwrap().hash(),
        &sha1
    );
}

#[test]
fn parse_errors() {
    use ContentAddressParseError as E;
    assert!(matches!(ContentAddress::parse("sha256:abc"), Err(E::UnknownPrefix(_))));
    assert!(matches!(ContentAddress::parse("nothing"), Err(E::UnknownPrefix(_))));
    assert!(matches!(ContentAddress::parse("fixed:git:sha1:abc"), Err(E::GitUnsupported(_))));
    assert!(matches!(ContentAddress::parse("fixed:r:sha256"), Err(E::MissingAlgo(_))));
    let sha1 = HashAlgo::Sha1.digest(b"x").to_nix32();
    assert!(matches!(
        ContentAddress::parse(&format!("text:sha1:{sha1}")),
        Err(E::TextNotSha256(_))
    ));
    assert!(matches!(ContentAddress::parse("fixed:r:sha256:tooshort"), Err(E::Hash { .. })));
    assert!(matches!(ContentAddress::parse("fixed:r:blake9:abc"), Err(E::Hash { .. })));
}

fn file_nar(exec: bool, c: &[u8]) -> Vec<u8> {
    let mut w = NarWriter::new(Vec::new()).unwrap();
    w.regular(exec, c).unwrap();
    w.into_inner()
}

#[test]
fn verify_checks_hash_path_and_kind() {
    let lim = NarLimits::default();
    let rule = SelfRefRule::ZeroAndPositions;
    let dep = StorePath::from_base_name("dc04vv14dak1c1r48qa0m23vr9jy8sm0-dep").unwrap();
    // A text object referring to `dep`.
    let contents = format!("uses {dep}");
    let ca = ContentAddress::Text { hash: HashAlgo::Sha256.digest(contents.as_bytes()) };
    let refs: BTreeSet<_> = [dep.clone()].into();
    let path = ca.store_path("t", &refs, false).unwrap();
    let nar = file_nar(false, contents.as_bytes());
    verify(&path, &ca, &refs, &nar[..], rule, &lim).unwrap();
    // Wrong references: the path does not match.
    assert!(matches!(
        verify(&path, &ca, &BTreeSet::new(), &nar[..], rule, &lim),
        Err(VerifyError::PathMismatch { .. })
    ));
    // Other contents: hash mismatch.
    let other = file_nar(false, b"other");
    assert!(matches!(
        verify(&path, &ca, &refs, &other[..], rule, &lim),
        Err(VerifyError::HashMismatch { .. })
    ));
    // Executable or directory: not a text object.
    assert!(matches!(
        verify(&path, &ca, &refs, &file_nar(true, contents.as_bytes())[..], rule, &lim),
        Err(VerifyError::NotARegularFile("text"))
    ));

    // A recursive object from a NAR (what `nix-store --add` / `builtins.path` make).
    let nar = file_nar(true, b"#!/bin/sh\n");
    let h = crate::nar::hash_nar(&nar[..]).unwrap();
    let ca = ContentAddress::Fixed {
        method: FileIngestionMethod::Recursive,
        hash: crate::hash::Hash::sha256(h.sha256),
    };
    let path = ca.store_path("script", &BTreeSet::new(), false).unwrap();
    verify(&path, &ca, &BTreeSet::new(), &nar[..], rule, &lim).unwrap();
    // Flat with references is impossible.
    let flat = ContentAddress::Fixed {
        method: FileIngestionMethod::Flat,
        hash: HashAlgo::Sha256.digest(b"x"),
    };
    assert!(matches!(flat.store_path("f", &refs, false), Err(StorePathError::RefsNotAllowed(_))));
}
