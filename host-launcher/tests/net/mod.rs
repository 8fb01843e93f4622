//! Test connections from a chosen loopback address (the service limits and binds by address).

// Each test file uses part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::time::Duration;

use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrIn};
use test_support::http_service::HttpService;

/// A TCP connection to `to` from the local address `from` (any of 127/8 is this host).
pub fn connect_from(from: &str, to: &str) -> TcpStream {
    let fd: OwnedFd =
        socket::socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
            .unwrap();
    let local: std::net::SocketAddrV4 = format!("{from}:0").parse().unwrap();
    socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(local)).unwrap();
    let SocketAddr::V4(remote) = to.parse::<SocketAddr>().unwrap() else { panic!("IPv4") };
    socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(remote)).unwrap();
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

/// Send a request head on `c` (`Connection: close`).
pub fn head(c: &mut TcpStream, method: &str, path: &str, auth: Option<&str>, len: usize) {
    let auth = auth.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(c, "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n{auth}Connection: close\r\n\r\n")
        .unwrap();
}

/// The status and body of the response on `c`.
pub fn response(c: TcpStream) -> (u16, String) {
    let mut r = BufReader::new(c);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut rest = String::new();
    let _ = r.read_to_string(&mut rest);
    let body = rest.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

/// One whole request from `from`.
pub fn request(
    s: &HttpService,
    from: &str,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    let mut c = connect_from(from, &s.addr);
    // A refused connection may be closed before the request is written: read why anyway.
    let auth = auth.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let text = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = c.write_all(text.as_bytes()).and_then(|()| c.write_all(body));
    response(c)
}
