//! AMD's Key Distribution Service (KDS): the URLs of a product's certificate chain and of a
//! chip's VCEK, and fetching them with retries.
//!
//! URL scheme (AMD's VCEK certificate and KDS interface specification 57230):
//! - chain: `GET {base}/vcek/v1/{Milan|Genoa|Turin}/cert_chain` → PEM, ASK first, then ARK;
//! - VCEK: `GET {base}/vcek/v1/{product}/{hwID}?blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..` → DER,
//!   where hwID is the hex CHIP_ID: 64 bytes on Milan and Genoa, the first 8 on Turin, whose
//!   query starts with `fmcSPL`. SPLs are written as two-digit decimals (as snpguest and trustee
//!   do; the KDS accepts them). Bergamo and Siena use Genoa's product name.
//! - VLEKs cannot be fetched: the KDS serves them only to cloud providers with a secret; a VLEK
//!   host's certificate comes from its provider (or the guest's certificate table).
//!
//! Retry rule ([`retry_wait`]): a 404 is final (the KDS does not know this chip and TCB); a 429
//! waits at least 10 s (the KDS allows about one request per 10 s per address) or the
//! `Retry-After` it names, whichever is longer; 5xx answers and transport errors wait 2, 4, 8 s;
//! any other answer is final. At most [`ATTEMPTS`] tries. `HTTPS_PROXY`, `HTTP_PROXY`,
//! `ALL_PROXY` and `NO_PROXY` are honoured (ureq reads them).
//!
//! What is not here: checking what was fetched (see [`super::certs`]).

use std::sync::Arc;
use std::time::Duration;

use build_trace::evidence::report::Product;

use super::platform::HostIdentity;

/// AMD's KDS.
pub const AMD_KDS: &str = "https://kdsintf.amd.com";
/// Most tries per URL.
pub const ATTEMPTS: u32 = 4;
/// Least wait after a 429.
pub const RATE_LIMIT_WAIT: Duration = Duration::from_secs(10);
/// Largest body accepted (a chain is ~5 KiB, a VCEK ~1.4 KiB).
const MAX_BODY: u64 = 1 << 20;

/// The path of a product's VCEK chain (ASK, ARK).
pub fn chain_path(product: Product) -> String {
    format!("/vcek/v1/{}/cert_chain", product.name())
}

/// The path of the VCEK for `id` (its product, hwID and reported TCB).
pub fn vcek_path(id: &HostIdentity) -> String {
    let t = &id.tcb;
    let fmc = match (id.product, t.fmc) {
        (Product::Turin, f) => format!("fmcSPL={:02}&", f.unwrap_or(0)),
        _ => String::new(),
    };
    format!(
        "/vcek/v1/{}/{}?{fmc}blSPL={:02}&teeSPL={:02}&snpSPL={:02}&ucodeSPL={:02}",
        id.product.name(),
        hex::encode(id.hw_id()),
        t.bootloader,
        t.tee,
        t.snp,
        t.microcode
    )
}

/// One answer of the KDS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// 200 with this body.
    Ok(Vec<u8>),
    /// Another HTTP status, with `Retry-After` seconds if given.
    Status(u16, Option<u64>),
    /// No answer (connection, TLS, timeout).
    Transport(String),
}

/// How long to wait before try `attempt + 1` (0-based) after `answer`, or `None` when the
/// answer is final.
pub fn retry_wait(attempt: u32, answer: &Answer) -> Option<Duration> {
    let backoff = Duration::from_secs(2u64 << attempt.min(4));
    match answer {
        Answer::Ok(_) => None,
        Answer::Status(429, after) => {
            Some(RATE_LIMIT_WAIT.max(Duration::from_secs(after.unwrap_or(0))).max(backoff))
        }
        Answer::Status(s, after) if (500..600).contains(s) => {
            Some(backoff.max(Duration::from_secs(after.unwrap_or(0)).min(RATE_LIMIT_WAIT * 6)))
        }
        Answer::Status(..) => None,
        Answer::Transport(_) => Some(backoff),
    }
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum KdsError {
    /// 404.
    #[error(
        "{0}: the KDS has no such certificate (404): check the product, chip ID and reported TCB"
    )]
    NotFound(String),
    /// Another final status.
    #[error("{url}: HTTP {status}")]
    Status {
        /// URL.
        url: String,
        /// Status.
        status: u16,
    },
    /// Every try failed.
    #[error("{url}: gave up after {tries} tries; last: {last}")]
    GaveUp {
        /// URL.
        url: String,
        /// Tries.
        tries: u32,
        /// Last answer.
        last: String,
    },
}

/// Called before each wait between tries: the URL, the answer, the wait.
pub type RetryHook = Box<dyn FnMut(&str, &Answer, Duration) + Send>;

