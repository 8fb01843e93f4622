//! Who may do what on the CI service: **scoped tokens**.
//!
//! A token grants a set of [`Scope`]s:
//! - `cache`: read the binary cache when it is private (`--private-cache`), and see the unsigned
//!   narinfos of uploaded paths (which inputs were uploaded is not public);
//! - `upload`: `nix copy --to` (PUT `nar/…` and `….narinfo`);
//! - `build`: the build API and the web page (submit, list, read, cancel);
//! - `trusted`: the callers the operator trusts as Nix trusts its `trusted-users`: only they may
//!   upload paths with neither a content address nor a signature by a key the service trusts,
//!   each token into an overlay of its own (`super::Service`) that only its builds read.
//!   (Input-addressed derivations build for every `build` caller, at the output paths the core
//!   computes from the derivation graph; one declaring other paths is refused for all.)
//!
//! Tokens come from a **tokens file** (`--tokens FILE`), one per line, `#` comments:
//!
//! ```text
//! # NAME      SCOPES                      SECRET (the token, or sha256:<hex of its SHA-256>)
//! ci          upload,build                sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
//! readers     cache                       a-long-random-token-0123
//! admin       cache,upload,build,trusted  sha256:…
//! anonymous   cache                       -
//! ```
//!
//! `anonymous` (secret `-`) sets what callers without a token may do: without that line,
//! `cache` once any token is configured, and `cache,upload,build` on a service with no token
//! at all (anyone who reaches the port). `--private-cache` takes `cache` from anonymous callers.
//! The older flags stay: `--token-file FILE` is a token named `token` with
//! `cache,upload,build` (and closes the service to anonymous uploads and builds, as before), and
//! `--trusted-token-file FILE` a token named `trusted` with every scope (it does not by itself
//! close the service, as before).
//!
//! A request presents its token either as `Authorization: Bearer TOKEN` or as HTTP Basic with
//! any user name and the token as the password, which is what Nix sends, unasked, from a netrc
//! entry (`machine HOST login ci password TOKEN`), and what a browser asks for on a 401. Only
//! SHA-256 digests of tokens are kept; presented tokens are hashed and compared with every
//! configured one without an early exit.
//!
//! What is not here: TLS ([`super::tls`]), per-user accounts.

use std::path::{Path, PathBuf};

use base64::Engine;
use sha2::{Digest, Sha256};

/// Shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;
/// Most tokens in a tokens file.
pub const MAX_TOKENS: usize = 1024;

/// What a token allows (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Read the (private) cache and see uploaded paths.
    Cache,
    /// Upload paths.
    Upload,
    /// Use the build API and the web page.
    Build,
    /// Trusted as Nix's `trusted-users`.
    Trusted,
}

impl Scope {
    const ALL: [Scope; 4] = [Scope::Cache, Scope::Upload, Scope::Build, Scope::Trusted];

    fn bit(self) -> u8 {
        1 << self as u8
    }

    /// Its name in a tokens file.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Cache => "cache",
            Scope::Upload => "upload",
            Scope::Build => "build",
            Scope::Trusted => "trusted",
        }
    }
}

/// A set of scopes.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes(u8);

impl std::fmt::Debug for Scopes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> =
            Scope::ALL.iter().filter(|s| self.has(**s)).map(|s| s.name()).collect();
        write!(f, "Scopes({})", names.join(","))
    }
}

impl Scopes {
    /// Every scope.
    pub const ALL: Scopes = Scopes(0b1111);
    /// No scope.
    pub const NONE: Scopes = Scopes(0);

    /// These scopes.
    pub fn of(scopes: &[Scope]) -> Scopes {
        Scopes(scopes.iter().fold(0, |acc, s| acc | s.bit()))
    }

    /// Whether `s` is in the set.
    pub fn has(self, s: Scope) -> bool {
        self.0 & s.bit() != 0
    }

    /// The set without `s`.
    pub fn without(self, s: Scope) -> Scopes {
        Scopes(self.0 & !s.bit())
    }

    /// `cache,upload`, as in a tokens file.
    pub fn parse(text: &str) -> Result<Scopes, String> {
        text.split(',').try_fold(Scopes::NONE, |acc, name| {
            let s = Scope::ALL.iter().find(|s| s.name() == name.trim()).ok_or_else(|| {
                format!("unknown scope {name:?} (scopes: cache, upload, build, trusted)")
            })?;
            Ok(Scopes(acc.0 | s.bit()))
        })
    }
}

