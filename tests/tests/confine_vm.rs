//! The builder's confinement, tested by its effects in real VMs (`vouch build`, KVM where
//! usable, else TCG) with a real Nix 2.8.
//!
//! Each builder **records what it managed to do** into its output (or fails with a limit error),
//! so the tests check effects, with positive controls (loopback networking, ordinary sockets,
//! `/tmp`) that show the probes can succeed. Six VMs in all: one probe build (escapes, leftover
//! processes, no network for a non-fixed-output build), the fork bomb, the memory hog, the tmpfs
//! filler (which also proves that a quiet build is not taken for a stalled channel), and a
//! fixed-output fetch over user-mode networking with the right and with a wrong declared hash,
//! from a public address of the test's own network namespaces (`tests::netlab`), where `vouch`
//! runs too: a networked VM reaches no private address (`egress_vm.rs`).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use test_support::vm::{nix, nonce, Scratch};
use tests::netlab::{self, HttpServer, Lab};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json_of(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "vouch build failed ({}):\n{}", out.status, stderr(out));
    serde_json::from_slice(&out.stdout).expect("vouch build --json prints JSON")
}

/// The probe program (`tests/src/bin/vouch_probe.rs`), compiled static for the guest into
/// `<scratch>/probe/vouch_probe`.
fn build_probe(s: &Scratch) -> PathBuf {
    let dir = s.dir.path().join("probe");
    std::fs::create_dir_all(&dir).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/bin/vouch_probe.rs");
    let out = dir.join("vouch_probe");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let st = Command::new(&rustc)
        .args([
            "--edition",
            "2021",
            "-O",
            "-C",
            "target-feature=+crt-static",
            "-C",
            "strip=symbols",
        ])
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("running {rustc}: {e}"));
    assert!(
        st.status.success(),
        "compiling the static probe failed (needs rustc and glibc's static libc.a, libc6-dev): {}",
        stderr(&st)
    );
    dir
}

/// The Nix file: `bb` (busybox), `mk` (floating-CA derivation running a script file with
/// busybox sh), the probe build, the limit builds and the fetchers.
fn confine_nix(n: &str, port: u16, fetch: &str, good_sha256: &str, bad_sha256: &str) -> String {
    format!(
        r#"let
  bb = builtins.path {{ path = ./bb; name = "busybox"; }};
  probe = builtins.path {{ path = ./probe; name = "vouch-probe"; }};
  mk = name: script: attrs: derivation ({{
    inherit name bb; system = builtins.currentSystem; builder = "${{bb}}/sh"; args = [ script ];
    __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
    nonce = "{n}"; port = "{port}";
  }} // attrs);
  fetch = name: hash: derivation {{
    inherit name bb; system = builtins.currentSystem; builder = "${{bb}}/sh";
    args = [ "-c" "$bb/busybox wget -q -O $out http://$fetch/file" ];
    outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = hash;
    fetch = "{fetch}";
  }};
in {{
  probes = mk "confine-probes" ./probes.sh {{ inherit probe; }};
  forkbomb = mk "confine-forkbomb" ./forkbomb.sh {{ }};
  memhog = mk "confine-memhog" ./memhog.sh {{ }};
  tmpfsfill = mk "confine-tmpfs" ./tmpfsfill.sh {{ }};
  fetched = fetch "fetched-{n}" "{good_sha256}";
  misdeclared = fetch "misdeclared-{n}" "{bad_sha256}";
}}
"#
    )
}

/// The probe builder: every attempt is recorded as `name: ok …` or `name: denied …`.
const PROBES_SH: &str = r#"b=$bb/busybox
$b mkdir $out
r() { echo "$1: $2" >> $out/probes; }
try() {
  n=$1; shift
  if "$@" > $TMPDIR/o 2> $TMPDIR/e < /dev/null; then
    r "$n" "ok $($b head -c 100 $TMPDIR/o | $b tr '\n' ' ')"
  else
    r "$n" "denied $($b head -n 1 $TMPDIR/e)"
  fi
}
# (No `wget -T`: it crashes the static busybox of Debian 12.)
# Positive controls: a server on the builder's own loopback works, /tmp is writable.
$b mkdir $TMPDIR/www
echo loopback-ok > $TMPDIR/www/index.html
$b httpd -p 127.0.0.1:8080 -h $TMPDIR/www
try loopback-http $b wget -q -O - http://127.0.0.1:8080/index.html
try tmp-write $b sh -c 'echo x > /tmp/x'
# The host over TCP: the URL a fetcher would use (no NIC in this VM).
try host-tcp $b wget -q -O - http://10.0.2.2:$port/file
try host-nc $b nc -w 3 10.0.2.2 $port
# The attestation interfaces.
try sev-guest $b cat /dev/sev-guest
try sev $b cat /dev/sev
try tsm-report $b mkdir /sys/kernel/config/tsm/report/probe
try configfs-mount $b mount -t configfs none /tmp
try sysfs-mount $b mount -t sysfs none /tmp
try devtmpfs-mount $b mount -t devtmpfs none /tmp
# The console.
try console $b sh -c 'echo probe > /dev/console'
try ttyS0 $b sh -c 'echo probe > /dev/ttyS0'
try hvc0 $b sh -c 'echo probe > /dev/hvc0'
try kmsg $b sh -c 'echo probe > /dev/kmsg'
try tty $b sh -c 'echo probe > /dev/tty'
try dmesg $b dmesg
# Privileges, namespaces and the agent's files.
try chroot $b chroot / $b true
try userns $b unshare -U $b true
try agent-binary $b cat /init
try agent-sys $b ls /sys/fs/cgroup
r pid "$$"
r uid "$($b id -u)"
r nnp "$($b grep NoNewPrivs /proc/self/status | $b tr -d '\t')"
r seccomp "$($b grep '^Seccomp:' /proc/self/status | $b tr -d '\t')"
r cap-eff "$($b grep CapEff /proc/self/status | $b tr -d '\t')"
r setuid-files "$($b find / -path /proc -prune -o -type f \( -perm -4000 -o -perm -2000 \) -print | $b wc -l)"
# vsock (the host channel's port) and setuid(0), which busybox cannot attempt.
$probe/vouch_probe 1024 >> $out/probes
# Processes left behind: the httpd above, and a writer that keeps appending to $out.
( while :; do echo tick >> $out/bg; $b usleep 2000; done ) &
$b sleep 1
echo exited > $out/exited
"#;

fn parse_probes(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(": ").map(|(k, v)| (k.to_owned(), v.trim().to_owned())))
        .collect()
}

