//! Fetching files of a remote trace store: one HTTP(S) agent (ureq on rustls with aws-lc-rs,
//! Mozilla's roots or the CA files given ([`super::TlsRoots`]), kept-alive connections), a bounded pool of fetching threads, and the local
//! cache by content hash ([`super::cache`]) for files whose URL always names the same bytes.
//!
//! Answers: 200 is the file; 404 is "absent" (`None`), which the caller turns into an error
//! where the file is required ([`Fetcher::need`]); any other status, a transport failure
//! (connection refused, timeout, TLS) or a body that cannot be read is a [`FetchError`] naming
//! the URL. Redirects are not followed: a cache answers for its own URLs.
//!
//! What is not here: what the files mean (the callers: [`super::http`], [`super::drvs`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use super::cache::{BlobCache, CacheWriter};

/// The largest file read (statements, evidence, `.drv` NARs, indexes are far smaller).
const MAX_BODY: u64 = 64 << 20;

/// Why a remote file could not be had.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The server answered with a status other than 200 or 404.
    #[error("{url} answered HTTP {status}, expected {expected}")]
    Status {
        /// What was fetched.
        url: String,
        /// The status.
        status: u16,
        /// What was expected.
        expected: String,
    },
    /// A required file is not there (404).
    #[error("{url} answered HTTP 404 (not found), expected {expected}")]
    Missing {
        /// What was fetched.
        url: String,
        /// What was expected.
        expected: String,
    },
    /// No answer: connection refused, timeout, TLS failure, or a body that could not be read.
    #[error("cannot fetch {url}: {problem}")]
    Transport {
        /// What was fetched.
        url: String,
        /// What went wrong.
        problem: String,
    },
    /// The answer is not what the URL must hold.
    #[error("{url}: {problem}")]
    Garbled {
        /// What was fetched.
        url: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// How to fetch: the bounded pool's size, the local cache, the time limits.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Fetches at once (at least 1).
    pub jobs: usize,
    /// The local cache directory (`None`: no cache).
    pub cache_dir: Option<std::path::PathBuf>,
    /// Time to connect.
    pub connect_timeout: Duration,
    /// Time for one whole request.
    pub timeout: Duration,
    /// The roots an `https://` store's certificate must chain to.
    pub tls_roots: super::TlsRoots,
    /// The option that gives CA files, for errors (`--tls-ca`; `vouch serve`'s is
    /// `--builder-tls-ca`).
    pub ca_option: &'static str,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            jobs: 16,
            cache_dir: None,
            connect_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(60),
            tls_roots: super::TlsRoots::BuiltIn,
            ca_option: "--tls-ca",
        }
    }
}

/// Whether the local cache may answer for a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Its URL always names the same bytes (a statement under its entry id, a `.drv`, …).
    Immutable,
    /// It changes (laut's index, the log's checkpoint): always asked of the server.
    Fresh,
}

/// A client of one remote store; cheap to clone (shared agent, pool and cache).
#[derive(Debug, Clone)]
pub struct Fetcher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    base: String,
    agent: ureq::Agent,
    /// What a certificate must chain to, for errors.
    roots: String,
    cache: Option<(BlobCache, CacheWriter)>,
    pool: Pool,
    requests: AtomicU64,
    cache_hits: AtomicU64,
    /// A download's time limit per read.
    per_read: Duration,
}

/// One answer: the body, or `None` for 404.
pub type Answer = Result<Option<Vec<u8>>, FetchError>;

impl Fetcher {
    /// A client for the store at `base` (`http(s)://HOST[:PORT][/prefix]`, no trailing `/`).
    /// The CA files of [`FetchOptions::tls_roots`] are read here, for an `https://` base only.
    pub fn new(base: &str, opts: &FetchOptions) -> Result<Fetcher, super::CaFileError> {
        let roots = if base.starts_with("https://") { opts.tls_roots.load()? } else { None };
        let roots_text = super::tls::roots_text(
            if roots.is_some() { &opts.tls_roots } else { &super::TlsRoots::BuiltIn },
            opts.ca_option,
        );
        let mut tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ));
        if let Some(certs) = roots {
            let certs: Vec<ureq::tls::Certificate<'static>> = certs
                .iter()
                .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
                .collect();
            tls = tls.root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)));
        }
        let tls = tls.build();
        let jobs = opts.jobs.max(1);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .max_redirects(0)
            .max_idle_connections(jobs.max(10))
            .max_idle_connections_per_host(jobs)
            .timeout_connect(Some(opts.connect_timeout))
            .timeout_global(Some(opts.timeout))
            .user_agent(concat!("vouch/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(Fetcher {
            inner: Arc::new(Inner {
                base: base.trim_end_matches('/').to_owned(),
                agent,
                roots: roots_text,
                cache: opts.cache_dir.as_deref().map(|d| {
                    let c = BlobCache::new(d);
                    (c.clone(), CacheWriter::new(c))
                }),
                pool: Pool::new(jobs),
                requests: AtomicU64::new(0),
                cache_hits: AtomicU64::new(0),
                per_read: opts.timeout,
            }),
        })
    }

    /// The store's base URL.
    pub fn base(&self) -> &str {
        &self.inner.base
    }

    /// The URL of `rel` (a path under the base, without a leading `/`).
    pub fn url(&self, rel: &str) -> String {
        format!("{}/{rel}", self.inner.base)
    }

    /// `rel`'s bytes, `None` if the server answered 404.
    pub fn get(&self, rel: &str, kind: Kind) -> Answer {
        self.inner.get(&self.url(rel), kind)
    }

    /// `rel`'s bytes, which must be there (`expected` says what it should hold).
    pub fn need(&self, rel: &str, kind: Kind, expected: &str) -> Result<Vec<u8>, FetchError> {
        self.get(rel, kind)?
            .ok_or_else(|| FetchError::Missing { url: self.url(rel), expected: expected.into() })
    }

    /// Several files at once, on the bounded pool and the calling thread; answers in order.
    pub fn get_all(&self, rels: &[(String, Kind)]) -> Vec<Answer> {
        let Some((first, rest)) = rels.split_first() else { return Vec::new() };
        let (tx, rx) = mpsc::channel();
        for (i, (rel, kind)) in rest.iter().enumerate() {
            let (inner, tx, url, kind) =
                (Arc::clone(&self.inner), tx.clone(), self.url(rel), *kind);
            self.inner.pool.run(Box::new(move || {
                let _ = tx.send((i + 1, inner.get(&url, kind)));
            }));
        }
        drop(tx);
        let mut out: Vec<Option<Answer>> = (0..rels.len()).map(|_| None).collect();
        out[0] = Some(self.get(&first.0, first.1));
        for (i, a) in rx {
            out[i] = Some(a);
        }
        out.into_iter()
            .zip(rels)
            .map(|(a, (rel, _))| {
                a.unwrap_or_else(|| {
                    Err(FetchError::Transport {
                        url: self.url(rel),
                        problem: "the fetching thread stopped".into(),
                    })
                })
            })
            .collect()
    }

    /// Stream `rel` into `to`, at most `max` bytes (more is an error), without the local cache
    /// and without [`MAX_BODY`]: for large files (NARs). The time limit is per read (the
    /// fetch options' `timeout`), not for the whole body. The bytes written, `None` for 404.
    pub fn download(
        &self,
        rel: &str,
        to: &mut dyn std::io::Write,
        max: u64,
    ) -> Result<Option<u64>, FetchError> {
        self.inner.download(&self.url(rel), to, max)
    }

    /// Requests sent to the server, and answers the local cache gave, so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.inner.requests.load(Ordering::Relaxed), self.inner.cache_hits.load(Ordering::Relaxed))
    }
}

