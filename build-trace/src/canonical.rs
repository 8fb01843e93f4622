//! Canonical JSON: the one byte encoding of jobs and statements that gets hashed.
//!
//! What is here: an encoder from any `serde::Serialize` value to canonical bytes, and a decoder
//! that accepts only bytes that are already canonical (it decodes, re-encodes and compares).
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
    /// serde could not turn the value into JSON or the JSON into the type.
    #[error("JSON does not match the expected schema")]
    Schema(#[source] serde_json::Error),
    /// The bytes decode, but are not the canonical encoding of what they decode to.
    #[error("JSON is not in canonical form (first difference at byte {offset})")]
    NotCanonical {
        /// Offset of the first byte that differs from the canonical re-encoding.
        offset: usize,
    },
}

/// Encode `value` canonically.
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CanonicalError> {
    let value = serde_json::to_value(value).map_err(CanonicalError::Schema)?;
    let mut out = Vec::with_capacity(256);
    write_value(&mut out, &value)?;
    Ok(out)
}

/// Decode `bytes` as a `T`, accepting them only if they are exactly the canonical encoding of
/// the decoded value (so two different byte strings never decode to the same value).
pub fn from_slice<T: Serialize + DeserializeOwned>(bytes: &[u8]) -> Result<T, CanonicalError> {
    let value: T = serde_json::from_slice(bytes).map_err(CanonicalError::Schema)?;
    let again = to_vec(&value)?;
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

/// Append the canonical encoding of a JSON value.
pub fn write_value(out: &mut Vec<u8>, value: &Value) -> Result<(), CanonicalError> {
    match value {
        Value::Null => return Err(CanonicalError::Null),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => {
            let Some(n_u64) = n.as_u64() else {
                return Err(CanonicalError::NotAnInteger(n.to_string()));
            };
            if n_u64 > MAX_INTEGER {
                return Err(CanonicalError::IntegerTooLarge(n_u64));
            }
            out.extend_from_slice(n_u64.to_string().as_bytes());
        }
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            // serde_json's map iterates in byte order, which is UTF-16 order unless a key has
            // characters above U+FFFF and U+E000..U+FFFF both; sort only when it differs.
            let utf16_order = |a: &&String, b: &&String| a.encode_utf16().cmp(b.encode_utf16());
            if !members
                .windows(2)
                .all(|w| w[0].0.is_ascii() && w[1].0.is_ascii() && w[0].0 < w[1].0)
            {
                members.sort_by(|a, b| utf16_order(&a.0, &b.0));
            }
            out.push(b'{');
            for (i, (key, item)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(out, key);
                out.push(b':');
                write_value(out, item)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
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

fn write_string(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b >= 0x20 && b != b'"' && b != b'\\' {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        start = i + 1;
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x08 => out.extend_from_slice(b"\\b"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            0x0c => out.extend_from_slice(b"\\f"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
        }
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
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
