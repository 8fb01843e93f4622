//! The canonical JSON writer: a `serde::Serializer` that appends canonical bytes directly, with
//! no intermediate `serde_json::Value`.
//!
//! It writes every value where it stands. An object's members are written in the order serde
//! hands them over (struct fields in declaration order, map entries in key order); when the
//! object is complete and its keys are not already strictly ascending (UTF-16 code units), its
//! members are reordered in place. Equal keys are refused. The mapping of Rust values to JSON is
//! `serde_json::to_value`'s, restricted by the rules in the parent module: non-negative integers
//! up to 2^53 − 1, no floats, no `null`.
//!
//! What is not here: map keys and their order (`key.rs`), decoding, or the check that bytes are
//! canonical (the parent module).

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt::{self, Display};

use serde::ser::{self, Serialize};

use super::key::{key_order, KeyWriter};
use super::{CanonicalError, MAX_INTEGER};

impl ser::Error for CanonicalError {
    fn custom<T: Display>(msg: T) -> Self {
        CanonicalError::Schema(<serde_json::Error as ser::Error>::custom(msg))
    }
}

/// Appends canonical JSON to `out`.
#[derive(Debug)]
pub(super) struct Writer<'a> {
    pub(super) out: &'a mut Vec<u8>,
}

impl Writer<'_> {
    fn uint(&mut self, n: u64) -> Result<(), CanonicalError> {
        if n > MAX_INTEGER {
            return Err(CanonicalError::IntegerTooLarge(n));
        }
        let mut buf = [0u8; 20];
        let mut i = buf.len();
        let mut n = n;
        loop {
            i -= 1;
            buf[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.out.extend_from_slice(&buf[i..]);
        Ok(())
    }

    fn int(&mut self, n: i64) -> Result<(), CanonicalError> {
        match u64::try_from(n) {
            Ok(n) => self.uint(n),
            Err(_) => Err(CanonicalError::NotAnInteger(n.to_string())),
        }
    }

    fn float(&mut self, f: f64) -> Result<(), CanonicalError> {
        // As `serde_json::to_value`: a finite float is a number (refused), anything else `null`.
        if f.is_finite() {
            Err(CanonicalError::NotAnInteger(format!("{f:?}")))
        } else {
            Err(CanonicalError::Null)
        }
    }

    /// `{"<variant>":` — the opening of an externally tagged enum variant with data.
    fn open_variant(&mut self, variant: &str) {
        self.out.push(b'{');
        write_string(self.out, variant);
        self.out.push(b':');
    }
}

/// Append `s` as a canonical JSON string.
pub(super) fn write_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    write_escaped(out, s);
    out.push(b'"');
}

/// Whether any of the 8 bytes in `x` must be escaped (below 0x20, `"` or `\\`): the classic
/// "has byte less than / equal to" word tricks, exact as a yes/no answer.
fn needs_escape_8(x: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below_space = x.wrapping_sub(ONES * 0x20) & !x;
    let quote = x ^ (ONES * u64::from(b'"'));
    let backslash = x ^ (ONES * u64::from(b'\\'));
    let zero = |v: u64| v.wrapping_sub(ONES) & !v;
    (below_space | zero(quote) | zero(backslash)) & HIGH != 0
}

fn write_escaped(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    // Skip runs that need no escaping eight bytes at a time (most strings have none).
    let mut clean = 0;
    while let Some(chunk) = bytes.get(clean..clean + 8) {
        if needs_escape_8(u64::from_le_bytes(chunk.try_into().expect("8 bytes"))) {
            break;
        }
        clean += 8;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate().skip(clean) {
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
}

/// `fmt::Write` into a JSON string body (for `collect_str`, without a temporary `String`).
struct Escaping<'a>(&'a mut Vec<u8>);

impl fmt::Write for Escaping<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_escaped(self.0, s);
        Ok(())
    }
}

/// `serialize_<int>` methods that widen to `i64`/`u64` and call `Writer::$via`.
macro_rules! integers {
    ($via:ident: $($method:ident $t:ty),*) => {
        $(fn $method(self, v: $t) -> Result<(), CanonicalError> {
            self.$via(v.into())
        })*
    };
}

impl<'a, 'w> ser::Serializer for &'a mut Writer<'w> {
    type Ok = ();
    type Error = CanonicalError;
    type SerializeSeq = Seq<'a, 'w>;
    type SerializeTuple = Seq<'a, 'w>;
    type SerializeTupleStruct = Seq<'a, 'w>;
    type SerializeTupleVariant = Seq<'a, 'w>;
    type SerializeMap = Object<'a, 'w>;
    type SerializeStruct = Object<'a, 'w>;
    type SerializeStructVariant = Object<'a, 'w>;

