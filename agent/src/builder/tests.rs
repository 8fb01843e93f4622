//! Tests of the builder module: the environment and output paths Nix would give a builder
//! (placeholders, floating-CA fallback paths, structured attributes, `exportReferencesGraph`),
//! and running real `sh` builders unconfined: log streaming, exit status, and the timeout,
//! silence and log-size limits killing the builder and its background processes.
//!
//! What is not here: the confined sandbox (`crate::sandbox`), or builds inside a VM (`tests/`).

use super::*;
use build_trace::job::{DrvOutput, NarHash};

fn drv(env: &[(&str, &str)], outputs: &[(&str, &str)]) -> BasicDerivation {
    BasicDerivation {
        name: "hello".into(),
        outputs: outputs
            .iter()
            .map(|(n, p)| {
                let (path, algo) = match *p {
                    "" => (None, "r:sha256"),
                    p => (Some(StorePath::parse(p).unwrap()), ""),
                };
                (n.to_string(), DrvOutput { path, hash_algo: algo.into(), hash: String::new() })
            })
            .collect(),
        input_srcs: BTreeSet::new(),
        system: "x86_64-linux".into(),
        builder: "/nix/store/7jdhpwzjf5zjq2fq1gf5hmnb3m8qy0ms-busybox/sh".into(),
        args: vec!["-c".into(), format!("echo {} > $out", hash_placeholder("out"))],
        env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    }
}

const DRV: &str = "/nix/store/j8y7fpxpnf0s4ah5y4g5x4vbfhjqxvkm-hello.drv";

#[test]
fn placeholder_matches_nix() {
    // Verified against Nix 2.8 (see shared/docs/nix-protocol.md §4.2).
    assert_eq!(hash_placeholder("out"), "/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9");
}

#[test]
fn floating_ca_outputs_get_nix_fallback_paths() {
    let d = drv(&[("out", &hash_placeholder("out"))], &[("out", ""), ("dev", "")]);
    let (scratch, rewrites) = scratch_paths(&d, &StorePath::parse(DRV).unwrap()).unwrap();
    let expect = |out: &str, name: &str| {
        make_store_path(
            &format!("rewrite:j8y7fpxpnf0s4ah5y4g5x4vbfhjqxvkm-hello.drv:name:{out}"),
            &Hash::sha256([0; 32]),
            name,
        )
        .unwrap()
    };
    assert_eq!(scratch["out"], expect("out", "hello"));
    assert_eq!(scratch["dev"], expect("dev", "hello-dev"));
    assert_eq!(rewrites.len(), 2);
    assert!(rewrites.windows(2).all(|w| w[0] <= w[1]), "sorted like std::map");
}

#[test]
fn input_addressed_outputs_build_in_place() {
    let path = "/nix/store/fib9f3qwvznq3m047cv9kmy5lffsrny7-hello";
    let d = drv(&[("out", path)], &[("out", path)]);
    let (scratch, rewrites) = scratch_paths(&d, &StorePath::parse(DRV).unwrap()).unwrap();
    assert_eq!(scratch["out"].to_string(), path);
    assert_eq!(rewrites, [(hash_placeholder("out"), path.to_owned())]);
}