impl Inner {
    /// Send a GET of `url` (with `per_read`, a time limit per read instead of one for the whole
    /// request): the response if 200, `None` if 404.
    fn call(
        &self,
        url: &str,
        per_read: Option<Duration>,
    ) -> Result<Option<ureq::http::Response<ureq::Body>>, FetchError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let transport = |problem: String| FetchError::Transport { url: url.to_owned(), problem };
        let req = self.agent.get(url);
        let sent = match per_read {
            None => req.call(),
            Some(t) => req.config().timeout_global(None).timeout_per_read(Some(t)).build().call(),
        };
        let resp = sent.map_err(|e| {
            transport(super::tls::describe_tls(&e, &self.roots).unwrap_or(e.to_string()))
        })?;
        match resp.status().as_u16() {
            200 => Ok(Some(resp)),
            404 => Ok(None),
            status => Err(FetchError::Status {
                url: url.to_owned(),
                status,
                expected: "200 (the file) or 404 (absent)".into(),
            }),
        }
    }

    fn download(
        &self,
        url: &str,
        to: &mut dyn std::io::Write,
        max: u64,
    ) -> Result<Option<u64>, FetchError> {
        let Some(mut resp) = self.call(url, Some(self.per_read))? else { return Ok(None) };
        let transport = |problem: String| FetchError::Transport { url: url.to_owned(), problem };
        // Not limited by ureq (its reader is unbounded): by `take`, one byte past `max`.
        let mut body = std::io::Read::take(resp.body_mut().as_reader(), max.saturating_add(1));
        let n = std::io::copy(&mut body, to)
            .map_err(|e| transport(format!("receiving the body: {e}")))?;
        if n > max {
            return Err(FetchError::Garbled {
                url: url.to_owned(),
                problem: format!("more than the {max} bytes expected"),
            });
        }
        Ok(Some(n))
    }

    fn get(&self, url: &str, kind: Kind) -> Answer {
        let cache = self.cache.as_ref().filter(|_| kind == Kind::Immutable);
        if let Some(bytes) = cache.and_then(|(c, _)| c.get(url)) {
            self.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(bytes));
        }
        let transport = |problem: String| FetchError::Transport { url: url.to_owned(), problem };
        let Some(mut resp) = self.call(url, None)? else { return Ok(None) };
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_vec()
            .map_err(|e| transport(format!("reading the body: {e}")))?;
        if let Some((_, w)) = cache {
            w.put(url, &body);
        }
        Ok(Some(body))
    }
}

type Task = Box<dyn FnOnce() + Send>;

/// `jobs − 1` threads (the caller of [`Fetcher::get_all`] is the last), started on first use
/// and ended when the fetcher is dropped.
#[derive(Debug)]
struct Pool {
    jobs: usize,
    tx: Mutex<Option<mpsc::Sender<Task>>>,
}

impl Pool {
    fn new(jobs: usize) -> Pool {
        Pool { jobs, tx: Mutex::new(None) }
    }

    fn run(&self, task: Task) {
        if self.jobs <= 1 {
            return task();
        }
        let mut tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let tx = tx.get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel::<Task>();
            let rx = Arc::new(Mutex::new(rx));
            for _ in 1..self.jobs {
                let rx = Arc::clone(&rx);
                std::thread::spawn(move || loop {
                    let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    match next {
                        Ok(task) => task(),
                        Err(_) => return,
                    }
                });
            }
            tx
        });
        if let Err(mpsc::SendError(task)) = tx.send(task) {
            task();
        }
    }
}
