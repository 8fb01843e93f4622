//! Fault injection: for each fault, the client gets a named error, nothing is published or
//! half-registered, no process is orphaned, and the service keeps serving other clients
//! (`docs/reliability.md` has the table). The faults: `kill -9` of the launcher, of QEMU and of
//! the vsock backend; a client that hangs up mid-build and mid-upload; a guest kernel panic; an
//! agent crash (the bench image's `vouch.bench=panic`); a full disk under the trace store (a
//! 1 MiB tmpfs in a user and mount namespace of the launcher's own); the content store's SQLite
//! database locked; a simulated root whose certificates expired (a clock outside their
//! validity); and a launcher paused (SIGSTOP) while its guest sends the outputs (the race that
//! lost the last frames).
//!
//! Real Nix 2.8, real QEMU (TCG here), real `vhost-device-vsock`. The tests take a lock so their
//! VMs do not compete for the CPUs; builds are tiny.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use build_trace::evidence::SimulatedRoot;
use host_launcher::core::ValidPathInfo;
use host_launcher::nixproto::types;
use host_launcher::nixproto::wire::{FramedWriter, WireRead, WireWrite};
use host_launcher::nixproto::worker::{STDERR_LAST, WORKER_MAGIC_1, WORKER_MAGIC_2};
use nix_formats::StorePath;
use test_support::nix::{text, CA_PRELUDE};
use test_support::server::SocketServer;
use test_support::vm::{bench_image_dir, image_dir, nix, vouch_bin, VmTest, NIX_CONFIG};
use tests::faults::*;

static VMS: Mutex<()> = Mutex::new(());

type Env = VmTest;

fn setup() -> Env {
    VmTest::new(&VMS, "faults.nix", faults_nix)
}

/// `slow` sleeps (the faults strike while it runs); `quick`, `quick2` and `quick3` are the
/// builds that show the service still serves; `big` has a 2 MiB output (more than the full-disk
/// test's trace store holds); `mid` a 230 KiB one (it fits in the channel's buffers).
fn faults_nix(n: &str) -> String {
    let dd = "${bb}/busybox dd of=$out/blob bs=1k 2>/dev/null";
    format!(
        r#"let
{CA_PRELUDE}in {{
  slow = ca "f-slow" {{}} "echo started {n}; ${{bb}}/busybox sleep 600";
  quick = ca "f-quick" {{}} "mkdir $out; echo {n} > $out/n";
  quick2 = ca "f-quick2" {{}} "mkdir $out; echo {n} 2 > $out/n";
  quick3 = ca "f-quick3" {{}} "mkdir $out; echo {n} 3 > $out/n";
  big = ca "f-big" {{}} "mkdir $out; {dd} if=/dev/zero count=2048; echo {n} > $out/n";
  mid = ca "f-mid" {{}} "mkdir $out; {dd} if=/dev/urandom count=230; echo {n} > $out/n";
}}
"#
    )
}

/// `vouch nix-builder --listen` on `name.sock` with `image` (and `--cache cache`, if given),
/// started through `program` (the `vouch` binary, or a wrapper that execs it), without a warm
/// pool: each fault strikes the one VM of its build (the pool's own faults, a crashed or idle
/// pool VM, are `pool_vm.rs`'s).
fn server(e: &Env, name: &str, program: &Path, image: &Path, cache: Option<&Path>) -> SocketServer {
    server_with_pool(e, name, program, image, cache, 0)
}

/// [`server`] with a warm pool of `pool` VMs.
fn server_with_pool(
    e: &Env,
    name: &str,
    program: &Path,
    image: &Path,
    cache: Option<&Path>,
    pool: usize,
) -> SocketServer {
    let pool = pool.to_string();
    let mut args: Vec<&str> = vec!["--pool", &pool];
    if let Some(c) = cache {
        args.extend(["--cache", c.to_str().unwrap()]);
    }
    SocketServer::start(
        program,
        &e.state,
        &e.s.dir.path().join(format!("{name}.sock")),
        &args,
        &[("VOUCH_IMAGE_DIR", image.as_os_str())],
    )
}

