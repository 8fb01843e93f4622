//! Replays the seed corpora of the Nix protocol fuzz targets (`fuzz/seeds/{worker,serve,
//! nixproto_records}/`: sessions recorded from the real Nix 2.8 client talking to
//! `vouch nix-builder`, and records cut from them) through their bodies
//! (`host_launcher::nixproto::fuzzing`) under their heap bound, with single-byte mutations, on
//! every stable `cargo test`.

#[path = "../../fuzz/src/alloc.rs"]
mod alloc;
#[path = "../../fuzz/src/replay.rs"]
mod replay;

use host_launcher::nixproto::fuzzing::{self, BOUND};

#[global_allocator]
static HEAP: alloc::Counting = alloc::Counting;

#[test]
fn worker_seeds() {
    assert!(replay::replay("worker", 5, BOUND, fuzzing::worker_session) >= 3);
}

#[test]
fn serve_seeds() {
    assert!(replay::replay("serve", 5, BOUND, fuzzing::serve_session) >= 2);
}

#[test]
fn nixproto_records_seeds() {
    replay::replay("nixproto_records", 3, BOUND, fuzzing::records);
}

/// Writes the `nixproto_records` seeds (run with `--ignored`): the records of the real jobs in
/// `fuzz/seeds/job/` (their basic derivations, their closures as upload infos and path sets) and
/// a build result and options in the layouts of Nix 2.8 (worker 1.34, serve 2.7), each after the
/// selector byte `records` reads.
#[test]
#[ignore = "regenerates fuzz/seeds/nixproto_records"]
fn write_record_seeds() {
    use host_launcher::core::ValidPathInfo;
    use host_launcher::nixproto::action::{BuildOptions, BuiltOutput, ClientOptions};
    use host_launcher::nixproto::{types, BuildResult, BuildStatus};
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/nixproto_records");
    std::fs::create_dir_all(&dir).unwrap();
    // `records`: record = sel & 7, minor = (sel >> 3) + 10; Nix 2.8 speaks worker 1.34 (sel
    // 24 << 3) and serve 2.7 (sel with (minor & 7) == 7).
    let sel = |record: u8, minor: u8| ((minor - 10) << 3) | record;
    let put = |name: &str, record: u8, minor: u8, body: Vec<u8>| {
        std::fs::write(dir.join(name), [&[sel(record, minor)][..], &body].concat()).unwrap();
    };
    for (p, bytes) in replay::seeds("job") {
        let job = build_trace::Job::from_canonical_bytes(&bytes).unwrap();
        let stem = p.file_stem().unwrap().to_string_lossy().replace("of-closure-", "");
        let mut b = Vec::new();
        types::write_basic_derivation(&mut b, &job.drv).unwrap();
        put(&format!("drv-{stem}"), 1, 34, b);
        let mut b = Vec::new();
        types::write_store_path_set(&mut b, job.closure.keys()).unwrap();
        put(&format!("paths-{stem}"), 6, 34, b);
        if let Some((path, info)) = job.closure.iter().find(|(_, i)| !i.references.is_empty()) {
            let v = ValidPathInfo {
                path: path.clone(),
                info: info.clone(),
                deriver: None,
                registration_time: 1_700_000_000,
                ultimate: false,
                sigs: ["cache-a-1:VUYbT40EiqxQ8DDKsJ/c9NK0yyRRy+wb6+5kY20F++g=".to_string()].into(),
            };
            let mut b = Vec::new();
            types::write_upload_info(&mut b, &v).unwrap();
            put(&format!("upload-{stem}"), 0, 34, b);
        }
    }
    let mut opts = ClientOptions { max_build_jobs: 1, build_cores: 2, ..Default::default() };
    opts.overrides.insert("max-silent-time".into(), "30".into());
    let mut b = Vec::new();
    types::write_client_options(&mut b, &opts, 0x122).unwrap();
    put("set-options", 2, 34, b);
    let mut b = Vec::new();
    types::write_build_options(
        &mut b,
        &BuildOptions { max_silent_time: 30, ..Default::default() },
        0x207,
    )
    .unwrap();
    put("build-options", 3, 15, b);
    let out: nix_formats::StorePath =
        "/nix/store/qsjcbnwrnvg7szfxfb1d89chldvr7f5p-ca-top".parse().unwrap();
    let mut res = BuildResult::failure(BuildStatus::Built, "");
    res.built_outputs.insert(
        "out".into(),
        BuiltOutput { out_path: out, signatures: Default::default(), legacy: None },
    );
    let client = host_launcher::nixproto::ClientProfile::new(
        host_launcher::nixproto::Protocol::Worker,
        0x122,
        Default::default(),
    );
    let mut b = Vec::new();
    types::write_build_result(&mut b, &res, &client).unwrap();
    put("build-result", 5, 34, b);
}