/// Why the token configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// A file could not be read.
    #[error("reading the token file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// Too short to resist guessing.
    #[error(
        "the token in {path} is {len} characters long; use at least {MIN_TOKEN_LEN} \
         (for example `head -c 24 /dev/urandom | base64`)"
    )]
    Short {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// Characters a netrc entry or an HTTP header cannot carry.
    #[error(
        "the token in {0} contains whitespace, control or non-ASCII characters, which a netrc \
         entry or an HTTP header cannot carry"
    )]
    Chars(PathBuf),
    /// A line of a tokens file.
    #[error("{path}, line {line}: {msg}")]
    Line {
        /// The file.
        path: PathBuf,
        /// The line (from 1).
        line: usize,
        /// What was wrong.
        msg: String,
    },
}

/// One configured token: its name, scopes and SHA-256.
#[derive(Clone)]
pub struct Token {
    /// Its name (for logs; never the secret).
    pub name: String,
    /// What it grants.
    pub scopes: Scopes,
    digest: [u8; 32],
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({}, {:?}, <redacted>)", self.name, self.scopes)
    }
}

fn check_secret(path: &Path, token: &str) -> Result<[u8; 32], TokenError> {
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenError::Chars(path.to_owned()));
    }
    if token.len() < MIN_TOKEN_LEN {
        return Err(TokenError::Short { path: path.to_owned(), len: token.len() });
    }
    Ok(Sha256::digest(token.as_bytes()).into())
}

/// The token on the first line of `path` (surrounding whitespace ignored), named `name`.
pub fn token_from_file(path: &Path, name: &str, scopes: Scopes) -> Result<Token, TokenError> {
    let text = std::fs::read_to_string(path).map_err(|e| TokenError::Read(path.to_owned(), e))?;
    let token = text.lines().next().unwrap_or_default().trim();
    Ok(Token { name: name.into(), scopes, digest: check_secret(path, token)? })
}

/// Who may do what: the configured tokens and what anonymous callers may do.
#[derive(Debug, Clone)]
pub struct Access {
    tokens: Vec<Token>,
    anonymous: Scopes,
}

impl Default for Access {
    /// No token: anyone may read, upload and build (never `trusted`).
    fn default() -> Self {
        Access { tokens: Vec::new(), anonymous: Scopes::ALL.without(Scope::Trusted) }
    }
}

impl Access {
    /// The configuration of `vouch serve`'s flags (see the module docs).
    pub fn configure(
        tokens_file: Option<&Path>,
        token_file: Option<&Path>,
        trusted_token_files: &[PathBuf],
        private_cache: bool,
    ) -> Result<Access, TokenError> {
        let mut a = Access::default();
        let mut anonymous = None;
        if let Some(p) = tokens_file {
            let (tokens, anon) = parse_tokens_file(p)?;
            a.tokens = tokens;
            anonymous = Some(anon.unwrap_or(Scopes::of(&[Scope::Cache])));
        }
        if let Some(p) = token_file {
            let scopes = Scopes::of(&[Scope::Cache, Scope::Upload, Scope::Build]);
            a.tokens.push(token_from_file(p, "token", scopes)?);
            anonymous = Some(anonymous.unwrap_or(Scopes::of(&[Scope::Cache])));
        }
        for (i, p) in trusted_token_files.iter().enumerate() {
            let name = if i == 0 { "trusted".to_owned() } else { format!("trusted-{}", i + 1) };
            a.tokens.push(token_from_file(p, &name, Scopes::ALL)?);
        }
        if let Some(anon) = anonymous {
            a.anonymous = anon;
        }
        if private_cache {
            a.anonymous = a.anonymous.without(Scope::Cache);
        }
        Ok(a)
    }

