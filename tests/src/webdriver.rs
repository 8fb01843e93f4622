//! A real headless Chromium for the web page's tests, driven through W3C WebDriver
//! (Debian's `chromedriver`) with a small HTTP/1.1 client of our own: start a session, open a
//! page, run a script in it, take a screenshot, end the session. Chromium runs as root with a
//! fresh profile and without sandbox, GPU, first-run, sync or background networking.
//!
//! What is not here: the service under test (`test_support::http_service`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

/// A Chromium session through chromedriver; both end on drop.
#[derive(Debug)]
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
}

/// Chromium's flags: headless, as root, nothing that reaches out.
const FLAGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1100",
];

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap()
}

/// One WebDriver command: `method path` with a JSON body; the response's `value`.
fn call(port: u16, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
    let mut c = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    // chromedriver keeps the connection open: read the head, then exactly the body.
    let mut r = BufReader::new(c);
    let mut status = String::new();
    r.read_line(&mut status).map_err(|e| e.to_string())?;
    let mut len = None;
    let mut chunked = false;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).map_err(|e| e.to_string())?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => len = value.trim().parse::<usize>().ok(),
            "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
            _ => {}
        }
    }
    let body = if chunked {
        let mut out = Vec::new();
        loop {
            let mut size = String::new();
            r.read_line(&mut size).map_err(|e| e.to_string())?;
            let n = usize::from_str_radix(size.trim(), 16).map_err(|e| e.to_string())?;
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&chunk[..n]);
        }
        out
    } else {
        let mut out = vec![0; len.ok_or("no Content-Length")?];
        r.read_exact(&mut out).map_err(|e| e.to_string())?;
        out
    };
    let body = String::from_utf8_lossy(&body);
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {status} {body}"))?;
    if !status.contains(" 200 ") {
        return Err(format!("{method} {path}: {status}: {}", v["value"]));
    }
    Ok(v["value"].clone())
}

impl Browser {
    /// Start chromedriver and a Chromium session with a fresh profile in `profile`.
    pub fn start(profile: &Path) -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver (apt-get install chromium chromium-driver)");
        let mut b = Browser { driver, port, session: String::new() };
        let t0 = Instant::now();
        while call(port, "GET", "/status", None).map(|v| v["ready"] != true).unwrap_or(true) {
            assert!(t0.elapsed() < Duration::from_secs(30), "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut args: Vec<String> = FLAGS.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args}
        }}});
        let v = call(port, "POST", "/session", Some(&caps)).expect("a Chromium session");
        b.session = v["sessionId"].as_str().expect("a session id").to_owned();
        b
    }

    fn path(&self, what: &str) -> String {
        format!("/session/{}/{what}", self.session)
    }

    /// Open `url` (returns once it loaded).
    pub fn goto(&self, url: &str) {
        call(self.port, "POST", &self.path("url"), Some(&json!({"url": url}))).expect("navigating");
    }

    /// Run `script` (a function body) in the page; what it returns.
    pub fn eval(&self, script: &str) -> Value {
        let body = json!({"script": script, "args": []});
        call(self.port, "POST", &self.path("execute/sync"), Some(&body)).expect("running a script")
    }

    /// The text of the first element matching `css` (empty if none).
    pub fn text(&self, css: &str) -> String {
        let s = format!("const e = document.querySelector({css:?}); return e ? e.innerText : '';");
        self.eval(&s).as_str().unwrap_or_default().to_owned()
    }

    /// Wait (up to `within`) until `script` returns true.
    pub fn wait_for(&self, script: &str, within: Duration, what: &str) {
        let t0 = Instant::now();
        while self.eval(script) != Value::Bool(true) {
            assert!(t0.elapsed() < within, "{what}: not within {within:?}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// A PNG screenshot of the window, written to `file`.
    pub fn screenshot(&self, file: &Path) {
        let v = call(self.port, "GET", &self.path("screenshot"), None).expect("a screenshot");
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64"))
            .expect("a base64 PNG");
        std::fs::write(file, png).expect("writing the screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = call(self.port, "DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
