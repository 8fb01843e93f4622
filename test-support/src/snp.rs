//! The real AMD SEV-SNP test vectors (reports, certificates, OVMF images), read-only: the copy
//! in this crate's `data/snp/`, whose README gives each file's source repository, commit, licence
//! and what it is.
//!
//! The directory is found from this crate's own manifest directory, never from the calling
//! crate's or the environment, so every test of every crate reads the one copy inside the
//! repository.
//!
//! What is not here: what the vectors mean or which policy each passes (the tests that use them
//! say so next to their assertions).

use std::path::PathBuf;

/// `test-support/data/snp`; panics naming it if its README is missing (a broken checkout).
pub fn testdata() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/snp");
    assert!(
        dir.join("README.md").is_file(),
        "real SNP test vectors not found at {} (they are part of the repository)",
        dir.display()
    );
    dir
}

/// The bytes of a test-vector file, by its path below [`testdata`].
pub fn read(rel: &str) -> Vec<u8> {
    let path = testdata().join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
