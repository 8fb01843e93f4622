//! A minimal blocking HTTP/1.1 server side for the transparency log's witness
//! ([`super::witness`], one small POST endpoint on a thread per connection): request heads with
//! bounded size, bodies framed by `Content-Length` only, `Expect: 100-continue`, keep-alive, and
//! responses with an exact `Content-Length`. The CI service does not use it: it serves through
//! hyper and axum (`crate::serve::server`).
//!
//! What is here: the byte-level protocol. What is not: what the witness answers.
//!
//! Limits: a request head (request line and headers) of at most [`MAX_HEAD`] bytes and
//! [`MAX_HEADERS`] header lines; `Transfer-Encoding` (chunked uploads) is refused with 411, as Nix
//! always sends a length. Bodies are bounded by the caller ([`Request::body`]).

use std::io::{self, BufRead, Read, Write};

/// Most bytes of a request head.
pub const MAX_HEAD: usize = 16 << 10;
/// Most header lines.
pub const MAX_HEADERS: usize = 100;

/// A malformed or refused request (answered with `status` and the message, then the connection
/// closes).
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct HttpError {
    /// The status to answer with.
    pub status: u16,
    /// What was wrong.
    pub msg: String,
}

impl HttpError {
    /// An error with a status.
    pub fn new(status: u16, msg: impl Into<String>) -> Self {
        HttpError { status, msg: msg.into() }
    }
}

/// One request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `HEAD`, `PUT`, `POST` …
    pub method: String,
    /// The path of the target (query string removed, not percent-decoded).
    pub path: String,
    /// The query string, if any (without `?`).
    pub query: Option<String>,
    /// Headers, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// `Content-Length` (0 when absent).
    pub content_length: u64,
    /// Whether the client keeps the connection open after this exchange.
    pub keep_alive: bool,
    /// Whether the client waits for `100 Continue` before sending the body.
    pub expect_continue: bool,
}

impl Request {
    /// A header's value (first occurrence).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The body as a reader of exactly `content_length` bytes, refused with 413 above `max`.
    /// Sends `100 Continue` first when the client asked for it.
    pub fn body<'a, R: Read>(
        &self,
        conn: &'a mut R,
        out: &mut dyn Write,
        max: u64,
    ) -> Result<io::Take<&'a mut R>, HttpError> {
        if self.content_length > max {
            return Err(HttpError::new(
                413,
                format!(
                    "the request body ({} bytes) is larger than this endpoint accepts ({max} bytes)",
                    self.content_length
                ),
            ));
        }
        if self.expect_continue {
            out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .and_then(|()| out.flush())
                .map_err(|e| HttpError::new(500, format!("writing 100 Continue: {e}")))?;
        }
        Ok(conn.take(self.content_length))
    }
}

fn read_line(r: &mut impl BufRead, budget: &mut usize) -> Result<Option<String>, HttpError> {
    let mut buf = Vec::new();
    let n = r
        .take(*budget as u64 + 1)
        .read_until(b'\n', &mut buf)
        .map_err(|e| HttpError::new(400, format!("reading the request: {e}")))?;
    if n == 0 {
        return Ok(None);
    }
    if n > *budget {
        return Err(HttpError::new(
            431,
            format!("the request head is larger than {MAX_HEAD} bytes"),
        ));
    }
    *budget -= n;
    if buf.last() != Some(&b'\n') {
        return Err(HttpError::new(400, "the request ended in the middle of its head"));
    }
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| HttpError::new(400, "the request head is not UTF-8"))
}

