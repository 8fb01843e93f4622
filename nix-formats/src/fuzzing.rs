//! Bodies of this crate's fuzz targets in the repository's `fuzz/` workspace (cargo-fuzz), kept
//! here so that they build with the stable toolchain and a test (`tests/fuzz_seeds.rs`) runs
//! them over the seed corpus in `fuzz/seeds/<target>/` on every `cargo test`; and
//! [`AllocBound`], the heap bound every target of every crate is held to.
//!
//! Each function takes arbitrary bytes and panics only if an invariant is broken:
//! * [`aterm`]: a successful parse prints back to the same bytes, survives the JSON round trip,
//!   and hashing, drv paths and resolution return (errors allowed) without panicking;
//! * [`store_path`]: store paths, base names, hashes and nix32 strings that parse print back to
//!   the same text;
//! * [`narinfo`]: a narinfo that parses prints as text that parses to the same record and
//!   prints identically again, and it has a fingerprint.
//!
//! Not here: the NAR unpack target (owned by the NAR module), libFuzzer glue, the allocator that
//! measures the heap (`fuzz/src/alloc.rs`).

use crate::derivation::json::parse_show_derivation;
use crate::derivation::{Derivation, DerivationError, DrvGraph};
use crate::hash::Hash;
use crate::narinfo::NarInfo;
use crate::resolve::resolve;
use crate::store_path::StorePath;
use crate::{base32, signing};

/// How much heap a fuzz target may have live at once while it handles an input of `len` bytes:
/// `per_byte · len + base`. A decoder that allocates on the word of a length field instead of
/// on data that arrived breaks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocBound {
    /// Bytes allowed per input byte (parsed structures are bigger than their text).
    pub per_byte: usize,
    /// Bytes allowed whatever the input (buffers of a fixed size, tables, the first growth).
    pub base: usize,
}

impl AllocBound {
    /// The most bytes live at once for an input of `len` bytes.
    pub fn limit(&self, len: usize) -> usize {
        self.per_byte.saturating_mul(len).saturating_add(self.base)
    }
}

/// The bound of [`aterm`], [`store_path`] and [`narinfo`] (the NAR target has its own).
pub const TEXT_BOUND: AllocBound = AllocBound { per_byte: 64, base: 64 << 10 };

/// Fuzz body for ATerm parsing (see the module docs).
pub fn aterm(data: &[u8]) {
    let Ok(d) = Derivation::from_aterm(data) else {
        return;
    };
    assert_eq!(d.to_aterm(), data, "a canonical parse must print back the same bytes");
    let p = StorePath::from_parts([0; 20], "fuzz.drv").expect("valid name");
    let json = d.to_show_derivation_json(&p);
    let back = parse_show_derivation(&json).expect("our own JSON must parse");
    assert_eq!(back.get(&p), Some(&d), "JSON round trip");
    let _ = d.drv_path("fuzz");
    let _ = d.check_output_paths("fuzz");
    let _ = d.hash_modulo("fuzz", true, &mut |i| Err(DerivationError::MissingInputDrv(i.clone())));
    let mut g = DrvGraph::new();
    for i in d.input_drvs.keys() {
        g.insert(i.clone(), d.clone());
    }
    let _ = g.realisation_ids(&d, "fuzz");
    let out = StorePath::from_parts([1; 20], "out").expect("valid name");
    let _ = resolve(&d, "fuzz", &mut |_, _| Some(out.clone()));
}

/// Fuzz body for store paths, hashes, nix32 and signatures (see the module docs).
pub fn store_path(data: &[u8]) {
    if let Ok(p) = base32::decode_bytes(data) {
        assert_eq!(base32::encode(&p).as_bytes(), data, "nix32 round trip");
    }
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = StorePath::parse(s) {
        assert_eq!(p.to_string(), s, "store path round trip");
        assert_eq!(StorePath::from_parts(*p.digest(), p.name()).as_ref(), Ok(&p));
    }
    if let Ok(p) = StorePath::from_base_name(s) {
        assert_eq!(p.base_name(), s, "base name round trip");
    }
    if let Ok(h) = s.parse::<Hash>() {
        assert_eq!(h.to_string().parse::<Hash>().as_ref(), Ok(&h), "hash round trip");
        assert_eq!(Hash::parse_sri(&h.to_sri()).as_ref(), Ok(&h), "SRI round trip");
    }
    if let Ok(sig) = s.parse::<signing::Signature>() {
        assert_eq!(sig.to_string().parse::<signing::Signature>().as_ref(), Ok(&sig));
    }
}

/// Fuzz body for `.narinfo` text (see the module docs).
pub fn narinfo(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(n) = NarInfo::parse(text) else {
        return;
    };
    let printed = n.to_text();
    let again = match NarInfo::parse(&printed) {
        Ok(again) => again,
        Err(e) => panic!("the printed narinfo does not parse ({e}):\n{printed}"),
    };
    assert_eq!(again, n, "narinfo round trip");
    assert_eq!(again.to_text(), printed, "narinfo printing is stable");
    assert!(n.fingerprint().is_ok(), "a parsed narinfo has a NarSize");
}
