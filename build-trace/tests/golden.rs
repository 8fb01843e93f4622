//! Golden vectors of the launch, job and statement encodings: a fixed launch, job and statement
//! must encode to the exact bytes checked in under `tests/data/golden/`, and hash to the
//! HOST_DATA, job digest and REPORT_DATA written here. A change to any of these is a format
//! change: bump the version and the domain-separation tags instead of editing the vectors.
//! `statement-v1.json` is a version-1 statement (no launch; HOST_DATA was the job digest), which
//! this code still reads and verifies.

use std::collections::{BTreeMap, BTreeSet};

use build_trace::{
    BasicDerivation, CaRule, DrvOutput, Job, Launch, Limits, Measurement, NarHash, OutputInfo,
    PathInfo, Statement, StatementError, StepKind,
};
use nix_formats::StorePath;

const BB: &str = "/nix/store/3mj0m6kd4p0w2yzkx1yvq5fgylrbshzc-busybox";
const DEP: &str = "/nix/store/n9vq2iwi1y2jz7p4bf8gwwkm6l0kdcx4-ca-dep";
const OUT: &str = "/nix/store/fib9f3qwvznq3m047cv9kmy5lffsrny7-ca-top";

fn sp(p: &str) -> StorePath {
    StorePath::parse(p).unwrap()
}

fn set(items: &[&str]) -> BTreeSet<StorePath> {
    items.iter().map(|s| sp(s)).collect()
}

fn golden_job() -> Job {
    let drv = BasicDerivation {
        name: "ca-top".into(),
        outputs: BTreeMap::from([(
            "out".into(),
            DrvOutput { path: None, hash_algo: "r:sha256".into(), hash: String::new() },
        )]),
        input_srcs: set(&[BB, DEP]),
        system: "x86_64-linux".into(),
        builder: format!("{BB}/sh"),
        args: vec![
            "-c".into(),
            format!("mkdir $out; cat {DEP}/data > $out/copied; echo \"tab\there\" > $out/ref"),
        ],
        env: BTreeMap::from([
            ("builder".into(), format!("{BB}/sh")),
            ("name".into(), "ca-top".into()),
            ("out".into(), "/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9".into()),
            ("outputHashAlgo".into(), "sha256".into()),
            ("outputHashMode".into(), "recursive".into()),
            ("system".into(), "x86_64-linux".into()),
            ("unicode".into(), "é\u{1}".into()),
        ]),
    };
    let closure = BTreeMap::from([
        (
            sp(BB),
            PathInfo {
                nar_hash: NarHash([0x11; 32]),
                nar_size: 1_234_568,
                references: BTreeSet::new(),
                ca: Some(
                    "fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s".into(),
                ),
            },
        ),
        (
            sp(DEP),
            PathInfo {
                nar_hash: NarHash::of(b"dep nar"),
                nar_size: 424,
                references: set(&[DEP]),
                ca: Some(
                    "fixed:r:sha256:0xw0ba0l8pcs0bxkwbx0z9s7xv4ng0dk6wdfcm1rqzsm9hhj8z2h".into(),
                ),
            },
        ),
    ]);
    let limits = Limits {
        timeout_s: 3600,
        max_silent_s: 600,
        max_log_bytes: 64 << 20,
        cores: 2,
        memory_bytes: 2 << 30,
        max_processes: 4096,
        tmpfs_bytes: 4 << 30,
    };
    Job::new(
        "job-0001",
        sp("/nix/store/l8g4zxyralcvw9yx2idk5qpv7a8k4cjg-ca-top.drv"),
        drv,
        closure,
        limits,
        CaRule::SelfRefPositions,
        false,
        BTreeSet::from(["out".to_string()]),
    )
}

/// A pool VM's launch: 2 vCPUs, 2304 MiB (the job's 2 GiB limit plus the reserve), no NIC.
fn golden_launch() -> Launch {
    Launch::new([0x5a; 32], 2, 2304, false)
}

fn golden_statement() -> Statement {
    let v1 = golden_statement_v1();
    Statement::new(
        golden_launch(),
        v1.job,
        v1.input_cas,
        v1.outputs,
        v1.measurement,
        v1.agent_version,
    )
}

/// The same step as a version-1 statement (as agents before warm pools wrote it).
fn golden_statement_v1() -> Statement {
    let job = golden_job();
    let input_cas =
        job.closure.iter().filter_map(|(p, i)| Some((p.clone(), i.ca.clone()?))).collect();
    let outputs = BTreeMap::from([(
        "out".to_string(),
        OutputInfo {
            path: sp(OUT),
            nar_hash: NarHash::of(b"top nar"),
            nar_size: 512,
            references: set(&[DEP]),
            ca: Some("fixed:r:sha256:0q4zb8ln2vlwsvkd7xpd3yxaf7sn9f6ywn8gq5h7bwmp6bifkkd8".into()),
        },
    )]);
    Statement {
        v: 1,
        launch: None,
        job,
        input_cas,
        outputs,
        measurement: Measurement([0xa5; 48]),
        agent_version: "vouch-agent 0.1.0".into(),
    }
}

