//! The DNS relay of one networked VM.
//!
//! QEMU's user networking answers the guest's DNS (10.0.2.3) by asking the name servers of the
//! `resolv.conf` QEMU sees. Those are usually on loopback (systemd-resolved's 127.0.0.53), a
//! private network or link-local (a cloud's resolver): all denied to the VM's namespace. So QEMU
//! sees a `resolv.conf` naming the host end of its link, where this relay listens (the only
//! host address the rules let the VM reach, UDP port 53 only), and passes each query, as is, to
//! the host's own name servers, and the first answer with the query's id back.
//!
//! UDP only (a truncated answer makes the guest's resolver retry over TCP, which fails): enough
//! for a fetcher's A records. It answers only the VM's end of the link, at most [`IN_FLIGHT`]
//! queries at a time, each waiting at most [`UPSTREAM_TIMEOUT`] per name server.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Queries relayed at once; more are dropped (the guest retries).
pub const IN_FLIGHT: usize = 32;
/// How long one name server may take to answer.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

/// The name servers of a `resolv.conf` text (port 53); glibc's default, 127.0.0.1, if none.
pub fn name_servers(resolv_conf: &str) -> Vec<SocketAddr> {
    let mut v: Vec<SocketAddr> = resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.split_whitespace().next())
        // `fe80::1%eth0`: the zone is dropped, such a server is not reachable from a relay anyway.
        .filter_map(|a| a.split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect();
    if v.is_empty() {
        v.push(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 53));
    }
    v
}

/// A running relay; stopped (its thread joined) on drop.
#[derive(Debug)]
pub struct Relay {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Answer `client`'s queries sent to `listen` by asking `upstreams` in turn.
    pub fn start(
        listen: SocketAddr,
        client: IpAddr,
        upstreams: Vec<SocketAddr>,
    ) -> io::Result<Relay> {
        let sock = UdpSocket::bind(listen)?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let upstreams = Arc::new(upstreams);
        let thread =
            std::thread::Builder::new().name("vouch-dns-relay".into()).spawn(move || {
                let busy = Arc::new(AtomicUsize::new(0));
                let mut buf = vec![0u8; 65535];
                while !s.load(Ordering::SeqCst) {
                    let Ok((n, from)) = sock.recv_from(&mut buf) else { continue };
                    if from.ip() != client || n < 12 || busy.load(Ordering::SeqCst) >= IN_FLIGHT {
                        continue;
                    }
                    let (Ok(reply_sock), query) = (sock.try_clone(), buf[..n].to_vec()) else {
                        continue;
                    };
                    busy.fetch_add(1, Ordering::SeqCst);
                    let (busy, upstreams) = (busy.clone(), upstreams.clone());
                    std::thread::spawn(move || {
                        if let Some(answer) = ask(&upstreams, &query) {
                            let _ = reply_sock.send_to(&answer, from);
                        }
                        busy.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            })?;
        Ok(Relay { stop, thread: Some(thread) })
    }
}

/// The first answer to `query` (same id) from `upstreams`.
fn ask(upstreams: &[SocketAddr], query: &[u8]) -> Option<Vec<u8>> {
    for up in upstreams {
        let local: SocketAddr = match up {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let Ok(s) = UdpSocket::bind(local) else { continue };
        if s.set_read_timeout(Some(UPSTREAM_TIMEOUT)).is_err()
            || s.connect(up).is_err()
            || s.send(query).is_err()
        {
            continue;
        }
        let mut buf = vec![0u8; 65535];
        if let Ok(n) = s.recv(&mut buf) {
            if n >= 12 && buf[..2] == query[..2] {
                buf.truncate(n);
                return Some(buf);
            }
        }
    }
    None
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_servers_of_resolv_conf() {
        let t = "# c\nnameserver 127.0.0.53\noptions edns0\nnameserver  fd00::1\nnameserver fe80::1%eth0\nnameserver bad\n";
        let v: Vec<String> = name_servers(t).iter().map(|a| a.to_string()).collect();
        assert_eq!(v, ["127.0.0.53:53", "[fd00::1]:53", "[fe80::1]:53"]);
        assert_eq!(name_servers("")[0].to_string(), "127.0.0.1:53");
    }

    /// A query from the client reaches the upstream as is, and its answer comes back; a query
    /// from anyone else is ignored.
    #[test]
    fn relays_the_clients_queries_only() {
        let upstream = UdpSocket::bind("127.0.0.1:0").unwrap();
        let up_addr = upstream.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut b = [0u8; 512];
            while let Ok((n, from)) = upstream.recv_from(&mut b) {
                let mut answer = b[..n].to_vec();
                answer.extend_from_slice(b"-answered");
                let _ = upstream.send_to(&answer, from);
            }
        });
        let client = UdpSocket::bind("127.0.0.2:0").unwrap();
        client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        let listen = probe.local_addr().unwrap();
        drop(probe);
        let relay = Relay::start(listen, "127.0.0.2".parse().unwrap(), vec![up_addr]).unwrap();
        let query = b"\x12\x34 twelve bytes.";
        client.send_to(query, listen).unwrap();
        let mut b = [0u8; 512];
        let n = client.recv(&mut b).unwrap();
        assert_eq!(&b[..n], [&query[..], b"-answered"].concat().as_slice());

        let stranger = UdpSocket::bind("127.0.0.3:0").unwrap();
        stranger.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
        stranger.send_to(query, listen).unwrap();
        assert!(stranger.recv(&mut b).is_err(), "a stranger got an answer");
        drop(relay);
    }
}
