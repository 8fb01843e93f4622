//! Export of a step's output as an in-toto Statement v1 with a SLSA Provenance v1 predicate.
//!
//! ```text
//! { "_type": "https://in-toto.io/Statement/v1",
//!   "subject": [{ "name": "<output path>", "digest": { "sha256": "<hex of the NAR's SHA-256>" },
//!                 "annotations": { "nix_nar_hash": "sha256:<nix32>", "nix_ca": … } }],
//!   "predicateType": "https://slsa.dev/provenance/v1",
//!   "predicate": {
//!     "buildDefinition": {
//!       "buildType": BUILD_TYPE,
//!       "externalParameters": { "derivation": "<drv path>", "outputs": [..] },
//!       "internalParameters": { "system", "limits", "ca_rule", "network" },
//!       "resolvedDependencies": [ { "name": "<input path>", "digest": { "sha256": "<hex NAR>" },
//!                                   "annotations": { "nix_ca": … } }, … ] },
//!     "runDetails": {
//!       "builder": { "id": "<BUILDER_ID_BASE>/<sev-snp|simulated>#measurement=<hex>",
//!                    "version": { "vouch-agent": "<agent version>" } },
//!       "metadata": { "invocationId": "<job id>" },
//!       "byproducts": [ statement.json and evidence.json by SHA-256, REPORT_DATA, HOST_DATA ] } } }
//! ```
//! Subjects and dependencies are store paths named by the SHA-256 of their NAR serialisation
//! (what Nix calls the NAR hash), in hex as in-toto's digest sets require.
//!
//! What is not here: signing the statement (a DSSE envelope is the consumer's choice; vouch's
//! own signature is the laut JWS and the SNP report, referenced as byproducts).

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::job::NarHash;
use crate::statement::{Statement, StatementError};

/// The SLSA `buildType` of a vouch step.
pub const BUILD_TYPE: &str = "https://example.invalid/vouch/build-types/nix-basic-derivation/v1";
/// Prefix of the `builder.id`.
pub const BUILDER_ID_BASE: &str = "https://example.invalid/vouch/builders";

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

/// The in-toto statement for output `output` of `statement`. `evidence_kind` is `sev-snp` or
/// `simulated` (from verifying the evidence, never from a label in it).
pub fn in_toto(
    statement: &Statement,
    output: &str,
    statement_bytes: &[u8],
    evidence_bytes: Option<&[u8]>,
    evidence_kind: &str,
) -> Result<Value, StatementError> {
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
        json!({ "name": "REPORT_DATA", "content": hex::encode(statement.report_data()?) }),
        json!({ "name": "HOST_DATA", "content": hex::encode(statement.host_data()?) }),
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
                    "id": format!("{BUILDER_ID_BASE}/{evidence_kind}#measurement={}", statement.measurement),
                    "version": { "vouch-agent": statement.agent_version },
                },
                "metadata": { "invocationId": job.job_id },
                "byproducts": byproducts,
            },
        },
    }))
}
