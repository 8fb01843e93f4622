//! The repository's tests are self-contained: a fresh clone, with nothing beside it, runs them.
//!
//! Two checks over every file of the repository (what `git ls-files` lists; in a copy without
//! `.git`, every file but cargo target directories):
//! - no file names a directory beside the checkout or the machine this was written on (the AMD
//!   vectors used to be read from a `shared/` directory next to it; they are in
//!   `test-support/data/snp/` now);
//! - no `#[path = "…"]` reaches into another crate: shared test code is the `test-support`
//!   crate, used as a dependency, so a crate's tests build from that crate and its dependencies.
//!
//! `scripts/check-self-contained.sh` (run by `scripts/test-all.sh`) is the other half: it runs
//! the tests that read test data in a fresh clone with no `shared/` beside it, which also catches
//! what a text search cannot (a path assembled at run time, a file left out of the commit).

use std::path::{Component, Path, PathBuf};

fn repo_root() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    dir.parent().expect("test-support sits in the repository root").to_path_buf()
}

/// Every file of the checkout, except in `.git` and in cargo target directories (those that
/// hold a `CACHEDIR.TAG`, as cargo writes one).
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for e in entries {
        let e = e.unwrap();
        let path = e.path();
        let kind = e.file_type().unwrap();
        if e.file_name() == ".git" {
            // git's own (a directory, or in a worktree a file naming one).
        } else if kind.is_dir() {
            if !path.join("CACHEDIR.TAG").exists() {
                files(&path, out);
            }
        } else if kind.is_file() {
            out.push(path);
        }
    }
}

/// The files a clone has: in a git checkout the tracked ones (with uncommitted edits, as on
/// disk; whatever a CI runner or a test leaves in the work tree is no part of the repository),
/// in a copy without `.git` (scripts/check-self-contained.sh) every file of it.
fn all_files() -> Vec<PathBuf> {
    let root = repo_root();
    let tracked = std::process::Command::new("git")
        .args(["ls-files", "-z", "--cached"])
        .current_dir(&root)
        .output()
        .ok()
        .filter(|o| o.status.success() && root.join(".git").exists());
    let mut out = Vec::new();
    match tracked {
        Some(o) => out.extend(
            o.stdout
                .split(|b| *b == 0)
                .filter(|p| !p.is_empty())
                .map(|p| root.join(String::from_utf8_lossy(p).as_ref()))
                .filter(|p| p.is_file()),
        ),
        None => files(&root, &mut out),
    }
    assert!(out.len() > 100, "only {} files found under {}", out.len(), repo_root().display());
    out
}

/// What no file but this one may contain.
const FORBIDDEN: &[&str] =
    &["../shared", "/shared/", "\"shared\"", "shared/testdata", "/work/", "VOUCH_SNP_TESTDATA"];

/// `(needle, line)` for every line of `text` containing a [`FORBIDDEN`] string.
fn offending_lines(text: &str) -> Vec<(&'static str, &str)> {
    text.lines()
        .flat_map(|line| FORBIDDEN.iter().filter(|n| line.contains(*n)).map(move |n| (*n, line)))
        .collect()
}

#[test]
fn no_file_refers_to_a_directory_beside_the_checkout() {
    let root = repo_root();
    let this = root.join(file!());
    assert!(this.is_file(), "{} is not this file", this.display());
    let mut found = Vec::new();
    for path in all_files().into_iter().filter(|p| *p != this) {
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let text = String::from_utf8_lossy(&bytes);
        for (n, line) in offending_lines(&text) {
            let rel = path.strip_prefix(&root).unwrap().display();
            found.push(format!("{rel}: `{n}` in: {}", line.trim()));
        }
    }
    assert!(
        found.is_empty(),
        "files refer to directories outside the repository (tests must read only what is in \
         it; the AMD vectors are test_support::snp):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_guard_sees_what_it_looks_for() {
    let bad = [
        r#"let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/snp");"#,
        r#"let d = root.join("..").join("shared");"#,
        r#"std::fs::read("/work/shared/x")"#,
        r#"let d = Path::new("/data/shared/snp");"#,
    ];
    for line in bad {
        assert!(!offending_lines(line).is_empty(), "not caught: {line}");
    }
    assert!(offending_lines("one chain shared by every step").is_empty());
}

/// The crate directory holding `path`: its nearest ancestor with a `Cargo.toml`.
fn crate_of(path: &Path) -> PathBuf {
    path.ancestors()
        .skip(1)
        .find(|d| d.join("Cargo.toml").is_file())
        .unwrap_or_else(|| panic!("{} is in no crate", path.display()))
        .to_path_buf()
}

/// `path` with `.` and `..` resolved lexically (the file need not exist).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// The targets of the `#[path = "…"]` attributes in `text` (relative, as written).
fn path_attributes(text: &str) -> Vec<&str> {
    text.lines().filter_map(|l| l.trim().strip_prefix("#[path = \"")?.split('"').next()).collect()
}

#[test]
fn no_path_attribute_reaches_into_another_crate() {
    let root = repo_root();
    let mut found = Vec::new();
    for file in all_files().into_iter().filter(|p| p.extension().is_some_and(|e| e == "rs")) {
        let text = std::fs::read_to_string(&file).unwrap();
        for target in path_attributes(&text) {
            // Relative to the directory of the file that declares the module.
            let resolved = normalize(&file.parent().unwrap().join(target));
            if crate_of(&resolved) != crate_of(&file) {
                let rel = file.strip_prefix(&root).unwrap().display();
                found.push(format!("{rel}: #[path = \"{target}\"]"));
            }
        }
    }
    assert!(
        found.is_empty(),
        "modules included from another crate (use the test-support crate, or move the test to \
         the crate that owns the code):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_vectors_are_inside_the_repository() {
    let dir = test_support::snp::testdata().canonicalize().unwrap();
    assert!(dir.starts_with(repo_root().canonicalize().unwrap()), "{}", dir.display());
    // One file of each source, with its licence next to it.
    for f in [
        "virtee-sev/report_milan.bin",
        "go-sev-guest/attestation.bin",
        "trustee/test-report.bin",
        "microsoft-tav/turin_attestation_report.bin",
    ] {
        assert_eq!(test_support::snp::read(f).len(), 0x4a0, "{f}");
        let licence = dir.join(f).with_file_name("LICENSE");
        assert!(licence.is_file(), "{} is missing", licence.display());
    }
}
