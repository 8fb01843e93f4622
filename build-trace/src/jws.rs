//! laut-compatible JWS for a step, with the statement and evidence as detached fields.
//!
//! What is here: signing and verifying the compact JWS (`base64url(header).base64url(payload).
//! base64url(signature)`, Ed25519 over the ASCII signing input) that laut (v2 format) reads, and
//! the detachable-field scheme from laut's predecessor `trace-signature`: a field's value is
//! replaced in the payload by `"~" + base64url(sha256(value bytes))` and the bytes travel beside
//! the JWS (in the trace store: `statement.json` and `evidence.json`).
//!
//! ```text
//! header  {"alg":"EdDSA","crv":"Ed25519","kid":"<key name>:<16 hex of SHA-256(SPKI DER)>",
//!          "type":"laut","v":"2"}
//! payload {"in":{"rdrv_aterm_ca":"<hash part of the step's drv path>",
//!                "debug":{"drv_name":"<name>","rdrv_path":"<drv path>"}},
//!          "out":{"nix":{"<output>":{"hashAlgo":"sha256","method":"nar","path":"<path>",
//!                                   "hash":"sha256:<nix32 NAR hash>"}}},
//!          "builder":{"rebuild_id":<u32>,"store_root":"/nix/store","nix_flavor":"vouch",
//!                     "nix_version":"<agent version>"},
//!          "vouch":{"statement":"~<digest>","evidence":"~<digest>","evidence_kind":"sev-snp"}}
//! ```
//! `out.nix.<output>` keeps the derivation's output method (`hashAlgo`/`method` for content-
//! addressed outputs, none for input-addressed ones) and adds the path and NAR hash, as laut's
//! signer does. `rebuild_id` is the first four bytes of REPORT_DATA, so signing is deterministic.
//! `evidence_kind` is a label for humans; verifiers classify evidence by the root that verifies it.
//!
//! Signing ([`sign`]) only with the `producer` feature.
//!
//! What is not here: trust decisions (the verifier asks the policy which keys count).

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use ed25519_dalek::{Signature, VerifyingKey};
use nix_formats::signing::PublicKey;
#[cfg(feature = "producer")]
use nix_formats::signing::SecretKey;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::job::DrvOutput;
use crate::statement::{Statement, StatementError};

/// Why a JWS could not be made or does not verify.
#[derive(Debug, thiserror::Error)]
pub enum JwsError {
    /// The statement could not be encoded.
    #[error("statement")]
    Statement(#[source] StatementError),
    /// Not three base64url parts with JSON header and payload.
    #[error("malformed JWS: {0}")]
    Malformed(String),
    /// The header is not a laut v2 EdDSA header.
    #[error("JWS header: {0}")]
    Header(String),
    /// No key with the `kid`'s name and thumbprint.
    #[error("JWS signed by `{0}`, which is not a key we were given")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("JWS signature by `{0}` does not verify")]
    BadSignature(String),
    /// The payload does not describe the statement it travels with.
    #[error("JWS payload does not match the statement: {0}")]
    Mismatch(String),
}

/// The ed25519 public key of a Nix key (for the JWS `kid`).
pub fn verifying_key(key: &PublicKey) -> VerifyingKey {
    VerifyingKey::from_bytes(&key.to_bytes()).expect("a parsed public key is a valid point")
}

/// SHA-256 of the key's SubjectPublicKeyInfo DER (`302a300506032b6570032100 ‖ key`).
pub fn spki_thumbprint(key: &VerifyingKey) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00]);
    h.update(key.as_bytes());
    h.finalize().into()
}

/// laut's `kid`: `<key name>:<first 16 hex digits of the SPKI thumbprint>`.
pub fn kid(key_name: &str, key: &VerifyingKey) -> String {
    format!("{key_name}:{}", &hex::encode(spki_thumbprint(key))[..16])
}

/// The `kid` of a compact JWS, without verifying anything (for display).
pub fn kid_of(compact: &str) -> Option<String> {
    let header = B64URL.decode(compact.split('.').next()?).ok()?;
    let v: Value = serde_json::from_slice(&header).ok()?;
    v.get("kid")?.as_str().map(str::to_string)
}

/// The SHA-256 of the statement a compact JWS's payload names (`vouch.statement`), without
/// verifying anything: where to find its entry (whose id is that digest's first 32 hex digits).
pub fn statement_digest_of(compact: &str) -> Option<[u8; 32]> {
    let payload = B64URL.decode(compact.split('.').nth(1)?).ok()?;
    let v: Value = serde_json::from_slice(&payload).ok()?;
    let r = v.get("vouch")?.get("statement")?.as_str()?.strip_prefix('~')?;
    B64URL.decode(r).ok()?.try_into().ok()
}

