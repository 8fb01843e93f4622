//! Bodies of build-trace's fuzz targets (the repository's `fuzz/` workspace), plain functions
//! so that `tests/fuzz_seeds.rs` replays their seed corpora (`fuzz/seeds/<target>/`) with the
//! stable toolchain. Not part of the crate's API.
//!
//! Each body takes arbitrary bytes and panics only if an invariant is broken:
//! - [`canonical`]: bytes the canonical decoder accepts are the canonical encoding of what they
//!   decode to, and [`crate::canonical::member`] finds exactly each top-level member's bytes;
//! - [`job`] / [`statement`]: an accepted job or statement re-encodes to the same bytes, its
//!   job digest (a statement's HOST_DATA and REPORT_DATA) computed from the value equals the one
//!   computed from the bytes (a statement's HOST_DATA from its launch member, or version 1's job
//!   member, found without decoding), and it is its own launch's and job's;
//! - [`cert_table`]: an accepted GHCB certificate table re-encodes to a table that parses to the
//!   same entries, and the entries never hold more bytes than the table;
//! - with `verifier`: [`evidence`] (the SNP report parser and verifier against real AMD chains,
//!   the VCEK/VLEK certificate parser, aws-lc-rs's ECDSA verdict against `p384`'s) and
//!   [`tlog`] (log entries, entry bundles, signed checkpoints, verifier keys) and the trust policy;
//! - with `remote`: [`source`] (what a remote trace store answers: laut's index, narinfos, a
//!   `.drv`'s NAR, the URLs made of them, the local cache's URL index).
//!
//! The harness also holds each body to a heap bound ([`BOUND`], [`nix_formats::fuzzing::AllocBound`]).
//! Not here: libFuzzer glue, the allocator that measures (test-support's `fuzz`), the real AMD
//! vectors (the harness passes their reader to [`samples::real_samples`]).

use nix_formats::fuzzing::AllocBound;
use serde_json::Value;

use crate::canonical::{self, member};
use crate::evidence::cert_table;
use crate::job::{self, Job};
use crate::statement::{self, Statement};

#[cfg(feature = "verifier")]
pub mod evidence;
#[cfg(feature = "verifier")]
pub mod samples;
#[cfg(feature = "remote")]
pub mod source;
#[cfg(feature = "verifier")]
pub mod tlog;

/// The heap bound of build-trace's bodies: JSON, DER and TOML values are several times their
/// text; decoding a job re-encodes it once more.
pub const BOUND: AllocBound = AllocBound { per_byte: 64, base: 256 << 10 };

/// The heap bound of the trust policy body: the `toml` parser keeps up to about 530 bytes per
/// input byte on malformed documents, linearly (measured at 652–5 041 bytes: 343 KB–2.7 MB;
/// found by the `trust_policy` target against [`BOUND`]). A policy is the operator's own file
/// and [`crate::trust::MAX_POLICY_BYTES`] caps what one may cost; the bound still catches
/// anything worse than linear.
pub const TOML_BOUND: AllocBound = AllocBound { per_byte: 1024, base: 256 << 10 };

/// Fuzz body: canonical JSON (see the module docs).
pub fn canonical(data: &[u8]) {
    let _ = member(data, "job");
    let Ok(v) = canonical::from_slice::<Value>(data) else { return };
    let again = canonical::to_vec(&v).expect("an accepted value encodes");
    assert_eq!(again, data, "accepted bytes are canonical");
    if let Value::Object(m) = &v {
        for (k, inner) in m {
            if k.contains(['"', '\\']) || k.chars().any(|c| c < ' ') {
                continue; // `member` takes keys that need no escaping
            }
            let want = canonical::to_vec(inner).expect("a member encodes");
            assert_eq!(member(data, k), Some(&want[..]), "member `{k}`");
        }
    }
}

/// Fuzz body: a job's canonical bytes (see the module docs).
pub fn job(data: &[u8]) {
    let _ = job::digest_of(data);
    let Ok(j) = Job::from_canonical_bytes(data) else { return };
    assert_eq!(j.canonical_bytes().expect("an accepted job encodes"), data, "job round trip");
    assert_eq!(j.digest().expect("encodes"), job::digest_of(data), "digest");
    j.validate().expect("an accepted job validates");
    let _ = j.drv.to_derivation();
    let _ = j.drv.drv_path();
}

/// Fuzz body: a statement's canonical bytes (see the module docs).
pub fn statement(data: &[u8]) {
    let _ = statement::host_data_of(data);
    let Ok(st) = Statement::from_canonical_bytes(data) else { return };
    let bytes = st.canonical_bytes().expect("an accepted statement encodes");
    assert_eq!(bytes, data, "statement round trip");
    assert_eq!(st.report_data().expect("encodes"), statement::report_data_of(data));
    let hd = st.host_data().expect("encodes");
    assert_eq!(
        statement::host_data_of(data),
        Some(hd),
        "HOST_DATA from the launch (v1: job) member"
    );
    match &st.launch {
        Some(l) => st.verify_against(l, &st.job).expect("an accepted statement is its own"),
        None => st.validate().expect("an accepted version-1 statement validates"),
    }
}

/// Fuzz body: a GHCB certificate table (see the module docs).
pub fn cert_table(data: &[u8]) {
    let Ok(entries) = cert_table::parse(data) else { return };
    let held: usize = entries.iter().map(|e| e.data.len()).sum();
    assert!(held <= data.len(), "entries hold {held} bytes of a {}-byte table", data.len());
    let again = cert_table::encode(&entries);
    assert_eq!(cert_table::parse(&again).as_ref(), Ok(&entries), "re-encoded table");
    if let Some(e) = cert_table::endorsement_key(&entries) {
        assert!(matches!(e.kind, cert_table::CertKind::Vcek | cert_table::CertKind::Vlek));
    }
}
