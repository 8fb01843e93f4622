//! A minimal HTTP/1.1 client for logs and witnesses: `GET` of log resources and `POST` of
//! `add-checkpoint`, one request per connection, bodies framed by `Content-Length`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use build_trace::tlog::{TileSource, TlogError};

/// The largest response read (a full entry bundle is at most 256 × 64 KiB).
const MAX_BODY: u64 = 256 * 65_538 + 4096;

/// An HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// `Content-Type`, if any.
    pub content_type: Option<String>,
    /// Body.
    pub body: Vec<u8>,
}

fn fail(url: &str, problem: impl std::fmt::Display) -> TlogError {
    TlogError::Corrupt { path: url.into(), problem: problem.to_string() }
}

/// `(host:port, path)` of an `http://` URL.
fn split_url(url: &str) -> Result<(&str, &str), TlogError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| fail(url, "only http:// URLs are supported (put TLS in a proxy)"))?;
    Ok(match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    })
}

/// One request to `url`.
pub fn request(method: &str, url: &str, body: &[u8]) -> Result<Reply, TlogError> {
    let (host, path) = split_url(url)?;
    let io = |e: std::io::Error| fail(url, e);
    let mut conn = TcpStream::connect(host).map_err(io)?;
    conn.set_read_timeout(Some(Duration::from_secs(60))).map_err(io)?;
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .and_then(|()| conn.write_all(body))
    .map_err(io)?;
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    r.read_line(&mut line).map_err(io)?;
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| fail(url, format!("not an HTTP status line: {line:?}")))?;
    let (mut len, mut content_type) = (None, None);
    loop {
        line.clear();
        r.read_line(&mut line).map_err(io)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            match k.to_ascii_lowercase().as_str() {
                "content-length" => len = v.trim().parse::<u64>().ok(),
                "content-type" => content_type = Some(v.trim().to_owned()),
                _ => {}
            }
        }
    }
    let len = len.ok_or_else(|| fail(url, "the response has no Content-Length"))?;
    if len > MAX_BODY {
        return Err(fail(url, format!("a {len}-byte response is larger than any log resource")));
    }
    let mut body = Vec::new();
    r.take(len).read_to_end(&mut body).map_err(io)?;
    if body.len() as u64 != len {
        return Err(fail(url, "the response ended early"));
    }
    Ok(Reply { status, content_type, body })
}

/// A log served over HTTP at a URL prefix (`http://host:port/log`).
#[derive(Debug, Clone)]
pub struct HttpTiles {
    prefix: String,
}

impl HttpTiles {
    /// The log at `prefix`.
    pub fn new(prefix: &str) -> HttpTiles {
        HttpTiles { prefix: prefix.trim_end_matches('/').to_owned() }
    }
}

impl TileSource for HttpTiles {
    fn get(&self, path: &str) -> Result<Option<Vec<u8>>, TlogError> {
        let url = format!("{}/{path}", self.prefix);
        let r = request("GET", &url, b"")?;
        match r.status {
            200 => Ok(Some(r.body)),
            404 => Ok(None),
            s => Err(fail(&url, format!("HTTP {s}: {}", String::from_utf8_lossy(&r.body).trim()))),
        }
    }

    fn describe(&self) -> String {
        self.prefix.clone()
    }
}