fn nix_build(file: &Path, attr: &str, server: &SocketServer) -> Command {
    let mut cmd = Command::new("nix-build");
    cmd.env("NIX_CONFIG", NIX_CONFIG).arg(file).args([
        "--no-out-link",
        "--max-jobs",
        "0",
        "--builders",
        &server.machine("ca-derivations"),
        "-A",
        attr,
    ]);
    cmd
}

/// Build `attr` through `server` and expect success: the service still serves.
fn serves(file: &Path, attr: &str, server: &SocketServer) {
    let out = nix_build(file, attr, server).output().unwrap();
    assert!(
        out.status.success(),
        "the service no longer builds:\n{}\n{}",
        text(&out),
        server.log_text()
    );
}

/// Valid paths named `*<suffix>` in the content store of `state`.
fn stored(state: &Path, suffix: &str) -> usize {
    let db = state.join("store/index.sqlite");
    let out = Command::new("sqlite3")
        .args(["-cmd", ".timeout 20000"])
        .arg(db)
        .arg(format!("SELECT count(*) FROM paths WHERE path LIKE '%{suffix}'"))
        .output()
        .expect("sqlite3 (scripts/setup-host.sh installs it)");
    assert!(out.status.success(), "sqlite3: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Step directories in the trace store `cache` whose drv name ends with `suffix`.
fn steps(cache: &Path, suffix: &str) -> usize {
    std::fs::read_dir(cache.join("vouch/v1/steps"))
        .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(suffix)).count())
        .unwrap_or(0)
}

/// Nothing of the `f-<name>` step anywhere: no valid path, no step, no staging of `launcher`.
fn nothing_of(e: &Env, cache: &Path, name: &str, launcher: u32) {
    assert_eq!(stored(&e.state, &format!("-f-{name}")), 0, "{name} registered");
    assert_eq!(steps(cache, &format!("-f-{name}.drv")), 0, "{name} published");
    let staged = staging_dirs(&e.state, launcher);
    assert!(staged.is_empty(), "staging left: {staged:?}");
}

/// The build fails with `expect` in the client's log.
fn fails_naming(b: Background, expect: &[&str]) -> String {
    let (st, log) = b.finish();
    assert!(!st.success(), "the build succeeded:\n{log}");
    for x in expect {
        assert!(log.contains(x), "`{x}` not in the client's log:\n{log}");
    }
    log
}

#[test]
fn launcher_kill_9_mid_build_orphans_nothing_and_the_next_start_recovers() {
    let e = setup();
    let image = image_dir();
    // With a pool of one: the build's VM and the ready one that replaces it, both started by
    // the pool's booter thread, must die with the launcher too.
    let s1 = server_with_pool(&e, "b", &vouch_bin(), &image, None, 1);
    let launcher = s1.pid();
    let b = Background::start(&mut nix_build(&e.file, "slow", &s1));
    b.wait_for(&format!("started {}", e.n));
    wait_until("the pool booted a replacement", Duration::from_secs(10), || {
        vm_processes(launcher).len() == 4
    });
    let procs = vm_processes(launcher);
    assert_eq!(procs.len(), 4, "QEMU and vhost-device-vsock, twice: {procs:?}");
    let (run_dirs, staged) = (vm_dirs(launcher), staging_dirs(&e.state, launcher));
    assert_eq!((run_dirs.len(), staged.len()), (2, 1), "{run_dirs:?} {staged:?}");

    let (st, _) = s1.stop("KILL");
    assert!(!st.success());
    // QEMU and the vsock backend (which ignores SIGTERM) die with it: PR_SET_PDEATHSIG.
    assert_no_vm_left(launcher, true);
    // Nix names what happened: the builder's connection ended mid-build.
    fails_naming(b, &["unexpected end-of-file", "f-slow.drv' failed"]);
    // Nobody but a successor can remove what a `kill -9`ed process owned.
    assert!(run_dirs.iter().all(|d| d.exists()) && staged[0].exists());

    let s2 = server(&e, "b", &vouch_bin(), &image, None);
    let log = s2.log_text();
    for line in [
        "VM run directories of dead launchers removed count=2",
        "step staging directories of dead launchers removed count=1",
        "stale sockets replaced count=1",
    ] {
        assert!(log.contains(line), "`{line}` not in the log:\n{log}");
    }
    assert!(run_dirs.iter().all(|d| !d.exists()) && !staged[0].exists());
    serves(&e.file, "quick", &s2);
    nothing_of(&e, &e.state.join("cache"), "slow", launcher);
    let (st, _) = s2.stop("TERM");
    assert!(st.success());
}

