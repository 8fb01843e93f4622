//! What a networked VM may reach, as nftables rules: a pure function of the VM's link and the
//! operator's allowed ranges ([`ruleset`]), unit-tested as text.
//!
//! The rules live in a table of their own in the **host's** namespace (QEMU, in the VM's
//! namespace, cannot change them), one table per VM, named after its host-side veth:
//! - `input`: from the VM's link, only DNS to the relay on the host end of the link (and
//!   destinations the operator allowed); everything else addressed to this host — any of its
//!   addresses, now or later (the kernel routes to `input` exactly what is local) — is rejected.
//! - `forward`: from the VM's link, every IPv6 packet is rejected (the guest has no IPv6, so no
//!   IPv6 egress is offered); IPv4 to the operator's allowed ranges is accepted, to a [`DENIED`]
//!   range rejected, anything else accepted. Towards the VM's link only replies pass.
//! - `postrouting`: what leaves from the VM's link is masqueraded to the host's address.
//!
//! Rejections are `icmpx admin-prohibited`, so that QEMU's connect fails at once and the guest
//! sees a reset rather than waiting for a timeout.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// IPv4 destinations a networked build is denied unless the operator allows them: "this
/// network", RFC 1918, CGNAT (RFC 6598), loopback, link-local (cloud metadata services live
/// there), multicast, and the reserved and broadcast block. Non-overlapping (an nftables interval
/// set refuses overlaps). Documentation, benchmarking and IETF ranges are not here: they are
/// not private networks.
pub const DENIED: &[(&str, &str)] = &[
    ("0.0.0.0/8", "this network"),
    ("10.0.0.0/8", "RFC 1918"),
    ("100.64.0.0/10", "CGNAT (RFC 6598)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local, cloud metadata"),
    ("172.16.0.0/12", "RFC 1918"),
    ("192.168.0.0/16", "RFC 1918"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved, broadcast"),
];

/// One VM's link: the host-side veth and the two ends' addresses (a /31).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// The host-side veth's name (`vouch<index>`), also the table's suffix.
    pub host_if: String,
    /// The host end's address (the VM namespace's gateway and DNS relay).
    pub host_addr: Ipv4Addr,
    /// The VM namespace's end.
    pub vm_addr: Ipv4Addr,
}

/// The nftables table name of `link`.
pub fn table_name(link: &Link) -> String {
    format!("vouch_egress_{}", link.host_if.trim_start_matches("vouch"))
}

fn set(nets: &[Ipv4Net]) -> String {
    let items: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
    format!("{{ {} }}", items.join(", "))
}

/// The nftables script that creates the table of `link` (see the module docs), replacing a
/// stale one of a launcher that died (`nft -f` applies a script atomically). `allowed` must be
/// aggregated (no overlaps: [`super::EgressPolicy::new`] does it).
pub fn ruleset(link: &Link, allowed: &[Ipv4Net]) -> String {
    let table = table_name(link);
    let (i, h) = (&link.host_if, link.host_addr);
    let denied: Vec<Ipv4Net> = DENIED.iter().map(|(n, _)| n.parse().expect("a CIDR")).collect();
    let reject = "counter reject with icmpx admin-prohibited";
    let mut s = String::new();
    let mut line = |l: &str| {
        s.push_str(l);
        s.push('\n');
    };
    line(&format!("table inet {table}"));
    line(&format!("delete table inet {table}"));
    line(&format!("table inet {table} {{"));
    line("  chain input {");
    line("    type filter hook input priority filter - 10; policy accept;");
    line(&format!("    iifname \"{i}\" ip daddr {h} udp dport 53 accept"));
    if !allowed.is_empty() {
        line(&format!("    iifname \"{i}\" ip daddr {} accept", set(allowed)));
    }
    line(&format!("    iifname \"{i}\" {reject}"));
    line("  }");
    line("  chain forward {");
    line("    type filter hook forward priority filter - 10; policy accept;");
    line(&format!("    iifname \"{i}\" meta nfproto ipv6 {reject}"));
    if !allowed.is_empty() {
        line(&format!("    iifname \"{i}\" ip daddr {} accept", set(allowed)));
    }
    line(&format!("    iifname \"{i}\" ip daddr {} {reject}", set(&denied)));
    line(&format!("    oifname \"{i}\" ct state established,related accept"));
    line(&format!("    oifname \"{i}\" counter drop"));
    line("  }");
    line("  chain postrouting {");
    line("    type nat hook postrouting priority srcnat; policy accept;");
    line(&format!("    iifname \"{i}\" oifname != \"{i}\" masquerade"));
    line("  }");
    line("}");
    s
}

