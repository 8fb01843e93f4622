//! Build-trace records ("realisations") of both Nix generations, with their fingerprints.
//!
//! * **Nix ≤ 2.34** ([`LegacyRealisation`]): keyed by [`DrvOutputId`] `sha256:<hex>!<output>`,
//!   where `<hex>` is the masked hash modulo of the (resolved) derivation. JSON
//!   `{"dependentRealisations":{…},"id":…,"outPath":"<hash>-<name>","signatures":[…]}`; the
//!   fingerprint is that JSON without `signatures`, compact with sorted keys (nlohmann's `dump()`).
//! * **Nix ≥ 2.35** ([`BuildTraceEntry`]): keyed by [`DrvOutputKey`] (resolved drv path +
//!   output name). JSON `{"key":{"drvPath","outputName"},"value":{"outPath","signatures"}}` with
//!   signatures as `{"keyName","sig"}` objects (the old `"name:sig"` strings are accepted when
//!   parsing); the fingerprint is the JSON without `value.signatures`.
//!
//! Store paths in these JSON documents are base names (no `/nix/store/`). JSON text is produced
//! here field by field (not through a map type) so that key order never depends on crate features.
//! Not here: deciding which signatures to trust, or binary-cache layout beyond [`BuildTraceEntry::cache_path`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde_json::Value;
use thiserror::Error;

use crate::signing::{count_valid, PublicKey, SecretKey, Signature, SigningError};
use crate::store_path::{StorePath, StorePathError};

/// Why a realisation record was rejected.
#[derive(Debug, Error)]
pub enum RealisationError {
    /// Malformed JSON or wrong shape.
    #[error("invalid realisation JSON: {0}")]
    Json(String),
    /// A `sha256:<hex>!<output>` id is malformed.
    #[error("invalid realisation id {0:?} (expected sha256:<64 hex>!<output>)")]
    BadId(String),
    /// A store path inside is invalid.
    #[error("invalid store path in realisation")]
    StorePath(#[from] StorePathError),
    /// A signature inside is invalid.
    #[error("invalid signature in realisation")]
    Signature(#[from] SigningError),
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("strings always serialise")
}

/// Nix ≤ 2.34 `DrvOutput`: the hash modulo of a derivation and an output name. Parsing accepts
/// only the form Nix prints (`sha256:` + 64 lowercase hex digits + `!` + output).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DrvOutputId {
    /// SHA-256 hash modulo (masked) of the derivation.
    pub drv_hash: [u8; 32],
    /// Output name.
    pub output: String,
}

/// `sha256:<hex>!<output>`.
impl fmt::Display for DrvOutputId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}!{}", hex::encode(self.drv_hash), self.output)
    }
}

impl FromStr for DrvOutputId {
    type Err = RealisationError;
    fn from_str(s: &str) -> Result<Self, RealisationError> {
        let bad = || RealisationError::BadId(s.to_owned());
        let (h, out) = s.split_once('!').ok_or_else(bad)?;
        let hex_part = h.strip_prefix("sha256:").ok_or_else(bad)?;
        let mut drv_hash = [0u8; 32];
        if hex_part.len() != 64
            || out.is_empty()
            || hex_part.bytes().any(|c| c.is_ascii_uppercase())
        {
            return Err(bad());
        }
        hex::decode_to_slice(hex_part, &mut drv_hash).map_err(|_| bad())?;
        Ok(Self { drv_hash, output: out.to_owned() })
    }
}

/// Nix ≥ 2.35 `DrvOutput`: a (resolved) derivation path and an output name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DrvOutputKey {
    /// The derivation's store path.
    pub drv_path: StorePath,
    /// Output name.
    pub output: String,
}

/// `<drv base name>^<output>` (Nix's `DrvOutput::to_string`).
impl fmt::Display for DrvOutputKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}^{}", self.drv_path.base_name(), self.output)
    }
}

/// A Nix ≤ 2.34 realisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyRealisation {
    /// The key.
    pub id: DrvOutputId,
    /// The output path.
    pub out_path: StorePath,
    /// Signatures (`name:base64`), sorted and unique as in Nix.
    pub signatures: BTreeSet<Signature>,
    /// Realisations of the inputs this one was built from (deprecated upstream).
    pub dependent_realisations: BTreeMap<DrvOutputId, StorePath>,
}

