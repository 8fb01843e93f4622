//! `vouch verify`, `vouch trace show`, `vouch trace reindex` and `vouch provenance` (the built
//! binary) on a closure built by the real Debian Nix with simulated-evidence traces
//! ([`tests::fixture`]): exit codes 0/1/2, `--json`, the default policy rejecting simulated
//! evidence.

use std::path::Path;
use std::process::{Command, Output};

use test_support::nix::text;
use test_support::vm::vouch_bin;
use tests::fixture::Fixture;

/// Change the bytes of the store object at `p` (a file, or the first file in a directory).
fn substitute(p: &std::path::Path) {
    let mut file = p.to_path_buf();
    while file.is_dir() {
        let mut entries: Vec<_> =
            std::fs::read_dir(&file).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        file = entries.into_iter().find(|e| !e.is_symlink()).expect("a file in the output");
    }
    let mut perms = std::fs::metadata(&file).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&file, perms).unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.extend_from_slice(b"attacker\n");
    std::fs::write(&file, bytes).unwrap();
}

fn a_out_of(fx: &Fixture) -> String {
    fx.outs["a"].to_string()
}

fn vouch(args: &[&str]) -> Output {
    Command::new(vouch_bin()).args(args).output().unwrap()
}

#[test]
fn verify_trace_and_provenance_commands() {
    let sc = Scene::new();
    let Scene { traces, drv, out, .. } = &sc;
    let verify = |args: &[&str]| sc.verify(args);
    let ok = verify(&["--expect", out, drv]);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    assert!(text(&ok).contains("VERIFIED") && text(&ok).contains("SIMULATED"), "{}", text(&ok));

    paths_are_not_bytes(&sc);

    let json = verify(&["--json", drv]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["result"], "verified");
    assert_eq!(v["outputs"]["out"], out.as_str());

    the_default_policy_refuses_simulated_evidence(&sc);
    any_guest_and_jobs(&sc);

    let bad = vouch(&["verify", "--traces", traces, "not-a-drv"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    assert!(text(&bad).contains("neither a store path nor a symlink"), "{}", text(&bad));

    let show = vouch(&["trace", "show", "--traces", traces, out]);
    assert_eq!(show.status.code(), Some(0), "{}", text(&show));
    assert!(
        text(&show).contains("SIMULATED") && text(&show).contains(out.as_str()),
        "{}",
        text(&show)
    );

    provenance_needs_a_policy(&sc);
    reindex_rebuilds_lauts_index(&sc);
}

/// The fixture's closure (`c`) with its traces, a scratch directory, and the fixture's policy
/// (`p`); `drv` and `out` are `c`'s derivation and output.
struct Scene {
    fx: Fixture,
    dir: tempfile::TempDir,
    p: String,
    traces: String,
    drv_dir: String,
    drv: String,
    out: String,
}

impl Scene {
    fn new() -> Scene {
        let fx = Fixture::new(&["c"]);
        let dir = tempfile::tempdir().unwrap();
        let p = fx.write_sim_policy(dir.path()).display().to_string();
        let traces = fx.traces.display().to_string();
        let drv_dir = fx.store_dir.display().to_string();
        let drv = fx.drvs["c"].to_string();
        let out = fx.outs["c"].to_string();
        Scene { fx, dir, p, traces, drv_dir, drv, out }
    }

    /// `vouch verify` under the fixture's policy, with its traces and `.drv` files.
    fn verify(&self, args: &[&str]) -> Output {
        let mut all = vec![
            "verify",
            "--policy",
            &self.p,
            "--traces",
            &self.traces,
            "--drv-dir",
            &self.drv_dir,
        ];
        all.extend(args);
        vouch(&all)
    }
}

/// `--check-local` and `--check-cache`: other bytes under the right path are refused.
fn paths_are_not_bytes(sc: &Scene) {
    let Scene { fx, dir, traces, drv, .. } = sc;
    let verify = |args: &[&str]| sc.verify(args);
    // Paths are not bytes: the NAR hashes of the output in a store directory, and of what a
    // cache serves, must be the accepted ones.
    let store_dir = fx.store_dir.display().to_string();
    let local = verify(&["--check-local", "--store-dir", &store_dir, drv]);
    assert_eq!(local.status.code(), Some(0), "{}", text(&local));
    let cache = format!("file://{traces}");
    let served = verify(&["--check-cache", &cache, drv]);
    assert_eq!(served.status.code(), Some(0), "{}", text(&served));
    // The attack: other bytes under the right path, in a store and in a cache.
    let base = fx.outs["c"].base_name().to_string();
    let fake_store = dir.path().join("store");
    std::fs::create_dir(&fake_store).unwrap();
    let fake_out = fake_store.join(&base);
    let st = Command::new("cp").arg("-a").arg(fx.store_dir.join(&base)).arg(&fake_out).status();
    assert!(st.unwrap().success());
    substitute(&fake_out);
    let fs = fake_store.display().to_string();
    let swapped = verify(&["--check-local", "--store-dir", &fs, drv]);
    assert_eq!(swapped.status.code(), Some(1), "{}", text(&swapped));
    assert!(text(&swapped).contains("output bytes") && text(&swapped).contains("NAR hash"));
    let fake_cache = dir.path().join("cache");
    let st = Command::new("cp").arg("-a").arg(&fx.traces).arg(&fake_cache).status();
    assert!(st.unwrap().success());
    let info =
        std::fs::read_to_string(fake_cache.join(format!("{}.narinfo", fx.outs["c"].hash_part())))
            .unwrap();
    let url = info.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap().to_owned();
    let nar = fake_cache.join(&url);
    let mut bytes = std::fs::read(&nar).unwrap();
    let last = bytes.iter().rposition(|b| b.is_ascii_alphanumeric()).unwrap();
    bytes[last] ^= 0x01;
    std::fs::write(&nar, bytes).unwrap();
    let fc = format!("file://{}", fake_cache.display());
    let served = verify(&["--check-cache", &fc, drv]);
    assert_eq!(served.status.code(), Some(1), "{}", text(&served));
    assert!(text(&served).contains("NAR hash"), "{}", text(&served));
}

/// The default policy, from an image manifest, refuses simulated evidence; without any
/// manifest it refuses to run.
fn the_default_policy_refuses_simulated_evidence(sc: &Scene) {
    let Scene { fx, dir, traces, drv_dir, drv, .. } = sc;
    // The default policy pins the measurement of the manifest it is given (here the
    // fixture's own, as an SNP measurement): simulated evidence is still refused.
    let manifest = dir.path().join("manifest.json");
    let m = hex::encode(fx.measurement);
    std::fs::write(&manifest, format!(r#"{{"snp": {{"expected_measurement": "{m}"}}}}"#)).unwrap();
    let mf = manifest.display().to_string();
    let default =
        vouch(&["verify", "--image-manifest", &mf, "--traces", traces, "--drv-dir", drv_dir, drv]);
    assert_eq!(default.status.code(), Some(1), "{}", text(&default));
    assert!(
        text(&default).contains("NOT VERIFIED") && text(&default).contains("simulated root"),
        "{}",
        text(&default)
    );
    // Without any manifest (an empty default image directory) it refuses, naming the fix.
    let empty = tempfile::tempdir().unwrap();
    let none = Command::new(vouch_bin())
        .env("VOUCH_IMAGE_DIR", empty.path())
        .args(["verify", "--traces", traces, "--drv-dir", drv_dir, drv])
        .output()
        .unwrap();
    assert_eq!(none.status.code(), Some(2), "{}", text(&none));
    assert!(text(&none).contains("--image-manifest"), "{}", text(&none));
}

/// A policy that accepts any guest says so; `--jobs` changes no verdict.
fn any_guest_and_jobs(sc: &Scene) {
    let Scene { fx, dir, traces, drv_dir, drv, .. } = sc;
    let verify = |args: &[&str]| sc.verify(args);
    // A policy that accepts any guest says so on the first line of every result.
    let any = dir.path().join("any.toml");
    let mut any_policy = fx.policy(build_trace::trust::TrustModel::Leaf("builder:sim".into()));
    any_policy.builders.get_mut("sim").unwrap().evidence.measurements =
        Some(build_trace::evidence::Measurements::Any);
    std::fs::write(&any, any_policy.to_toml()).unwrap();
    let a = any.display().to_string();
    let a_out = a_out_of(fx);
    for args in [&[drv.as_str()][..], &["--expect", a_out.as_str(), drv.as_str()][..]] {
        let r = vouch(
            &[&["verify", "--policy", &a, "--traces", traces, "--drv-dir", drv_dir][..], args]
                .concat(),
        );
        let first =
            String::from_utf8_lossy(&r.stdout).lines().next().unwrap_or_default().to_owned();
        assert!(first.starts_with("ANY GUEST"), "{}", text(&r));
    }

    let wrong = verify(&["--expect", &a_out, drv]);
    assert_eq!(wrong.status.code(), Some(1), "{}", text(&wrong));

    // `--jobs`: the same verdicts, word for word, on one thread and on several.
    for args in [&["--json", drv][..], &["--expect", &a_out, drv][..]] {
        let one = verify(&[&["--jobs", "1"][..], args].concat());
        let four = verify(&[&["-j", "4"][..], args].concat());
        assert_eq!((one.status.code(), &one.stdout), (four.status.code(), &four.stdout));
    }
    let zero = verify(&["--jobs", "0", drv]);
    assert_eq!(zero.status.code(), Some(2), "{}", text(&zero));
}

/// `vouch provenance` exports only a trace that passes the policy (the default one, from the
/// manifest [`the_default_policy_refuses_simulated_evidence`] wrote, refuses it).
fn provenance_needs_a_policy(sc: &Scene) {
    let Scene { p, traces, out, dir, .. } = sc;
    let mf = dir.path().join("manifest.json").display().to_string();
    // Provenance exports a trace only after it passes a policy: the default one refuses the
    // simulated evidence, the fixture's exports it.
    let refused = vouch(&["provenance", "--image-manifest", &mf, "--traces", traces, out]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(text(&refused).contains("passes the trust policy"), "{}", text(&refused));
    let prov = vouch(&["provenance", "--policy", p, "--traces", traces, out]);
    assert_eq!(prov.status.code(), Some(0), "{}", text(&prov));
    let st: serde_json::Value = serde_json::from_slice(&prov.stdout).unwrap();
    assert_eq!(st["_type"], "https://in-toto.io/Statement/v1");
    assert_eq!(st["predicateType"], "https://slsa.dev/provenance/v1");
    assert_eq!(st["subject"][0]["name"], out.as_str());
    // The builder is the policy rule that accepted the step.
    assert_eq!(
        st["predicate"]["runDetails"]["builder"]["id"],
        "urn:vouch:builder:simulated:rule:sim"
    );
}

/// `vouch trace reindex` rebuilds laut's index exactly.
fn reindex_rebuilds_lauts_index(sc: &Scene) {
    let Scene { fx, traces, .. } = sc;
    // laut's index: `trace reindex` rebuilds exactly what writing the steps wrote.
    let index = fx.traces.join("traces");
    let written: Vec<_> = std::fs::read_dir(&index).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(!written.is_empty());
    let before: Vec<Vec<u8>> = written.iter().map(|p| std::fs::read(p).unwrap()).collect();
    std::fs::remove_dir_all(&index).unwrap();
    let re = vouch(&["trace", "reindex", "--traces", traces]);
    assert_eq!(re.status.code(), Some(0), "{}", text(&re));
    assert!(text(&re).contains(&format!("{} steps", written.len())), "{}", text(&re));
    let after: Vec<Vec<u8>> = written.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert_eq!(after, before);
}

/// Item "any argument": `verify`, `trace show` and `provenance` take an unresolved or resolved
/// `.drv`, an output path, `./result` or any symlink into the store; from an output, the
/// derivation comes from the local Nix database, else from the trace store's index; every
/// result names the derivation.
#[test]
fn every_command_takes_any_argument() {
    let fx = Fixture::new(&["c", "ia2"]);
    let dir = tempfile::tempdir().unwrap();
    let policy = fx.write_sim_policy(dir.path());
    let p = policy.display().to_string();
    let traces = fx.traces.display().to_string();
    let drv_dir = fx.store_dir.display().to_string();
    let chroot = fx.chroot.display().to_string();
    // A store where nothing is registered: outputs are found by the trace store's index.
    let empty = dir.path().join("empty-store");
    let empty = empty.display().to_string();
    let resolved = |attr: &str| {
        let u = &fx.drvs[attr];
        fx.steps.iter().find(|s| &s.udrv == u).unwrap().statement.job.drv_path.to_string()
    };
    for attr in ["c", "ia2"] {
        let udrv = fx.drvs[attr].to_string();
        let out = fx.outs[attr].to_string();
        // `result` as `nix-build --store` makes it (pointing at the logical store path), and a
        // link to that link.
        let result = dir.path().join(format!("result-{attr}"));
        std::os::unix::fs::symlink(&out, &result).unwrap();
        let link = dir.path().join(format!("link-{attr}"));
        std::os::unix::fs::symlink(format!("result-{attr}"), &link).unwrap();
        let inner = format!("{out}/data");
        let forms = [
            (udrv.clone(), "as given", chroot.as_str()),
            (resolved(attr), if attr == "c" { "Nix database" } else { "as given" }, &chroot),
            (out.clone(), "Nix database", &chroot),
            (out.clone(), "trace store", &empty),
            (result.display().to_string(), "Nix database", &chroot),
            (link.display().to_string(), "Nix database", &chroot),
            (inner, "Nix database", &chroot),
        ];
        for (arg, how, store) in &forms {
            let common = ["--traces", &traces, "--drv-dir", &drv_dir, "--nix-store", store];
            let v = vouch(&[&["verify", "--policy", &p][..], &common, &[arg]].concat());
            let t = text(&v);
            assert_eq!(v.status.code(), Some(0), "verify {arg}: {t}");
            assert!(t.contains(&format!("derivation {udrv}")) && t.contains(how), "{arg}: {t}");
            assert!(t.contains("VERIFIED"), "{arg}: {t}");
            let j = vouch(&[&["verify", "--json", "--policy", &p][..], &common, &[arg]].concat());
            let v: serde_json::Value = serde_json::from_slice(&j.stdout).unwrap();
            assert_eq!(v["derivation"], udrv.as_str(), "{arg}");
            assert_eq!(v["outputs"]["out"], out.as_str(), "{arg}");

            let show = vouch(&[&["trace", "show"][..], &common, &[arg]].concat());
            let t = text(&show);
            assert_eq!(show.status.code(), Some(0), "trace show {arg}: {t}");
            assert!(t.contains(&format!("derivation {udrv}")) && t.contains(&out), "{arg}: {t}");

            let prov = vouch(&[&["provenance", "--policy", &p][..], &common, &[arg]].concat());
            assert_eq!(prov.status.code(), Some(0), "provenance {arg}: {}", text(&prov));
            let st: serde_json::Value = serde_json::from_slice(&prov.stdout).unwrap();
            assert_eq!(st["subject"][0]["name"], out.as_str(), "{arg}");
        }
    }
    candidates_hints_and_bad_arguments(&fx, dir.path(), &p, &traces, &drv_dir, &empty);
}

/// Where only the trace store's index knows an output, the verifier tells which of two
/// same-named derivations built it; a derivation is only a hint (another's output expected is
/// not verified); an argument outside the store and an output nobody knows are usage errors.
fn candidates_hints_and_bad_arguments(
    fx: &Fixture,
    dir: &Path,
    p: &str,
    traces: &str,
    drv_dir: &str,
    empty: &str,
) {
    // Two same-named derivations, only one of which built the output: where only the trace
    // store's index knows the output, the verifier tells which one it is.
    let other = test_support::nix::stdout(
        Command::new("nix-instantiate")
            .arg("--store")
            .arg(&fx.chroot)
            .arg(fx.dir.path().join("fixture.nix"))
            .args(["-A", "c", "--argstr", "tag", "2"]),
    );
    let other = other.trim().to_owned();
    assert_ne!(other, fx.drvs["c"].to_string());
    let c_out = fx.outs["c"].to_string();
    let common = ["--policy", p, "--traces", traces, "--drv-dir", drv_dir];
    let o = vouch(&[&["verify"][..], &common, &["--nix-store", empty, &c_out]].concat());
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains(&format!("derivation {} (found in the trace", fx.drvs["c"])));
    let o = vouch(&[&["verify"][..], &common, &[&other]].concat());
    assert_eq!(o.status.code(), Some(1), "the other one does not verify: {}", text(&o));

    // The derivation found for an output is only a hint: verification expects the output. A
    // derivation given with another's output expected is not verified.
    let a_out = fx.outs["a"].to_string();
    let c = fx.drvs["c"].to_string();
    let v = vouch(&[
        "verify",
        "--policy",
        p,
        "--traces",
        traces,
        "--drv-dir",
        drv_dir,
        "--expect",
        &a_out,
        &c,
    ]);
    assert_eq!(v.status.code(), Some(1), "{}", text(&v));
    // Neither a store path nor a link into the store: a usage error naming it.
    let elsewhere = dir.join("elsewhere");
    std::os::unix::fs::symlink("/tmp", &elsewhere).unwrap();
    for cmd in [&["verify"][..], &["trace", "show"], &["provenance"]] {
        let e = elsewhere.display().to_string();
        let r = vouch(&[cmd, &["--traces", traces, &e]].concat());
        assert_eq!(r.status.code(), Some(2), "{}", text(&r));
        assert!(text(&r).contains("symlink into /nix/store"), "{}", text(&r));
    }
    // An output nobody knows: verify says so, naming the fix.
    let unknown = "/nix/store/00000000000000000000000000000000-unknown";
    let r = vouch(&["verify", "--traces", traces, "--nix-store", empty, unknown]);
    assert_eq!(r.status.code(), Some(2), "{}", text(&r));
    assert!(text(&r).contains("no derivation known"), "{}", text(&r));
}
