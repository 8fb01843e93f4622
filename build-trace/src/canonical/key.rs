//! Object keys in canonical JSON: their order (JCS: UTF-16 code units) and the serializer that
//! turns a map key into its string.
//!
//! What is not here: writing objects (`writer.rs` writes members and reorders them with
//! [`key_order`]).

use std::cmp::Ordering;

use serde::ser::{self, Impossible, Serialize};

use super::CanonicalError;

/// JCS key order: UTF-16 code units. UTF-8 byte order is code point order, which differs from
/// UTF-16 order only between U+E000..U+FFFF (lead bytes 0xEE, 0xEF) and characters above
/// U+FFFF (lead bytes 0xF0..0xF4); since equal prefixes end on a character boundary, looking at
/// the first differing byte decides.
pub(super) fn key_order(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) else {
        return a.len().cmp(&b.len());
    };
    let (x, y) = (a[i], b[i]);
    let high_bmp = |c: u8| c == 0xee || c == 0xef;
    let astral = |c: u8| c >= 0xf0;
    if (high_bmp(x) && astral(y)) || (astral(x) && high_bmp(y)) {
        y.cmp(&x)
    } else {
        x.cmp(&y)
    }
}

/// Map keys: strings (and, as in `serde_json`, characters and integers, written as strings).
pub(super) struct KeyWriter;

fn key_error() -> CanonicalError {
    <CanonicalError as ser::Error>::custom("key must be a string")
}

/// `KeyWriter` methods for scalars, each answering `$answer` about the value `$v`.
macro_rules! key_scalars {
    ($v:ident => $answer:expr; $($method:ident $t:ty),*) => {
        $(fn $method(self, $v: $t) -> Result<String, CanonicalError> {
            $answer
        })*
    };
}

impl ser::Serializer for KeyWriter {
    type Ok = String;
    type Error = CanonicalError;
    type SerializeSeq = Impossible<String, CanonicalError>;
    type SerializeTuple = Impossible<String, CanonicalError>;
    type SerializeTupleStruct = Impossible<String, CanonicalError>;
    type SerializeTupleVariant = Impossible<String, CanonicalError>;
    type SerializeMap = Impossible<String, CanonicalError>;
    type SerializeStruct = Impossible<String, CanonicalError>;
    type SerializeStructVariant = Impossible<String, CanonicalError>;

    fn serialize_str(self, v: &str) -> Result<String, CanonicalError> {
        Ok(v.to_owned())
    }
    fn serialize_char(self, v: char) -> Result<String, CanonicalError> {
        Ok(v.to_string())
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<String, CanonicalError> {
        Ok(variant.to_owned())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<String, CanonicalError> {
        value.serialize(self)
    }
    key_scalars!(v => Ok(v.to_string()); serialize_i8 i8, serialize_i16 i16, serialize_i32 i32,
        serialize_i64 i64, serialize_u8 u8, serialize_u16 u16, serialize_u32 u32, serialize_u64 u64);
    key_scalars!(_v => Err(key_error()); serialize_bool bool, serialize_f32 f32,
        serialize_f64 f64, serialize_bytes &[u8]);
    fn serialize_none(self) -> Result<String, CanonicalError> {
        Err(key_error())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<String, CanonicalError> {
        Err(key_error())
    }
    fn serialize_unit(self) -> Result<String, CanonicalError> {
        Err(key_error())
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<String, CanonicalError> {
        Err(key_error())
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<String, CanonicalError> {
        Err(key_error())
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, CanonicalError> {
        Err(key_error())
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, CanonicalError> {
        Err(key_error())
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, CanonicalError> {
        Err(key_error())
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, CanonicalError> {
        Err(key_error())
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, CanonicalError> {
        Err(key_error())
    }
    fn serialize_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStruct, CanonicalError> {
        Err(key_error())
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, CanonicalError> {
        Err(key_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn key_order_is_utf16_order(
            a in "[a\u{7f}\u{e9}\u{ffff}\u{e000}\u{10000}\u{10ffff}]{0,5}",
            b in "[a\u{7f}\u{e9}\u{ffff}\u{e000}\u{10000}\u{10ffff}]{0,5}",
        ) {
            prop_assert_eq!(key_order(&a, &b), a.encode_utf16().cmp(b.encode_utf16()));
            let ab = format!("{a}{b}");
            prop_assert_eq!(key_order(&a, &ab), a.encode_utf16().cmp(ab.encode_utf16()));
        }
    }
}