/// A one-line summary of what the rules deny, for logs and errors.
pub fn summary(allowed: &[Ipv4Net]) -> String {
    let mut s = String::from("denied: IPv6, this host's addresses");
    for (net, what) in DENIED {
        let _ = write!(s, ", {net} ({what})");
    }
    if !allowed.is_empty() {
        let list: Vec<String> = allowed.iter().map(|n| n.to_string()).collect();
        let _ = write!(s, "; allowed by the operator: {}", list.join(", "));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link() -> Link {
        Link {
            host_if: "vouch7".into(),
            host_addr: "169.254.64.14".parse().unwrap(),
            vm_addr: "169.254.64.15".parse().unwrap(),
        }
    }

    #[test]
    fn the_denied_ranges_do_not_overlap_and_cover_the_private_ones() {
        let nets: Vec<Ipv4Net> = DENIED.iter().map(|(n, _)| n.parse().unwrap()).collect();
        for (a, x) in nets.iter().enumerate() {
            for y in &nets[a + 1..] {
                assert!(!x.contains(y) && !y.contains(x), "{x} overlaps {y}");
            }
        }
        let denied = |ip: &str| {
            let ip: Ipv4Addr = ip.parse().unwrap();
            nets.iter().any(|n| n.contains(&ip))
        };
        for ip in ["10.0.2.2", "127.0.0.1", "169.254.169.254", "172.17.0.1", "192.168.1.1"] {
            assert!(denied(ip), "{ip}");
        }
        for ip in ["100.64.0.1", "100.127.255.254", "0.0.0.0", "255.255.255.255", "224.0.0.1"] {
            assert!(denied(ip), "{ip}");
        }
        for ip in ["198.51.100.10", "1.1.1.1", "100.128.0.1", "172.32.0.1", "192.0.2.1"] {
            assert!(!denied(ip), "{ip}");
        }
    }

    #[test]
    fn the_table_denies_before_it_accepts_and_allows_only_what_the_operator_named() {
        let r = ruleset(&link(), &[]);
        assert!(
            r.starts_with(
                "table inet vouch_egress_7\ndelete table inet vouch_egress_7\ntable inet vouch_egress_7 {\n"
            ),
            "{r}"
        );
        assert!(!r.contains("daddr { } accept"), "no empty allow set: {r}");
        let input: Vec<&str> = r.lines().skip_while(|l| !l.contains("chain input")).collect();
        assert!(input[2].contains("ip daddr 169.254.64.14 udp dport 53 accept"), "{r}");
        assert!(input[3].ends_with("iifname \"vouch7\" counter reject with icmpx admin-prohibited"));
        assert!(r.contains("iifname \"vouch7\" meta nfproto ipv6 counter reject"), "{r}");
        assert!(r.contains("10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16"), "{r}");
        assert!(r.contains("iifname \"vouch7\" oifname != \"vouch7\" masquerade"), "{r}");

        let allowed: Vec<Ipv4Net> = vec!["10.1.0.0/16".parse().unwrap()];
        let r = ruleset(&link(), &allowed);
        let fwd: Vec<&str> = r.lines().skip_while(|l| !l.contains("chain forward")).collect();
        assert!(fwd[3].ends_with("ip daddr { 10.1.0.0/16 } accept"), "{r}");
        assert!(fwd[4].contains("ip daddr { 0.0.0.0/8, 10.0.0.0/8"), "the allow comes first: {r}");
        assert!(summary(&allowed).ends_with("allowed by the operator: 10.1.0.0/16"));
    }
}