impl LegacyRealisation {
    /// A record with no signatures and no dependent realisations.
    pub fn new(id: DrvOutputId, out_path: StorePath) -> Self {
        Self { id, out_path, signatures: BTreeSet::new(), dependent_realisations: BTreeMap::new() }
    }

    fn json(&self, with_sigs: bool) -> String {
        let deps: Vec<String> = self
            .dependent_realisations
            .iter()
            .map(|(k, v)| format!("{}:{}", json_str(&k.to_string()), json_str(v.base_name())))
            .collect();
        let mut s = format!(
            "{{\"dependentRealisations\":{{{}}},\"id\":{},\"outPath\":{}",
            deps.join(","),
            json_str(&self.id.to_string()),
            json_str(self.out_path.base_name())
        );
        if with_sigs {
            let sigs: Vec<String> =
                self.signatures.iter().map(|g| json_str(&g.to_string())).collect();
            s.push_str(&format!(",\"signatures\":[{}]", sigs.join(",")));
        }
        s.push('}');
        s
    }

    /// Compact JSON as Nix writes it (`realisations/<id>.doi`, the wire's builtOutputs value).
    pub fn to_json(&self) -> String {
        self.json(true)
    }

    /// The signed fingerprint: the JSON without `signatures`.
    pub fn fingerprint(&self) -> String {
        self.json(false)
    }

    /// Adds a signature by `key`.
    pub fn sign(&mut self, key: &SecretKey) {
        self.signatures.insert(key.sign(self.fingerprint().as_bytes()));
    }

    /// How many distinct `keys` have a valid signature here.
    pub fn count_valid_signatures(&self, keys: &[PublicKey]) -> usize {
        count_valid(self.fingerprint().as_bytes(), &self.signatures, keys)
    }

    /// Parses the JSON (any key order, whitespace allowed).
    pub fn from_json(s: &str) -> Result<Self, RealisationError> {
        let v = parse_json(s)?;
        let o =
            object(&v, "realisation", &["dependentRealisations", "id", "outPath", "signatures"])?;
        let mut r = Self::new(
            get_str(o, "id")?.parse()?,
            StorePath::from_base_name(get_str(o, "outPath")?)?,
        );
        for s in get_array(o, "signatures")? {
            let s = s.as_str().ok_or_else(|| json_err("signatures must be strings"))?;
            r.signatures.insert(s.parse()?);
        }
        if let Some(d) = o.get("dependentRealisations") {
            let deps =
                d.as_object().ok_or_else(|| json_err("dependentRealisations must be an object"))?;
            for (k, p) in deps {
                let p = p
                    .as_str()
                    .ok_or_else(|| json_err("dependentRealisations values must be strings"))?;
                r.dependent_realisations.insert(k.parse()?, StorePath::from_base_name(p)?);
            }
        }
        Ok(r)
    }
}

/// A Nix ≥ 2.35 build-trace entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildTraceEntry {
    /// The key.
    pub key: DrvOutputKey,
    /// The output path.
    pub out_path: StorePath,
    /// Signatures, sorted and unique.
    pub signatures: BTreeSet<Signature>,
}

impl BuildTraceEntry {
    /// A record with no signatures.
    pub fn new(key: DrvOutputKey, out_path: StorePath) -> Self {
        Self { key, out_path, signatures: BTreeSet::new() }
    }

    fn key_json(&self) -> String {
        format!(
            "{{\"drvPath\":{},\"outputName\":{}}}",
            json_str(self.key.drv_path.base_name()),
            json_str(&self.key.output)
        )
    }

    /// The `value` object alone (the body of `build-trace-v2/<drv>/<out>.doi`).
    pub fn value_json(&self) -> String {
        let sigs: Vec<String> = self
            .signatures
            .iter()
            .map(|g| {
                format!(
                    "{{\"keyName\":{},\"sig\":{}}}",
                    json_str(&g.key_name),
                    json_str(&g.sig_base64())
                )
            })
            .collect();
        format!(
            "{{\"outPath\":{},\"signatures\":[{}]}}",
            json_str(self.out_path.base_name()),
            sigs.join(",")
        )
    }

