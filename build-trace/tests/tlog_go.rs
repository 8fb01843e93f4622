//! Interoperation: Go's `golang.org/x/mod/sumdb/tlog` and `sumdb/note` (Debian's
//! golang-golang-x-mod-dev 0.7.0, built offline with GO111MODULE=off from /usr/share/gocode)
//! check a log vouch wrote: the signed checkpoint (note.Open), every tile and entry bundle byte
//! for byte against Go's own tiles of the same entries, the tree hash, every leaf's inclusion
//! through Go's TileHashReader, vouch's inclusion and consistency proofs (CheckRecord,
//! CheckTree), and a witness's cosignature/v1. A log with one byte changed is refused.

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::prelude::{Engine, BASE64_STANDARD};
use build_trace::tlog::entry::LoggedOutput;
use build_trace::tlog::note::add_signatures;
use build_trace::tlog::proof::LogTrust;
use build_trace::tlog::{
    CosignerKey, DirTiles, LogEntry, LogKey, LogView, LogWriter, NoteVerifierKey,
};

/// The Go checker, built into `dir` (panics naming the packages when Go is missing).
fn build_checker(dir: &Path) -> PathBuf {
    let gocode = Path::new("/usr/share/gocode/src/golang.org/x/mod/sumdb/tlog");
    assert!(
        gocode.is_dir() && Command::new("go").arg("version").output().is_ok(),
        "Go and golang.org/x/mod are needed: apt-get install golang-go golang-golang-x-mod-dev \
         (scripts/setup-host.sh installs them)"
    );
    let bin = dir.join("tlogcheck");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/go/tlogcheck.go");
    let out = Command::new("go")
        .arg("build")
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .current_dir(dir)
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOFLAGS", "")
        .env("GOPROXY", "off")
        .env("GOCACHE", dir.join("gocache"))
        .output()
        .unwrap();
    assert!(out.status.success(), "go build: {}", String::from_utf8_lossy(&out.stderr));
    bin
}

fn entry(i: u32) -> LogEntry {
    let mut statement = [0u8; 32];
    statement[..4].copy_from_slice(&i.to_be_bytes());
    let out = LoggedOutput {
        path: nix_formats::StorePath::parse(&format!("/nix/store/{}-out-{i}", "q".repeat(32)))
            .unwrap(),
        nar_hash: build_trace::job::NarHash([(i % 251) as u8; 32]),
        nar_size: u64::from(i) * 1000,
    };
    LogEntry {
        drv: nix_formats::StorePath::parse(&format!("/nix/store/{}-step-{i}.drv", "p".repeat(32)))
            .unwrap(),
        statement,
        evidence: (i % 3 != 0).then_some([7; 32]),
        jws: Some([8; 32]),
        outputs: [("out".to_string(), out)].into(),
    }
}

fn hashes(p: &[build_trace::tlog::Hash]) -> String {
    p.iter().map(|h| h.to_string()).collect::<Vec<_>>().join(" ")
}

#[test]
fn go_sumdb_tlog_and_note_accept_our_log() {
    let t = tempfile::tempdir().unwrap();
    let bin = build_checker(t.path());
    let log = t.path().join("log");
    let key = LogKey::from_seed("interop.test/log", [11; 32]).unwrap();
    let w = LogWriter::open(&log, key.clone()).unwrap();
    let trust =
        LogTrust { logs: vec![NoteVerifierKey::parse(key.vkey()).unwrap()], ..Default::default() };
    let src = DirTiles::new(&log);
    // Several appends (full, partial and pruned tiles; a level-2 tile needs > 65536 leaves and
    // is left to the unit of the crate), keeping each checkpoint for consistency proofs.
    let mut old = Vec::new();
    let mut next = 0;
    for batch in [1u32, 2, 253, 300, 1, 600] {
        w.append(&(next..next + batch).map(entry).collect::<Vec<_>>()).unwrap();
        next += batch;
        old.push(LogView::open(&src, &trust).unwrap().checkpoint().clone());
    }
    let view = LogView::open(&src, &trust).unwrap();
    let size = view.checkpoint().size;
    let mut proofs = String::new();
    for i in (0..size).step_by(7).chain([size - 1]) {
        proofs.push_str(&format!("record {i} {}\n", hashes(&view.prove(i).unwrap())));
    }
    for cp in old.iter().filter(|c| c.size < size) {
        let p = view.prove_consistency(cp.size).unwrap();
        proofs.push_str(&format!("tree {} {} {}\n", cp.size, cp.root_hash(), hashes(&p)));
    }
    std::fs::write(t.path().join("proofs"), &proofs).unwrap();
    // A witness cosigns the final checkpoint.
    let wk = CosignerKey::from_seed("witness.test/w", [12; 32]).unwrap();
    let cp = view.checkpoint();
    let line = wk.cosign(cp.text().as_bytes(), 1_750_000_000);
    std::fs::write(log.join("checkpoint"), add_signatures(&cp.note, &line).unwrap()).unwrap();
    let raw = BASE64_STANDARD.decode(wk.vkey().rsplit('+').next().unwrap()).unwrap();
    let wpub = BASE64_STANDARD.encode(&raw[1..]);

    let check = |dir: &Path| {
        Command::new(&bin)
            .arg(dir)
            .arg(key.vkey())
            .arg("witness.test/w")
            .arg(&wpub)
            .arg(t.path().join("proofs"))
            .output()
            .unwrap()
    };
    let out = check(&log);
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("ok: 1157 leaves") && text.contains("cosigned by witness.test/w"),
        "{text}"
    );

    // One byte of one entry changed: Go refuses the log.
    let bad = t.path().join("bad");
    assert!(Command::new("cp").arg("-a").arg(&log).arg(&bad).status().unwrap().success());
    let bundle = bad.join("tile/entries/002");
    let mut b = std::fs::read(&bundle).unwrap();
    b[40] ^= 1;
    std::fs::write(&bundle, b).unwrap();
    let out = check(&bad);
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tlogcheck:"), "{out:?}");
}
