//! Canonical JSON: the one byte encoding of jobs and statements that gets hashed.
//!
//! What is here: an encoder from any `serde::Serialize` value to canonical bytes (a serializer
//! that writes them directly, in `writer.rs`; object keys in `key.rs`), a decoder that accepts
//! only bytes that are already canonical (it decodes, re-encodes and compares), and
//! [`member`], which finds a top-level member's bytes without decoding.
//!
//! The rules (a strict subset of RFC 8785, the JSON Canonicalization Scheme, so any JCS
//! implementation reproduces our bytes):
//! - no whitespace anywhere;
//! - object members sorted by key, compared as UTF-16 code units (for the ASCII keys we use this
//!   is plain byte order); no duplicate keys;
//! - numbers are non-negative integers no larger than 2^53 − 1, written in decimal without
//!   sign, leading zeros, fraction or exponent; floats are refused;
//! - `null` is refused: an absent optional field is left out, never written as `null`;
//! - strings are UTF-8; `"` and `\` are escaped as `\"` and `\\`; the control characters
//!   U+0008, U+0009, U+000A, U+000C, U+000D as `\b`, `\t`, `\n`, `\f`, `\r`; every other
//!   character below U+0020 as `\u00xx` with lowercase hex; everything else (including `/`,
//!   U+007F and all non-ASCII) is written as its raw UTF-8 bytes.
//!
//! What is not here: the schemas themselves (see `job.rs`, `statement.rs` and
//! `docs/job-and-statement.md`), or any hashing.

mod key;
mod writer;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// The largest integer canonical JSON carries (2^53 − 1, exact in every JSON implementation).
pub const MAX_INTEGER: u64 = (1 << 53) - 1;

/// Why a value could not be encoded, or bytes were not accepted as canonical.
#[derive(Debug, thiserror::Error)]
pub enum CanonicalError {
    /// The value contains a floating-point or negative number.
    #[error("canonical JSON carries only non-negative integers, found {0}")]
    NotAnInteger(String),
    /// An integer is above 2^53 − 1.
    #[error("integer {0} is larger than 2^53 - 1")]
    IntegerTooLarge(u64),
    /// The value contains `null` (optional fields must be left out instead).
    #[error("canonical JSON has no null (leave optional fields out)")]
    Null,
    /// An object has two members with the same key.
    #[error("duplicate object key `{0}`")]
    DuplicateKey(String),
    /// serde could not turn the value into JSON or the JSON into the type.
    #[error("JSON does not match the expected schema")]
    Schema(#[source] serde_json::Error),
    /// A member's value does not fit the type (e.g. a malformed store path).
    #[error("JSON member `{at}` does not match the expected schema")]
    Member {
        /// Where, as serde names it: `job.closure`, `outputs.out.path` …
        at: String,
        /// What is wrong with it.
        #[source]
        source: serde_json::Error,
    },
    /// The bytes decode, but are not the canonical encoding of what they decode to.
    #[error("JSON is not in canonical form (first difference at byte {offset})")]
    NotCanonical {
        /// Offset of the first byte that differs from the canonical re-encoding.
        offset: usize,
    },
}

/// Encode `value` canonically.
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CanonicalError> {
    let mut out = Vec::with_capacity(1024);
    value.serialize(&mut writer::Writer { out: &mut out })?;
    Ok(out)
}

/// Decode `bytes` as a `T`, accepting them only if they are exactly the canonical encoding of
/// the decoded value (so two different byte strings never decode to the same value).
pub fn from_slice<T: Serialize + DeserializeOwned>(bytes: &[u8]) -> Result<T, CanonicalError> {
    let value: T = serde_json::from_slice(bytes).map_err(|e| schema_error::<T>(bytes, e))?;
    let mut again = Vec::with_capacity(bytes.len());
    value.serialize(&mut writer::Writer { out: &mut again })?;
    if again != bytes {
        let offset = again
            .iter()
            .zip(bytes)
            .position(|(a, b)| a != b)
            .unwrap_or(again.len().min(bytes.len()));
        return Err(CanonicalError::NotCanonical { offset });
    }
    Ok(value)
}

/// The error for bytes that do not decode as a `T`, naming the member at fault where there is
/// one. Decoding again with the path tracked costs only on this error path.
fn schema_error<T: DeserializeOwned>(bytes: &[u8], error: serde_json::Error) -> CanonicalError {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Err(e) if e.path().iter().next().is_some() => {
            CanonicalError::Member { at: e.path().to_string(), source: e.into_inner() }
        }
        _ => CanonicalError::Schema(error),
    }
}

