use super::*;

/// A tag naming this process with another start time: a process that is gone.
fn dead_tag() -> String {
    let me = ProcessId::current();
    format!("{}-{}", me.pid, me.start_ticks + 1)
}

/// A pid no process can have (above the kernel's largest `pid_max`).
const DEAD_PID: u32 = 99_999_999;

fn touch(p: &Path) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, b"x").unwrap();
}

#[test]
fn removes_only_what_dead_processes_left() {
    let t = tempfile::tempdir().unwrap();
    let (state, cache, tmp) =
        (t.path().join("state"), t.path().join("cache"), t.path().join("tmp"));
    let live = ProcessId::current().tag();
    let dead = dead_tag();
    for d in [
        format!("vouch-vm-{dead}-abc/vsock"),
        format!("vouch-vm-{live}-abc/vsock"),
        "vouch-vm-unknownowner/x".into(),
        format!("other-{dead}-x/y"),
    ] {
        touch(&tmp.join(d));
    }
    for d in [format!("step-{dead}-job1/out.nar"), format!("step-{live}-job2/out.nar")] {
        touch(&state.join("tmp").join(d));
    }
    let me = std::process::id();
    for f in [
        format!(".tmp-{DEAD_PID}-0"),
        format!("nar/.tmp-{DEAD_PID}-Xy12"),
        format!("vouch/v1/tmp/step-{DEAD_PID}-Ab3/statement.json"),
        format!("log/tile/0/.tmp-{DEAD_PID}-q"),
        format!(".tmp-{me}-1"),
        format!("vouch/v1/tmp/step-{me}-Cd4/statement.json"),
        "nar/abc.nar".into(),
        "log/tile/0/001".into(),
        "x.narinfo".into(),
    ] {
        touch(&cache.join(f));
    }
    let scope = Scope {
        state_dir: state.clone(),
        cache_dir: Some(cache.clone()),
        tmp_dir: tmp.clone(),
        serve: false,
    };
    let r = recover(&scope, Cleanup::default());
    assert_eq!((r.vm_dirs, r.staging_dirs, r.trace_tmp), (1, 1, 4), "{r:?}");
    assert!(!tmp.join(format!("vouch-vm-{dead}-abc")).exists());
    assert!(tmp.join(format!("vouch-vm-{live}-abc/vsock")).exists(), "a live launcher's VM");
    assert!(tmp.join("vouch-vm-unknownowner/x").exists(), "no owner in the name: left alone");
    assert!(tmp.join(format!("other-{dead}-x/y")).exists());
    assert!(state.join(format!("tmp/step-{live}-job2/out.nar")).exists());
    assert!(!state.join(format!("tmp/step-{dead}-job1")).exists());
    for kept in [
        format!(".tmp-{me}-1"),
        format!("vouch/v1/tmp/step-{me}-Cd4/statement.json"),
        "nar/abc.nar".into(),
        "log/tile/0/001".into(),
        "x.narinfo".into(),
    ] {
        assert!(cache.join(&kept).exists(), "{kept} was removed");
    }
    assert!(!cache.join("vouch/v1/tmp").read_dir().unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains(&DEAD_PID.to_string())));
    // Nothing left to do the second time.
    let again = recover(&scope, Cleanup::default());
    assert_eq!((again.vm_dirs, again.staging_dirs, again.trace_tmp), (0, 0, 0));
}

#[test]
fn the_services_staging_is_emptied_only_under_its_lock() {
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    touch(&state.join("serve/staging/abc.nar"));
    touch(&state.join("serve/staging/tmp-3"));
    let scope = Scope {
        state_dir: state.clone(),
        cache_dir: None,
        tmp_dir: t.path().join("tmp"),
        serve: true,
    };
    // Another service holds the lock: nothing is touched.
    let held = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(state.join("serve/lock"))
        .unwrap();
    let held = nix::fcntl::Flock::lock(held, nix::fcntl::FlockArg::LockExclusiveNonblock).unwrap();
    let r = recover(&scope, Cleanup::default());
    assert!(r.serve_locked && r.serve_staged == 0, "{r:?}");
    assert!(state.join("serve/staging/abc.nar").exists());
    drop(held);
    let r = recover(&scope, Cleanup::default());
    assert_eq!((r.serve_locked, r.serve_staged), (false, 2), "{r:?}");
    assert_eq!(fs::read_dir(state.join("serve/staging")).unwrap().count(), 0);
}
