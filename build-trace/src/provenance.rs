//! Export of a step's output as an in-toto Statement v1 with a SLSA Provenance v1 predicate.
//!
//! ```text
//! { "_type": "https://in-toto.io/Statement/v1",
//!   "subject": [{ "name": "<output path>", "digest": { "sha256": "<hex of the NAR's SHA-256>" },
//!                 "annotations": { "nix_nar_hash": "sha256:<nix32>", "nix_ca": … } }],
//!   "predicateType": "https://slsa.dev/provenance/v1",
//!   "predicate": {
//!     "buildDefinition": {
//!       "buildType": BUILD_TYPE (docs/provenance.md),
//!       "externalParameters": { "derivation": "<drv path>", "outputs": [..] },
//!       "internalParameters": { "system", "limits", "ca_rule", "network" },
//!       "resolvedDependencies": [ { "name": "<input path>", "digest": { "sha256": "<hex NAR>" },
//!                                   "annotations": { "nix_ca": … } }, … ] },
//!     "runDetails": {
//!       "builder": { "id": builder_id(): "urn:vouch:builder:<kind>:rule:<policy rule>[+…]"
//!                           (or "…:unattested:key:<key>[+…]" for key-only acceptance),
//!                    "version": { "vouch-agent": "<agent version>", "measurement": "<hex>" } },
//!       "metadata": { "invocationId": "<job id>" },
//!       "byproducts": [ statement.json and evidence.json by SHA-256, REPORT_DATA and
//!                       HOST_DATA with their bytes as `content` (base64) ] } } }
//! ```
//! Subjects and dependencies are store paths named by the SHA-256 of their NAR serialisation
//! (what Nix calls the NAR hash), in hex as in-toto's digest sets require; `content` is bytes,
//! base64 as the ResourceDescriptor's JSON form requires. The `builder.id` names the policy rule
//! (or keys) that accepted the step: export happens only after that check
//! (`crate::verify::check_entry_alone`).
//!
//! Signing ([`sign_envelope`], [`open_envelope`]): a DSSE envelope (payload type
//! [`PAYLOAD_TYPE`]) signed with the launcher's Ed25519 Nix key over DSSE's pre-authentication
//! encoding; `keyid` is the key's name.
//!
//! `runDetails.metadata.startedOn`/`finishedOn` ([`set_times`]) are the launcher's clock, from
//! the step's [`TIMES_FILE`] where the launcher wrote one: a claim of the host that ran the
//! step (signed by it with `--sign`), not evidence — the statement and the report carry no time.
//!
//! What is not here: the policy check itself.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::job::NarHash;
use crate::statement::{Statement, StatementError};

/// The SLSA `buildType` of a vouch step, defined in `docs/provenance.md`. A URN: stable, and
/// no claim on a domain name.
pub const BUILD_TYPE: &str = "urn:vouch:build-type:nix-basic-derivation:v1";
/// Prefix of the `builder.id` ([`builder_id`]).
pub const BUILDER_ID_BASE: &str = "urn:vouch:builder";
/// DSSE payload type of an in-toto statement.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";

/// The file beside a trace entry's `statement.json` where the launcher records when it ran the
/// step: `{"started_unix": S, "finished_unix": F}` (seconds since the epoch, its clock).
pub const TIMES_FILE: &str = "times.json";

/// `startedOn`/`finishedOn` of `statement` from a [`TIMES_FILE`]'s bytes (nothing when they do
/// not parse, or finish before start).
pub fn set_times(statement: &mut Value, times_json: &[u8]) {
    let Ok(t) = serde_json::from_slice::<Value>(times_json) else { return };
    let (Some(s), Some(f)) = (t["started_unix"].as_u64(), t["finished_unix"].as_u64()) else {
        return;
    };
    if f < s {
        return;
    }
    let meta = &mut statement["predicate"]["runDetails"]["metadata"];
    meta["startedOn"] = rfc3339(s).into();
    meta["finishedOn"] = rfc3339(f).into();
}

/// `YYYY-MM-DDTHH:MM:SSZ` of seconds since the epoch (proleptic Gregorian, UTC).
pub fn rfc3339(unix: u64) -> String {
    let (days, secs) = (unix / 86_400, unix % 86_400);
    // Days since 1970-01-01 → civil date (the era-based algorithm of H. Hinnant's
    // `civil_from_days`, for non-negative days).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
}

/// Why a provenance envelope does not check out.
#[derive(Debug, thiserror::Error)]
pub enum ProvenanceError {
    /// Not a DSSE envelope.
    #[error("not a DSSE envelope: {0}")]
    Envelope(String),
    /// Another payload type.
    #[error("payload type `{0}` is not {PAYLOAD_TYPE}")]
    PayloadType(String),
    /// No signature by a given key verifies.
    #[error("no signature verifies under the given keys (signed by: {0})")]
    Unsigned(String),
    /// The payload is not an in-toto Statement v1 with a SLSA Provenance v1 predicate.
    #[error("the payload is not an in-toto Statement v1 of SLSA Provenance v1: {0}")]
    Statement(String),
}