/// A detached-field reference: `"~" + base64url(sha256(bytes))`.
pub fn detached_ref(bytes: &[u8]) -> String {
    format!("~{}", B64URL.encode(Sha256::digest(bytes)))
}

/// laut's `out.nix.<output>` entry method fields for a derivation output.
fn output_method(out: &DrvOutput) -> Map<String, Value> {
    let mut m = Map::new();
    let (method, algo) = match out.hash_algo.split_once(':') {
        Some(("r", algo)) => ("nar", algo),
        Some(("text", algo)) => ("text", algo),
        _ => ("flat", out.hash_algo.as_str()),
    };
    if !out.hash_algo.is_empty() {
        m.insert("hashAlgo".into(), json!(algo));
        m.insert("method".into(), json!(method));
    }
    m
}

/// The payload for a statement (see the module documentation).
pub fn payload(
    statement: &Statement,
    statement_bytes: &[u8],
    evidence_bytes: Option<&[u8]>,
    evidence_kind: &str,
) -> Result<Value, JwsError> {
    let job = &statement.job;
    let hash_part = job.drv_path.hash_part().to_string();
    let mut nix = Map::new();
    for (name, out) in &statement.outputs {
        let mut entry = output_method(&job.drv.outputs[name]);
        entry.insert("path".into(), json!(out.path));
        entry.insert("hash".into(), json!(out.nar_hash.to_string()));
        nix.insert(name.clone(), Value::Object(entry));
    }
    let report_data = statement.report_data().map_err(JwsError::Statement)?;
    let rebuild_id =
        u32::from_be_bytes([report_data[0], report_data[1], report_data[2], report_data[3]]);
    let mut vouch = Map::new();
    vouch.insert("statement".into(), json!(detached_ref(statement_bytes)));
    if let Some(ev) = evidence_bytes {
        vouch.insert("evidence".into(), json!(detached_ref(ev)));
        vouch.insert("evidence_kind".into(), json!(evidence_kind));
    }
    Ok(json!({
        "in": {
            "rdrv_aterm_ca": hash_part,
            "debug": { "drv_name": job.drv.name, "rdrv_path": job.drv_path },
        },
        "out": { "nix": nix },
        "builder": {
            "rebuild_id": rebuild_id,
            "store_root": nix_formats::STORE_DIR,
            "nix_flavor": "vouch",
            "nix_version": statement.agent_version,
        },
        "vouch": vouch,
    }))
}

#[cfg(feature = "producer")]
/// Sign a step's trace: the compact JWS.
pub fn sign(
    statement: &Statement,
    evidence_bytes: Option<&[u8]>,
    evidence_kind: &str,
    key: &SecretKey,
) -> Result<String, JwsError> {
    let statement_bytes = statement.canonical_bytes().map_err(JwsError::Statement)?;
    let payload = payload(statement, &statement_bytes, evidence_bytes, evidence_kind)?;
    let header = json!({
        "type": "laut", "alg": "EdDSA", "crv": "Ed25519", "v": "2",
        "kid": kid(key.name(), &verifying_key(&key.public_key())),
    });
    let input = format!(
        "{}.{}",
        B64URL.encode(serde_json::to_vec(&header).expect("JSON value")),
        B64URL.encode(serde_json::to_vec(&payload).expect("JSON value"))
    );
    let sig = key.sign(input.as_bytes());
    Ok(format!("{input}.{}", B64URL.encode(sig.sig)))
}

/// A JWS whose signature verified.
#[derive(Debug, Clone)]
pub struct VerifiedJws {
    /// The signing key's name (the policy's name for it).
    pub key_name: String,
    /// The payload.
    pub payload: Value,
}

/// Public keys ready to verify JWS: each key's name, its Ed25519 point (decompressed once, not
/// once per signature) and its `kid`.
#[derive(Debug, Clone)]
pub struct JwsKeys(Vec<(String, VerifyingKey, String)>);

impl JwsKeys {
    pub fn new(keys: &[PublicKey]) -> JwsKeys {
        JwsKeys(
            keys.iter()
                .map(|k| {
                    let vk = verifying_key(k);
                    (k.name().to_string(), vk, kid(k.name(), &vk))
                })
                .collect(),
        )
    }
}

