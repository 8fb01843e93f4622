use super::*;

fn request(n: usize) -> BuildRequest {
    let name = format!("b{n}");
    BuildRequest {
        drv_path: StorePath::from_parts([7; 20], &format!("{name}.drv")).unwrap(),
        drv: crate::core::request::test_derivation(&name),
        outputs: Default::default(),
        limits: Default::default(),
        ca_rule: crate::core::CaRuleChoice::Known(build_trace::CaRule::SelfRefZeroed),
        derivations: None,
        trusted: false,
    }
}

fn builds(dir: &std::path::Path) -> Builds {
    let engine = Engine {
        launcher: crate::build::LauncherConfig::new(dir.join("image"), dir.join("state")),
        limits: Default::default(),
        publish: crate::core::PublishConfig {
            state_dir: dir.join("state"),
            trace_store: dir.join("cache"),
            key_naming: crate::core::KeyNaming::host_default(),
        },
    };
    let records = Records::open(&dir.join("state/serve")).unwrap();
    let store = StoreConfig { max_bytes: 1 << 30 };
    Builds::new(engine, &dir.join("store"), store, records, Arc::new(Metrics::default()))
}

fn submit(b: &Builds, n: usize) -> Result<u64, String> {
    b.submit(Job::Step(Box::new(request(n))), r#"{"drv":"x"}"#, "{}", None)
}

fn state(b: &Builds, id: u64) -> BuildState {
    b.get(id).unwrap().expect("a known build").state()
}

#[test]
fn the_queue_is_bounded_and_what_waits_at_a_stop_resumes_on_the_next_start() {
    let t = tempfile::tempdir().unwrap();
    let b = builds(t.path()); // no workers: everything waits
    let ids: Vec<u64> = (0..MAX_QUEUED).map(|n| submit(&b, n).unwrap()).collect();
    let e = submit(&b, MAX_QUEUED).unwrap_err();
    assert!(e.contains("queue is full"), "{e}");
    assert!(matches!(state(&b, ids[0]), BuildState::Queued));
    assert_eq!(b.load(), (MAX_QUEUED, 0));
    b.stop();
    assert_eq!(state(&b, ids[0]), BuildState::Queued);
    assert!(submit(&b, 0).unwrap_err().contains("shutting down"));
    // A restarted service finds them queued, to check and queue again, and gives new builds
    // new ids.
    drop(b);
    let b = builds(t.path());
    assert_eq!(b.records().pending().len(), MAX_QUEUED);
    assert_eq!(b.records().pending()[0].id, ids[0]);
    assert_eq!(submit(&b, 0).unwrap(), ids.last().unwrap() + 1);
}

#[test]
fn a_queued_build_is_cancelled_and_stays_cancelled() {
    let t = tempfile::tempdir().unwrap();
    let b = builds(t.path());
    let (one, two) = (submit(&b, 1).unwrap(), submit(&b, 2).unwrap());
    let rx = b.get(one).unwrap().unwrap().subscribe();
    assert_eq!(b.cancel(one).unwrap(), BuildState::Cancelled);
    assert!(rx.has_changed().unwrap(), "readers are woken");
    assert!(matches!(b.cancel(one), Err(CancelError::Finished(_, "cancelled"))));
    assert!(matches!(b.cancel(99), Err(CancelError::Unknown(99))));
    assert_eq!(b.load().0, 1, "it left the queue");
    let v = b.get(one).unwrap().unwrap().view();
    assert!(v.info.finished.is_some() && v.steps[0].state == BuildState::Cancelled);
    assert_eq!(state(&b, two), BuildState::Queued);
    drop(b);
    let b = builds(t.path());
    assert_eq!(state(&b, one), BuildState::Cancelled);
    assert_eq!(b.records().pending().len(), 1, "the other one resumes after a restart");
}

#[test]
fn older_finished_builds_are_read_back_from_the_record() {
    let t = tempfile::tempdir().unwrap();
    let b = Arc::new(builds(t.path()));
    let n = MAX_FINISHED_KEPT + 3;
    // No VM image: each build fails fast, and is finished.
    let ids: Vec<u64> = (0..n).map(|i| submit(&b, i).unwrap()).collect();
    let workers = b.start_workers(1);
    let last = *ids.last().unwrap();
    let t0 = std::time::Instant::now();
    while !matches!(state(&b, last), BuildState::Failed { .. }) {
        assert!(t0.elapsed() < std::time::Duration::from_secs(60), "builds did not finish");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    b.stop();
    workers.into_iter().for_each(|w| w.join().unwrap());
    assert!(!lock(&b.inner).builds.contains_key(&ids[0]), "the oldest left memory");
    assert!(lock(&b.inner).builds.contains_key(&ids[3]));
    let old = b.get(ids[0]).unwrap().expect("recorded");
    let BuildState::Failed { error, .. } = old.state() else { panic!() };
    assert!(error.contains("no outputs"), "the recorded outcome: {error}");
    let v = old.view();
    assert!(v.info.started.is_some() && v.steps[0].started.is_some());
    let (log, len) = old.log_from(0, 0).unwrap();
    assert_eq!(len as usize, log.len());
    assert!(b.get(last + 1).unwrap().is_none());
}
