//! Where a networked (fixed-output) VM's packets may go.
//!
//! QEMU's user networking has no destination filter: a builder reaches whatever QEMU's process
//! can, including 10.0.2.2 (the host's loopback) and the host's private networks. So the
//! networked VM's QEMU runs in a **network namespace of its own** (`vouch-<pid>-<index>`), whose
//! only link is a veth pair to the host (`vouch<index>` on the host side, a /31 of
//! [`POOL`]): its loopback is its own and empty (10.0.2.2 reaches nothing), and everything else
//! leaves through the host, where an nftables table of this VM ([`rules`]) rejects the denied
//! ranges and this host's own addresses, rejects all IPv6, and masquerades the rest. The
//! guest's DNS goes through a relay on the host end of the link ([`dns`]).
//!
//! Why not filter QEMU's sockets in the host's namespace: rules keyed to a process (cgroup, uid)
//! cannot express "not this host's own addresses" without listing them, while the namespace makes
//! loopback unreachable by construction and puts every host address behind the `input` hook.
//! Why slirp stays: the guest image and its static addresses (10.0.2.15 via 10.0.2.2) stay the
//! same, so the measurement does not depend on the host's networking.
//!
//! Setting up needs `ip` (iproute2) and `nft` (nftables), CAP_NET_ADMIN and CAP_SYS_ADMIN (for
//! `ip netns`), and IPv4 forwarding on (`net.ipv4.ip_forward = 1`: the host routes the VM's
//! packets). [`check_host`] says which is missing, before any VM starts; without them networked
//! builds are refused, unless the operator passes `--unfiltered-network` (unsafe: QEMU in the
//! host's namespace, as before). The namespace, veth, table, `/etc/netns/<ns>/` and relay of a
//! VM are removed when its [`Egress`] is dropped, which happens after its QEMU is killed, on
//! every path; the veth goes first, so no moment exists where the VM's link is up without its
//! rules.
//!
//! What is not here: which VM gets a NIC ([`super::network`]), the QEMU argv ([`super::qemu_argv`]).

pub mod dns;
pub mod rules;

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;

pub use rules::Link;

/// The link addresses of networked VMs: /31s of 169.254.64.0/18 (link-local, clear of the
/// reserved first and last /24 and of the metadata services at 169.254.169.x).
pub const POOL: &str = "169.254.64.0/18";
const POOL_BASE: u32 = u32::from_be_bytes([169, 254, 64, 0]);
const POOL_PAIRS: u32 = 1 << 13;

/// What the operator says about networked builds (`--allow-egress`, `--unfiltered-network`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    allow: Vec<Ipv4Net>,
    unfiltered: bool,
}

impl EgressPolicy {
    /// Networked builds may also reach `allow` (merged), or, with `unfiltered`, anything.
    pub fn new(allow: Vec<Ipv4Net>, unfiltered: bool) -> EgressPolicy {
        EgressPolicy { allow: Ipv4Net::aggregate(&allow), unfiltered }
    }

    /// The ranges the operator allowed.
    pub fn allowed(&self) -> &[Ipv4Net] {
        &self.allow
    }

    /// Whether networked VMs get QEMU's unfiltered user networking (unsafe).
    pub fn unfiltered(&self) -> bool {
        self.unfiltered
    }
}

/// Parse an `--allow-egress` value: an IPv4 address or CIDR.
pub fn parse_allowed(s: &str) -> Result<Ipv4Net, String> {
    if let Ok(net) = s.parse::<Ipv4Net>() {
        return Ok(net.trunc());
    }
    if let Ok(ip) = s.parse::<Ipv4Addr>() {
        return Ok(Ipv4Net::from(ip));
    }
    if s.contains(':') {
        return Err(format!(
            "{s:?}: IPv6 egress is not offered (the guest has no IPv6), so there is nothing to allow"
        ));
    }
    Err(format!("{s:?} is not an IPv4 address or CIDR such as 10.1.0.0/16"))
}

const UNSAFE_HINT: &str = "or pass --unfiltered-network to give fixed-output builders QEMU's \
    unfiltered user networking (UNSAFE: they then reach this host's loopback services, its \
    private networks and cloud metadata)";

/// Why a networked VM cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// The host lacks a tool, a capability or forwarding.
    #[error(
        "the networked fixed-output variant is not available on this host: {0}; {UNSAFE_HINT}"
    )]
    Unavailable(String),
    /// A command failed.
    #[error("setting up the networked VM's namespace: `{cmd}` failed: {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// What it said.
        stderr: String,
    },
    /// Local trouble (the relay's socket, `/etc/netns`).
    #[error("setting up the networked VM's namespace: {0}")]
    Io(String, #[source] io::Error),
    /// The pair of addresses tried is in use on this host (another one is tried).
    #[error("the addresses of {0} are in use on this host")]
    Taken(String),
    /// Every address tried was taken.
    #[error("no free link address for the networked VM in {POOL} after {0} tries")]
    NoFreeLink(u32),
}

