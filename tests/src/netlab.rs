//! A network for the networked-VM tests made only of network namespaces the test creates, so
//! that nothing a test sends, filtered or not, leaves this machine or touches a real private,
//! link-local or metadata address.
//!
//! ```text
//!  [lab host]  up0 203.0.113.1/24, 2001:db8:ff::1/64  ──veth──  down0 .254, ::254  [lab world]
//!  `vouch` runs here (`ip netns exec`), forwarding on;             every target below is an
//!  default routes via the world; its own address and               address on the world's `lo`
//!  loopback host servers too
//! ```
//!
//! The world holds one address per class a fetcher must not reach ([`RFC1918`], [`LINK_LOCAL`],
//! [`CGNAT`], [`ULA`]) and the public ones it may ([`PUBLIC`], [`PUBLIC6`], documentation
//! ranges). Servers are bound inside a namespace by a thread that enters it ([`in_netns`]); the
//! socket stays there. Both namespaces (and with them their veths) are deleted on drop, also when
//! the test panics.
//!
//! Needs root and `ip`; tests fail (never skip) without them.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The lab host's own address (on its uplink).
pub const HOST_ADDR: &str = "203.0.113.1";
/// The lab host's own IPv6 address.
pub const HOST_ADDR6: &str = "2001:db8:ff::1";
/// A public address (documentation range): networked builds may reach it.
pub const PUBLIC: &str = "198.51.100.10";
/// A public IPv6 address (documentation range).
pub const PUBLIC6: &str = "2001:db8:77::10";
/// An RFC 1918 address.
pub const RFC1918: &str = "10.77.0.10";
/// A link-local address (outside the pool vouch takes its links from).
pub const LINK_LOCAL: &str = "169.254.200.10";
/// A CGNAT address.
pub const CGNAT: &str = "100.64.77.10";
/// A unique-local IPv6 address.
pub const ULA: &str = "fd77::10";

/// Run `f` on a thread that has entered network namespace `netns` (`/run/netns/<netns>`).
pub fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("entering {path}: {e} (the tests need root)"));
        f()
    })
    .join()
    .expect("the thread in the namespace panicked")
}

/// Run `ip ARGS…`, panicking with its error.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ip (iproute2, scripts/setup-host.sh): {e}"));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The output of `program ARGS…` run in namespace `netns`.
pub fn netns_output(netns: &str, program: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, program])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip netns exec {netns} {program}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// The two namespaces of one test (see the module docs).
#[derive(Debug)]
pub struct Lab {
    /// Where `vouch` runs.
    pub host: String,
    /// Where the targets are.
    pub world: String,
}

impl Lab {
    /// Create the lab (names unique to this process and call).
    pub fn new() -> Lab {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = format!("{}-{}", std::process::id() % 100_000, N.fetch_add(1, Ordering::SeqCst));
        let lab = Lab { host: format!("vt-{n}-host"), world: format!("vt-{n}-world") };
        let (h, w) = (lab.host.as_str(), lab.world.as_str());
        ip(&["netns", "add", h]);
        ip(&["netns", "add", w]);
        ip(&["-n", h, "link", "add", "up0", "type", "veth", "peer", "name", "down0", "netns", w]);
        for (ns, dev, v4, v6) in
            [(h, "up0", HOST_ADDR, HOST_ADDR6), (w, "down0", "203.0.113.254", "2001:db8:ff::254")]
        {
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev]);
            ip(&["-n", ns, "addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        for a in [PUBLIC, RFC1918, LINK_LOCAL, CGNAT] {
            ip(&["-n", w, "addr", "add", &format!("{a}/32"), "dev", "lo"]);
        }
        for a in [PUBLIC6, ULA] {
            ip(&["-n", w, "addr", "add", &format!("{a}/128"), "dev", "lo", "nodad"]);
        }
        ip(&["-n", h, "route", "add", "default", "via", "203.0.113.254"]);
        ip(&["-n", h, "-6", "route", "add", "default", "via", "2001:db8:ff::254"]);
        in_netns(h, || {
            for f in ["/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"] {
                std::fs::write(f, "1").unwrap_or_else(|e| panic!("{f}: {e}"));
            }
        });
        lab
    }

    /// A counting HTTP server on `addr` in namespace `netns` (one of the lab's).
    pub fn serve(&self, netns: &str, addr: SocketAddr, body: &str) -> HttpServer {
        let listener = in_netns(netns, move || {
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("binding {addr}: {e}"))
        });
        HttpServer::start(listener, body)
    }

    /// `ip netns exec <host> program`: a command run on the lab host.
    pub fn on_host(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.host]).arg(program);
        c
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.host, &self.world] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A one-file HTTP/1.0 server counting the connections it answers.
#[derive(Debug)]
pub struct HttpServer {
    /// Where it listens.
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl HttpServer {
    /// Serve `body` on `listener` from a thread (which ends with the process).
    pub fn start(listener: TcpListener, body: &str) -> HttpServer {
        let addr = listener.local_addr().expect("a bound listener");
        let hits = Arc::new(AtomicUsize::new(0));
        let (h, body) = (hits.clone(), body.to_owned());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                h.fetch_add(1, Ordering::SeqCst);
                let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(5)));
                let mut reader = BufReader::new(conn.try_clone().expect("a socket"));
                let mut line = String::new();
                while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                    line.clear();
                }
                let _ = write!(
                    conn,
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        HttpServer { addr, hits }
    }

    /// Connections answered so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}
