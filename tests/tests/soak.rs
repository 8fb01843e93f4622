//! Soak (a benchmark, not part of `.ci/run`; `scripts/soak.sh` runs it): 200 consecutive short
//! builds through one `vouch nix-builder --listen` from 2 concurrent real Nix 2.8 clients
//! (`unix://` builders), every build in a fresh VM. Every 10 builds the launcher's resident
//! memory, open descriptors, threads and temporary-directory usage (its VM run directories,
//! `<state>/tmp`, the unpacked tree it serves clients from) are sampled; they must stay flat,
//! and nothing may be left once the clients are done. The table it prints goes to
//! `docs/benchmarks.md`. `VOUCH_SOAK_BUILDS` sets another number of builds (a quick trial).

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use test_support::nix::{text, CA_PRELUDE};
use test_support::server::SocketServer;
use test_support::vm::{image_dir, nonce, vouch_bin, Scratch, NIX_CONFIG};
use tests::faults::{staging_dirs, usage, vm_dirs, ProcSample};

const CLIENTS: usize = 2;
const EVERY: usize = 10;

/// One sample.
#[derive(Debug, Clone)]
struct Row {
    builds: usize,
    secs: f64,
    proc: ProcSample,
    vm_dirs: usize,
    tmp_bytes: u64,
    tmp_entries: usize,
}

fn soak_nix(n: &str, builds: usize) -> String {
    format!(
        r#"let
{CA_PRELUDE}  mk = i: ca "soak-${{toString i}}" {{}} "mkdir $out; echo {n} ${{toString i}} > $out/n";
in builtins.listToAttrs (map (i: {{ name = "b${{toString i}}"; value = mk i; }}) (builtins.genList (x: x) {builds}))
"#
    )
}

#[test]
#[ignore = "about 10 minutes under TCG: scripts/soak.sh"]
fn builds_through_one_listener_leave_it_flat() {
    let builds: usize =
        std::env::var("VOUCH_SOAK_BUILDS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let s = Scratch::new();
    let file = s.write("soak.nix", &soak_nix(&nonce(), builds));
    let state = s.state();
    let server = SocketServer::start(
        &vouch_bin(),
        &state,
        &s.dir.path().join("soak.sock"),
        // No warm pool: its VMs are there at idle by design (`pool_vm` tests them); this
        // counts what each build leaves behind.
        &["--pool", "0"],
        &[("VOUCH_IMAGE_DIR", image_dir().as_os_str())],
    );
    let pid = server.pid();
    let machine = server.machine("ca-derivations");
    let real = server.real.clone();
    let t0 = Instant::now();
    let sample = {
        let state = state.clone();
        move |builds: usize| {
            let mut tmp: Vec<PathBuf> = vm_dirs(pid);
            let vm = tmp.len();
            tmp.extend([state.join("tmp"), real.clone()]);
            let (tmp_bytes, tmp_entries) = usage(&tmp);
            Row {
                builds,
                secs: t0.elapsed().as_secs_f64(),
                proc: ProcSample::of(pid),
                vm_dirs: vm,
                tmp_bytes,
                tmp_entries,
            }
        }
    };
    let idle_before = sample(0);
    let done = Arc::new(AtomicUsize::new(0));
    let rows: Arc<Mutex<Vec<Row>>> = Arc::default();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (done, rows, sample) = (done.clone(), rows.clone(), sample.clone());
            let (file, machine) = (file.clone(), machine.clone());
            std::thread::spawn(move || {
                for i in (c..builds).step_by(CLIENTS) {
                    let out = Command::new("nix-build")
                        .env("NIX_CONFIG", NIX_CONFIG)
                        .arg(&file)
                        .args(["--no-out-link", "--max-jobs", "0", "--builders", &machine])
                        .args(["-A", &format!("b{i}")])
                        .output()
                        .unwrap();
                    assert!(out.status.success(), "build {i}: {}", text(&out));
                    let k = done.fetch_add(1, Ordering::SeqCst) + 1;
                    if k % EVERY == 0 {
                        rows.lock().unwrap().push(sample(k));
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("a client failed");
    }
    // The sessions end once their clients have gone.
    std::thread::sleep(Duration::from_secs(2));
    let idle_after = sample(builds);
    let mut rows = rows.lock().unwrap().clone();
    rows.sort_by_key(|r| r.builds);

    println!(
        "launcher pid {pid}; {builds} builds from {CLIENTS} clients in {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    print_table(builds, &idle_before, &rows, &idle_after);

    assert_flat(&rows);
    assert_eq!(idle_after.vm_dirs, 0, "{idle_after:?}");
    assert!(staging_dirs(&state, pid).is_empty());
    // A finished session's connection is let go at the next accept: one per client at most.
    assert!(
        idle_after.proc.fds <= idle_before.proc.fds + CLIENTS,
        "{idle_before:?} → {idle_after:?}"
    );
    assert!(
        idle_after.proc.threads <= idle_before.proc.threads,
        "{idle_before:?} → {idle_after:?}"
    );
    let (st, log) = server.stop("TERM");
    assert!(st.success(), "{log}");
}

/// The samples as the table `docs/benchmarks.md` holds: idle before, every [`EVERY`] builds,
/// idle after.
fn print_table(builds: usize, idle_before: &Row, rows: &[Row], idle_after: &Row) {
    println!("| builds | s | RSS MiB | fds | threads | VM dirs | temp KiB (entries) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let print = |label: &str, r: &Row| {
        println!(
            "| {label} | {:.0} | {:.1} | {} | {} | {} | {} ({}) |",
            r.secs,
            r.proc.rss_kib as f64 / 1024.0,
            r.proc.fds,
            r.proc.threads,
            r.vm_dirs,
            r.tmp_bytes / 1024,
            r.tmp_entries
        )
    };
    print("0 (idle)", idle_before);
    for r in rows {
        print(&r.builds.to_string(), r);
    }
    print(&format!("{builds} (idle)"), idle_after);
}

/// Flat: the last quarter of the samples holds no more than the first quarter (plus a
/// session's worth of descriptors and threads, and some allocator slack).
fn assert_flat(rows: &[Row]) {
    let q = (rows.len() / 4).max(1);
    let max = |rs: &[Row], f: fn(&Row) -> u64| rs.iter().map(f).max().unwrap_or(0);
    let (first, last) = (&rows[..q], &rows[rows.len() - q..]);
    let rss = |r: &Row| r.proc.rss_kib;
    assert!(max(last, rss) <= max(first, rss) * 5 / 4 + 8 * 1024, "RSS grew: {first:?} → {last:?}");
    for (what, f) in [
        ("descriptors", (|r: &Row| r.proc.fds as u64) as fn(&Row) -> u64),
        ("threads", |r: &Row| r.proc.threads),
        ("temporary entries", |r: &Row| r.tmp_entries as u64),
    ] {
        assert!(max(last, f) <= max(first, f) + 4, "{what} grew: {first:?} → {last:?}");
    }
}