/// Verify a compact JWS against the keys given: the `kid` must name one of them with a matching
/// thumbprint, and the Ed25519 signature must verify (strictly).
pub fn verify(compact: &str, keys: &[PublicKey]) -> Result<VerifiedJws, JwsError> {
    verify_with(compact, &JwsKeys::new(keys))
}

/// [`verify`] with prepared keys.
pub fn verify_with(compact: &str, keys: &JwsKeys) -> Result<VerifiedJws, JwsError> {
    let parts: Vec<&str> = compact.trim().split('.').collect();
    let [h64, p64, s64] = parts[..] else {
        return Err(JwsError::Malformed(format!("{} parts, not 3", parts.len())));
    };
    let decode = |what: &str, s: &str| {
        B64URL.decode(s).map_err(|e| JwsError::Malformed(format!("{what}: {e}")))
    };
    let header: Value = serde_json::from_slice(&decode("header", h64)?)
        .map_err(|e| JwsError::Malformed(format!("header: {e}")))?;
    for (field, want) in [("type", "laut"), ("alg", "EdDSA"), ("v", "2")] {
        if header.get(field).and_then(Value::as_str) != Some(want) {
            return Err(JwsError::Header(format!("`{field}` is not \"{want}\"")));
        }
    }
    let kid_str = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or_else(|| JwsError::Header("no `kid`".into()))?;
    let (name, _) =
        kid_str.rsplit_once(':').ok_or_else(|| JwsError::Header(format!("kid `{kid_str}`")))?;
    let (_, key, _) = keys
        .0
        .iter()
        .find(|(n, _, kid)| n == name && kid == kid_str)
        .ok_or_else(|| JwsError::UnknownKey(kid_str.to_string()))?;
    let sig_bytes: [u8; 64] = decode("signature", s64)?
        .try_into()
        .map_err(|_| JwsError::Malformed("signature is not 64 bytes".into()))?;
    key.verify_strict(format!("{h64}.{p64}").as_bytes(), &Signature::from_bytes(&sig_bytes))
        .map_err(|_| JwsError::BadSignature(kid_str.to_string()))?;
    let payload: Value = serde_json::from_slice(&decode("payload", p64)?)
        .map_err(|e| JwsError::Malformed(format!("payload: {e}")))?;
    Ok(VerifiedJws { key_name: name.to_string(), payload })
}

impl VerifiedJws {
    /// Check that the payload describes `statement` (whose canonical bytes are
    /// `statement_bytes`): same drv hash part, the same output paths and NAR hashes, and the
    /// detached statement digest.
    pub fn check_statement(
        &self,
        statement: &Statement,
        statement_bytes: &[u8],
    ) -> Result<(), JwsError> {
        let p = &self.payload;
        let key = p.pointer("/in/rdrv_aterm_ca").and_then(Value::as_str);
        if key != Some(statement.job.drv_path.hash_part()) {
            return Err(JwsError::Mismatch(format!(
                "in.rdrv_aterm_ca is {key:?}, the step is {}",
                statement.job.drv_path
            )));
        }
        let nix = p
            .pointer("/out/nix")
            .and_then(Value::as_object)
            .ok_or_else(|| JwsError::Mismatch("no out.nix".into()))?;
        if nix.len() != statement.outputs.len() {
            return Err(JwsError::Mismatch(format!(
                "{} outputs signed, the statement has {}",
                nix.len(),
                statement.outputs.len()
            )));
        }
        for (name, out) in &statement.outputs {
            let entry = nix
                .get(name)
                .ok_or_else(|| JwsError::Mismatch(format!("output `{name}` not signed")))?;
            let path = entry.get("path").and_then(Value::as_str);
            let hash = entry.get("hash").and_then(Value::as_str);
            if path != Some(out.path.to_string().as_str())
                || hash != Some(out.nar_hash.to_string().as_str())
            {
                return Err(JwsError::Mismatch(format!(
                    "output `{name}`: signed {path:?} {hash:?}, the statement has {} {}",
                    out.path, out.nar_hash
                )));
            }
        }
        let signed = p.pointer("/vouch/statement").and_then(Value::as_str);
        if signed != Some(detached_ref(statement_bytes).as_str()) {
            return Err(JwsError::Mismatch("the detached statement digest differs".into()));
        }
        Ok(())
    }

    /// The detached evidence digest, if the payload carries one.
    pub fn evidence_ref(&self) -> Option<&str> {
        self.payload.pointer("/vouch/evidence").and_then(Value::as_str)
    }
}
