use super::*;

fn drv(n: u8) -> StorePath {
    StorePath::from_parts([n; 20], "x.drv").unwrap()
}

fn step(n: u8) -> Vec<StepInfo> {
    vec![StepInfo {
        index: 0,
        drv: drv(n),
        resolved: None,
        state: BuildState::Queued,
        started: None,
        finished: None,
        detail: None,
    }]
}

fn queue(r: &Records, id: u64) {
    let sub = format!(r#"{{"drv":"{}"}}"#, drv(id as u8));
    r.queued(id, &drv(id as u8), &sub, r#"{"trusted":false}"#, &step(id as u8)).unwrap();
}

#[test]
fn outcomes_and_logs_outlive_a_restart_running_builds_fail_and_queued_ones_resume() {
    let t = tempfile::tempdir().unwrap();
    let r = Records::open(t.path()).unwrap();
    assert_eq!(r.next_id(), 1);
    for id in 1..=4 {
        queue(&r, id);
    }
    let outputs = serde_json::json!({"out": {"path": "/nix/store/x"}});
    let ok = BuildState::Succeeded { outputs: outputs.clone(), attester: AttesterKind::SevSnp };
    r.step_started(1, 0).unwrap();
    r.step_finished(1, 0, &ok, Some(&serde_json::json!({"mode": "snp"})), "a\n").unwrap();
    r.finished(1, &ok).unwrap();
    let failed = BuildState::Failed { status: "TimedOut".into(), error: "too slow".into() };
    r.step_finished(2, 0, &failed, None, "b\n").unwrap();
    r.finished(2, &failed).unwrap();
    r.step_started(3, 0).unwrap();
    drop(r);

    let r = Records::open(t.path()).unwrap();
    assert_eq!(r.next_id(), 5, "ids are never reused");
    let (one, steps) = r.load(1).unwrap().unwrap();
    assert_eq!((one.drv, r.log(1, 0).unwrap().as_str()), (drv(1), "a\n"));
    assert_eq!(one.state, ok);
    assert!(one.started.is_some() && one.finished >= one.started);
    assert_eq!(steps.len(), 1);
    assert_eq!((steps[0].state.clone(), steps[0].drv.clone()), (ok, drv(1)));
    assert_eq!(steps[0].detail, Some(serde_json::json!({"mode": "snp"})));
    let (two, _) = r.load(2).unwrap().unwrap();
    assert_eq!(two.state, failed);
    let (three, steps) = r.load(3).unwrap().unwrap();
    let cut = BuildState::Failed { status: "MiscFailure".into(), error: CUT_OFF.into() };
    assert_eq!((three.state, steps[0].state.clone()), (cut.clone(), cut));
    // The queued one is handed back, with its submission, to be checked and queued again.
    assert_eq!(r.pending().len(), 1);
    assert_eq!(r.pending()[0].id, 4);
    assert!(r.pending()[0].submission.contains(&drv(4).to_string()));
    assert_eq!(r.load(4).unwrap().unwrap().0.state, BuildState::Queued);
    assert!(r.load(5).unwrap().is_none());
    assert!(r.finished(4, &BuildState::Running).is_err(), "an outcome is required");
    // Listing: newest first, by state, paged by id.
    let all: Vec<u64> = r.list(None, None, 10).unwrap().iter().map(|b| b.id).collect();
    assert_eq!(all, [4, 3, 2, 1]);
    let failed: Vec<u64> = r.list(Some("failed"), None, 10).unwrap().iter().map(|b| b.id).collect();
    assert_eq!(failed, [3, 2]);
    let page: Vec<u64> = r.list(None, Some(3), 1).unwrap().iter().map(|b| b.id).collect();
    assert_eq!(page, [2]);
    assert_eq!(r.step_of(&drv(2)).unwrap(), Some((2, 0)));
    let counts = r.counts().unwrap();
    assert!(counts.contains(&("failed".into(), 2)), "{counts:?}");
}

#[test]
fn a_record_of_the_first_layout_is_migrated() {
    let t = tempfile::tempdir().unwrap();
    let db = Connection::open(t.path().join("builds.sqlite")).unwrap();
    db.execute_batch(
        "CREATE TABLE builds (id INTEGER PRIMARY KEY, drv TEXT NOT NULL, state TEXT NOT NULL
           CHECK (state IN ('queued', 'running', 'succeeded', 'failed')), status TEXT, error TEXT,
           outputs TEXT, evidence TEXT, submitted INTEGER NOT NULL, finished INTEGER);",
    )
    .unwrap();
    db.execute(
        "INSERT INTO builds VALUES (7, ?1, 'failed', 'TimedOut', 'slow', NULL, NULL, 1, 2)",
        [drv(7).to_string()],
    )
    .unwrap();
    db.execute(
        "INSERT INTO builds VALUES (8, ?1, 'queued', NULL, NULL, NULL, NULL, 3, NULL)",
        [drv(8).to_string()],
    )
    .unwrap();
    drop(db);
    std::fs::create_dir_all(t.path().join("logs")).unwrap();
    std::fs::write(t.path().join("logs/7.log"), "old log\n").unwrap();
    let r = Records::open(t.path()).unwrap();
    let (info, steps) = r.load(7).unwrap().unwrap();
    assert_eq!((info.submitted, info.finished), (1, Some(2)));
    assert_eq!(steps[0].drv, drv(7));
    assert_eq!(r.log(7, 0).unwrap(), "old log\n");
    assert!(r.pending().is_empty(), "a queued build without its submission cannot resume");
    assert!(matches!(r.load(8).unwrap().unwrap().0.state, BuildState::Failed { .. }));
    assert_eq!(r.next_id(), 9);
    queue(&r, 9);
    r.never_started(&[9], &BuildState::Cancelled).unwrap();
    assert_eq!(r.load(9).unwrap().unwrap().0.state, BuildState::Cancelled, "new states fit");
}

#[test]
fn one_service_per_state_directory() {
    let t = tempfile::tempdir().unwrap();
    let first = Records::open(t.path()).unwrap();
    queue(&first, 1);
    let e = Records::open(t.path()).unwrap_err();
    assert!(matches!(e, RecordError::InUse(_)), "{e}");
    assert_eq!(first.load(1).unwrap().unwrap().0.state, BuildState::Queued, "untouched");
    drop(first);
    Records::open(t.path()).unwrap();
}

#[test]
fn only_the_newest_finished_builds_are_kept() {
    let t = tempfile::tempdir().unwrap();
    let r = Records::open(t.path()).unwrap();
    let failed = BuildState::Failed { status: "MiscFailure".into(), error: "no".into() };
    for id in 1..=5 {
        queue(&r, id);
        r.step_finished(id, 0, &failed, None, "log\n").unwrap();
        r.finished(id, &failed).unwrap();
    }
    queue(&r, 6);
    r.prune(&r.db(), 2).unwrap();
    for id in 1..=3 {
        assert!(r.load(id).unwrap().is_none(), "build {id} pruned");
        assert!(!r.log_path(id, 0).exists(), "log {id} pruned");
    }
    assert!(r.load(4).unwrap().is_some() && r.load(5).unwrap().is_some());
    assert!(r.load(6).unwrap().is_some(), "an unfinished build is never pruned");
}

#[test]
fn an_edited_row_is_reported_not_trusted() {
    let t = tempfile::tempdir().unwrap();
    let r = Records::open(t.path()).unwrap();
    queue(&r, 1);
    let ok =
        BuildState::Succeeded { outputs: serde_json::json!({}), attester: AttesterKind::Simulated };
    r.finished(1, &ok).unwrap();
    r.db().execute("UPDATE builds SET evidence = 'SEV-SNP!' WHERE id = 1", []).unwrap();
    let (loaded, _) = r.load(1).unwrap().unwrap();
    assert!(matches!(
        loaded.state,
        BuildState::Succeeded { attester: AttesterKind::Simulated, .. }
    ));
    r.db().execute("UPDATE builds SET outputs = 'not json' WHERE id = 1", []).unwrap();
    let e = r.load(1).unwrap_err();
    assert!(e.to_string().contains("build 1"), "{e}");
}