/// The tools [`check_host`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    ip: PathBuf,
    nft: PathBuf,
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Whether a `/proc/self/status` text has capability `bit` effective.
fn has_cap(status: &str, bit: u32) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << bit) != 0)
}

/// Whether this host can run a filtered networked VM: the tools, the capabilities, forwarding.
pub fn check_host() -> Result<Tools, EgressError> {
    let missing = |tool: &str, package: &str| {
        EgressError::Unavailable(format!(
            "`{tool}` was not found in $PATH, /usr/sbin or /sbin (install {package}; \
             scripts/setup-host.sh does)"
        ))
    };
    let ip = find_tool("ip").ok_or_else(|| missing("ip", "iproute2"))?;
    let nft = find_tool("nft").ok_or_else(|| missing("nft", "nftables"))?;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    // CAP_NET_ADMIN (12): the veth and the rules; CAP_SYS_ADMIN (21): `ip netns`.
    if !has_cap(&status, 12) || !has_cap(&status, 21) {
        return Err(EgressError::Unavailable(
            "vouch lacks CAP_NET_ADMIN or CAP_SYS_ADMIN, which the VM's network namespace and \
             its nftables rules need (run it as root)"
                .into(),
        ));
    }
    let fwd = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
    if fwd.trim() != "1" {
        return Err(EgressError::Unavailable(
            "IPv4 forwarding is off (net.ipv4.ip_forward = 0), so the host cannot route the VM's \
             namespace out; enable it (`sysctl -w net.ipv4.ip_forward=1`)"
                .into(),
        ));
    }
    Ok(Tools { ip, nft })
}

fn run(tool: &Path, args: &[&str], stdin: Option<&str>) -> Result<(), EgressError> {
    use std::io::Write;
    let cmd = || format!("{} {}", tool.display(), args.join(" "));
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| EgressError::Io(format!("running {}", cmd()), e))?;
    if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(text.as_bytes())
            .map_err(|e| EgressError::Io(format!("feeding {}", cmd()), e))?;
    }
    let out = child.wait_with_output().map_err(|e| EgressError::Io(cmd(), e))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    Err(EgressError::Command { cmd: cmd(), stderr })
}

/// Whether `e` says that the names or addresses tried are taken (another pair is tried).
fn taken(e: &EgressError) -> bool {
    match e {
        EgressError::Taken(_) => true,
        EgressError::Command { stderr, .. } => stderr.contains("File exists"),
        _ => false,
    }
}

/// The link of pool pair `index`.
fn link(index: u32) -> Link {
    let host = POOL_BASE + 2 * index;
    Link {
        host_if: format!("vouch{index}"),
        host_addr: Ipv4Addr::from(host),
        vm_addr: Ipv4Addr::from(host + 1),
    }
}

/// One networked VM's namespace, link, rules and DNS relay; all removed on drop.
#[derive(Debug)]
pub struct Egress {
    tools: Tools,
    netns: String,
    link: Link,
    netns_made: bool,
    veth: bool,
    table: bool,
    etc: Option<PathBuf>,
    relay: Option<dns::Relay>,
}

impl Egress {
    /// Set up a namespace for one VM under `policy` (see the module docs).
    pub fn create(tools: &Tools, policy: &EgressPolicy) -> Result<Egress, EgressError> {
        use rand_core::RngCore;
        const TRIES: u32 = 32;
        for _ in 0..TRIES {
            let index = rand_core::OsRng.next_u32() % POOL_PAIRS;
            let mut e = Egress {
                tools: tools.clone(),
                netns: format!("vouch-{}-{index}", std::process::id()),
                link: link(index),
                netns_made: false,
                veth: false,
                table: false,
                etc: None,
                relay: None,
            };
            match e.set_up(policy) {
                Ok(()) => return Ok(e),
                Err(err) if taken(&err) => continue,
                Err(err) => return Err(err),
            }
        }
        Err(EgressError::NoFreeLink(TRIES))
    }

    fn ip(&self, args: &[&str]) -> Result<(), EgressError> {
        run(&self.tools.ip, args, None)
    }

