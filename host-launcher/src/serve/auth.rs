//! Who may change what the CI service holds: one access token, required (when the operator sets
//! one) for uploads and the build API. The binary cache and `/healthz` stay public — the cache is
//! signed and verifiers and substituters need it.
//!
//! Further tokens (the operator's list) mark the clients the operator **trusts**, as Nix's
//! `trusted-users`: only they may upload paths with neither a content address nor a signature by
//! a key the service trusts, each into an overlay of its own (`super::Service`). A caller is
//! described by a [`Caller`].
//!
//! A request presents the token either as `Authorization: Bearer TOKEN` or as HTTP Basic with
//! any user name and the token as the password, which is what Nix sends, unasked, from a netrc
//! entry (`machine HOST login ci password TOKEN`, `netrc-file = …`). Only a SHA-256 digest of the
//! token is kept; presented tokens are hashed and compared without an early exit.
//!
//! What is not here: TLS (put a TLS-terminating proxy in front when the token crosses a network),
//! per-user accounts or scopes.

use std::path::{Path, PathBuf};

use base64::Engine;
use sha2::{Digest, Sha256};

/// Shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why a token file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file could not be read.
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
}

/// The service's access token (its SHA-256 only).
#[derive(Clone)]
pub struct AccessToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessToken(<redacted>)")
    }
}

impl AccessToken {
    /// The token on the first line of `path` (surrounding whitespace ignored).
    pub fn from_file(path: &Path) -> Result<AccessToken, TokenError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| TokenError::Read(path.to_owned(), e))?;
        let token = text.lines().next().unwrap_or_default().trim();
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::Chars(path.to_owned()));
        }
        if token.len() < MIN_TOKEN_LEN {
            return Err(TokenError::Short { path: path.to_owned(), len: token.len() });
        }
        Ok(AccessToken { digest: Sha256::digest(token.as_bytes()).into() })
    }

    /// Whether an `Authorization` header value (if any) presents this token.
    pub fn admits(&self, authorization: Option<&str>) -> bool {
        let Some(presented) = authorization.and_then(presented_token) else {
            return false;
        };
        let got: [u8; 32] = Sha256::digest(&presented).into();
        got.iter().zip(&self.digest).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// What a request's credentials allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Caller {
    /// It may upload and use the build API (it presented a token, or none is configured).
    pub access: bool,
    /// It presented a token the operator configured (not merely an open service).
    pub authenticated: bool,
    /// It presented one of the trusted callers' tokens.
    pub trusted: bool,
    /// Which (its index in the operator's list): each trusted token is one client, with its own
    /// overlay for the uploads vouch cannot certify.
    pub client: Option<usize>,
}

impl Caller {
    /// Who presents `authorization` to a service with the access token `access` (may be unset)
    /// and the trusted callers' tokens `trusted` (may be none).
    pub fn of(
        authorization: Option<&str>,
        access: Option<&AccessToken>,
        trusted: &[AccessToken],
    ) -> Caller {
        let client = trusted.iter().position(|t| t.admits(authorization));
        let trusted = client.is_some();
        let holds_access = access.is_some_and(|t| t.admits(authorization));
        Caller {
            access: trusted || holds_access || access.is_none(),
            authenticated: trusted || holds_access,
            trusted,
            client,
        }
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

    fn token_file(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("token");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn bearer_and_basic_present_the_token_and_nothing_else_does() {
        let dir = tempfile::tempdir().unwrap();
        let t = AccessToken::from_file(&token_file(dir.path(), "s3cr3t-token-0123\n")).unwrap();
        let basic = |s: &str| {
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(s.as_bytes()))
        };
        for ok in [
            "Bearer s3cr3t-token-0123".to_string(),
            "bearer  s3cr3t-token-0123 ".to_string(),
            basic("ci:s3cr3t-token-0123"),
            basic(":s3cr3t-token-0123"),
        ] {
            assert!(t.admits(Some(&ok)), "{ok}");
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
            assert!(!t.admits(bad.as_deref()), "{bad:?}");
        }
        assert_eq!(format!("{t:?}"), "AccessToken(<redacted>)");
    }

    #[test]
    fn callers_are_trusted_only_with_the_trusted_token() {
        let dir = tempfile::tempdir().unwrap();
        let access =
            AccessToken::from_file(&token_file(dir.path(), "access-token-0123\n")).unwrap();
        let p = dir.path().join("trusted");
        std::fs::write(&p, "trusted-token-0123\n").unwrap();
        let trusted = AccessToken::from_file(&p).unwrap();
        let (a, t) = (Some("Bearer access-token-0123"), Some("Bearer trusted-token-0123"));
        let p2 = dir.path().join("trusted-2");
        std::fs::write(&p2, "trusted-token-4567\n").unwrap();
        let second = AccessToken::from_file(&p2).unwrap();
        let both = [trusted.clone(), second];
        let t2 = Some("Bearer trusted-token-4567");
        let c = |auth, access, trusted: Option<&AccessToken>| {
            Caller::of(auth, access, trusted.map(std::slice::from_ref).unwrap_or_default())
        };
        let open = Caller { access: true, authenticated: false, ..Caller::default() };
        assert_eq!(c(None, None, None), open, "an open service trusts nobody");
        assert_eq!(c(a, None, None), open);
        assert_eq!(c(None, Some(&access), None), Caller::default());
        let holder = Caller { access: true, authenticated: true, ..Caller::default() };
        assert_eq!(c(a, Some(&access), Some(&trusted)), holder);
        let all = Caller { access: true, authenticated: true, trusted: true, client: Some(0) };
        assert_eq!(c(t, Some(&access), Some(&trusted)), all);
        assert_eq!(c(t, None, Some(&trusted)), all);
        assert_eq!(c(a, None, Some(&trusted)), open);
        // Each token of the operator's list is one client.
        assert_eq!(Caller::of(t, None, &both).client, Some(0));
        assert_eq!(Caller::of(t2, None, &both).client, Some(1));
        assert_eq!(Caller::of(a, None, &both), open);
    }

    #[test]
    fn weak_or_unusable_tokens_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let short = AccessToken::from_file(&token_file(dir.path(), "short\n")).unwrap_err();
        assert!(short.to_string().contains("5 characters long"), "{short}");
        let spaced = AccessToken::from_file(&token_file(dir.path(), "with a space 012345"));
        assert!(matches!(spaced, Err(TokenError::Chars(_))), "{spaced:?}");
        let missing = AccessToken::from_file(&dir.path().join("nope")).unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");
    }
}
