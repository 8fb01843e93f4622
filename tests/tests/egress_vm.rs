//! Issue 12, item 6: a fixed-output builder, inside a real VM behind QEMU's user networking,
//! tries to reach the host and its private networks. Everything it tries is hosted by the test's
//! own namespaces (`tests::netlab`), where `vouch build` runs too: the host's loopback through
//! 10.0.2.2, the host's own address, an RFC 1918, a link-local and a CGNAT address; and a public
//! (documentation-range) address that it may reach. (The guest has no IPv6; the IPv6 rules are
//! attacked from the VM's namespace in `egress_netns.rs`.)
//!
//! The same derivation runs twice: with `--unfiltered-network` (QEMU in the host's namespace, as
//! before the fix) it reaches every one of them, which shows the attack works; by default it
//! reaches only the public address, and the VM's namespace, link and rules are gone afterwards.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use test_support::vm::{nonce, Scratch};
use tests::netlab::{self, netns_output, HttpServer, Lab};

const PORT: u16 = 8080;

fn sha256_hex(data: &[u8]) -> String {
    let mut c = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    c.stdin.take().unwrap().write_all(data).unwrap();
    String::from_utf8(c.wait_with_output().unwrap().stdout).unwrap()[..64].to_owned()
}

/// The builder: tries each forbidden target, saying what happened in its log, then fetches the
/// public one into `$out` (so the output, and its declared hash, are the same either way).
const ATTACK_SH: &str = r#"b=$bb/busybox
for t in $forbidden; do
  if $b timeout 15 $b wget -q -O /dev/null http://$t/; then echo "ATTACK reached $t"; else echo "ATTACK denied $t"; fi
done
$b wget -q -O $out http://$public/
"#;

fn attack_nix(n: &str, sha256: &str, forbidden: &str) -> String {
    format!(
        r#"let bb = builtins.path {{ path = ./bb; name = "busybox"; }}; in {{ attack = derivation {{
  name = "egress-attack-{n}"; inherit bb; system = builtins.currentSystem;
  builder = "${{bb}}/sh"; args = [ ./attack.sh ];
  forbidden = "{forbidden}"; public = "{public}:{PORT}";
  outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "{sha256}";
}}; }}
"#,
        public = netlab::PUBLIC
    )
}

struct Target {
    name: &'static str,
    /// What the guest connects to.
    url: String,
    server: HttpServer,
}

fn targets(lab: &Lab) -> Vec<Target> {
    let sa = |ip: &str| SocketAddr::new(ip.parse().unwrap(), PORT);
    let mut v = vec![
        // 10.0.2.2 is QEMU's name for the loopback of the namespace QEMU runs in.
        Target {
            name: "host-loopback",
            url: format!("10.0.2.2:{PORT}"),
            server: lab.serve(&lab.host, sa("127.0.0.1"), "loopback"),
        },
        Target {
            name: "host-address",
            url: format!("{}:{PORT}", netlab::HOST_ADDR),
            server: lab.serve(&lab.host, sa(netlab::HOST_ADDR), "host"),
        },
    ];
    for (name, a) in
        [("rfc1918", netlab::RFC1918), ("link-local", netlab::LINK_LOCAL), ("cgnat", netlab::CGNAT)]
    {
        v.push(Target {
            name,
            url: format!("{a}:{PORT}"),
            server: lab.serve(&lab.world, sa(a), name),
        });
    }
    v
}

/// Build the attack in the lab host with `extra` flags: the output, the targets reached (by
/// their servers' counts) and vouch's process id.
fn attack(
    lab: &Lab,
    targets: &[Target],
    body: &str,
    extra: &[&str],
) -> (String, Vec<&'static str>, u32) {
    let s = Scratch::new();
    s.write("attack.sh", ATTACK_SH);
    let forbidden: Vec<&str> = targets.iter().map(|t| t.url.as_str()).collect();
    let file = s.write(
        "attack.nix",
        &attack_nix(&nonce(), &sha256_hex(body.as_bytes()), &forbidden.join(" ")),
    );
    let drv = s.instantiate(&file, "attack");
    let before: Vec<usize> = targets.iter().map(|t| t.server.hits()).collect();
    let mut args = vec!["--json", "--console", "--timeout", "600", "--import"];
    args.extend_from_slice(extra);
    let (pid, out) = s.vouch_build_under(&["ip", "netns", "exec", &lab.host], &drv, &args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "vouch build failed ({}):\n{err}", out.status);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let path = v["outputs"]["out"]["path"].as_str().unwrap();
    let reached = targets
        .iter()
        .zip(before)
        .filter(|(t, b)| t.server.hits() > *b)
        .map(|(t, _)| t.name)
        .collect();
    // The builder's own account, for the failure message.
    let log: Vec<&str> = err.lines().filter(|l| l.contains("ATTACK ")).collect();
    eprintln!("{}", log.join("\n"));
    (std::fs::read_to_string(Path::new(path)).unwrap_or_default(), reached, pid)
}

#[test]
fn a_fixed_output_builder_reaches_public_addresses_only() {
    let lab = Lab::new();
    let body = format!("public {}\n", nonce());
    let public =
        lab.serve(&lab.world, SocketAddr::new(netlab::PUBLIC.parse().unwrap(), PORT), &body);
    let targets = targets(&lab);

    // Before the fix (now only with the unsafe flag): every target is reached.
    let (out, reached, _) = attack(&lab, &targets, &body, &["--unfiltered-network"]);
    assert_eq!(out, body);
    assert_eq!(
        reached,
        ["host-loopback", "host-address", "rfc1918", "link-local", "cgnat"],
        "the attack works on QEMU's unfiltered user networking"
    );
    assert_eq!(public.hits(), 1);

    // The default: none is reached, the public address is.
    let (out, reached, pid) = attack(&lab, &targets, &body, &[]);
    assert_eq!(out, body, "the fetch from the public address still works");
    assert_eq!(public.hits(), 2);
    assert!(reached.is_empty(), "a fixed-output builder reached {reached:?}");

    // The VM's namespace, link, rules and resolv.conf are gone.
    let list =
        String::from_utf8(Command::new("ip").args(["netns", "list"]).output().unwrap().stdout)
            .unwrap();
    let prefix = format!("vouch-{pid}-");
    assert!(!list.contains(&prefix), "a namespace of vouch {pid} is left: {list}");
    let links = netns_output(&lab.host, "ip", &["-o", "link"]);
    assert!(!links.contains("vouch"), "{links}");
    assert_eq!(netns_output(&lab.host, "nft", &["list", "tables"]).trim(), "");
    let etc: Vec<_> = std::fs::read_dir("/etc/netns")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(!etc.iter().any(|n: &String| n.starts_with(&prefix)), "{etc:?}");
}
