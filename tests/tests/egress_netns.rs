//! The networked VM's namespace (`host_launcher::vm::egress`), attacked from inside it as its
//! QEMU would connect, IPv4 and IPv6, inside a lab of the test's own namespaces
//! (`tests::netlab`): no VM, so each rule is checked on its own and quickly. The VM end to end
//! (a fixed-output builder behind QEMU's user networking) is `egress_vm.rs`.
//!
//! Each attack has a positive control: with the namespace's filter chains flushed, the same
//! connections reach their servers, so what stops them is the rules, not a missing route. The
//! guest kernel has no IPv6; the IPv6 attacks give the namespace IPv6 by hand, as a compromised
//! or changed namespace would have, to show that the host's table still refuses it.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use host_launcher::vm::egress::{self, Egress, EgressPolicy};
use tests::netlab::{self, in_netns, ip, netns_output, HttpServer, Lab};

const PORT: u16 = 8080;

fn sa(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), PORT)
}

/// The targets: name, address, server.
fn servers(lab: &Lab) -> Vec<(&'static str, SocketAddr, HttpServer)> {
    let mut v = Vec::new();
    for (name, a) in [
        ("public", netlab::PUBLIC),
        ("public6", netlab::PUBLIC6),
        ("rfc1918", netlab::RFC1918),
        ("link-local", netlab::LINK_LOCAL),
        ("cgnat", netlab::CGNAT),
        ("ula", netlab::ULA),
    ] {
        v.push((name, sa(a), lab.serve(&lab.world, sa(a), name)));
    }
    for (name, a) in
        [("host", netlab::HOST_ADDR), ("host6", netlab::HOST_ADDR6), ("host-loopback", "127.0.0.1")]
    {
        v.push((name, sa(a), lab.serve(&lab.host, sa(a), name)));
    }
    v
}

/// Which targets a connection from namespace `netns` reaches (connected and answered).
fn reached(netns: &str, targets: &[(&'static str, SocketAddr, HttpServer)]) -> Vec<&'static str> {
    let addrs: Vec<(&'static str, SocketAddr)> = targets.iter().map(|(n, a, _)| (*n, *a)).collect();
    let before: Vec<usize> = targets.iter().map(|(_, _, s)| s.hits()).collect();
    let connected = in_netns(netns, move || {
        addrs
            .into_iter()
            .filter(|(_, a)| TcpStream::connect_timeout(a, Duration::from_secs(3)).is_ok())
            .map(|(n, _)| n)
            .collect::<Vec<_>>()
    });
    // A connection counts only if the server saw it (and every hit comes with a connection).
    std::thread::sleep(Duration::from_millis(200));
    let hit: Vec<&'static str> = targets
        .iter()
        .zip(before)
        .filter(|((_, _, s), b)| s.hits() > *b)
        .map(|((n, _, _), _)| *n)
        .collect();
    assert_eq!(connected, hit, "connections and server hits disagree");
    hit
}

/// Give the VM namespace IPv6 towards the lab host (fd99::/64 on its link), as a namespace
/// that had IPv6 would; the world routes the answers back.
fn give_ipv6(lab: &Lab, e: &Egress) {
    let ns = e.netns();
    let host_if = e.link().host_if.clone();
    ip(&["-n", &lab.host, "link", "set", &host_if, "addrgenmode", "eui64"]);
    ip(&["-n", &lab.host, "addr", "add", "fd99::1/64", "dev", &host_if, "nodad"]);
    ip(&["-n", ns, "addr", "add", "fd99::2/64", "dev", "eth0", "nodad"]);
    ip(&["-n", ns, "-6", "route", "add", "default", "via", "fd99::1"]);
    let _ = std::process::Command::new("ip")
        .args(["-n", &lab.world, "-6", "route", "add", "fd99::/64", "via", "2001:db8:ff::1"])
        .status();
}

fn links_and_tables(lab: &Lab) -> String {
    let links = netns_output(&lab.host, "ip", &["-o", "link"]);
    let tables = netns_output(&lab.host, "nft", &["list", "tables"]);
    let mine: Vec<&str> = links.lines().filter(|l| l.contains("vouch")).collect();
    format!("{}{}", mine.join("\n"), tables.trim())
}

#[test]
fn a_networked_vm_namespace_reaches_public_addresses_only() {
    let lab = Lab::new();
    let targets = servers(&lab);
    let host = lab.host.clone();
    let tools = in_netns(&host, egress::check_host).unwrap_or_else(|e| {
        panic!("{}", build_trace::error_chain(&e));
    });
    // Everything that touches the namespace runs in the lab host, where vouch would run.
    let lab = std::sync::Arc::new(lab);
    let targets = std::sync::Arc::new(targets);
    let (l, t) = (lab.clone(), targets.clone());
    let netns_names = in_netns(&host, move || {
        let e = Egress::create(&tools, &EgressPolicy::default()).expect("setting up");
        let ns = e.netns().to_owned();
        assert!(ns.starts_with(&format!("vouch-{}-", std::process::id())), "{ns}");
        assert_eq!(reached(&ns, &t), ["public"], "only the public IPv4 address");

        give_ipv6(&l, &e);
        assert_eq!(reached(&ns, &t), ["public"], "IPv6 is refused by the host's table");

        // The operator allows the RFC 1918 address: it alone joins.
        let allow = vec![egress::parse_allowed(netlab::RFC1918).unwrap()];
        let e2 = Egress::create(&tools, &EgressPolicy::new(allow, false)).expect("setting up");
        assert_ne!(e2.link().host_if, e.link().host_if, "two VMs, two links");
        assert_eq!(reached(e2.netns(), &t), ["public", "rfc1918"]);
        let ns2 = e2.netns().to_owned();
        drop(e2);

        // Control: without the filter chains (the masquerade kept), the same connections
        // reach every server but the host's loopback, which the namespace does not share.
        let table = format!("vouch_egress_{}", e.link().host_if.trim_start_matches("vouch"));
        for chain in ["input", "forward"] {
            netns_output(&l.host, "nft", &["flush", "chain", "inet", &table, chain]);
        }
        let mut all = reached(&ns, &t);
        all.sort();
        assert_eq!(
            all,
            ["cgnat", "host", "host6", "link-local", "public", "public6", "rfc1918", "ula"],
            "the control reaches everything the rules stopped"
        );
        drop(e);
        (ns, ns2)
    });
    // Nothing is left: no namespace, link or table.
    let list = String::from_utf8(
        std::process::Command::new("ip").args(["netns", "list"]).output().unwrap().stdout,
    )
    .unwrap();
    for ns in [&netns_names.0, &netns_names.1] {
        assert!(
            !list.lines().any(|l| l.split_whitespace().next() == Some(ns)),
            "{ns} left: {list}"
        );
        assert!(!std::path::Path::new("/etc/netns").join(ns).exists(), "/etc/netns/{ns} left");
    }
    assert_eq!(links_and_tables(&lab), "", "links or tables left in the lab host");
}