    /// Whether any token is configured.
    pub fn has_tokens(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// What callers without a token may do.
    pub fn anonymous(&self) -> Scopes {
        self.anonymous
    }

    /// Who presents `authorization`.
    pub fn caller(&self, authorization: Option<&str>) -> Caller {
        let presented = authorization.and_then(presented_token).map(|t| {
            let d: [u8; 32] = Sha256::digest(&t).into();
            d
        });
        let mut found = None;
        if let Some(got) = presented {
            // Compare with every token, without an early exit.
            for (i, t) in self.tokens.iter().enumerate() {
                let same = got.iter().zip(&t.digest).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
                if same && found.is_none() {
                    found = Some(i);
                }
            }
        }
        match found {
            Some(i) => {
                let scopes =
                    Scopes(self.tokens[i].scopes.0 | self.anonymous.without(Scope::Trusted).0);
                let trusted = scopes.has(Scope::Trusted);
                Caller {
                    scopes,
                    authenticated: true,
                    trusted,
                    token: Some(i as u16),
                    client: trusted.then(|| self.client_of(i)),
                }
            }
            None => Caller {
                scopes: self.anonymous,
                authenticated: false,
                trusted: false,
                token: None,
                client: None,
            },
        }
    }

    /// How many tokens have the `trusted` scope: the trusted clients, each with an overlay of
    /// its own ([`Caller::client`]).
    pub fn trusted_clients(&self) -> usize {
        self.tokens.iter().filter(|t| t.scopes.has(Scope::Trusted)).count()
    }

    /// The client index of token `i`: how many tokens before it have the `trusted` scope.
    fn client_of(&self, i: usize) -> usize {
        self.tokens[..i].iter().filter(|t| t.scopes.has(Scope::Trusted)).count()
    }

    /// The name of token `i` (of [`Caller::token`]).
    pub fn token_name(&self, i: u16) -> &str {
        self.tokens.get(usize::from(i)).map_or("?", |t| t.name.as_str())
    }
}

fn parse_tokens_file(path: &Path) -> Result<(Vec<Token>, Option<Scopes>), TokenError> {
    let text = std::fs::read_to_string(path).map_err(|e| TokenError::Read(path.to_owned(), e))?;
    let mut tokens: Vec<Token> = Vec::new();
    let mut anonymous = None;
    for (n, line) in text.lines().enumerate() {
        let bad = |msg: String| TokenError::Line { path: path.to_owned(), line: n + 1, msg };
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, scopes, secret] = fields[..] else {
            return Err(bad(format!(
                "expected `NAME SCOPES SECRET` (3 fields), found {}",
                fields.len()
            )));
        };
        let scopes = Scopes::parse(scopes).map_err(bad)?;
        if name == "anonymous" {
            if secret != "-" {
                return Err(bad("the anonymous line's secret must be `-`".into()));
            }
            if scopes.has(Scope::Trusted) {
                return Err(bad("anonymous callers cannot be trusted".into()));
            }
            anonymous = Some(scopes);
            continue;
        }
        if tokens.iter().any(|t| t.name == name) {
            return Err(bad(format!("the name {name:?} is used twice")));
        }
        if tokens.len() == MAX_TOKENS {
            return Err(bad(format!("more than {MAX_TOKENS} tokens")));
        }
        let digest = match secret.strip_prefix("sha256:") {
            Some(h) => {
                let v = hex::decode(h).ok().filter(|v| v.len() == 32).ok_or_else(|| {
                    bad("sha256:… must be 64 hex digits (`printf %s TOKEN | sha256sum`)".into())
                })?;
                let mut d = [0; 32];
                d.copy_from_slice(&v);
                d
            }
            None => check_secret(path, secret).map_err(|e| bad(e.to_string()))?,
        };
        tokens.push(Token { name: name.into(), scopes, digest });
    }
    Ok((tokens, anonymous))
}

/// What a request's credentials allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Caller {
    /// What it may do.
    pub scopes: Scopes,
    /// It presented a configured token (not merely an open service).
    pub authenticated: bool,
    /// It holds the `trusted` scope.
    pub trusted: bool,
    /// Which token it presented (an index into the configuration).
    pub token: Option<u16>,
    /// Which trusted client it is (its index among the tokens with the `trusted` scope): each
    /// trusted token is one client, with its own overlay for the uploads vouch cannot certify.
    pub client: Option<usize>,
}

impl Caller {
    /// Whether it may do what `s` allows.
    pub fn can(&self, s: Scope) -> bool {
        self.scopes.has(s)
    }
}

