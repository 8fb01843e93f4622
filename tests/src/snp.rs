//! The real AMD SEV-SNP test vectors (reports, certificates, OVMF images) in
//! `shared/testdata/snp`, read-only, with their README.
//!
//! What is not here: what the vectors mean or which policy each passes (the tests that use them
//! say so next to their assertions).

use std::path::PathBuf;

/// `$VOUCH_SNP_TESTDATA`, else `<workspace>/../shared/testdata/snp`; panics with both names if
/// the vectors are not there.
pub fn testdata() -> PathBuf {
    let dir = std::env::var_os("VOUCH_SNP_TESTDATA").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/snp")
    });
    assert!(
        dir.join("README.md").is_file(),
        "real SNP test vectors not found at {} (set VOUCH_SNP_TESTDATA)",
        dir.display()
    );
    dir
}

/// The bytes of a test-vector file, by its path below [`testdata`].
pub fn read(rel: &str) -> Vec<u8> {
    let path = testdata().join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