#[test]
fn qemu_vsock_backend_or_client_gone_mid_build_fails_that_build_only() {
    let e = setup();
    let s = server(&e, "b", &vouch_bin(), &image_dir(), None);
    let launcher = s.pid();
    let started = format!("started {}", e.n);
    let cache = e.state.join("cache");

    // QEMU killed: the VM died, said so, nothing registered (not retried: the job was accepted).
    let b = Background::start(&mut nix_build(&e.file, "slow", &s));
    b.wait_for(&started);
    signal(vm_process(launcher, "qemu-system"), "KILL");
    fails_naming(b, &["failed: vouch:", "was killed by signal 9", "nothing was registered"]);
    assert_no_vm_left(launcher, false);
    nothing_of(&e, &cache, "slow", launcher);

    // The vsock backend killed: the channel broke mid-build; QEMU is killed with it.
    let b = Background::start(&mut nix_build(&e.file, "slow", &s));
    b.wait_for(&started);
    signal(vm_process(launcher, "vhost-device-vsock"), "KILL");
    fails_naming(b, &["failed: vouch:", "guest channel"]);
    assert_no_vm_left(launcher, false);
    nothing_of(&e, &cache, "slow", launcher);

    // The client hangs up mid-build (its build hook killed): nobody waits for the result, so
    // the build is stopped and its VM killed, not left running for nobody.
    let b = Background::start(&mut nix_build(&e.file, "slow", &s));
    b.wait_for(&started);
    let peer = last_session_peer(&s.log_text());
    signal(peer, "KILL");
    wait_until("the server notices the hang-up", Duration::from_secs(10), || {
        s.log_text().contains("the client hung up: stopping its builds")
    });
    assert_no_vm_left(launcher, false);
    drop(b);
    nothing_of(&e, &cache, "slow", launcher);

    serves(&e.file, "quick", &s);
    assert_eq!(steps(&cache, "-f-quick.drv"), 1);
    let (st, log) = s.stop("TERM");
    assert!(st.success(), "{log}");
}

/// The pid of the client of the newest session in a `nix-builder --listen` log.
fn last_session_peer(log: &str) -> u32 {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("connected") && l.contains("peer=pid "))
        .unwrap_or_else(|| panic!("no session in the log:\n{log}"));
    let rest = &line[line.find("peer=pid ").unwrap() + 9..];
    rest.split(' ').next().unwrap().parse().unwrap()
}

#[test]
fn a_guest_kernel_panic_or_an_agent_crash_is_a_named_error() {
    let e = setup();
    let cases = [
        // No program at `rdinit=` and none of the kernel's fallbacks in the initramfs: panic.
        (image_dir(), "rdinit=/vouch-no-such-init", "Kernel panic"),
        // The bench image's agent panics right after mounting (its panic hook powers off).
        (bench_image_dir(), "vouch.bench=panic", "PANIC: "),
    ];
    for (i, (image, append, console)) in cases.iter().enumerate() {
        let variant = image_variant(image, &e.s.dir.path().join(format!("image-{i}")), append);
        let s = server(&e, &format!("p{i}"), &vouch_bin(), &variant, None);
        let b = Background::start(&mut nix_build(&e.file, "quick", &s));
        let log =
            fails_naming(b, &["before its agent connected", "nothing was registered", console]);
        assert!(log.contains("retrying"), "one retry in a fresh VM: {log}");
        assert_no_vm_left(s.pid(), false);
        nothing_of(&e, &e.state.join("cache"), "quick", s.pid());
        // The service still answers the next client.
        let ping = nix(&["nix", "store", "ping", "--store", &s.store_uri()]);
        assert!(ping.status.success(), "{}", text(&ping));
        let (st, log) = s.stop("TERM");
        assert!(st.success(), "{log}");
    }
}