/// Append the canonical encoding of a JSON value.
pub fn write_value(out: &mut Vec<u8>, value: &Value) -> Result<(), CanonicalError> {
    value.serialize(&mut writer::Writer { out })
}

/// The bytes of the value of top-level member `key` in a JSON object given as compact bytes
/// (no whitespace, as canonical JSON is), without decoding anything else. `None` if the bytes
/// are not such an object or have no such member. `key` must need no escaping.
pub fn member<'a>(bytes: &'a [u8], key: &str) -> Option<&'a [u8]> {
    let mut i = 0;
    if bytes.first() != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        let key_start = i;
        i = skip_value(bytes, i)?;
        let k = bytes.get(key_start + 1..i - 1)?;
        if bytes.get(i) != Some(&b':') {
            return None;
        }
        let value_start = i + 1;
        i = skip_value(bytes, value_start)?;
        if k == key.as_bytes() {
            return bytes.get(value_start..i);
        }
        match bytes.get(i) {
            Some(b',') => i += 1,
            _ => return None,
        }
    }
}

/// The index just after the JSON value starting at `i`.
fn skip_value(bytes: &[u8], mut i: usize) -> Option<usize> {
    let mut depth = 0usize;
    loop {
        match *bytes.get(i)? {
            b'"' => {
                i += 1;
                loop {
                    match *bytes.get(i)? {
                        b'\\' => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
                i += 1;
            }
            b'{' | b'[' => {
                depth += 1;
                i += 1;
                continue;
            }
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                i += 1;
            }
            b',' | b':' if depth > 0 => {
                i += 1;
                continue;
            }
            _ => {
                while !matches!(*bytes.get(i)?, b',' | b'}' | b']' | b':') {
                    i += 1;
                }
            }
        }
        if depth == 0 {
            return Some(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn enc(v: Value) -> String {
        let mut out = Vec::new();
        write_value(&mut out, &v).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn sorts_keys_and_drops_whitespace() {
        assert_eq!(
            enc(json!({"b": 1, "a": [true, false, "x"], "A": {}})),
            r#"{"A":{},"a":[true,false,"x"],"b":1}"#
        );
    }

    #[test]
    fn sorts_keys_by_utf16_code_units_as_jcs() {
        // U+10000 is D800 DC00 in UTF-16, so it sorts before U+E000 (unlike in UTF-8).
        assert_eq!(
            enc(json!({"\u{e000}": 1, "\u{10000}": 2, "a": 3})),
            "{\"a\":3,\"\u{10000}\":2,\"\u{e000}\":1}"
        );
    }

    #[test]
    fn escapes_exactly_as_jcs() {
        assert_eq!(
            enc(json!("a\"b\\c\n\t\u{1}\u{1f}\u{7f}/é")),
            "\"a\\\"b\\\\c\\n\\t\\u0001\\u001f\u{7f}/é\""
        );
    }

    #[test]
    fn refuses_floats_negatives_null_and_big_integers() {
        let mut out = Vec::new();
        assert!(matches!(write_value(&mut out, &json!(1.5)), Err(CanonicalError::NotAnInteger(_))));
        assert!(matches!(write_value(&mut out, &json!(-1)), Err(CanonicalError::NotAnInteger(_))));
        assert!(matches!(write_value(&mut out, &json!({"a": null})), Err(CanonicalError::Null)));
        assert!(matches!(
            write_value(&mut out, &json!(MAX_INTEGER + 1)),
            Err(CanonicalError::IntegerTooLarge(_))
        ));
        assert!(write_value(&mut out, &json!(MAX_INTEGER)).is_ok());
    }

    #[test]
    fn member_finds_top_level_values() {
        let doc = br#"{"a":{"job":1,"x":"}\"{"},"job":{"k":[1,{"b":"]"}],"s":"x\"y"},"z":true}"#;
        assert_eq!(member(doc, "job"), Some(&br#"{"k":[1,{"b":"]"}],"s":"x\"y"}"#[..]));
        assert_eq!(member(doc, "z"), Some(&b"true"[..]));
        assert_eq!(member(doc, "a"), Some(&br#"{"job":1,"x":"}\"{"}"#[..]));
        assert_eq!(member(doc, "nope"), None);
        assert_eq!(member(b"[1]", "a"), None);
        assert_eq!(member(b"{\"a\":", "a"), None);
    }

    /// The encoding as first specified: through `serde_json::Value`, members sorted by UTF-16
    /// code units. The direct writer must produce exactly these bytes.
    fn reference(value: &Value, out: &mut Vec<u8>) {
        match value {
            Value::Null => panic!("null"),
            Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            Value::Number(n) => out.extend_from_slice(n.as_u64().unwrap().to_string().as_bytes()),
            Value::String(s) => writer::write_string(out, s),
            Value::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    reference(item, out);
                }
                out.push(b']');
            }
            Value::Object(map) => {
                let mut members: Vec<(&String, &Value)> = map.iter().collect();
                members.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
                out.push(b'{');
                for (i, (key, item)) in members.into_iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    writer::write_string(out, key);
                    out.push(b':');
                    reference(item, out);
                }
                out.push(b'}');
            }
        }
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let key = prop_oneof![
            "[a-z_]{0,6}",
            "\\PC{0,4}",
            Just("\u{e000}".to_string()),
            Just("\u{10000}".to_string())
        ];
        let leaf = prop_oneof![
            any::<bool>().prop_map(Value::Bool),
            (0..=MAX_INTEGER).prop_map(Value::from),
            "\\PC{0,8}".prop_map(Value::String),
            "[\\x00-\\x20\"\\\\/\u{7f}é]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::vec((key.clone(), inner), 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn direct_writer_matches_the_value_encoding(v in json_value()) {
            let mut want = Vec::new();
            reference(&v, &mut want);
            proptest::prop_assert_eq!(to_vec(&v).unwrap(), want.clone());
            let back: Value = from_slice(&want).unwrap();
            proptest::prop_assert_eq!(back, v);
        }
    }

    /// Struct fields in any declaration order, maps, options and enums encode as their
    /// `serde_json::Value` does, sorted.
    #[test]
    fn structs_are_sorted_and_match_the_value_encoding() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        enum E {
            Unit,
            New(u64),
            Tuple(u64, String),
            Struct { z: u64, a: bool },
        }
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct S {
            zeta: u64,
            alpha: Vec<E>,
            #[serde(skip_serializing_if = "Option::is_none")]
            gone: Option<String>,
            mid: std::collections::BTreeMap<String, (u8, char)>,
            #[serde(rename = "Mid")]
            upper: Option<i32>,
        }
        let s = S {
            zeta: 7,
            alpha: vec![E::Unit, E::New(1), E::Tuple(2, "t".into()), E::Struct { z: 3, a: true }],
            gone: None,
            mid: [("b".to_string(), (1, 'x')), ("a".to_string(), (2, 'é'))].into(),
            upper: Some(4),
        };
        let bytes = to_vec(&s).unwrap();
        let mut want = Vec::new();
        reference(&serde_json::to_value(&s).unwrap(), &mut want);
        assert_eq!(String::from_utf8(bytes.clone()).unwrap(), String::from_utf8(want).unwrap());
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            r#"{"Mid":4,"alpha":["Unit",{"New":1},{"Tuple":[2,"t"]},{"Struct":{"a":true,"z":3}}],"mid":{"a":[2,"é"],"b":[1,"x"]},"zeta":7}"#
        );
        assert_eq!(from_slice::<S>(&bytes).unwrap(), s);
        let neg = S { upper: Some(-1), ..s };
        assert!(matches!(to_vec(&neg), Err(CanonicalError::NotAnInteger(_))));
    }

    #[test]
    fn duplicate_keys_are_refused() {
        struct Dup;
        impl serde::Serialize for Dup {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeMap;
                let mut m = s.serialize_map(None)?;
                m.serialize_entry("b", &1)?;
                m.serialize_entry("a", &2)?;
                m.serialize_entry("b", &3)?;
                m.end()
            }
        }
        assert!(matches!(to_vec(&Dup), Err(CanonicalError::DuplicateKey(k)) if k == "b"));
    }

    #[test]
    fn decoder_accepts_only_canonical_bytes() {
        let ok: Value = from_slice(br#"{"a":1,"b":"c"}"#).unwrap();
        assert_eq!(ok, json!({"a": 1, "b": "c"}));
        for bad in [
            &br#"{"b":"c","a":1}"#[..],
            br#"{"a":1, "b":"c"}"#,
            br#"{"a":1,"b":"\u0063"}"#,
            br#"{"a":01}"#,
        ] {
            assert!(from_slice::<Value>(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(matches!(
            from_slice::<Value>(br#"{"a":1,"a":1}"#),
            Err(CanonicalError::NotCanonical { .. })
        ));
    }
}