    fn serialize_bool(self, v: bool) -> Result<(), CanonicalError> {
        self.out.extend_from_slice(if v { b"true" } else { b"false" });
        Ok(())
    }
    integers!(int: serialize_i8 i8, serialize_i16 i16, serialize_i32 i32, serialize_i64 i64);
    integers!(uint: serialize_u8 u8, serialize_u16 u16, serialize_u32 u32, serialize_u64 u64);
    fn serialize_i128(self, v: i128) -> Result<(), CanonicalError> {
        match u64::try_from(v) {
            Ok(n) => self.uint(n),
            Err(_) => Err(CanonicalError::NotAnInteger(v.to_string())),
        }
    }
    fn serialize_u128(self, v: u128) -> Result<(), CanonicalError> {
        match u64::try_from(v) {
            Ok(n) => self.uint(n),
            Err(_) => Err(CanonicalError::NotAnInteger(v.to_string())),
        }
    }
    fn serialize_f32(self, v: f32) -> Result<(), CanonicalError> {
        self.float(v.into())
    }
    fn serialize_f64(self, v: f64) -> Result<(), CanonicalError> {
        self.float(v)
    }
    fn serialize_char(self, v: char) -> Result<(), CanonicalError> {
        write_string(self.out, v.encode_utf8(&mut [0; 4]));
        Ok(())
    }
    fn serialize_str(self, v: &str) -> Result<(), CanonicalError> {
        write_string(self.out, v);
        Ok(())
    }
    fn collect_str<T: Display + ?Sized>(self, value: &T) -> Result<(), CanonicalError> {
        self.out.push(b'"');
        fmt::write(&mut Escaping(self.out), format_args!("{value}"))
            .map_err(|_| <CanonicalError as ser::Error>::custom("a Display impl failed"))?;
        self.out.push(b'"');
        Ok(())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<(), CanonicalError> {
        // As `serde_json::to_value`: an array of numbers.
        self.out.push(b'[');
        for (i, &b) in v.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            self.uint(b.into())?;
        }
        self.out.push(b']');
        Ok(())
    }
    fn serialize_none(self) -> Result<(), CanonicalError> {
        Err(CanonicalError::Null)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), CanonicalError> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), CanonicalError> {
        Err(CanonicalError::Null)
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), CanonicalError> {
        Err(CanonicalError::Null)
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<(), CanonicalError> {
        write_string(self.out, variant);
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), CanonicalError> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), CanonicalError> {
        self.open_variant(variant);
        value.serialize(&mut *self)?;
        self.out.push(b'}');
        Ok(())
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Seq<'a, 'w>, CanonicalError> {
        self.out.push(b'[');
        Ok(Seq { w: self, first: true, variant: false })
    }
    fn serialize_tuple(self, len: usize) -> Result<Seq<'a, 'w>, CanonicalError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<Seq<'a, 'w>, CanonicalError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Seq<'a, 'w>, CanonicalError> {
        self.open_variant(variant);
        self.out.push(b'[');
        Ok(Seq { w: self, first: true, variant: true })
    }
    fn serialize_map(self, len: Option<usize>) -> Result<Object<'a, 'w>, CanonicalError> {
        Ok(Object::open(self, len.unwrap_or(0), false))
    }
    fn serialize_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<Object<'a, 'w>, CanonicalError> {
        Ok(Object::open(self, len, false))
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Object<'a, 'w>, CanonicalError> {
        self.open_variant(variant);
        Ok(Object::open(self, len, true))
    }
}

/// An array being written.
#[derive(Debug)]
pub(super) struct Seq<'a, 'w> {
    w: &'a mut Writer<'w>,
    first: bool,
    /// Inside `{"<variant>":…}`: close that too.
    variant: bool,
}

impl Seq<'_, '_> {
    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), CanonicalError> {
        if !self.first {
            self.w.out.push(b',');
        }
        self.first = false;
        value.serialize(&mut *self.w)
    }
    fn close(self) -> Result<(), CanonicalError> {
        self.w.out.push(b']');
        if self.variant {
            self.w.out.push(b'}');
        }
        Ok(())
    }
}

macro_rules! seq_impl {
    ($trait:ident, $method:ident) => {
        impl ser::$trait for Seq<'_, '_> {
            type Ok = ();
            type Error = CanonicalError;
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), CanonicalError> {
                self.element(value)
            }
            fn end(self) -> Result<(), CanonicalError> {
                self.close()
            }
        }
    };
}
seq_impl!(SerializeSeq, serialize_element);
seq_impl!(SerializeTuple, serialize_element);
seq_impl!(SerializeTupleStruct, serialize_field);
seq_impl!(SerializeTupleVariant, serialize_field);