#[test]
fn a_full_disk_under_the_trace_store_publishes_nothing_and_later_builds_succeed() {
    let e = setup();
    test_support::vm::require_tool("unshare", "apt-get install util-linux");
    // The launcher in a user and mount namespace of its own, its trace store on a 1 MiB tmpfs
    // (gone with the namespace, whatever happens to the test).
    let cache = e.s.dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let wrapper = e.s.dir.path().join("vouch-on-a-small-disk");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec unshare --user --map-root-user --mount sh -c \
             'mount -t tmpfs -o size=1m vouch-full \"$0\" && exec \"$@\"' '{}' '{}' \"$@\"\n",
            cache.display(),
            vouch_bin().display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = server(&e, "b", &wrapper, &image_dir(), Some(&cache));
    // What the launcher sees at `cache`: the tmpfs, in its mount namespace.
    let inside = PathBuf::from(format!("/proc/{}/root{}", s.pid(), cache.display()));

    let b = Background::start(&mut nix_build(&e.file, "big", &s));
    fails_naming(b, &["publishing the step to the trace store", "No space left on device"]);
    nothing_of(&e, &inside, "big", s.pid());
    let left = files_named(&inside, |n| n.ends_with(".narinfo") || n.starts_with(".tmp-"));
    assert!(left.is_empty(), "half-published: {left:?}");
    assert_eq!(files_named(&inside.join("nar"), |_| true).len(), 0);
    assert_no_vm_left(s.pid(), false);

    serves(&e.file, "quick", &s);
    assert_eq!(steps(&inside, "-f-quick.drv"), 1);
    assert_eq!(files_named(&inside, |n| n.ends_with(".narinfo")).len(), 1);
    let (st, log) = s.stop("TERM");
    assert!(st.success(), "{log}");
}

/// Files under `dir` (recursively) whose name satisfies `want`.
fn files_named(dir: &Path, want: impl Fn(&str) -> bool + Copy) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(files_named(&p, want));
        } else if want(&e.file_name().to_string_lossy()) {
            out.push(p);
        }
    }
    out
}

#[test]
fn an_expired_certificate_fails_the_step_and_registers_nothing() {
    let e = setup();
    // The host's simulated root, valid only until yesterday: what a host whose clock runs past
    // its certificates sees (the check uses the host's clock, `Verifier::verify`).
    let day = Duration::from_secs(86_400);
    let now = SystemTime::now();
    let platform = SimulatedRoot::generate().unwrap().platform();
    let root = SimulatedRoot::generate_valid(platform, now - 30 * day, now - day).unwrap();
    root.save(&e.state.join("simulated-snp")).unwrap();
    let drv = e.s.instantiate(&e.file, "quick3");
    let out = e.s.vouch_build(&drv, &[]);
    assert!(!out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("the VM's result was rejected") && t.contains("certificate is not valid at"),
        "{t}"
    );
    e.s.assert_nothing_registered();
}

#[test]
fn a_launcher_paused_while_the_guest_sends_its_outputs_loses_nothing() {
    let e = setup();
    let drv = e.s.instantiate(&e.file, "mid");
    let mut cmd = Command::new(vouch_bin());
    cmd.arg("--state-dir")
        .arg(&e.state)
        .args(["build", &drv, "--cache"])
        .arg(e.s.cache())
        .env("VOUCH_IMAGE_DIR", image_dir());
    let b = Background::start(&mut cmd);
    b.wait_for("attesting");
    // The guest sends all 230 KiB and its Bye into the channel's buffers and, before the fix,
    // powered off at once: the frames still in the vsock backend were lost with QEMU.
    signal(b.pid(), "STOP");
    std::thread::sleep(Duration::from_secs(4));
    signal(b.pid(), "CONT");
    let (st, log) = b.finish();
    assert!(st.success(), "{log}");
    assert!(log.contains("statement, evidence and outputs checked"), "{log}");
}

/// A Nix 2.8 client's worker handshake on `socket`.
fn worker_client(socket: &Path) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_u64(WORKER_MAGIC_1).unwrap();
    s.write_u64(0x122).unwrap();
    assert_eq!(s.read_u64().unwrap(), WORKER_MAGIC_2);
    s.read_u64().unwrap();
    s.write_u64(0).unwrap(); // cpu affinity
    s.write_u64(0).unwrap(); // reserve space
    s.read_string("version").unwrap();
    assert_eq!(s.read_u64().unwrap(), STDERR_LAST);
    s
}