#[test]
fn environment_is_nixs() {
    let ph = hash_placeholder("out");
    let d = drv(
        &[
            ("out", &ph),
            ("name", "hello"),
            ("big", "x y"),
            ("passAsFile", "big"),
            ("ref", &format!("{ph}/bin")),
        ],
        &[("out", "")],
    );
    let (scratch, rewrites) = scratch_paths(&d, &StorePath::parse(DRV).unwrap()).unwrap();
    let p = prepare(&d, &rewrites, &BTreeMap::new(), false, 4, "/build").unwrap();
    let s = scratch["out"].to_string();
    let fname = format!(".attr-{}", nix_formats::base32::encode(&Sha256::digest(b"big")));
    let big_path = format!("/build/{fname}");
    let want: BTreeMap<String, String> = [
        ("HOME", "/homeless-shelter"),
        ("NIX_BUILD_CORES", "4"),
        ("NIX_BUILD_TOP", "/build"),
        ("NIX_LOG_FD", "2"),
        ("NIX_STORE", "/nix/store"),
        ("PATH", "/path-not-set"),
        ("PWD", "/build"),
        ("TEMP", "/build"),
        ("TEMPDIR", "/build"),
        ("TERM", "xterm-256color"),
        ("TMP", "/build"),
        ("TMPDIR", "/build"),
        ("bigPath", big_path.as_str()),
        ("name", "hello"),
        ("out", s.as_str()),
        ("passAsFile", "big"),
        ("ref", &format!("{s}/bin")),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(p.env, want);
    assert_eq!(p.files, vec![(fname, b"x y".to_vec())]);
    assert_eq!(p.argv0, "sh");
    assert_eq!(p.args, ["-c".to_string(), format!("echo {s} > $out")]);
    assert_eq!(p.program, d.builder, "the builder itself is never rewritten");
}

#[test]
fn fixed_output_flag() {
    let d = drv(&[], &[("out", "/nix/store/fib9f3qwvznq3m047cv9kmy5lffsrny7-hello")]);
    let p = prepare(&d, &[], &BTreeMap::new(), true, 1, "/build").unwrap();
    assert_eq!(p.env["NIX_OUTPUT_CHECKED"], "1");
}

#[test]
fn structured_attrs_files() {
    let ph = hash_placeholder("out");
    let json = r#"{"name":"hello","n":3,"b":true,"f":false,"z":null,"list":["a","b'c"],"m":{"k":"v"},"nested":[[1]],"bad-key":"x"}"#;
    let d = drv(&[("__json", json)], &[("out", "")]);
    let (scratch, rewrites) = scratch_paths(&d, &StorePath::parse(DRV).unwrap()).unwrap();
    let p = prepare(&d, &rewrites, &BTreeMap::new(), false, 1, "/build").unwrap();
    assert!(!p.env.contains_key("name"), "structured attrs are not passed in the environment");
    assert_eq!(p.env["NIX_ATTRS_JSON_FILE"], "/build/.attrs.json");
    let files: BTreeMap<_, _> = p.files.iter().cloned().collect();
    let sh = String::from_utf8(files[".attrs.sh"].clone()).unwrap();
    let s = scratch["out"].to_string();
    assert_eq!(
        sh,
        format!(
            "declare b=1\ndeclare f=\ndeclare -a list=('a' 'b'\\''c' )\ndeclare -A m=(['k']='v' )\n\
             declare n=3\ndeclare name='hello'\ndeclare -A outputs=(['out']='{s}' )\ndeclare z=''\n"
        )
    );
    let j: serde_json::Value = serde_json::from_slice(&files[".attrs.json"]).unwrap();
    assert_eq!(j["outputs"]["out"], s.as_str());
    assert!(!String::from_utf8_lossy(&files[".attrs.json"]).contains(&ph));
}

#[test]
fn export_references_graph() {
    let a = StorePath::parse("/nix/store/00000000000000000000000000000000-a").unwrap();
    let b = StorePath::parse("/nix/store/11111111111111111111111111111111-b").unwrap();
    let info = |refs: &[&StorePath]| PathInfo {
        nar_hash: NarHash([0; 32]),
        nar_size: 8,
        references: refs.iter().map(|s| (*s).clone()).collect(),
        ca: None,
    };
    let closure: BTreeMap<StorePath, PathInfo> =
        [(a.clone(), info(&[&b])), (b.clone(), info(&[]))].into();
    let d = drv(&[("exportReferencesGraph", &format!("graph {a}"))], &[("out", "")]);
    let p = prepare(&d, &[], &closure, false, 1, "/build").unwrap();
    assert_eq!(
        p.files,
        vec![("graph".to_owned(), format!("{a}\n\n1\n{b}\n{b}\n\n0\n").into_bytes())]
    );
    let bad = drv(
        &[("exportReferencesGraph", "g /nix/store/22222222222222222222222222222222-c")],
        &[("out", "")],
    );
    assert!(matches!(
        prepare(&bad, &[], &closure, false, 1, "/build"),
        Err(PrepareError::ExportGraph(_))
    ));
}

// --- running (host-side, /bin/sh, as the current user) ---

fn me() -> Confinement {
    Confinement::unconfined(nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw())
}

fn sh(script: &str) -> Prepared {
    Prepared {
        program: "/bin/sh".into(),
        argv0: "sh".into(),
        args: vec!["-c".into(), script.into()],
        env: [("PATH".to_string(), "/usr/bin:/bin".to_string())].into(),
        files: vec![],
    }
}

fn run_sh(script: &str, limits: RunLimits) -> (Result<(), BuildFailure>, Vec<u8>, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let mut log = Vec::new();
    let t = Instant::now();
    let r = run(&sh(script), "/nix/store/x-t.drv", dir.path(), limits, &me(), &mut |d| {
        log.extend_from_slice(d)
    });
    (r, log, t.elapsed())
}

#[test]
fn log_is_streamed_from_stdout_and_stderr() {
    let (r, log, _) = run_sh("echo out; echo err >&2; pwd", RunLimits::default());
    r.unwrap();
    let text = String::from_utf8(log).unwrap();
    assert!(text.starts_with("out\nerr\n"), "{text}");
}

#[test]
fn nonzero_exit_is_reported() {
    let (r, _, _) = run_sh("exit 3", RunLimits::default());
    let e = r.unwrap_err();
    assert_eq!(e.to_string(), "builder for '/nix/store/x-t.drv' failed with exit code 3");
}

#[test]
fn timeout_kills_the_builder() {
    let (r, _, took) = run_sh("sleep 30", RunLimits { timeout_s: 1, ..RunLimits::default() });
    assert!(matches!(r, Err(BuildFailure::Timeout { secs: 1, .. })), "{r:?}");
    assert!(took < Duration::from_secs(5));
}

#[test]
fn silence_kills_the_builder() {
    let (r, _, took) =
        run_sh("echo hi; sleep 30", RunLimits { max_silent_s: 1, ..RunLimits::default() });
    assert!(matches!(r, Err(BuildFailure::MaxSilent { secs: 1, .. })), "{r:?}");
    assert!(took < Duration::from_secs(5));
}

#[test]
fn log_limit_kills_the_builder() {
    let (r, log, _) = run_sh(
        "while :; do echo yyyyyyyyyyyyyyyyyyyy; done",
        RunLimits { max_log_bytes: 10_000, ..RunLimits::default() },
    );
    assert!(matches!(r, Err(BuildFailure::LogLimit { bytes: 10_000, .. })), "{r:?}");
    assert!(log.len() <= 10_000 + 64 * 1024);
}

#[test]
fn background_processes_do_not_outlive_the_builder() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("still-running");
    let script = format!("(sleep 1; touch {}) & echo started", marker.display());
    let (r, _, took) = run_sh(&script, RunLimits::default());
    r.unwrap();
    assert!(took < Duration::from_secs(1), "did not wait for the background job");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!marker.exists(), "the background process was killed with the builder");
}