fn setup(s: &Scratch, port: u16, good: &str, bad: &str) -> PathBuf {
    setup_fetching(s, port, "unused:9", good, bad)
}

/// [`setup`], the fetchers fetching from `fetch` (`address:port`).
fn setup_fetching(s: &Scratch, port: u16, fetch: &str, good: &str, bad: &str) -> PathBuf {
    build_probe(s);
    s.write("probes.sh", PROBES_SH);
    s.write(
        "forkbomb.sh",
        "b=$bb/busybox\necho bombing\nbomb() { bomb | bomb & }\nbomb\n$b sleep 120\n",
    );
    s.write(
        "memhog.sh",
        "b=$bb/busybox\necho hogging\n$b awk 'BEGIN { s = \"x\"; while (1) s = s s }'\n$b mkdir $out\n",
    );
    // Silent for longer than the stall window of its test, then fills its tmpfs.
    s.write(
        "tmpfsfill.sh",
        "b=$bb/busybox\necho filling after a quiet while\n$b sleep 12\n$b dd if=/dev/zero of=$TMPDIR/fill bs=1048576 count=64 2>&1 || exit 1\n$b mkdir $out\n",
    );
    s.write("confine.nix", &confine_nix(&nonce(), port, fetch, good, bad))
}

fn sha256_hex(data: &[u8]) -> String {
    let out = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(data)?;
            c.wait_with_output()
        })
        .expect("sha256sum");
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// The escapes of the issue, each recorded by the builder: none succeeds, the controls do; the
/// leftover processes are gone before hashing; a non-fixed-output build has no network.
#[test]
fn builder_cannot_escape_and_leaves_nothing_running() {
    let s = Scratch::new();
    // A server on the host's loopback: what a guest with user networking would reach as
    // 10.0.2.2 (this one has no NIC).
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding the test HTTP server");
    let server = HttpServer::start(listener, "not for you\n");
    let file = setup(&s, server.addr.port(), &"00".repeat(32), &"11".repeat(32));
    let drv = s.instantiate(&file, "probes");
    let link = s.dir.path().join("result");
    let out = s.vouch_build(
        &drv,
        &[
            "--json",
            "--console",
            "--timeout",
            "300",
            "--import",
            "--out-link",
            link.to_str().unwrap(),
        ],
    );
    let v = json_of(&out);
    let err = stderr(&out);
    let path = v["outputs"]["out"]["path"].as_str().unwrap().to_owned();
    let probes = parse_probes(&std::fs::read_to_string(Path::new(&path).join("probes")).unwrap());
    let get =
        |k: &str| probes.get(k).unwrap_or_else(|| panic!("no probe {k} in {probes:#?}")).as_str();

    // Controls: the sandbox still lets a build work.
    assert_eq!(get("loopback-http"), "ok loopback-ok", "{probes:#?}");
    assert!(get("tmp-write").starts_with("ok"), "{probes:#?}");
    assert_eq!(get("inet-socket"), "ok");

    for k in [
        "host-tcp",
        "host-nc",
        "sev-guest",
        "sev",
        "tsm-report",
        "configfs-mount",
        "sysfs-mount",
        "devtmpfs-mount",
        "console",
        "ttyS0",
        "hvc0",
        "kmsg",
        "tty",
        "dmesg",
        "chroot",
        "userns",
        "agent-binary",
        "agent-sys",
        "vsock-socket",
        "vsock-connect-host",
        "vsock-socketpair",
        "setuid0",
        "setgid0",
    ] {
        assert!(get(k).starts_with("denied"), "{k} was not denied: {probes:#?}");
    }
    // AF_VSOCK is refused by the seccomp filter itself (EAFNOSUPPORT), not by chance.
    assert_eq!(get("vsock-socket"), "denied (errno 97)");
    assert_eq!(get("setuid0"), "denied (errno 1)");
    assert_eq!(get("pid"), "1", "the builder is PID 1 of its own namespace");
    assert_eq!(get("uid"), "1000");
    assert_eq!(get("nnp"), "NoNewPrivs:1");
    assert_eq!(get("seccomp"), "Seccomp:2");
    assert_eq!(get("cap-eff"), "CapEff:0000000000000000");
    assert_eq!(get("setuid-files"), "0");

    // Nothing reached the host's server: no network without a fixed output.
    assert_eq!(server.hits(), 0, "a non-fixed-output build reached the host");
    let trace = PathBuf::from(v["trace"].as_str().unwrap());
    let st = build_trace::Statement::from_canonical_bytes(
        &std::fs::read(trace.join("statement.json")).unwrap(),
    )
    .unwrap();
    assert!(!st.job.network);
    assert_eq!(st.job.limits.max_processes, 4096, "the launcher's default limits are in the job");

    // The leftovers (httpd, the writer) were killed before hashing: the output is complete,
    // the writer did run, and the NAR the host received still had the hash computed in the
    // guest (a writer alive after hashing would have changed it: the step would be rejected).
    assert_eq!(std::fs::read_to_string(Path::new(&path).join("exited")).unwrap(), "exited\n");
    assert!(std::fs::read_to_string(Path::new(&path).join("bg")).unwrap().starts_with("tick\n"));
    assert!(err.contains("build cgroup empty: no builder process is left"), "{err}");
    let hash = nix(&["nix-store", "-q", "--hash", &path]);
    let nar_hash = v["outputs"]["out"]["nar_hash"].as_str().unwrap();
    assert_eq!(String::from_utf8_lossy(&hash.stdout).trim(), nar_hash);
}

