//! The transparency-log and trust-policy fuzz bodies.
//!
//! [`tlog`] gives the same bytes to every reader of the log's formats. Invariants:
//! - a log entry that parses is canonical (prints back to the input) and has its entry id;
//! - an entry bundle that decodes re-encodes to the input;
//! - a checkpoint accepted under the fixed test keys ([`LOG_VKEY`], [`WITNESS_VKEYS`]) starts
//!   with exactly the text the accepted size and root print as, names the log's origin, and
//!   counts only the trusted witnesses; adding its own signature lines again changes nothing
//!   that verifies;
//! - verifier keys, inclusion and consistency proofs (any sizes, indices and hashes from the
//!   input) are errors, not panics.
//!
//! [`trust_policy`]: a trust policy that parses prints as TOML that parses to the same policy,
//! and its requirement is monotone (what a set of signers satisfies, a superset satisfies).

use std::collections::BTreeSet;

use tlog_tiles::Hash;

use crate::tlog::note::add_signatures;
use crate::tlog::proof::consistency;
use crate::tlog::tiles::{decode_bundle, encode_bundle};
use crate::tlog::{Checkpoint, LogEntry, NoteVerifierKey};
use crate::trust::{Signers, TrustPolicy};

/// The origin of the fuzz log (`LogKey::from_seed(LOG_ORIGIN, [1; 32])` signs its checkpoints).
pub const LOG_ORIGIN: &str = "vouch.fuzz/log";
/// Its verifier key.
pub const LOG_VKEY: &str = "vouch.fuzz/log+0b9f5e7e+AYqI4910CfGV/VLbLTy6XXLKZwm/HZQSG/N0iAG0D29c";
/// Two witnesses (`CosignerKey::from_seed("w<n>.fuzz", [n + 1; 32])`).
pub const WITNESS_VKEYS: [&str; 2] = [
    "w1.fuzz+38903d95+BIE5dw6ofRdfVqNUZsNMfszLjYqRtO43ol32D1uPybOU",
    "w2.fuzz+29294e0f+BO1JKMYo0cLG6ukDOJBZlWEpWSc6XGP5NjbBRhSshzfR",
];

/// Fuzz body: the log's formats (see the module docs).
pub fn tlog(data: &[u8]) {
    if let Ok(e) = LogEntry::parse(data) {
        assert_eq!(e.to_bytes().expect("a parsed entry prints"), data, "entry round trip");
        let _ = e.entry_id();
    }
    if let Ok(entries) = decode_bundle("fuzz", data) {
        assert_eq!(encode_bundle(entries.iter().map(Vec::as_slice)), data, "bundle round trip");
    }
    checkpoint(data);
    if let Ok(text) = std::str::from_utf8(data) {
        for line in text.lines().take(4) {
            let _ = NoteVerifierKey::parse(line);
        }
    }
    proofs(data);
}

fn checkpoint(data: &[u8]) {
    let logs = [NoteVerifierKey::parse(LOG_VKEY).expect("the fuzz log key")];
    let witnesses = WITNESS_VKEYS.map(|k| NoteVerifierKey::parse(k).expect("a fuzz witness key"));
    for quorum in 0..=2 {
        let Ok(cp) = Checkpoint::verify(data, &logs, &witnesses, quorum) else { continue };
        assert!(data.starts_with(cp.text().as_bytes()), "the checkpoint is what was signed");
        assert_eq!(cp.origin, LOG_ORIGIN);
        assert!(cp.cosigned_by.len() >= quorum);
        let names: BTreeSet<&str> = witnesses.iter().map(|w| w.name.as_str()).collect();
        assert!(cp.cosigned_by.keys().all(|w| names.contains(w.as_str())), "untrusted witness");
        let sigs = std::str::from_utf8(&data[cp.text().len() + 1..]).expect("verified: text");
        let again = add_signatures(data, sigs).expect("a verified note takes its own lines");
        let cp2 = Checkpoint::verify(&again, &logs, &witnesses, quorum).expect("still verifies");
        assert_eq!((cp2.size, cp2.root), (cp.size, cp.root));
    }
    let _ = add_signatures(data, "— w1.fuzz AAAA\n");
}

fn proofs(data: &[u8]) {
    let Some((head, rest)) = data.split_first_chunk::<24>() else { return };
    let word = |i: usize| u64::from_le_bytes(head[8 * i..8 * i + 8].try_into().expect("8 bytes"));
    let hashes: Vec<Hash> =
        rest.chunks_exact(32).map(|c| Hash(c.try_into().expect("32 bytes"))).take(70).collect();
    let (Some(first), Some(second)) = (hashes.first(), hashes.get(1)) else { return };
    let _ = consistency(&hashes[2..], word(0), first, word(1), second);
    let _ = tlog_tiles::check_record(&hashes[2..].to_vec(), word(0), *first, word(2), *second);
}

/// Fuzz body: trust policy TOML (see the module docs).
pub fn trust_policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(p) = TrustPolicy::from_toml(text) else { return };
    let printed = p.to_toml();
    match TrustPolicy::from_toml(&printed) {
        Ok(again) => assert_eq!(again, p, "trust policy TOML round trip:\n{printed}"),
        Err(e) => panic!("the printed policy does not parse ({e}):\n{printed}"),
    }
    let _ = p.public_keys();
    let (some, all) = signers(&p);
    if p.accepts(&some) {
        assert!(p.accepts(&all), "monotone: more signers cannot break a satisfied policy");
    }
}

/// Two sets of signers for `p`, the first a subset of the second: every other key and one chip
/// per builder rule; every key and four chips per rule (two of them shared by every rule).
fn signers(p: &TrustPolicy) -> (Signers, Signers) {
    let mut some = Signers::default();
    let mut all = Signers::default();
    for (i, name) in p.keys.keys().enumerate() {
        if i % 2 == 0 {
            some.keys.insert(name.clone());
        }
        all.keys.insert(name.clone());
    }
    for rule in p.builders.keys() {
        let chips = |n: usize| -> BTreeSet<String> {
            (0..n)
                .map(|c| if c < 2 { format!("shared{c}") } else { format!("{rule}{c}") })
                .collect()
        };
        some.chips.insert(rule.clone(), chips(1));
        all.chips.insert(rule.clone(), chips(4));
    }
    (some, all)
}