/// An object being written: where it starts, and each member's key and start offset.
#[derive(Debug)]
pub(super) struct Object<'a, 'w> {
    w: &'a mut Writer<'w>,
    /// Offset just after `{`.
    body: usize,
    members: Vec<(Cow<'static, str>, usize)>,
    /// Inside `{"<variant>":…}`: close that too.
    variant: bool,
}

impl<'a, 'w> Object<'a, 'w> {
    fn open(w: &'a mut Writer<'w>, len: usize, variant: bool) -> Object<'a, 'w> {
        w.out.push(b'{');
        let body = w.out.len();
        Object { w, body, members: Vec::with_capacity(len), variant }
    }

    /// Write `"key":` and remember where the member starts.
    fn key(&mut self, key: Cow<'static, str>) {
        if !self.members.is_empty() {
            self.w.out.push(b',');
        }
        self.members.push((key, self.w.out.len()));
        let key = &self.members.last().expect("just pushed").0;
        write_string(self.w.out, key);
        self.w.out.push(b':');
    }

    /// Close the object, putting its members in canonical order first if needed.
    fn close(self) -> Result<(), CanonicalError> {
        let Object { w, body, members, variant } = self;
        let ordered = members.windows(2).all(|p| key_order(&p[0].0, &p[1].0) == Ordering::Less);
        if !ordered {
            // Member i spans from its start to just before the comma of member i + 1.
            let end = w.out.len();
            let mut spans: Vec<(&str, usize, usize)> = members
                .iter()
                .enumerate()
                .map(|(i, (k, start))| {
                    let stop = members.get(i + 1).map_or(end, |next| next.1 - 1);
                    (k.as_ref(), *start, stop)
                })
                .collect();
            spans.sort_by(|a, b| key_order(a.0, b.0));
            if let Some(p) = spans.windows(2).find(|p| p[0].0 == p[1].0) {
                return Err(CanonicalError::DuplicateKey(p[0].0.to_string()));
            }
            let old = w.out.split_off(body);
            for (i, (_, start, stop)) in spans.iter().enumerate() {
                if i > 0 {
                    w.out.push(b',');
                }
                w.out.extend_from_slice(&old[start - body..stop - body]);
            }
        }
        w.out.push(b'}');
        if variant {
            w.out.push(b'}');
        }
        Ok(())
    }
}

impl ser::SerializeMap for Object<'_, '_> {
    type Ok = ();
    type Error = CanonicalError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), CanonicalError> {
        let key = key.serialize(KeyWriter)?;
        self.key(Cow::Owned(key));
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), CanonicalError> {
        value.serialize(&mut *self.w)
    }
    fn end(self) -> Result<(), CanonicalError> {
        self.close()
    }
}

/// Struct fields, of a plain struct or of an enum's struct variant, are members keyed by name.
macro_rules! struct_impl {
    ($trait:ident) => {
        impl ser::$trait for Object<'_, '_> {
            type Ok = ();
            type Error = CanonicalError;
            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                key: &'static str,
                value: &T,
            ) -> Result<(), CanonicalError> {
                self.key(Cow::Borrowed(key));
                value.serialize(&mut *self.w)
            }
            fn end(self) -> Result<(), CanonicalError> {
                self.close()
            }
        }
    };
}
struct_impl!(SerializeStruct);
struct_impl!(SerializeStructVariant);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn escaped_bytewise(s: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for c in s.chars() {
            match c {
                '"' => out.extend_from_slice(b"\\\""),
                '\\' => out.extend_from_slice(b"\\\\"),
                '\u{8}' => out.extend_from_slice(b"\\b"),
                '\t' => out.extend_from_slice(b"\\t"),
                '\n' => out.extend_from_slice(b"\\n"),
                '\u{c}' => out.extend_from_slice(b"\\f"),
                '\r' => out.extend_from_slice(b"\\r"),
                c if (c as u32) < 0x20 => {
                    out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes())
                }
                c => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
        out
    }

    #[test]
    fn word_at_a_time_escaping_finds_every_special_byte_at_every_position() {
        for special in (0u8..0x20).chain([b'"', b'\\']) {
            for neighbour in [b'a', 0x1f, b' ', b'!', b'[', b']', 0x7f] {
                for len in 1..20 {
                    for pos in 0..len {
                        let mut bytes = vec![neighbour; len];
                        bytes[pos] = special;
                        let s = String::from_utf8(bytes).unwrap();
                        let mut out = Vec::new();
                        write_escaped(&mut out, &s);
                        assert_eq!(out, escaped_bytewise(&s), "{s:?}");
                    }
                }
            }
        }
    }

    proptest! {
        #[test]
        fn escaping_matches_the_bytewise_rules(s in "[\\x00-\\x7f\u{e9}\u{e000}\u{10000}]{0,40}") {
            let mut out = Vec::new();
            write_escaped(&mut out, &s);
            prop_assert_eq!(out, escaped_bytewise(&s));
        }
    }
}
