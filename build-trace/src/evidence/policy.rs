//! The evidence policy: what a verifier accepts beyond "AMD signed this" — products, simulated
//! roots, VLEK, VMPL, guest policy bits, minimum TCB, measurements and the check time. It is a
//! plain serde type: `vouch evidence check --policy P.toml` reads it from TOML, and the trust
//! policy embeds it in its attested-builder rules. `docs/evidence.md` documents the format.
//!
//! What is not here: per-step expected values (HOST_DATA, REPORT_DATA come from the statement
//! being checked: see [`Expected`]), or which builders a closure trusts (the trust policy).

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::error::EvidenceError;
use super::report::{policy_bits, Product, TcbVersion};

/// Fixed-length bytes written as lowercase hex in TOML/JSON.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hex<const N: usize>(pub [u8; N]);

/// SHA-256 of a SubjectPublicKeyInfo (DER): names a simulated root (or a VLEK).
pub type KeyId = Hex<32>;
/// A launch MEASUREMENT (SHA-384).
pub type Measurement = Hex<48>;

impl<const N: usize> fmt::Display for Hex<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}
impl<const N: usize> fmt::Debug for Hex<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hex({self})")
    }
}
impl<const N: usize> FromStr for Hex<N> {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let s = s.strip_prefix("sha256:").unwrap_or(s);
        let bytes = hex::decode(s).map_err(|e| format!("{s:?} is not hex: {e}"))?;
        let arr: [u8; N] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| format!("{s:?} is {} bytes, expected {N}", b.len()))?;
        Ok(Hex(arr))
    }
}
impl<const N: usize> Serialize for Hex<N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}
impl<'de, const N: usize> Deserialize<'de> for Hex<N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::serde_str::from_str_form(d)
    }
}

/// The launch measurements a policy allows: a list, or `"any"` (any guest at all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Measurements {
    /// `measurements = "any"`: every result says ANY GUEST.
    Any,
    /// These, and no other.
    Only(Vec<Measurement>),
}

impl Measurements {
    /// Whether `m` is allowed.
    pub fn allows(&self, m: &Measurement) -> bool {
        match self {
            Measurements::Any => true,
            Measurements::Only(list) => list.contains(m),
        }
    }

    /// The list (`None` for `"any"`).
    pub fn list(&self) -> Option<&[Measurement]> {
        match self {
            Measurements::Any => None,
            Measurements::Only(list) => Some(list),
        }
    }
}

impl From<Vec<Measurement>> for Measurements {
    fn from(list: Vec<Measurement>) -> Self {
        Measurements::Only(list)
    }
}

impl Serialize for Measurements {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Measurements::Any => s.serialize_str("any"),
            Measurements::Only(list) => list.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Measurements {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Word(String),
            List(Vec<Measurement>),
        }
        match Form::deserialize(d)? {
            Form::Word(w) if w == "any" => Ok(Measurements::Any),
            Form::Word(w) => Err(serde::de::Error::custom(format!(
                "measurements = {w:?}: a list of hex measurements, or \"any\""
            ))),
            Form::List(l) => Ok(Measurements::Only(l)),
        }
    }
}

/// A point in time for certificate validity checks, written `"2025-06-01T00:00:00Z"` or
/// `"2025-06-01"` (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckTime(pub SystemTime);

impl Serialize for CheckTime {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::certs::fmt_time(self.0))
    }
}
impl<'de> Deserialize<'de> for CheckTime {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::serde_str::with_str(d, |s| {
            super::certs::parse_time(s).map(CheckTime).map_err(|e| e.to_string())
        })
    }
}

/// What evidence must satisfy. `EvidencePolicy::default()` is the "authenticity and safe guest
/// policy bits" policy of `vouch evidence check` without `--policy`: any AMD product, no VLEK,
/// VMPL 0, no debug, no migration agent, no simulated root, no measurement check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvidencePolicy {
    /// AMD products whose pinned root may vouch (default: all of Milan, Genoa, Turin).
    /// See `docs/evidence.md` for the Milan caveat.
    pub products: Vec<Product>,
    /// Simulated roots accepted, by SHA-256 of their SubjectPublicKeyInfo (default: none).
    /// Evidence under such a root proves nothing about hardware.
    pub simulated_roots: Vec<KeyId>,
    /// Accept reports signed by a VLEK (a cloud provider's key) instead of a VCEK.
    pub allow_vlek: bool,
    /// The VMPL the report must have been requested at (default 0).
    pub vmpl: u32,
    /// Guest policy requirements.
    pub guest_policy: GuestPolicyRule,
    /// Minimum REPORTED_TCB per product.
    pub min_tcb: MinTcb,
    /// Allowed MEASUREMENTs. Absent: not checked here (authenticity only; a trust policy's
    /// builder rule refuses that). A list: the measurement must be one of them (an empty list
    /// accepts nothing). `"any"`: any guest, said on purpose.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measurements: Option<Measurements>,
    /// Check certificate validity at this time instead of the verifier's clock ("archival
    /// time"). See `docs/evidence.md` for the risk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check_time: Option<CheckTime>,
}

impl Default for EvidencePolicy {
    fn default() -> Self {
        EvidencePolicy {
            products: Product::ALL.to_vec(),
            simulated_roots: Vec::new(),
            allow_vlek: false,
            vmpl: 0,
            guest_policy: GuestPolicyRule::default(),
            min_tcb: MinTcb::default(),
            measurements: None,
            check_time: None,
        }
    }
}