/// Read one request head; `None` when the client closed the connection between requests.
pub fn read_request(r: &mut impl BufRead) -> Result<Option<Request>, HttpError> {
    let mut budget = MAX_HEAD;
    let line = loop {
        match read_line(r, &mut budget)? {
            None => return Ok(None),
            // Robustness (RFC 9112 §2.2): empty lines before a request line are ignored.
            Some(l) if l.is_empty() => continue,
            Some(l) => break l,
        }
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::new(400, format!("malformed request line {line:?}")));
    };
    if !method.bytes().all(|b| b.is_ascii_uppercase()) || method.is_empty() {
        return Err(HttpError::new(400, format!("malformed method {method:?}")));
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(HttpError::new(505, format!("unsupported HTTP version {version:?}"))),
    };
    if !target.starts_with('/') {
        return Err(HttpError::new(400, format!("the request target {target:?} is not a path")));
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (target.to_owned(), None),
    };
    let mut headers = Vec::new();
    loop {
        let Some(l) = read_line(r, &mut budget)? else {
            return Err(HttpError::new(400, "the request ended in the middle of its head"));
        };
        if l.is_empty() {
            break;
        }
        if headers.len() == MAX_HEADERS {
            return Err(HttpError::new(431, format!("more than {MAX_HEADERS} header lines")));
        }
        let Some((name, value)) = l.split_once(':') else {
            return Err(HttpError::new(400, format!("malformed header line {l:?}")));
        };
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(HttpError::new(400, format!("malformed header name {name:?}")));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    let mut req = Request {
        method: method.to_owned(),
        path,
        query,
        headers,
        content_length: 0,
        keep_alive: !http10,
        expect_continue: false,
    };
    if req.header("transfer-encoding").is_some() {
        return Err(HttpError::new(411, "Transfer-Encoding is not supported: send Content-Length"));
    }
    let lengths: Vec<&str> = req
        .headers
        .iter()
        .filter(|(n, _)| n == "content-length")
        .map(|(_, v)| v.as_str())
        .collect();
    match lengths.as_slice() {
        [] => {}
        [one] => {
            // Digits only (`u64::from_str` would also take `+5`, which a proxy in front may
            // read differently).
            let malformed = || HttpError::new(400, format!("malformed Content-Length {one:?}"));
            if one.is_empty() || !one.bytes().all(|b| b.is_ascii_digit()) {
                return Err(malformed());
            }
            req.content_length = one.parse().map_err(|_| malformed())?;
        }
        _ => return Err(HttpError::new(400, "more than one Content-Length header")),
    }
    if let Some(c) = req.header("connection") {
        let c = c.to_ascii_lowercase();
        if c.split(',').any(|t| t.trim() == "close") {
            req.keep_alive = false;
        } else if c.split(',').any(|t| t.trim() == "keep-alive") {
            req.keep_alive = true;
        }
    }
    req.expect_continue =
        !http10 && req.header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    Ok(Some(req))
}

/// A response body.
pub enum Body {
    /// Bytes in memory.
    Bytes(Vec<u8>),
    /// `len` bytes streamed from a reader (an open file).
    Stream(Box<dyn Read + Send>, u64),
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Bytes(b) => f.debug_tuple("Bytes").field(&b.len()).finish(),
            Body::Stream(_, n) => f.debug_tuple("Stream").field(n).finish(),
        }
    }
}

/// A response.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: Body,
}

impl Response {
    /// A response with bytes.
    pub fn bytes(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Response { status, content_type, body: Body::Bytes(body.into()) }
    }

    /// A JSON response.
    pub fn json(status: u16, v: &serde_json::Value) -> Self {
        let mut b = v.to_string().into_bytes();
        b.push(b'\n');
        Response::bytes(status, "application/json", b)
    }

    /// A plain-text error response.
    pub fn error(status: u16, msg: &str) -> Self {
        Response::bytes(status, "text/plain; charset=utf-8", format!("{msg}\n"))
    }

    fn len(&self) -> u64 {
        match &self.body {
            Body::Bytes(b) => b.len() as u64,
            Body::Stream(_, n) => *n,
        }
    }
}

/// The reason phrase of a status.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        507 => "Insufficient Storage",
        _ => "Unknown",
    }
}