/// A KDS client: a base URL (the real KDS, or a mirror or test server), an HTTP agent and the
/// sleep between tries (replaceable so tests can record the waits).
pub struct Kds {
    base: String,
    agent: ureq::Agent,
    sleep: Box<dyn FnMut(Duration) + Send>,
    /// Log each retry (`tracing` plus this callback, for the CLI).
    pub on_retry: RetryHook,
}

impl std::fmt::Debug for Kds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kds").field("base", &self.base).finish_non_exhaustive()
    }
}

impl Kds {
    /// A client for `base` (e.g. [`AMD_KDS`]); proxies from the environment.
    pub fn new(base: &str) -> Kds {
        let tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .build();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .user_agent(concat!("vouch/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Kds {
            base: base.trim_end_matches('/').to_owned(),
            agent,
            sleep: Box::new(std::thread::sleep),
            on_retry: Box::new(|_, _, _| {}),
        }
    }

    /// Replace the sleep between tries.
    pub fn with_sleep(mut self, sleep: impl FnMut(Duration) + Send + 'static) -> Kds {
        self.sleep = Box::new(sleep);
        self
    }

    /// The full URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn get_once(&self, url: &str) -> Answer {
        let mut resp = match self.agent.get(url).call() {
            Ok(r) => r,
            Err(e) => return Answer::Transport(e.to_string()),
        };
        let status = resp.status().as_u16();
        if status != 200 {
            let after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok());
            return Answer::Status(status, after);
        }
        match resp.body_mut().with_config().limit(MAX_BODY).read_to_vec() {
            Ok(b) => Answer::Ok(b),
            Err(e) => Answer::Transport(format!("reading the body: {e}")),
        }
    }

    /// GET `path` under the retry rule of the module doc.
    pub fn get(&mut self, path: &str) -> Result<Vec<u8>, KdsError> {
        let url = self.url(path);
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            let answer = self.get_once(&url);
            let wait = retry_wait(attempt, &answer);
            match answer {
                Answer::Ok(body) => return Ok(body),
                Answer::Status(404, _) => return Err(KdsError::NotFound(url)),
                Answer::Status(status, _) if wait.is_none() => {
                    return Err(KdsError::Status { url, status })
                }
                ref a => {
                    last = match a {
                        Answer::Status(s, _) => format!("HTTP {s}"),
                        Answer::Transport(t) => t.clone(),
                        Answer::Ok(_) => String::new(),
                    };
                    if attempt + 1 < ATTEMPTS {
                        let wait = wait.unwrap_or(RATE_LIMIT_WAIT);
                        tracing::warn!("{url}: {last}; retrying in {} s", wait.as_secs());
                        (self.on_retry)(&url, a, wait);
                        (self.sleep)(wait);
                    }
                }
            }
        }
        Err(KdsError::GaveUp { url, tries: ATTEMPTS, last })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use build_trace::evidence::report::TcbVersion;

    #[test]
    fn urls_follow_the_kds_layout() {
        let milan = HostIdentity {
            product: Product::Milan,
            chip_id: vec![0xab; 64],
            tcb: TcbVersion { fmc: None, bootloader: 3, tee: 0, snp: 8, microcode: 115 },
        };
        assert_eq!(
            vcek_path(&milan),
            format!("/vcek/v1/Milan/{}?blSPL=03&teeSPL=00&snpSPL=08&ucodeSPL=115", "ab".repeat(64))
        );
        let turin = HostIdentity {
            product: Product::Turin,
            chip_id: [vec![0x59; 8], vec![0; 56]].concat(),
            tcb: TcbVersion { fmc: Some(1), bootloader: 1, tee: 1, snp: 4, microcode: 81 },
        };
        assert_eq!(
            vcek_path(&turin),
            "/vcek/v1/Turin/5959595959595959?fmcSPL=01&blSPL=01&teeSPL=01&snpSPL=04&ucodeSPL=81"
        );
        assert_eq!(chain_path(Product::Genoa), "/vcek/v1/Genoa/cert_chain");
    }

    #[test]
    fn retry_rule() {
        let s = |n: u64| Some(Duration::from_secs(n));
        assert_eq!(retry_wait(0, &Answer::Status(404, None)), None);
        assert_eq!(retry_wait(0, &Answer::Status(403, None)), None);
        assert_eq!(retry_wait(0, &Answer::Ok(vec![])), None);
        // 429: never less than 10 s; more when the KDS asks for more.
        assert_eq!(retry_wait(0, &Answer::Status(429, None)), s(10));
        assert_eq!(retry_wait(0, &Answer::Status(429, Some(1))), s(10));
        assert_eq!(retry_wait(0, &Answer::Status(429, Some(30))), s(30));
        assert_eq!(retry_wait(3, &Answer::Status(429, None)), s(16));
        // Server errors and no answer: exponential.
        assert_eq!(retry_wait(0, &Answer::Status(503, None)), s(2));
        assert_eq!(retry_wait(2, &Answer::Transport("refused".into())), s(8));
    }
}
