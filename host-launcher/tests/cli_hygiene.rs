//! CLI hygiene, run as the built `vouch`: a closed stdout ends a command quietly with the
//! documented code, one exit-code scheme (0 ok, 1 rejected, 2 usage or bad input), `--help`
//! naming the default state directory, and `--json` forms whose fields are structured values.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use build_trace::store::TraceStore;
use nix_formats::StorePath;
use sha2::{Digest, Sha256};
use test_support::snp::testdata;

use test_support::nix::text;

fn vouch(args: &[&str], state: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vouch"))
        .args(args)
        .env("VOUCH_STATE_DIR", state)
        .output()
        .expect("run vouch")
}

#[test]
fn a_closed_stdout_ends_quietly_with_141() {
    let report = testdata().join("virtee-sev/report_milan.bin");
    let report = report.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // A pipe whose reader is gone before vouch writes: every write fails with EPIPE.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_vouch"))
        .args(["evidence", "show", report])
        .env("VOUCH_STATE_DIR", tmp.path())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(stderr.is_empty(), "not quiet: {stderr}");
    // The same command with a reader succeeds.
    let ok = vouch(&["evidence", "show", report], tmp.path());
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
}

#[test]
fn usage_errors_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    for args in [&["verify"][..], &["no-such-command"], &["trace", "show", "--nope", "x"]] {
        let out = vouch(args, tmp.path());
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
    }
    let out = vouch(&["trace", "show", "--traces", "/nonexistent", "x"], tmp.path());
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("/nonexistent"), "{}", text(&out));
}

#[test]
fn help_names_the_default_state_directory() {
    let data = tempfile::tempdir().unwrap();
    for args in [&["--help"][..], &["verify", "--help"], &["trace", "show", "--help"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_vouch"))
            .args(args)
            .env_remove("VOUCH_STATE_DIR")
            .env("XDG_DATA_HOME", data.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0));
        let want = format!("[default: {}/vouch", data.path().display());
        assert!(text(&out).contains(&want), "{args:?}: {}", text(&out));
    }
}

#[test]
fn trace_show_rejects_a_malformed_statement() {
    let tmp = tempfile::tempdir().unwrap();
    let traces = tmp.path().join("traces");
    std::fs::create_dir_all(&traces).unwrap();
    std::fs::write(traces.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
    let drv = StorePath::parse("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-x.drv").unwrap();
    let entry = TraceStore::open(&traces).unwrap().step_dir(&drv).join("0".repeat(32));
    std::fs::create_dir_all(&entry).unwrap();
    std::fs::write(entry.join("statement.json"), "{\"not\": \"a statement\"}").unwrap();
    let t = traces.to_str().unwrap();
    let d = drv.to_string();
    let out = vouch(&["trace", "show", "--traces", t, &d], tmp.path());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("malformed"), "{}", text(&out));
    // `--json` keeps stdout one JSON document (the problem goes to stderr).
    let out = vouch(&["trace", "show", "--json", "--traces", t, &d], tmp.path());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, serde_json::json!([]));
    // No trace at all: also 1.
    let other = "/nix/store/1123456789abcdfghijklmnpqrsvwxyz-y.drv";
    let out = vouch(&["trace", "show", "--traces", t, other], tmp.path());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

#[test]
fn doctor_json_is_structured() {
    let tmp = tempfile::tempdir().unwrap();
    let out = vouch(&["doctor", "--json", "--image", tmp.path().to_str().unwrap()], tmp.path());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert!(["snp", "kvm", "tcg"].contains(&v["mode"].as_str().unwrap()), "{v}");
    assert!(["sev-snp", "simulated"].contains(&v["evidence"].as_str().unwrap()), "{v}");
    assert!(v["mode_refused"].is_boolean() && v["can_build"].is_boolean(), "{v}");
    // No image in an empty directory: builds cannot run, exit 1.
    assert_eq!(v["can_build"], false, "{v}");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    for c in v["checks"].as_array().unwrap() {
        assert!(["ok", "warn", "fail"].contains(&c["status"].as_str().unwrap()), "{c}");
        assert!(c["name"].is_string() && c["detail"].is_string(), "{c}");
    }
}

#[test]
fn image_show_json_is_the_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let digest = |name: &str, bytes: &[u8]| {
        std::fs::write(dir.join(name), bytes).unwrap();
        serde_json::json!({ "file": name, "sha256": hex::encode(Sha256::digest(bytes)), "size": bytes.len() })
    };
    let manifest = serde_json::json!({
        "format": vm_image::image::MANIFEST_FORMAT,
        "agent_version": "vouch-agent 0.1.0",
        "agent_sha256": "00".repeat(32),
        "kernel_key": { "source": "test", "gcc": "gcc", "ld": "ld", "fragment_sha256": "11".repeat(32), "build_path": "/b" },
        "vmlinux": digest("vmlinux", b"pvh kernel"),
        "bzimage": digest("bzImage", b"efi kernel"),
        "initrd": digest("initrd.cpio", b"initramfs"),
        "cmdline": "console=ttyS0",
        "cmdline_sha256": hex::encode(Sha256::digest(b"console=ttyS0")),
        "simulated_measurement": "22".repeat(48),
        "snp": null,
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    let d = dir.to_str().unwrap();
    let out = vouch(&["image", "show", "--json", "--image", d], dir);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["manifest"], manifest);
    assert_eq!(v["image"], d);
    assert_eq!(v["files_match"], true);
    // A file that does not match its manifest: bad input, 2.
    std::fs::write(dir.join("initrd.cpio"), b"changed").unwrap();
    let out = vouch(&["image", "show", "--json", "--image", d], dir);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("initrd.cpio"), "{}", text(&out));
}
