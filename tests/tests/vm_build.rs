//! `vouch build` in real VMs (KVM where usable, else TCG), against a real Nix 2.8.
//!
//! Each test boots its own VM through the real `vouch` binary, with its own state directory
//! and binary cache. Data is kept tiny: in-guest SHA-256 runs at ~15 MiB/s under TCG.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use test_support::vm::{ca_nix, image_dir, nix, nonce, vouch_bin, Scratch};

fn json_of(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "vouch build failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("vouch build --json prints JSON")
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A floating-CA derivation with a self-reference and a reference to an input, built in a VM:
/// the output path equals what `nix-build` produces for the same derivation, the statement's
/// NAR hash equals `nix-store -q --hash` of Nix's own build, and the references match.
#[test]
fn ca_derivation_matches_nix() {
    let s = Scratch::new();
    let n = nonce();
    let file = s.write("ca.nix", &ca_nix(&n));
    let drv = s.instantiate(&file, "top");

    let out = s.vouch_build(&drv, &["--json"]);
    let v = json_of(&out);
    assert!(
        stderr(&out).contains("SIMULATED") || v["evidence"] == "sev-snp",
        "evidence kind said plainly"
    );
    assert_eq!(v["simulated"], v["evidence"] == "simulated");
    let ours = &v["outputs"]["out"];
    let our_path = ours["path"].as_str().unwrap().to_owned();
    assert!(stderr(&out).contains("built"), "builder log streamed: {}", stderr(&out));

    // Nix's own build of the same derivation.
    let nb = nix(&["nix-build", "--no-out-link", &drv]);
    assert!(nb.status.success(), "nix-build failed: {}", String::from_utf8_lossy(&nb.stderr));
    let nix_path = String::from_utf8(nb.stdout).unwrap().trim().to_owned();
    assert_eq!(our_path, nix_path, "same content-addressed output path as Nix");
    let hash = nix(&["nix-store", "-q", "--hash", &nix_path]);
    assert_eq!(
        ours["nar_hash"].as_str().unwrap(),
        String::from_utf8(hash.stdout).unwrap().trim(),
        "NAR hash"
    );
    let size = nix(&["nix-store", "-q", "--size", &nix_path]);
    assert_eq!(
        ours["nar_size"].as_u64().unwrap().to_string(),
        String::from_utf8(size.stdout).unwrap().trim()
    );
    let refs = nix(&["nix-store", "-q", "--references", &nix_path]);
    let mut nix_refs: Vec<String> =
        String::from_utf8(refs.stdout).unwrap().lines().map(str::to_owned).collect();
    nix_refs.sort();
    let our_refs: Vec<String> = ours["references"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(our_refs, nix_refs);
    assert!(our_refs.contains(&our_path), "self-reference");
    assert!(
        our_refs.iter().any(|r| r.ends_with(&format!("data-{n}"))),
        "reference to the input: {our_refs:?}"
    );

    // The trace: canonical statement and evidence in the binary cache.
    let trace = std::path::PathBuf::from(v["trace"].as_str().unwrap());
    let statement =
        std::fs::read(trace.join("statement.json")).expect("statement.json in the trace");
    let st = build_trace::Statement::from_canonical_bytes(&statement).expect("canonical statement");
    assert_eq!(st.outputs["out"].path.to_string(), nix_path);
    assert_eq!(st.job.drv_path.to_string(), drv);
    assert!(trace.join("evidence.json").is_file());
    // When the launcher ran it, by its clock (the provenance's startedOn / finishedOn).
    let times: serde_json::Value =
        serde_json::from_slice(&std::fs::read(trace.join("times.json")).unwrap()).unwrap();
    let (started, finished) =
        (times["started_unix"].as_u64().unwrap(), times["finished_unix"].as_u64().unwrap());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(started <= finished && finished <= now && now - finished < 600, "{times}");
    let narinfo = s.cache().join(format!("{}.narinfo", &nix_path["/nix/store/".len()..][..32]));
    assert!(narinfo.is_file(), "narinfo written");
    // And the step is an entry of the cache's transparency log, signed by the state's log key.
    let vkey = std::fs::read_to_string(s.state().join("keys/log.note-vkey")).unwrap();
    let m = Command::new(vouch_bin())
        .arg("--state-dir")
        .arg(s.state().join("monitor"))
        .args(["log", "monitor", s.cache().to_str().unwrap(), "--log-key", vkey.trim()])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&m.stdout);
    assert!(m.status.success(), "{listed}{}", stderr(&m));
    assert!(listed.starts_with(&format!("entry 0 {drv} out={nix_path} ")), "{listed}");
}

/// `--import` registers the output and the realisation in the local Nix store.
#[test]
fn import_registers_output_and_realisation() {
    let s = Scratch::new();
    let file = s.write("ca.nix", &ca_nix(&nonce()));
    let drv = s.instantiate(&file, "reads");
    let link = s.dir.path().join("result");
    let link_s = link.to_str().unwrap().to_owned();
    let v = json_of(&s.vouch_build(&drv, &["--json", "--import", "--out-link", &link_s]));
    let path = v["outputs"]["out"]["path"].as_str().unwrap().to_owned();
    let info = nix(&["nix", "path-info", "--json", &path]);
    assert!(
        info.status.success(),
        "path valid in the local store: {}",
        String::from_utf8_lossy(&info.stderr)
    );
    let real = nix(&["nix", "realisation", "info", "--json", &drv]);
    let text = String::from_utf8_lossy(&real.stdout);
    assert!(
        text.contains(&path["/nix/store/".len()..]),
        "realisation registered: {text} {}",
        String::from_utf8_lossy(&real.stderr)
    );
    assert_eq!(std::fs::read_link(&link).unwrap().to_str().unwrap(), path);
}

fn expect_failure(s: &Scratch, drv: &str, args: &[&str], needle: &str) -> String {
    let out = s.vouch_build(drv, args);
    let err = stderr(&out);
    assert!(!out.status.success(), "vouch build should fail; stderr:\n{err}");
    assert!(err.contains(needle), "expected {needle:?} in:\n{err}");
    s.assert_nothing_registered();
    err
}

#[test]
fn builder_timeout_is_its_own_error() {
    let s = Scratch::new();
    let drv = s.instantiate(&s.write("ca.nix", &ca_nix(&nonce())), "timeout");
    let t = Instant::now();
    let err = expect_failure(&s, &drv, &["--timeout", "3"], "timed out after 3 seconds");
    assert!(err.contains("Timeout"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(120));
}

#[test]
fn huge_log_is_its_own_error() {
    let s = Scratch::new();
    let drv = s.instantiate(&s.write("ca.nix", &ca_nix(&nonce())), "loud");
    expect_failure(
        &s,
        &drv,
        &["--max-log-size", "200000"],
        "killed after writing more than 200000 bytes of log output",
    );
}

#[test]
fn failing_builder_is_its_own_error() {
    let s = Scratch::new();
    let drv = s.instantiate(&s.write("ca.nix", &ca_nix(&nonce())), "fails");
    let err = expect_failure(&s, &drv, &[], "failed with exit code 3");
    assert!(err.contains("about to fail"), "the log reached the user: {err}");
}

/// An input whose bytes changed after Nix registered it: the guest refuses its NAR.
#[test]
fn input_with_wrong_nar_hash_is_refused() {
    let s = Scratch::new();
    let file = s.write("ca.nix", &ca_nix(&nonce()));
    let drv = s.instantiate(&file, "reads");
    let data = nix(&["nix-instantiate", "--eval", "--json", file.to_str().unwrap(), "-A", "data"]);
    let data: String = serde_json::from_slice(&data.stdout).expect("data path");
    // Corrupt the registered store path (it was created for this test only), keeping its size:
    // same NAR size, different NAR hash.
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[0] ^= 0x20;
    let mut perms = std::fs::metadata(&data).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&data, perms).unwrap();
    std::fs::write(&data, bytes).unwrap();
    expect_failure(&s, &drv, &[], "NAR hash mismatch");
}

/// Killing QEMU mid-build: the launcher says so and registers nothing.
#[test]
fn killed_vm_registers_nothing() {
    let s = Scratch::new();
    let drv = s.instantiate(&s.write("ca.nix", &ca_nix(&nonce())), "slow");
    let mut child = Command::new(vouch_bin())
        .arg("--state-dir")
        .arg(s.state())
        .args(["build", &drv, "--cache"])
        .arg(s.cache())
        .env("VOUCH_IMAGE_DIR", image_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut qemu_pid = None;
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.split("QEMU pid ").nth(1) {
            qemu_pid = rest.trim_end_matches(')').parse::<i32>().ok();
        }
        seen.push(line.clone());
        if line.contains("started") {
            break;
        }
    }
    let pid = qemu_pid.unwrap_or_else(|| panic!("no QEMU pid in: {seen:?}"));
    let kill = Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(kill.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    let text = rest.join("\n");
    assert!(!status.success());
    assert!(text.contains("killed by signal 9"), "{text}");
    assert!(text.contains("nothing was registered"), "{text}");
    s.assert_nothing_registered();
}

/// A derivation that still depends on other derivations is refused before any VM starts, with
/// a pointer to the remote-builder path (where Nix resolves each step).
#[test]
fn unresolved_derivation_points_at_nix_builder() {
    let s = Scratch::new();
    let drv = s.instantiate(&s.write("ca.nix", &ca_nix(&nonce())), "chained");
    let out = s.vouch_build(&drv, &[]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("is not resolved"), "{err}");
    assert!(err.contains("vouch%20nix-builder"), "{err}");
    assert!(!err.contains("booting"), "no VM was started: {err}");
    s.assert_nothing_registered();
}

/// A floating-CA derivation with two outputs, one referring to the other and each to itself:
/// both output paths and NAR hashes equal Nix's own build.
#[test]
fn multi_output_ca_derivation_matches_nix() {
    let s = Scratch::new();
    let drv = s.instantiate(&s.write("ca.nix", &ca_nix(&nonce())), "multi");
    let v = json_of(&s.vouch_build(&drv, &["--json"]));
    let nb = nix(&["nix-build", "--no-out-link", &drv]);
    assert!(nb.status.success(), "nix-build failed: {}", String::from_utf8_lossy(&nb.stderr));
    let real = nix(&["nix", "realisation", "info", "--json", &drv]);
    let infos: serde_json::Value = serde_json::from_slice(&real.stdout).expect("realisation JSON");
    for out in ["out", "dev"] {
        let ours = &v["outputs"][out];
        let path = ours["path"].as_str().unwrap();
        let nix_path = infos
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"].as_str().unwrap().ends_with(&format!("!{out}")))
            .map(|r| format!("/nix/store/{}", r["outPath"].as_str().unwrap()))
            .expect("Nix realised the output");
        assert_eq!(path, nix_path, "output {out}");
        let hash = nix(&["nix-store", "-q", "--hash", path]);
        assert_eq!(
            ours["nar_hash"].as_str().unwrap(),
            String::from_utf8(hash.stdout).unwrap().trim()
        );
    }
    let dev_refs: Vec<&str> = v["outputs"]["dev"]["references"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert!(dev_refs.contains(&v["outputs"]["out"]["path"].as_str().unwrap()), "dev refers to out");
}

/// A VM killed before its agent accepted the job is an infrastructure failure: the step is
/// retried once in a fresh VM with a fresh job, and that attempt's result is the one published
/// (nothing of the abandoned job is kept). The derivation also writes a 64 KiB log burst and a
/// 320 KiB output: guest writes that large once stalled the userspace vsock backend for good
/// (`channel::proto::GUEST_MAX_WRITE`).
#[test]
fn vm_killed_at_boot_is_retried_in_a_fresh_vm() {
    let s = Scratch::new();
    let n = nonce();
    let file = s.write(
        "retried.nix",
        &format!(
            r#"let bb = builtins.path {{ path = ./bb; name = "busybox"; }}; in derivation {{
  name = "vm-retried"; system = builtins.currentSystem; builder = "${{bb}}/sh"; nonce = "{n}";
  __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
  args = [ "-c" "set -e; b=${{bb}}/busybox; $b head -c 65536 /dev/zero | $b tr '\\0' L > $TMPDIR/l; $b dd if=$TMPDIR/l bs=65536 count=1 2>/dev/null; echo; mkdir $out; $b dd if=/dev/urandom of=$out/blob bs=65536 count=5 2>/dev/null; echo $out > $out/self" ];
}}"#
        ),
    );
    let drv = s.instantiate(&file, "");
    let mut child = Command::new(vouch_bin())
        .arg("--state-dir")
        .arg(s.state())
        .args(["build", &drv, "--json", "--cache"])
        .arg(s.cache())
        .env("VOUCH_IMAGE_DIR", image_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if seen.iter().all(|l: &String| !l.contains("QEMU pid ")) {
            if let Some(rest) = line.split("QEMU pid ").nth(1) {
                let pid = rest.trim_end_matches(')');
                assert!(Command::new("kill").args(["-9", pid]).status().unwrap().success());
            }
        }
        seen.push(line);
    }
    let out = child.wait_with_output().unwrap();
    let text = seen.join("\n");
    assert!(out.status.success(), "the retry should succeed:\n{text}");
    assert_eq!(text.matches("QEMU pid ").count(), 2, "{text}");
    let retry = seen
        .iter()
        .find(|l| l.contains("retrying step in a fresh VM after: the VM was killed by signal 9"))
        .unwrap_or_else(|| panic!("no retry announced:\n{text}"));
    let abandoned = retry.split("(job ").nth(1).and_then(|r| r.split(' ').next()).unwrap();
    let job = retry.split("new job ").nth(1).unwrap().trim_end_matches(')');
    assert_ne!(abandoned, job);
    assert!(text.contains(&"L".repeat(65536)), "the 64 KiB log burst arrived whole");

    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    assert!(v["outputs"]["out"]["nar_size"].as_u64().unwrap() > 5 * 65536, "{v}");
    let trace = std::path::PathBuf::from(v["trace"].as_str().unwrap());
    let st = build_trace::Statement::from_canonical_bytes(
        &std::fs::read(trace.join("statement.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(st.job.job_id, job, "the statement is the retry's");
    // Nothing of the abandoned attempt anywhere: no staging, no mention in the cache.
    let tmp = s.state().join("tmp");
    assert!(!tmp.exists() || std::fs::read_dir(&tmp).unwrap().next().is_none(), "staging left");
    let grep = Command::new("grep").args(["-r", "-l", abandoned]).arg(s.cache()).output().unwrap();
    assert!(grep.stdout.is_empty(), "{}", String::from_utf8_lossy(&grep.stdout));
}