fn data(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/data/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `bytes` are exactly the vector `name` (compared as text, for a readable difference).
#[track_caller]
fn assert_golden(bytes: &[u8], name: &str) {
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    assert_eq!(text(bytes.to_vec()), text(data(name)), "{name}");
}

#[test]
fn job_encodes_to_the_golden_bytes_and_digest() {
    let job = golden_job();
    job.validate().unwrap();
    assert_eq!(job.kind().unwrap(), StepKind::FloatingCa);
    let bytes = job.canonical_bytes().unwrap();
    assert_golden(&bytes, "job-v1.json");
    assert_eq!(hex::encode(job.digest().unwrap()), GOLDEN_JOB_DIGEST);
    assert_eq!(Job::from_canonical_bytes(&bytes).unwrap(), job);
}

#[test]
fn launch_encodes_to_the_golden_bytes_and_host_data() {
    let launch = golden_launch();
    let bytes = launch.canonical_bytes().unwrap();
    assert_golden(&bytes, "launch-v1.json");
    assert_eq!(hex::encode(launch.host_data().unwrap()), GOLDEN_HOST_DATA);
    assert_eq!(Launch::from_canonical_bytes(&bytes).unwrap(), launch);
}

#[test]
fn statement_encodes_to_the_golden_bytes_and_report_data() {
    let st = golden_statement();
    st.verify_against(&golden_launch(), &golden_job()).unwrap();
    let bytes = st.canonical_bytes().unwrap();
    assert_golden(&bytes, "statement-v2.json");
    assert_eq!(hex::encode(st.report_data().unwrap()), GOLDEN_REPORT_DATA);
    assert_eq!(hex::encode(st.host_data().unwrap()), GOLDEN_HOST_DATA);
    assert_eq!(Statement::from_canonical_bytes(&bytes).unwrap(), st);
}

/// Version 1 still reads: same bytes, its own REPORT_DATA tag, HOST_DATA = the job digest.
#[test]
fn version_1_statements_still_decode_with_their_own_tag_and_host_data() {
    let bytes = data("statement-v1.json");
    let st = Statement::from_canonical_bytes(&bytes).unwrap();
    assert_eq!(st, golden_statement_v1());
    assert_eq!(st.canonical_bytes().unwrap(), bytes);
    assert_eq!(hex::encode(st.report_data().unwrap()), GOLDEN_REPORT_DATA_V1);
    assert_eq!(hex::encode(st.host_data().unwrap()), GOLDEN_JOB_DIGEST);
    assert_eq!(st.launch_nonce(), None);
    // A version 1 statement with a launch, or a version 2 one without, is refused; so is v3.
    let mut s = golden_statement_v1();
    s.launch = Some(golden_launch());
    assert!(build_trace::error_chain(&s.validate().unwrap_err()).contains("present"));
    let mut s = golden_statement();
    s.launch = None;
    assert!(build_trace::error_chain(&s.validate().unwrap_err()).contains("missing"));
    let v3 = String::from_utf8(data("statement-v2.json")).unwrap().replace("\"v\":2}", "\"v\":3}");
    let e = Statement::from_canonical_bytes(v3.as_bytes()).unwrap_err();
    assert!(matches!(e, StatementError::Version(3)), "{e}");
    assert!(e.to_string().contains("version 3"), "{e}");
}

#[test]
fn host_data_is_the_tagged_sha256_of_the_bytes() {
    use sha2::{Digest, Sha256, Sha512};
    let tagged256 = |tag: &[u8], file| {
        let mut h = Sha256::new();
        h.update(tag);
        h.update(data(file));
        hex::encode(h.finalize())
    };
    let tagged512 = |tag: &[u8], file| {
        let mut h = Sha512::new();
        h.update(tag);
        h.update(data(file));
        hex::encode(h.finalize())
    };
    assert_eq!(tagged256(b"vouch.job.v1\0", "job-v1.json"), GOLDEN_JOB_DIGEST);
    assert_eq!(tagged256(b"vouch.launch.v1\0", "launch-v1.json"), GOLDEN_HOST_DATA);
    assert_eq!(tagged512(b"vouch.statement.v2\0", "statement-v2.json"), GOLDEN_REPORT_DATA);
    assert_eq!(tagged512(b"vouch.statement.v1\0", "statement-v1.json"), GOLDEN_REPORT_DATA_V1);
}

#[test]
fn non_canonical_bytes_are_refused() {
    let bytes = String::from_utf8(data("job-v1.json")).unwrap();
    let pretty = serde_json::to_string_pretty(&golden_job()).unwrap();
    assert!(Job::from_canonical_bytes(pretty.as_bytes()).is_err());
    // Same value, keys out of order.
    let swapped = bytes.replace(",\"v\":1}", "}").replacen('{', "{\"v\":1,", 1);
    assert!(serde_json::from_str::<serde_json::Value>(&swapped).is_ok());
    assert!(Job::from_canonical_bytes(swapped.as_bytes()).is_err());
    // An unknown field.
    let extra = bytes.replacen("\"v\":1", "\"v\":1,\"zz\":0", 1);
    assert!(Job::from_canonical_bytes(extra.as_bytes()).is_err());
    // A hash in another notation.
    let hexhash = bytes.replacen(
        &NarHash([0x11; 32]).to_string(),
        &format!("sha256:{}", hex::encode([0x11; 32])),
        1,
    );
    assert_ne!(hexhash, bytes);
    assert!(Job::from_canonical_bytes(hexhash.as_bytes()).is_err());
    // An escaped character that canonical form writes raw.
    let escaped = bytes.replacen("é", "\\u00e9", 1);
    assert_ne!(escaped, bytes);
    assert!(Job::from_canonical_bytes(escaped.as_bytes()).is_err());
}

#[test]
fn any_change_changes_the_digests_and_report_data() {
    let base = golden_job().digest().unwrap();
    let mut j = golden_job();
    j.limits.max_processes += 1;
    assert_ne!(j.digest().unwrap(), base);
    let mut j = golden_job();
    j.closure.get_mut(&sp(DEP)).unwrap().nar_hash.0[0] ^= 1;
    assert_ne!(j.digest().unwrap(), base);
    let hd = golden_launch().host_data().unwrap();
    for change in [
        |l: &mut Launch| l.nonce.0[0] ^= 1,
        |l: &mut Launch| l.vcpus += 1,
        |l: &mut Launch| l.memory_mib += 1,
        |l: &mut Launch| l.network = true,
        |l: &mut Launch| l.job = Some(build_trace::Hex32([0; 32])),
    ] {
        let mut l = golden_launch();
        change(&mut l);
        assert_ne!(l.host_data().unwrap(), hd);
    }
    let st = golden_statement().report_data().unwrap();
    let mut s = golden_statement();
    s.launch.as_mut().unwrap().nonce.0[31] ^= 1;
    assert_ne!(s.report_data().unwrap(), st);
    let mut s = golden_statement();
    s.outputs.get_mut("out").unwrap().nar_hash.0[31] ^= 1;
    assert_ne!(s.report_data().unwrap(), st);
    let mut s = golden_statement();
    s.measurement.0[0] ^= 1;
    assert_ne!(s.report_data().unwrap(), st);
}

#[test]
fn malformed_jobs_and_statements_are_refused_with_the_field_named() {
    let mut j = golden_job();
    j.closure
        .get_mut(&sp(DEP))
        .unwrap()
        .references
        .insert(sp("/nix/store/00000000000000000000000000000000-x"));
    assert!(j.validate().unwrap_err().to_string().contains("closure"));
    let mut j = golden_job();
    j.network = true;
    assert!(j.validate().unwrap_err().to_string().contains("network"));
    let mut j = golden_job();
    j.outputs.insert("dev".into());
    assert!(j.validate().unwrap_err().to_string().contains("outputs"));
    let mut j = golden_job();
    j.drv_path = StorePath::from_parts(*j.drv_path.digest(), "other.drv").unwrap();
    assert!(j.validate().unwrap_err().to_string().contains("drv_path"));
    let mut j = golden_job();
    j.drv.env.insert("extra".into(), "1".into());
    assert!(j.validate().unwrap_err().to_string().contains("hashes to"));

    let mut s = golden_statement();
    s.input_cas.remove(&sp(DEP));
    assert!(s.validate().unwrap_err().to_string().contains("input_cas"));
    let mut s = golden_statement();
    s.outputs
        .get_mut("out")
        .unwrap()
        .references
        .insert(sp("/nix/store/00000000000000000000000000000000-x"));
    assert!(s.validate().unwrap_err().to_string().contains("neither an input"));
    let mut s = golden_statement();
    s.outputs.get_mut("out").unwrap().ca = None;
    assert!(s.validate().is_err());
    let mut other = golden_job();
    other.job_id = "job-0002".into();
    assert!(matches!(
        golden_statement().verify_against(&golden_launch(), &other),
        Err(StatementError::OtherJob { .. })
    ));
    let other = Launch::new([0x5b; 32], 2, 2304, false);
    assert!(matches!(
        golden_statement().verify_against(&other, &golden_job()),
        Err(StatementError::OtherLaunch { .. })
    ));
}

/// A launch admits only jobs that fit it; a statement whose launch does not admit its job is
/// refused.
#[test]
fn the_launch_must_admit_the_job() {
    let job = golden_job();
    golden_launch().admits(&job).unwrap();
    let bound = golden_launch().for_job(&job).unwrap();
    bound.admits(&job).unwrap();
    let mut other = golden_job();
    other.job_id = "job-0002".into();
    let refused = |l: &Launch, j: &Job| build_trace::error_chain(&l.admits(j).unwrap_err());
    assert!(refused(&bound, &other).contains("launched for job"), "{}", refused(&bound, &other));
    let mut small = golden_launch();
    small.memory_mib = 1024;
    assert!(refused(&small, &job).contains("exceeds the VM's 1024 MiB"));
    let mut nic = golden_launch();
    nic.network = true;
    assert!(refused(&nic, &job).contains("network"));
    let mut s = golden_statement();
    s.launch = Some(small);
    assert!(build_trace::error_chain(&s.validate().unwrap_err()).contains("does not fit"));
    let mut l = golden_launch();
    l.vcpus = 0;
    assert!(l.validate().unwrap_err().to_string().contains("vcpus"));
}

#[test]
fn malformed_store_paths_are_refused_while_parsing_with_the_member_named() {
    let job = String::from_utf8(data("job-v1.json")).unwrap();
    let st = String::from_utf8(data("statement-v1.json")).unwrap();
    let dep_base = &DEP["/nix/store/".len()..];
    let no_dash = dep_base.replacen('-', "_", 1);
    let cases = [
        (Job::from_canonical_bytes(job.replace(dep_base, &no_dash).as_bytes()).err(), "closure"),
        (
            Job::from_canonical_bytes(job.replace("/nix/store/l8g4", "/nix/stor/l8g4").as_bytes())
                .err(),
            "drv_path",
        ),
        (
            Job::from_canonical_bytes(
                job.replace("\"path\":\"\"", "\"path\":\"/nix/store/x\"").as_bytes(),
            )
            .err(),
            "drv.outputs.out.path",
        ),
    ];
    for (err, member) in cases {
        let chain = build_trace::error_chain(&err.expect("refused"));
        assert!(chain.contains(&format!("member `{member}")), "{member}: {chain}");
        assert!(chain.contains("store path") || chain.contains("Nix store"), "{chain}");
    }
    let bad_out = st.replace(OUT, "/nix/store/fib9f3qwvznq3m047cv9kmy5lffsrny7-.ca-top");
    let chain =
        build_trace::error_chain(&Statement::from_canonical_bytes(bad_out.as_bytes()).unwrap_err());
    assert!(chain.contains("member `outputs.out.path`"), "{chain}");
    assert!(chain.contains("illegal character '.'"), "{chain}");
}

const GOLDEN_JOB_DIGEST: &str = "5bd073af3927aca6555f151db3ebb0619674264ed7924d3e14b8975094b65cdb";
const GOLDEN_HOST_DATA: &str = "223f709fa29cbaf32adca78dd4362e3fd11a3486b8fb2d384a35702889761fa6";
const GOLDEN_REPORT_DATA: &str =
    "0504bf7cc97577803db89cc8f91f68fd7dfff42acb0d7c68e737722dd170dbd779adbdb53fef6e6d4bade93c9164669dbb5b6afc66e8f0895ef17568848a8505";
const GOLDEN_REPORT_DATA_V1: &str =
    "829fb39737ed104975cf8dde05c2b12e46cdeeed20f234ac82f7b5e759591be75d52019dfc6272ebef1984b7a7d9cbfe3927011d8bfdf2dba34b03115a990adf";

#[test]
fn hashes_from_canonical_bytes_equal_the_encoders() {
    let st = golden_statement();
    let bytes = data("statement-v2.json");
    assert_eq!(build_trace::statement::report_data_of(&bytes), st.report_data().unwrap());
    assert_eq!(
        build_trace::statement::host_data_of(&bytes),
        Some(golden_launch().host_data().unwrap())
    );
    assert_eq!(build_trace::canonical::member(&bytes, "job"), Some(&data("job-v1.json")[..]));
    assert_eq!(build_trace::canonical::member(&bytes, "launch"), Some(&data("launch-v1.json")[..]));
    let v1 = data("statement-v1.json");
    assert_eq!(
        build_trace::statement::report_data_of(&v1),
        golden_statement_v1().report_data().unwrap()
    );
    assert_eq!(build_trace::statement::host_data_of(&v1), Some(golden_job().digest().unwrap()));
}
