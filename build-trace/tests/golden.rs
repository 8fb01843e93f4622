//! Golden vectors of the job and statement encodings: a fixed job and statement must encode to
//! the exact bytes checked in under `tests/data/golden/`, and hash to the HOST_DATA and
//! REPORT_DATA written here. A change to any of these is a format change: bump the version and
//! the domain-separation tags instead of editing the vectors.

use std::collections::{BTreeMap, BTreeSet};

use build_trace::{
    BasicDerivation, CaRule, DrvOutput, Job, Limits, Measurement, NarHash, OutputInfo, PathInfo,
    Statement, StepKind,
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

fn golden_statement() -> Statement {
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
    Statement::new(job, input_cas, outputs, Measurement([0xa5; 48]), "vouch-agent 0.1.0")
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
fn job_encodes_to_the_golden_bytes_and_host_data() {
    let job = golden_job();
    job.validate().unwrap();
    assert_eq!(job.kind().unwrap(), StepKind::FloatingCa);
    let bytes = job.canonical_bytes().unwrap();
    assert_golden(&bytes, "job-v1.json");
    assert_eq!(hex::encode(job.host_data().unwrap()), GOLDEN_HOST_DATA);
    assert_eq!(Job::from_canonical_bytes(&bytes).unwrap(), job);
}

#[test]
fn statement_encodes_to_the_golden_bytes_and_report_data() {
    let st = golden_statement();
    st.verify_against(&golden_job()).unwrap();
    let bytes = st.canonical_bytes().unwrap();
    assert_golden(&bytes, "statement-v1.json");
    assert_eq!(hex::encode(st.report_data().unwrap()), GOLDEN_REPORT_DATA);
    assert_eq!(Statement::from_canonical_bytes(&bytes).unwrap(), st);
}

#[test]
fn host_data_is_the_tagged_sha256_of_the_bytes() {
    use sha2::{Digest, Sha256, Sha512};
    let mut h = Sha256::new();
    h.update(b"vouch.job.v1\0");
    h.update(data("job-v1.json"));
    assert_eq!(hex::encode(h.finalize()), GOLDEN_HOST_DATA);
    let mut h = Sha512::new();
    h.update(b"vouch.statement.v1\0");
    h.update(data("statement-v1.json"));
    assert_eq!(hex::encode(h.finalize()), GOLDEN_REPORT_DATA);
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
fn any_change_changes_host_data_and_report_data() {
    let base = golden_job().host_data().unwrap();
    let mut j = golden_job();
    j.limits.max_processes += 1;
    assert_ne!(j.host_data().unwrap(), base);
    let mut j = golden_job();
    j.closure.get_mut(&sp(DEP)).unwrap().nar_hash.0[0] ^= 1;
    assert_ne!(j.host_data().unwrap(), base);
    let st = golden_statement().report_data().unwrap();
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
        golden_statement().verify_against(&other),
        Err(build_trace::StatementError::OtherJob { .. })
    ));
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

const GOLDEN_HOST_DATA: &str = "5bd073af3927aca6555f151db3ebb0619674264ed7924d3e14b8975094b65cdb";
const GOLDEN_REPORT_DATA: &str =
    "829fb39737ed104975cf8dde05c2b12e46cdeeed20f234ac82f7b5e759591be75d52019dfc6272ebef1984b7a7d9cbfe3927011d8bfdf2dba34b03115a990adf";

#[test]
fn hashes_from_canonical_bytes_equal_the_encoders() {
    let st = golden_statement();
    let bytes = data("statement-v1.json");
    assert_eq!(build_trace::statement::report_data_of(&bytes), st.report_data().unwrap());
    assert_eq!(
        build_trace::statement::host_data_of(&bytes),
        Some(golden_job().host_data().unwrap())
    );
    assert_eq!(build_trace::canonical::member(&bytes, "job"), Some(&data("job-v1.json")[..]));
}