    fn set_up(&mut self, policy: &EgressPolicy) -> Result<(), EgressError> {
        let (ns, l) = (self.netns.clone(), self.link.clone());
        let (host_if, host_cidr, vm_cidr, gw) = (
            l.host_if.as_str(),
            format!("{}/31", l.host_addr),
            format!("{}/31", l.vm_addr),
            l.host_addr.to_string(),
        );
        // An address already on this host (binding to it works) is not for us.
        if std::net::UdpSocket::bind((l.host_addr, 0)).is_ok()
            || std::net::UdpSocket::bind((l.vm_addr, 0)).is_ok()
        {
            return Err(EgressError::Taken(l.host_if.clone()));
        }
        self.ip(&["netns", "add", &ns])?;
        self.netns_made = true;
        // The host-side name is the claim on the pair of addresses: taken, "File exists".
        self.ip(&["link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
        self.veth = true;
        // No IPv6 on the link at all (no link-local addresses either).
        self.ip(&["link", "set", host_if, "addrgenmode", "none"])?;
        self.ip(&["-n", &ns, "link", "set", "eth0", "addrgenmode", "none"])?;
        self.ip(&["addr", "add", &host_cidr, "dev", host_if])?;
        let script = rules::ruleset(&l, &policy.allow);
        run(&self.tools.nft, &["-f", "-"], Some(&script))?;
        self.table = true;
        self.ip(&["link", "set", host_if, "up"])?;
        self.ip(&["-n", &ns, "addr", "add", &vm_cidr, "dev", "eth0"])?;
        self.ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        self.ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        self.ip(&["-n", &ns, "route", "add", "default", "via", &gw, "dev", "eth0"])?;

        let upstreams =
            dns::name_servers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default());
        let listen = SocketAddr::new(l.host_addr.into(), 53);
        let relay = dns::Relay::start(listen, l.vm_addr.into(), upstreams)
            .map_err(|e| EgressError::Io(format!("starting the DNS relay on {listen}"), e))?;
        self.relay = Some(relay);
        // `ip netns exec` bind-mounts this over /etc/resolv.conf for QEMU alone.
        let etc = Path::new("/etc/netns").join(&ns);
        self.etc = Some(etc.clone());
        std::fs::create_dir_all(&etc)
            .and_then(|()| std::fs::write(etc.join("resolv.conf"), format!("nameserver {gw}\n")))
            .map_err(|e| EgressError::Io(format!("writing {}/resolv.conf", etc.display()), e))?;
        tracing::info!(netns = %ns, link = %host_if, "networked VM namespace ready; {}", rules::summary(&policy.allow));
        Ok(())
    }

    /// The namespace's name.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The VM's link.
    pub fn link(&self) -> &Link {
        &self.link
    }

    /// The program and arguments that run `program args…` in the namespace.
    pub fn command(&self, program: &Path, args: &[String]) -> (PathBuf, Vec<String>) {
        let mut a = vec!["netns".to_owned(), "exec".to_owned(), self.netns.clone()];
        a.push(program.to_string_lossy().into_owned());
        a.extend(args.iter().cloned());
        (self.tools.ip.clone(), a)
    }
}

impl Drop for Egress {
    fn drop(&mut self) {
        let warn = |r: Result<(), EgressError>| {
            if let Err(e) = r {
                tracing::warn!("cleaning up the networked VM's namespace: {e}");
            }
        };
        self.relay = None;
        // The link first: whatever is still in the namespace has no way out from here on.
        if self.veth {
            warn(self.ip(&["link", "del", &self.link.host_if]));
        }
        if self.table {
            let table = rules::table_name(&self.link);
            warn(run(&self.tools.nft, &["delete", "table", "inet", &table], None));
        }
        if self.netns_made {
            warn(self.ip(&["netns", "del", &self.netns]));
        }
        if let Some(etc) = &self.etc {
            let _ = std::fs::remove_dir_all(etc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_31s_of_the_pool() {
        let pool: Ipv4Net = POOL.parse().unwrap();
        assert_eq!(pool.hosts().count() as u32 + 2, 2 * POOL_PAIRS);
        for i in [0, 1, POOL_PAIRS - 1] {
            let l = link(i);
            assert!(pool.contains(&l.host_addr) && pool.contains(&l.vm_addr), "{l:?}");
            assert_eq!(u32::from(l.vm_addr), u32::from(l.host_addr) + 1);
            assert_eq!(u32::from(l.host_addr) % 2, 0);
            assert!(l.host_if.len() <= 15, "an interface name");
        }
        assert_eq!(link(7).host_addr, Ipv4Addr::new(169, 254, 64, 14));
    }

    #[test]
    fn allowed_ranges_are_ipv4_and_merged() {
        assert_eq!(parse_allowed("10.1.2.3").unwrap().to_string(), "10.1.2.3/32");
        assert_eq!(parse_allowed("10.1.2.3/16").unwrap().to_string(), "10.1.0.0/16");
        assert!(parse_allowed("fd00::/8").unwrap_err().contains("IPv6 egress is not offered"));
        assert!(parse_allowed("ten").unwrap_err().contains("not an IPv4 address or CIDR"));
        let p = EgressPolicy::new(
            vec![parse_allowed("10.1.0.0/16").unwrap(), parse_allowed("10.1.2.0/24").unwrap()],
            false,
        );
        assert_eq!(p.allowed(), ["10.1.0.0/16".parse::<Ipv4Net>().unwrap()]);
    }

    #[test]
    fn capabilities_from_proc_status() {
        let s = "Name:\tx\nCapEff:\t000001fffeffffff\n";
        assert!(has_cap(s, 12) && has_cap(s, 21));
        assert!(!has_cap("CapEff:\t0000000000000000\n", 12));
        assert!(!has_cap("", 12));
    }
}