/// The token an `Authorization` value carries: `Bearer TOKEN`, or `Basic base64(user:TOKEN)`.
fn presented_token(value: &str) -> Option<Vec<u8>> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.as_bytes().to_vec());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let raw = base64::engine::general_purpose::STANDARD.decode(rest).ok()?;
        let colon = raw.iter().position(|&b| b == b':')?;
        return Some(raw[colon + 1..].to_vec());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn bearer_and_basic_present_the_token_and_nothing_else_does() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(dir.path(), "t", "s3cr3t-token-0123\n");
        let a = Access::configure(None, Some(&p), &[], false).unwrap();
        let basic = |s: &str| {
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(s.as_bytes()))
        };
        for ok in [
            "Bearer s3cr3t-token-0123".to_string(),
            "bearer  s3cr3t-token-0123 ".to_string(),
            basic("ci:s3cr3t-token-0123"),
            basic(":s3cr3t-token-0123"),
        ] {
            assert!(a.caller(Some(&ok)).authenticated, "{ok}");
        }
        for bad in [
            None,
            Some("s3cr3t-token-0123".to_string()),
            Some("Bearer s3cr3t-token-012".to_string()),
            Some("Bearer s3cr3t-token-01234".to_string()),
            Some("Token s3cr3t-token-0123".to_string()),
            Some(basic("s3cr3t-token-0123")),
            Some(basic("s3cr3t-token-0123:x")),
            Some("Basic !!!".to_string()),
        ] {
            let c = a.caller(bad.as_deref());
            assert!(!c.authenticated && !c.can(Scope::Upload) && c.can(Scope::Cache), "{bad:?}");
        }
        assert!(format!("{:?}", a.tokens[0]).contains("<redacted>"));
    }

    #[test]
    fn the_older_flags_keep_their_meaning() {
        let dir = tempfile::tempdir().unwrap();
        let access = file(dir.path(), "a", "access-token-0123\n");
        let trusted = file(dir.path(), "t", "trusted-token-0123\n");
        let (a, t) = (Some("Bearer access-token-0123"), Some("Bearer trusted-token-0123"));
        let open = Access::default().caller(None);
        assert!(open.can(Scope::Upload) && open.can(Scope::Build) && !open.trusted);
        assert!(!open.authenticated, "an open service trusts nobody");
        // --trusted-token-file alone leaves the service open, and only its holder trusted.
        let only_trusted =
            Access::configure(None, None, std::slice::from_ref(&trusted), false).unwrap();
        assert!(only_trusted.caller(None).can(Scope::Upload));
        assert!(!only_trusted.caller(a).trusted);
        let c = only_trusted.caller(t);
        assert!(c.trusted && c.authenticated && c.can(Scope::Build));
        // --token-file closes uploads and builds to anonymous callers; the cache stays public.
        let both =
            Access::configure(None, Some(&access), std::slice::from_ref(&trusted), false).unwrap();
        let anon = both.caller(None);
        assert!(anon.can(Scope::Cache) && !anon.can(Scope::Upload) && !anon.can(Scope::Build));
        let holder = both.caller(a);
        assert!(holder.can(Scope::Build) && holder.authenticated && !holder.trusted);
        assert!(both.caller(t).trusted);
        assert_ne!(both.caller(a).token, both.caller(t).token);
        // --private-cache: anonymous callers may not even read.
        let private = Access::configure(None, Some(&access), &[], true).unwrap();
        assert!(!private.caller(None).can(Scope::Cache) && private.caller(a).can(Scope::Cache));
        // --trusted-token-file is repeatable: each token is one client, with its own overlay.
        let second = file(dir.path(), "t2", "trusted-token-4567\n");
        let t2 = Some("Bearer trusted-token-4567");
        let two = Access::configure(None, Some(&access), &[trusted, second], false).unwrap();
        assert_eq!(two.trusted_clients(), 2);
        assert_eq!((two.caller(t).client, two.caller(t2).client), (Some(0), Some(1)));
        assert!(two.caller(t2).trusted && two.caller(a).client.is_none());
        assert_eq!(two.caller(None).client, None);
    }

    #[test]
    fn a_tokens_file_grants_scopes_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let hashed = hex::encode(Sha256::digest(b"uploader-token-0123"));
        let p = file(
            dir.path(),
            "tokens",
            &format!(
                "# name scopes secret\nreader cache reader-token-01234\n\
                 ci upload,build sha256:{hashed}   # hashed\nanonymous - -\n"
            )
            .replace("anonymous - -", "anonymous cache -"),
        );
        let a = Access::configure(Some(&p), None, &[], true).unwrap();
        assert_eq!(a.anonymous(), Scopes::NONE, "--private-cache");
        let r = a.caller(Some("Bearer reader-token-01234"));
        assert!(r.can(Scope::Cache) && !r.can(Scope::Upload));
        let ci = a.caller(Some("Bearer uploader-token-0123"));
        assert!(ci.can(Scope::Upload) && ci.can(Scope::Build) && !ci.can(Scope::Cache));
        assert_eq!(a.token_name(ci.token.unwrap()), "ci");
        // Each token with `trusted` is one trusted client, numbered in order: the tokens
        // file's, then each --trusted-token-file.
        let p = file(
            dir.path(),
            "trusting",
            "alice cache,upload,build,trusted alice-token-012345\n\
             ci upload,build ci-token-0123456789\nbob trusted bob-token-0123456789\n",
        );
        let carol = file(dir.path(), "carol", "carol-token-012345\n");
        let a = Access::configure(Some(&p), None, &[carol], false).unwrap();
        assert_eq!(a.trusted_clients(), 3);
        let client = |t: &str| a.caller(Some(&format!("Bearer {t}"))).client;
        assert_eq!(client("alice-token-012345"), Some(0));
        assert_eq!(client("ci-token-0123456789"), None);
        assert_eq!(client("bob-token-0123456789"), Some(1));
        assert_eq!(client("carol-token-012345"), Some(2));
        for (text, says) in [
            ("x cache", "3 fields"),
            ("x cash tok-0123456789abcdef", "unknown scope"),
            ("x cache short", "characters long"),
            ("x cache sha256:abc", "64 hex digits"),
            ("anonymous trusted -", "cannot be trusted"),
            ("a cache tok-0123456789abcdef\na build tok-0123456789abcdeg", "used twice"),
        ] {
            let p = file(dir.path(), "bad", text);
            let e = Access::configure(Some(&p), None, &[], false).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("line"), "{text}: {e}");
        }
    }
}
