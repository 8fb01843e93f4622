//! The evidence bundle a build step ships: the raw report and the certificates that verify it.
//!
//! JSON form (base64 = standard alphabet with padding):
//!
//! ```json
//! { "report": "<base64 of the 1184 raw bytes>",
//!   "vek": "<base64 DER of the VCEK or VLEK>",
//!   "ask": "<base64 DER of the ASK or ASVK>",      // omitted for the simulated two-level chain
//!   "ark": "<base64 DER of the ARK>",
//!   "provider": "sev_guest" }                       // optional label, never trusted
//! ```
//!
//! What is not here: any meaning. A bundle is classified only by the pinned root that verifies
//! it ([`super::Verifier`]); `provider` is informational.

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::certs;
use super::report::{Product, ProductHint, Report};

/// Raw SNP evidence: report bytes plus certificate chain (all DER).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvidenceBundle {
    /// The raw 1184-byte attestation report, exactly as the firmware returned it.
    #[serde(with = "b64")]
    pub report: Vec<u8>,
    /// VCEK or VLEK certificate (DER).
    #[serde(with = "b64")]
    pub vek: Vec<u8>,
    /// ASK or ASVK certificate (DER). `None` only for a simulated root, whose ARK signs the
    /// VCEK directly.
    #[serde(with = "b64_opt", default, skip_serializing_if = "Option::is_none")]
    pub ask: Option<Vec<u8>>,
    /// ARK certificate (DER): must be a pinned AMD root or a simulated root the policy names.
    #[serde(with = "b64")]
    pub ark: Vec<u8>,
    /// Where the report came from ("sev_guest", "simulated", ...). Informational only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
}

/// Why a built-in chain could not be chosen.
#[derive(Debug, thiserror::Error)]
pub enum BuiltinChainError {
    #[error("cannot tell the product: the report says {report}, the certificate says {cert}")]
    UnknownProduct { report: ProductHint, cert: String },
    #[error("certificate does not parse")]
    Certificate(#[source] der::Error),
}

impl EvidenceBundle {
    /// A bundle with AMD's built-in ARK and ASK (or ASVK, when the certificate's issuer is
    /// `SEV-VLEK-<product>`) for the product the report and certificate name. The verifier
    /// still checks everything; this only saves shipping the two well-known certificates.
    pub fn with_builtin_chain(
        report: Vec<u8>,
        vek: Vec<u8>,
    ) -> Result<EvidenceBundle, BuiltinChainError> {
        let cert = certs::from_der(&vek).map_err(BuiltinChainError::Certificate)?;
        let exts = certs::VekExtensions::read(&cert).unwrap_or_default();
        let from_cert = exts.product_name.as_deref().and_then(Product::from_cert_name);
        let hint = Report::parse(&report).map(|r| r.product_hint()).unwrap_or(ProductHint::Masked);
        let product = match (from_cert, hint) {
            (Some(p), _) => p,
            (None, ProductHint::Known(p)) => p,
            (None, hint) => {
                return Err(BuiltinChainError::UnknownProduct {
                    report: hint,
                    cert: exts.product_name.unwrap_or_else(|| "nothing".into()),
                })
            }
        };
        let issuer = cert.tbs_certificate.issuer.to_string();
        let ask = if issuer.contains("SEV-VLEK-") {
            certs::builtin_asvk(product)
        } else {
            certs::builtin_ask(product)
        };
        Ok(EvidenceBundle {
            report,
            vek,
            ask: Some(ask),
            ark: certs::builtin_ark(product),
            provider: None,
        })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> Result<EvidenceBundle, serde_json::Error> {
        serde_json::from_str(text)
    }
}

mod b64 {
    use super::*;
    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        crate::serde_str::with_str(d, |s| {
            base64::engine::general_purpose::STANDARD.decode(s).map_err(|e| e.to_string())
        })
    }
}

mod b64_opt {
    use super::*;
    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => super::b64::serialize(b, s),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        super::b64::deserialize(d).map(Some)
    }
}