/// Who accepted a step under the policy: the evidence kind (`sev-snp`, `simulated`,
/// `unattested`), the builder rules whose chips signed, the keys that signed.
#[derive(Debug, Clone, Copy)]
pub struct Acceptance<'a> {
    /// `sev-snp`, `simulated` or `unattested`.
    pub kind: &'a str,
    /// Builder rules of the policy that accepted the evidence.
    pub rules: &'a [String],
    /// Policy keys whose signatures counted.
    pub keys: &'a [String],
}

/// `urn:vouch:builder:<kind>:rule:<rule>[+<rule>…]`, or `…:key:<key>[+…]` when no rule's
/// evidence counted; names percent-encoded outside RFC 3986's unreserved characters.
pub fn builder_id(a: &Acceptance<'_>) -> String {
    let (what, names) = if a.rules.is_empty() { ("key", a.keys) } else { ("rule", a.rules) };
    let names: Vec<String> = names.iter().map(|n| pct(n)).collect();
    format!("{BUILDER_ID_BASE}:{}:{what}:{}", a.kind, names.join("+"))
}

fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// DSSE's pre-authentication encoding: `DSSEv1 <len> <type> <len> <body>`.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut m =
        format!("DSSEv1 {} {payload_type} {} ", payload_type.len(), payload.len()).into_bytes();
    m.extend_from_slice(payload);
    m
}

/// `statement` as a DSSE envelope signed by `key`.
pub fn sign_envelope(statement: &Value, key: &nix_formats::signing::SecretKey) -> Value {
    let payload = serde_json::to_vec(statement).expect("a JSON value serialises");
    let sig = key.sign(&pae(PAYLOAD_TYPE, &payload));
    json!({
        "payloadType": PAYLOAD_TYPE,
        "payload": B64.encode(&payload),
        "signatures": [{ "keyid": key.name(), "sig": sig.sig_base64() }],
    })
}

/// Open a DSSE envelope: some signature must verify under one of `keys` (matched by `keyid`,
/// the Nix key name) and the payload must be an in-toto Statement v1 of SLSA Provenance v1.
/// The statement and the names of the keys whose signatures verified.
pub fn open_envelope(
    envelope: &[u8],
    keys: &[nix_formats::signing::PublicKey],
) -> Result<(Value, Vec<String>), ProvenanceError> {
    let env: Value =
        serde_json::from_slice(envelope).map_err(|e| ProvenanceError::Envelope(e.to_string()))?;
    let field = |k: &str| {
        env.get(k)
            .and_then(Value::as_str)
            .ok_or_else(|| ProvenanceError::Envelope(format!("no string `{k}`")))
    };
    let ty = field("payloadType")?;
    if ty != PAYLOAD_TYPE {
        return Err(ProvenanceError::PayloadType(ty.to_owned()));
    }
    let payload = B64
        .decode(field("payload")?)
        .map_err(|e| ProvenanceError::Envelope(format!("payload: {e}")))?;
    let sigs = env
        .get("signatures")
        .and_then(Value::as_array)
        .ok_or_else(|| ProvenanceError::Envelope("no `signatures` list".into()))?;
    let msg = pae(ty, &payload);
    let mut claimed = Vec::new();
    let mut valid = Vec::new();
    for s in sigs {
        let (Some(id), Some(sig)) =
            (s.get("keyid").and_then(Value::as_str), s.get("sig").and_then(Value::as_str))
        else {
            continue;
        };
        claimed.push(id.to_owned());
        let Ok(sig) = nix_formats::signing::Signature::from_parts(id, sig) else { continue };
        if keys.iter().any(|k| k.name() == id && k.verify(&msg, &sig))
            && !valid.contains(&id.to_owned())
        {
            valid.push(id.to_owned());
        }
    }
    if valid.is_empty() {
        return Err(ProvenanceError::Unsigned(claimed.join(", ")));
    }
    let st: Value =
        serde_json::from_slice(&payload).map_err(|e| ProvenanceError::Statement(e.to_string()))?;
    let bad = |m: &str| Err(ProvenanceError::Statement(m.to_owned()));
    if st["_type"] != "https://in-toto.io/Statement/v1" {
        return bad("`_type` is not https://in-toto.io/Statement/v1");
    }
    if st["predicateType"] != "https://slsa.dev/provenance/v1" {
        return bad("`predicateType` is not https://slsa.dev/provenance/v1");
    }
    if st["subject"].as_array().is_none_or(Vec::is_empty) {
        return bad("no subject");
    }
    Ok((st, valid))
}