    /// Compact JSON `{"key":…,"value":…}`.
    pub fn to_json(&self) -> String {
        format!("{{\"key\":{},\"value\":{}}}", self.key_json(), self.value_json())
    }

    /// The signed fingerprint: the JSON without `value.signatures`.
    pub fn fingerprint(&self) -> String {
        format!(
            "{{\"key\":{},\"value\":{{\"outPath\":{}}}}}",
            self.key_json(),
            json_str(self.out_path.base_name())
        )
    }

    /// Binary-cache location: `build-trace-v2/<drv base name>/<output>.doi`.
    pub fn cache_path(&self) -> String {
        format!("build-trace-v2/{}/{}.doi", self.key.drv_path.base_name(), self.key.output)
    }

    /// Adds a signature by `key`.
    pub fn sign(&mut self, key: &SecretKey) {
        self.signatures.insert(key.sign(self.fingerprint().as_bytes()));
    }

    /// How many distinct `keys` have a valid signature here.
    pub fn count_valid_signatures(&self, keys: &[PublicKey]) -> usize {
        count_valid(self.fingerprint().as_bytes(), &self.signatures, keys)
    }

    /// Parses the JSON; signatures may be objects or `name:sig` strings.
    pub fn from_json(s: &str) -> Result<Self, RealisationError> {
        let v = parse_json(s)?;
        let o = object(&v, "build trace entry", &["key", "value"])?;
        let member = |k: &str| o.get(k).ok_or_else(|| json_err(&format!("missing key {k:?}")));
        let k = object(member("key")?, "key", &["drvPath", "outputName"])?;
        let val = object(member("value")?, "value", &["outPath", "signatures"])?;
        let key = DrvOutputKey {
            drv_path: StorePath::from_base_name(get_str(k, "drvPath")?)?,
            output: get_str(k, "outputName")?.to_owned(),
        };
        let mut e = Self::new(key, StorePath::from_base_name(get_str(val, "outPath")?)?);
        for s in get_array(val, "signatures")? {
            let sig = match s {
                Value::String(s) => s.parse()?,
                Value::Object(_) => {
                    let m = object(s, "a signature", &["keyName", "sig"])?;
                    Signature::from_parts(get_str(m, "keyName")?, get_str(m, "sig")?)?
                }
                _ => return Err(json_err("signatures must be strings or {keyName, sig} objects")),
            };
            e.signatures.insert(sig);
        }
        Ok(e)
    }
}

fn json_err(m: &str) -> RealisationError {
    RealisationError::Json(m.to_owned())
}

fn parse_json(s: &str) -> Result<Value, RealisationError> {
    serde_json::from_str(s).map_err(|e| RealisationError::Json(e.to_string()))
}

/// `v` as an object (`what`, for the error) with no keys but `keys`.
fn object<'a>(
    v: &'a Value,
    what: &str,
    keys: &[&str],
) -> Result<&'a serde_json::Map<String, Value>, RealisationError> {
    let o = v.as_object().ok_or_else(|| json_err(&format!("{what} must be an object")))?;
    match o.keys().find(|k| !keys.contains(&k.as_str())) {
        Some(k) => Err(json_err(&format!("unknown key {k:?}"))),
        None => Ok(o),
    }
}

fn get_str<'a>(
    o: &'a serde_json::Map<String, Value>,
    k: &str,
) -> Result<&'a str, RealisationError> {
    o.get(k).and_then(Value::as_str).ok_or_else(|| json_err(&format!("{k:?} must be a string")))
}

fn get_array<'a>(
    o: &'a serde_json::Map<String, Value>,
    k: &str,
) -> Result<&'a [Value], RealisationError> {
    o.get(k)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .ok_or_else(|| json_err(&format!("{k:?} must be a list")))
}

#[cfg(test)]
#[path = "realisation_tests.rs"]
mod tests;