/// Write `resp` (headers only for `head`); `keep_alive` says whether the connection stays open.
pub fn write_response(
    w: &mut impl Write,
    resp: Response,
    head: bool,
    keep_alive: bool,
) -> io::Result<()> {
    let len = resp.len();
    // A 401 says how to authenticate (`super::auth`).
    let challenge =
        if resp.status == 401 { "WWW-Authenticate: Basic realm=\"vouch\"\r\n" } else { "" };
    write!(
        w,
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {len}\r\n{challenge}Connection: {}\r\n\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        if keep_alive { "keep-alive" } else { "close" }
    )?;
    if !head {
        match resp.body {
            Body::Bytes(b) => w.write_all(&b)?,
            Body::Stream(r, n) => {
                let copied = io::copy(&mut r.take(n), w)?;
                if copied != n {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the file ended after {copied} of {n} bytes"),
                    ));
                }
            }
        }
    }
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Option<Request>, HttpError> {
        read_request(&mut io::BufReader::new(s.as_bytes()))
    }

    #[test]
    fn parses_a_put_with_expect_and_query() {
        let r = parse(
            "PUT /nar/abc.nar?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 12\r\n\
             Expect: 100-continue\r\nContent-Type: application/x-nix-nar\r\n\r\nbody",
        )
        .unwrap()
        .unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("PUT", "/nar/abc.nar"));
        assert_eq!(r.query.as_deref(), Some("x=1"));
        assert_eq!(r.content_length, 12);
        assert!(r.expect_continue && r.keep_alive);
        assert_eq!(r.header("content-type"), Some("application/x-nix-nar"));
        let mut conn = io::Cursor::new(b"0123456789abcdef".to_vec());
        let mut out = Vec::new();
        let mut body = String::new();
        r.body(&mut conn, &mut out, 100).unwrap().read_to_string(&mut body).unwrap();
        assert_eq!(body, "0123456789ab");
        assert_eq!(out, b"HTTP/1.1 100 Continue\r\n\r\n");
        assert_eq!(r.body(&mut conn, &mut out, 5).unwrap_err().status, 413);
    }

    #[test]
    fn refuses_malformed_heads() {
        assert!(parse("").unwrap().is_none(), "a closed connection is not an error");
        let status = |s: &str| parse(s).unwrap_err().status;
        assert_eq!(status("GET /x\r\n\r\n"), 400);
        assert_eq!(status("GET x HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status("GET /x HTTP/2\r\n\r\n"), 505);
        assert_eq!(status("GET /x HTTP/1.1\r\nbad\r\n\r\n"), 400);
        assert_eq!(status("GET /x HTTP/1.1\r\nHost: h\r\n"), 400);
        assert_eq!(status("PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), 411);
        for bad in ["-1", "+5", " ", "5 5", "0x5"] {
            let head = format!("PUT /x HTTP/1.1\r\nContent-Length: {bad}\r\n\r\n");
            assert_eq!(status(&head), 400, "{bad:?}");
        }
        assert_eq!(
            status("PUT /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        let big = format!("GET /x HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(status(&big), 431);
        let many = format!("GET /x HTTP/1.1\r\n{}\r\n", "A: b\r\n".repeat(MAX_HEADERS + 1));
        assert_eq!(status(&many), 431);
        let r = parse("GET /x HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!r.keep_alive);
        let r = parse("GET /x HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap().unwrap();
        assert!(!r.keep_alive);
    }

    #[test]
    fn responses_carry_exact_lengths() {
        let mut out = Vec::new();
        write_response(&mut out, Response::error(404, "no such file"), false, true).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 404 Not Found\r\n"), "{s}");
        assert!(s.contains("Content-Length: 13\r\n") && s.ends_with("\r\n\r\nno such file\n"));
        let mut out = Vec::new();
        let r = Response {
            status: 200,
            content_type: "x",
            body: Body::Stream(Box::new(&b"abcdef"[..]), 6),
        };
        write_response(&mut out, r, true, false).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.contains("Content-Length: 6\r\n") && s.ends_with("close\r\n\r\n"), "{s}");
        let short = Response {
            status: 200,
            content_type: "x",
            body: Body::Stream(Box::new(&b"ab"[..]), 6),
        };
        assert!(write_response(&mut Vec::new(), short, false, true).is_err());
    }
}