/// `AddToStoreNar` of `nar` as `path`, cut after `cut` bytes of the NAR if given.
/// The content address of `nar` as a recursive fixed output: an upload any client may make.
fn ca_of(nar: &[u8]) -> String {
    format!("fixed:r:{}", build_trace::NarHash::of(nar))
}

/// The content-addressed path named `name` of `nar`.
fn ca_path(name: &str, nar: &[u8]) -> StorePath {
    let any = StorePath::from_parts([0; 20], name).unwrap();
    build_trace::ownership::content_addressed_path(&any, &ca_of(nar), &BTreeSet::new()).unwrap()
}

/// `AddToStoreNar` of `nar` at its content-addressed `path` (the builder trusts no client here,
/// so an upload must be certified: issue 12, item 2).
fn add_to_store_nar(s: &mut UnixStream, path: &StorePath, nar: &[u8], cut: Option<usize>) {
    let info = ValidPathInfo {
        path: path.clone(),
        info: build_trace::PathInfo {
            nar_hash: build_trace::NarHash::of(nar),
            nar_size: nar.len() as u64,
            references: BTreeSet::new(),
            ca: Some(ca_of(nar)),
        },
        deriver: None,
        registration_time: 0,
        ultimate: false,
        sigs: BTreeSet::new(),
    };
    s.write_u64(39).unwrap();
    types::write_upload_info(s, &info).unwrap();
    s.write_u64(0).unwrap(); // repair
    s.write_u64(1).unwrap(); // dontCheckSigs
    let mut fw = FramedWriter::new(&mut *s);
    fw.write_all(&nar[..cut.unwrap_or(nar.len())]).unwrap();
    match cut {
        Some(_) => fw.flush().unwrap(),
        None => fw.finish().unwrap(),
    }
}

#[test]
fn a_client_gone_mid_upload_or_a_locked_database_registers_nothing_half() {
    let e = setup();
    let s = server(&e, "b", &vouch_bin(), &image_dir(), None);
    let mut w = nix_formats::nar::NarWriter::new(Vec::new()).unwrap();
    w.regular(false, &[7u8; 200_000]).unwrap();
    let nar = w.into_inner();
    let half = ca_path("f-half-upload", &nar);
    let whole = ca_path("f-whole-upload", &nar);

    // Mid-upload: half the NAR, then the connection is gone.
    let mut c = worker_client(&s.socket);
    add_to_store_nar(&mut c, &half, &nar, Some(nar.len() / 2));
    drop(c);
    wait_until("the server notices", Duration::from_secs(20), || {
        s.log_text().contains("the client went away mid-upload; nothing of it was registered")
    });
    assert_eq!(stored(&e.state, "-f-half-upload"), 0);
    assert_eq!(files_named(&e.state.join("store/tmp"), |_| true).len(), 0);
    assert_eq!(files_named(&e.state.join("store/nar"), |_| true).len(), 0);

    // The content store's database locked by another process: the upload waits for the lock
    // (the busy timeout, 120 s) instead of failing, and completes once it is released.
    let lock = HeldLock::take(&e.state.join("store/index.sqlite"));
    let t0 = Instant::now();
    let socket = s.socket.clone();
    let (nar2, whole2) = (nar.clone(), whole.clone());
    let upload = std::thread::spawn(move || {
        let mut c = worker_client(&socket);
        add_to_store_nar(&mut c, &whole2, &nar2, None);
        // Log messages until the end of the operation.
        loop {
            match c.read_u64().unwrap() {
                STDERR_LAST => return,
                0x6f6c6d67 => drop(c.read_string("next").unwrap()),
                other => panic!("unexpected STDERR message {other:#x}"),
            }
        }
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(!upload.is_finished(), "the upload did not wait for the lock");
    lock.release();
    upload.join().unwrap();
    assert!(t0.elapsed() >= Duration::from_secs(3));
    assert_eq!(stored(&e.state, "-f-whole-upload"), 1, "{}", s.log_text());
    let (st, log) = s.stop("TERM");
    assert!(st.success(), "{log}");
}