impl EvidencePolicy {
    /// Parse the TOML form.
    pub fn from_toml(text: &str) -> Result<EvidencePolicy, toml::de::Error> {
        toml::from_str(text)
    }

    /// The TOML form.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// The policy's simulated root list contains this key.
    pub fn names_simulated_root(&self, key: &KeyId) -> bool {
        self.simulated_roots.contains(key)
    }
}

/// Guest policy (the 64-bit POLICY field) requirements. DEBUG and MIGRATE_MA must be off unless
/// allowed here, bit 17 must be one and bits 26..63 zero always.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestPolicyRule {
    /// Accept DEBUG = 1 (the host can read and write guest memory). Only for test vectors.
    pub allow_debug: bool,
    /// Accept MIGRATE_MA = 1 (a migration agent may be associated).
    pub allow_migration_agent: bool,
    /// Accept SMT = 1 (the host may run other code on the sibling hyperthread). Default true.
    pub allow_smt: bool,
    /// Require SINGLE_SOCKET = 1.
    pub require_single_socket: bool,
    /// Minimum ABI major.minor the guest demanded of the firmware.
    pub min_abi_major: u8,
    pub min_abi_minor: u8,
}

impl Default for GuestPolicyRule {
    fn default() -> Self {
        GuestPolicyRule {
            allow_debug: false,
            allow_migration_agent: false,
            allow_smt: true,
            require_single_socket: false,
            min_abi_major: 0,
            min_abi_minor: 0,
        }
    }
}

impl GuestPolicyRule {
    /// Check a report's POLICY field.
    pub fn check(&self, policy: u64) -> Result<(), EvidenceError> {
        if policy & policy_bits::DEBUG != 0 && !self.allow_debug {
            return Err(EvidenceError::PolicyDebug { policy });
        }
        if policy & policy_bits::MIGRATE_MA != 0 && !self.allow_migration_agent {
            return Err(EvidenceError::PolicyMigrationAgent { policy });
        }
        if policy & policy_bits::RESERVED_ONE == 0 {
            return Err(EvidenceError::PolicyBit17 { policy });
        }
        if policy & policy_bits::RESERVED_ZERO != 0 {
            return Err(EvidenceError::PolicyReservedBits { policy });
        }
        if policy & policy_bits::SMT != 0 && !self.allow_smt {
            return Err(EvidenceError::PolicySmt { policy });
        }
        if policy & policy_bits::SINGLE_SOCKET == 0 && self.require_single_socket {
            return Err(EvidenceError::PolicySingleSocket { policy });
        }
        let (major, minor) = ((policy >> 8) as u8, policy as u8);
        if (major, minor) < (self.min_abi_major, self.min_abi_minor) {
            return Err(EvidenceError::PolicyAbi {
                major,
                minor,
                min_major: self.min_abi_major,
                min_minor: self.min_abi_minor,
            });
        }
        Ok(())
    }
}

/// Minimum REPORTED_TCB per product, component by component (each SPL must be at least the
/// minimum). A product without an entry has no minimum.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinTcb {
    #[serde(rename = "Milan", default, skip_serializing_if = "Option::is_none")]
    pub milan: Option<TcbVersion>,
    #[serde(rename = "Genoa", default, skip_serializing_if = "Option::is_none")]
    pub genoa: Option<TcbVersion>,
    #[serde(rename = "Turin", default, skip_serializing_if = "Option::is_none")]
    pub turin: Option<TcbVersion>,
    /// For evidence under a simulated root (its TCB is whatever the host chose).
    #[serde(rename = "simulated", default, skip_serializing_if = "Option::is_none")]
    pub simulated: Option<TcbVersion>,
}

impl MinTcb {
    pub fn for_product(&self, product: Option<Product>) -> Option<&TcbVersion> {
        match product {
            Some(Product::Milan) => self.milan.as_ref(),
            Some(Product::Genoa) => self.genoa.as_ref(),
            Some(Product::Turin) => self.turin.as_ref(),
            None => self.simulated.as_ref(),
        }
    }

    /// Check `got` against the minimum for `product` (`None`: simulated).
    pub fn check(&self, product: Option<Product>, got: &TcbVersion) -> Result<(), EvidenceError> {
        let Some(min) = self.for_product(product) else { return Ok(()) };
        let fmc = match (min.fmc, got.fmc) {
            (Some(m), Some(g)) => Some((m, g)),
            (Some(m), None) => Some((m, 0)),
            _ => None,
        };
        let pairs = [
            ("fmc", fmc),
            ("bootloader", Some((min.bootloader, got.bootloader))),
            ("tee", Some((min.tee, got.tee))),
            ("snp", Some((min.snp, got.snp))),
            ("microcode", Some((min.microcode, got.microcode))),
        ];
        for (component, pair) in pairs {
            if let Some((m, g)) = pair {
                if g < m {
                    return Err(EvidenceError::TcbTooLow {
                        product: product.map_or("simulated".to_string(), |p| p.to_string()),
                        component,
                        got: *got,
                        min: *min,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Per-step values the evidence must carry. The closure verifier always sets both (HOST_DATA
/// from the job, REPORT_DATA from the statement); `None` means "not checked" and exists for
/// `vouch evidence check` without `--host-data`/`--report-data`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expected {
    pub host_data: Option<[u8; 32]>,
    pub report_data: Option<[u8; 64]>,
}
