//! A real `vouch serve` process for tests: start it on `127.0.0.1:0`, learn the port from its
//! log, talk HTTP/1.1 to it with a tiny `std`-only client (so tests can send what `curl` and Nix
//! never would: `..` segments, wrong hashes), stop it with a signal.
//!
//! Uses `std` only, and [`crate::server`]'s `stop_child`. What is not here: Nix or VM set-up
//! ([`crate::nix`], [`crate::vm`]).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A running `vouch --state-dir STATE -v serve --listen 127.0.0.1:0 …`, ended on drop
/// (SIGTERM, then SIGKILL).
#[derive(Debug)]
pub struct HttpService {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// Its stderr (vouch's log at `-v`).
    pub log: PathBuf,
}

/// One HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Headers (names lower-cased).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

impl HttpService {
    /// Start `vouch` (the binary at `vouch`) with state `state`, log `log` and `extra` serve
    /// arguments, and wait (up to 60 s) until it listens; panics with its log if it exits.
    pub fn start(vouch: &Path, state: &Path, log: &Path, extra: &[&str]) -> HttpService {
        let err = std::fs::File::create(log).expect("creating the server log");
        let child = Command::new(vouch)
            .arg("--state-dir")
            .arg(state)
            .args(["-v", "serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", vouch.display()));
        let mut s = HttpService { child, addr: String::new(), log: log.to_owned() };
        let t0 = Instant::now();
        loop {
            let text = s.log_text();
            // Only a whole line: stderr is unbuffered, so the address may arrive in pieces.
            if let Some((url, _)) =
                text.split("listening on ").nth(1).and_then(|rest| rest.split_once('\n'))
            {
                let url = url.trim();
                let addr = url.trim_start_matches("http://").trim_start_matches("https://");
                s.addr = addr.to_owned();
                return s;
            }
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("vouch serve exited ({st}) instead of listening:\n{text}");
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "vouch serve did not listen:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One request on a fresh connection (`Connection: close`); `raw_path` is sent as is.
    pub fn request(&self, method: &str, raw_path: &str, body: &[u8]) -> HttpResponse {
        self.request_with(method, raw_path, &[], body)
    }

    /// [`Self::request`] with extra header lines (`Name: value`).
    pub fn request_with(
        &self,
        method: &str,
        raw_path: &str,
        headers: &[&str],
        body: &[u8],
    ) -> HttpResponse {
        let mut c = TcpStream::connect(&self.addr).expect("connecting to vouch serve");
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
        write!(
            c,
            "{method} {raw_path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
            self.addr,
            body.len()
        )
        .unwrap();
        c.write_all(body).unwrap();
        let mut r = BufReader::new(c);
        let mut line = String::new();
        r.read_line(&mut line).expect("reading the status line");
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            r.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (n, v) = h.split_once(':').expect("header line");
            headers.push((n.to_ascii_lowercase(), v.trim().to_owned()));
        }
        let mut body = Vec::new();
        if method != "HEAD" {
            r.read_to_end(&mut body).unwrap();
        }
        HttpResponse { status, headers, body }
    }

    /// Send `signal` (`TERM`, `INT`) and wait up to 60 s for the exit; the status and the log.
    pub fn stop(mut self, signal: &str) -> (ExitStatus, String) {
        crate::server::stop_child(&mut self.child, signal, "vouch serve", &self.log)
    }
}

impl Drop for HttpService {
    fn drop(&mut self) {
        crate::server::end_child(&mut self.child);
    }
}