/// What evidence claims to be, by its root alone and **without verifying it**: `sev-snp` when
/// the ARK is one of AMD's pinned roots, `simulated` for any other root, `malformed` otherwise.
/// For display and export labels; trust decisions go through the verifier.
pub fn classify_evidence(bundle_json: &[u8]) -> &'static str {
    let Ok(bundle) = serde_json::from_slice::<crate::evidence::EvidenceBundle>(bundle_json) else {
        return "malformed";
    };
    match crate::evidence::certs::parse(crate::evidence::CertRole::Ark, &bundle.ark) {
        Ok(ark)
            if crate::evidence::certs::pinned_amd_root(&crate::evidence::certs::spki_sha256(
                &ark,
            ))
            .is_some() =>
        {
            "sev-snp"
        }
        Ok(_) => "simulated",
        Err(_) => "malformed",
    }
}

fn digest(h: &NarHash) -> Value {
    json!({ "sha256": hex::encode(h.0) })
}

/// The in-toto statement for output `output` of `statement`, accepted as `accepted` says (from
/// verifying the evidence and signatures under a policy, never from a label in it).
pub fn in_toto(
    statement: &Statement,
    output: &str,
    statement_bytes: &[u8],
    evidence_bytes: Option<&[u8]>,
    accepted: &Acceptance<'_>,
) -> Result<Value, StatementError> {
    let evidence_kind = accepted.kind;
    let job = &statement.job;
    let out = statement.outputs.get(output).ok_or_else(|| StatementError::Field {
        field: "outputs",
        problem: format!("no output `{output}`"),
    })?;
    let mut subject = json!({
        "name": out.path,
        "digest": digest(&out.nar_hash),
        "annotations": { "nix_nar_hash": out.nar_hash.to_string(), "nix_nar_size": out.nar_size },
    });
    if let Some(ca) = &out.ca {
        subject["annotations"]["nix_ca"] = json!(ca);
    }
    let deps: Vec<Value> = job
        .closure
        .iter()
        .map(|(p, info)| {
            let mut d = json!({ "name": p, "digest": digest(&info.nar_hash) });
            if let Some(ca) = statement.input_cas.get(p) {
                d["annotations"] = json!({ "nix_ca": ca });
            }
            d
        })
        .collect();
    let mut byproducts = vec![
        json!({ "name": "statement.json", "digest": { "sha256": hex::encode(Sha256::digest(statement_bytes)) },
                "mediaType": "application/json" }),
        json!({ "name": "REPORT_DATA", "content": B64.encode(statement.report_data()?),
                "mediaType": "application/octet-stream" }),
        json!({ "name": "HOST_DATA", "content": B64.encode(statement.host_data()?),
                "mediaType": "application/octet-stream" }),
    ];
    if let Some(ev) = evidence_bytes {
        byproducts.push(json!({ "name": "evidence.json", "digest": { "sha256": hex::encode(Sha256::digest(ev)) },
                                "mediaType": "application/json", "annotations": { "kind": evidence_kind } }));
    }
    Ok(json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [subject],
        "predicateType": "https://slsa.dev/provenance/v1",
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "derivation": job.drv_path,
                    "outputs": job.outputs,
                },
                "internalParameters": {
                    "system": job.drv.system,
                    "limits": job.limits,
                    "ca_rule": job.ca_rule,
                    "network": job.network,
                },
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": {
                    "id": builder_id(accepted),
                    "version": {
                        "vouch-agent": statement.agent_version,
                        "measurement": statement.measurement.to_string(),
                    },
                },
                "metadata": { "invocationId": job.job_id },
                "byproducts": byproducts,
            },
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn times_only_when_they_make_sense() {
        let mut st = json!({ "predicate": { "runDetails": { "metadata": {} } } });
        set_times(&mut st, br#"{"started_unix": 10, "finished_unix": 5}"#);
        set_times(&mut st, b"not json");
        assert_eq!(st["predicate"]["runDetails"]["metadata"], json!({}));
        set_times(&mut st, br#"{"started_unix": 0, "finished_unix": 61}"#);
        let m = &st["predicate"]["runDetails"]["metadata"];
        assert_eq!(
            (m["startedOn"].as_str(), m["finishedOn"].as_str()),
            (Some("1970-01-01T00:00:00Z"), Some("1970-01-01T00:01:01Z"))
        );
    }

    #[test]
    fn builder_ids_name_the_rule_or_the_keys() {
        let rules = ["amd genoa".to_string(), "b".to_string()];
        let a = Acceptance { kind: "sev-snp", rules: &rules, keys: &[] };
        assert_eq!(builder_id(&a), "urn:vouch:builder:sev-snp:rule:amd%20genoa+b");
        let keys = ["ci:1".to_string()];
        let a = Acceptance { kind: "unattested", rules: &[], keys: &keys };
        assert_eq!(builder_id(&a), "urn:vouch:builder:unattested:key:ci%3A1");
    }
}