fn expect_limit(s: &Scratch, drv: &str, args: &[&str], needle: &str) {
    let out = s.vouch_build(drv, args);
    let err = stderr(&out);
    assert!(!out.status.success(), "the build should fail:\n{err}");
    // The agent reported it (the VM survived its builder): a guest failure of its own kind.
    assert!(err.contains("build failed in the VM (ResourceLimit)"), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in:\n{err}");
    s.assert_nothing_registered();
}

#[test]
fn fork_bomb_fails_with_the_process_limit() {
    let s = Scratch::new();
    let file = setup(&s, 9, &"00".repeat(32), &"11".repeat(32));
    let drv = s.instantiate(&file, "forkbomb");
    expect_limit(
        &s,
        &drv,
        &["--max-processes", "32", "--timeout", "300"],
        "process limit exceeded: the build tried to run more than 32 processes",
    );
}

#[test]
fn memory_hog_fails_with_the_memory_limit() {
    let s = Scratch::new();
    let file = setup(&s, 9, &"00".repeat(32), &"11".repeat(32));
    let drv = s.instantiate(&file, "memhog");
    expect_limit(
        &s,
        &drv,
        &["--max-memory", "64", "--timeout", "300"],
        "memory limit exceeded: the build reached its memory limit (memory.max = 67108864 bytes",
    );
}

/// A builder that fills its tmpfs fails with the disk-space limit error. It is first silent for
/// 12 s, more than twice the stall window it runs under (5 s): the agent's heartbeats keep the
/// channel alive, so a quiet build is not mistaken for a stalled channel.
#[test]
fn tmpfs_filler_fails_with_the_disk_limit_and_a_quiet_build_is_not_a_stall() {
    let s = Scratch::new();
    let file = setup(&s, 9, &"00".repeat(32), &"11".repeat(32));
    let drv = s.instantiate(&file, "tmpfsfill");
    let out = s.vouch_build(
        &drv,
        &["--tmpfs-size", "16", "--timeout", "300", "--stall-timeout", "5", "--console"],
    );
    let err = stderr(&out);
    assert!(!out.status.success(), "the build should fail:\n{err}");
    assert!(err.contains("build failed in the VM (ResourceLimit)"), "{err}");
    assert!(err.contains("disk space limit exceeded: /build is full"), "{err}");
    assert!(!err.contains("channel stalled") && !err.contains("retrying"), "{err}");
    // The agent heartbeated through the quiet part (it says how often on its console).
    let beats: u64 = err
        .lines()
        .find_map(|l| {
            l.trim_end()
                .split("vouch-agent: ")
                .nth(1)?
                .strip_suffix(" heartbeats sent")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no heartbeat count on the console:\n{err}"));
    assert!(beats >= 5, "{beats} heartbeats in a build with 12 s of silence");
    s.assert_nothing_registered();
}

/// A fixed-output derivation fetches over user-mode networking, from a public address of the
/// test's own namespaces, and is accepted by its declared hash; the same fetch with a wrong
/// declared hash is rejected (and nothing kept).
#[test]
fn fixed_output_fetches_over_user_networking_and_needs_its_declared_hash() {
    let lab = Lab::new();
    let s = Scratch::new();
    let body = format!("fetched over user-mode networking {}\n", nonce());
    let server = lab.serve(&lab.world, SocketAddr::new(netlab::PUBLIC.parse().unwrap(), 80), &body);
    let fetch = format!("{}:80", netlab::PUBLIC);
    let good = sha256_hex(body.as_bytes());
    let bad = sha256_hex(b"something else");
    let file = setup_fetching(&s, 9, &fetch, &good, &bad);
    let on_lab_host = ["ip", "netns", "exec", lab.host.as_str()];

    let drv = s.instantiate(&file, "fetched");
    let link = s.dir.path().join("fetched");
    let (_, out) = s.vouch_build_under(
        &on_lab_host,
        &drv,
        &["--json", "--timeout", "300", "--import", "--out-link", link.to_str().unwrap()],
    );
    let v = json_of(&out);
    assert_eq!(server.hits(), 1, "the guest fetched from the public address");
    let out = &v["outputs"]["out"];
    let path = out["path"].as_str().unwrap();
    let declared = nix(&["nix-store", "-q", "--outputs", &drv]);
    assert_eq!(String::from_utf8_lossy(&declared.stdout).trim(), path, "the declared path");
    assert_eq!(std::fs::read_to_string(path).unwrap(), body);
    let ca = out["ca"].as_str().unwrap();
    assert!(ca.starts_with("fixed:sha256:"), "{ca}");
    let flat = nix(&["nix-hash", "--type", "sha256", "--flat", path]);
    assert_eq!(String::from_utf8_lossy(&flat.stdout).trim(), good, "the declared hash");
    let trace = PathBuf::from(v["trace"].as_str().unwrap());
    let st = build_trace::Statement::from_canonical_bytes(
        &std::fs::read(trace.join("statement.json")).unwrap(),
    )
    .unwrap();
    assert!(st.job.network, "the statement says the VM had network");

    let s2 = Scratch::new();
    let file = setup_fetching(&s2, 9, &fetch, &good, &bad);
    let drv = s2.instantiate(&file, "misdeclared");
    let (_, out) = s2.vouch_build_under(&on_lab_host, &drv, &["--timeout", "300"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert_eq!(server.hits(), 2, "it did fetch");
    assert!(err.contains("hash mismatch in fixed-output derivation"), "{err}");
    s2.assert_nothing_registered();
}
