//! The one publish step: in host-launcher's sources, only `src/core/publish.rs` writes a step
//! into the trace store (`put_step`, `put_step_as`), loads the Nix signing key, or signs a step's records
//! (`step_records`, a JWS, any `.sign(`). Every front-end's build reaches it through the engine;
//! a second writer or signer anywhere else fails this test, naming the file and line.

use std::path::{Path, PathBuf};

/// The only file allowed to publish (relative to `src/`).
const PUBLISH_STEP: &str = "core/publish.rs";

/// What publishing or signing looks like in the source.
const FORBIDDEN: &[&str] = &[
    "put_step(",
    "put_step_as(",
    "step_records(",
    "load_or_generate_key(",
    "jws::sign(",
    ".sign(",
];

/// The forbidden calls in `text` (comments skipped), as `file:line: token`.
fn offences(file: &str, text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or_default();
        for token in FORBIDDEN {
            let mut from = 0;
            while let Some(i) = code[from..].find(token).map(|i| i + from) {
                // `unsigned_step_records(` makes no signature: only whole names count.
                let whole = token.starts_with('.')
                    || !code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_');
                if whole {
                    found.push(format!("{file}:{}: {token}", n + 1));
                }
                from = i + token.len();
            }
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn only_the_publish_step_writes_the_trace_store_or_signs_records() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 50, "the scan found the sources ({} files)", files.len());
    let mut found = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
        if rel.ends_with("tests.rs") {
            // Test modules (`#[cfg(test)]`, never shipped) may sign as a client does, e.g. an
            // upload signed by a key the operator trusts; they publish nothing.
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        let here = offences(&rel, &text);
        if rel == PUBLISH_STEP {
            // It must still be the step that does it, or this test guards nothing.
            for must in ["put_step_as(", "load_or_generate_key("] {
                assert!(here.iter().any(|o| o.ends_with(must)), "{PUBLISH_STEP} has no {must}");
            }
        } else {
            found.extend(here);
        }
    }
    assert!(
        found.is_empty(),
        "only src/{PUBLISH_STEP} may write steps into the trace store or sign their records; \
         found:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_scan_finds_what_it_forbids() {
    let code = "fn f() {\n    store.put_step(&r, &k)?; // publish\n    info.sign(&key);\n}\n";
    assert_eq!(offences("x.rs", code), ["x.rs:2: put_step(", "x.rs:3: .sign("]);
    assert!(offences("x.rs", "// store.put_step(&r, &k)\n").is_empty(), "comments are skipped");
    assert!(offences("x.rs", "let r = unsigned_step_records(st)?;\n").is_empty());
    assert_eq!(offences("x.rs", "sign::step_records(st, &key)\n"), ["x.rs:1: step_records("]);
}
