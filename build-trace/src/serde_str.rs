//! serde helpers for values written as strings (NAR hashes, measurements, hex digests, base64,
//! times): the string is read in place — no `String` is allocated for strings without escapes,
//! which matters when the verifier parses thousands of statements and evidence bundles — and
//! converted.
//!
//! What is not here: the string forms themselves (each type's `Display`/`FromStr`).

use std::fmt;
use std::str::FromStr;

use serde::de::{Deserializer, Error, Visitor};

/// Deserialize a string and convert it with `convert`.
pub(crate) fn with_str<'de, D, T, F>(d: D, convert: F) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    F: FnOnce(&str) -> Result<T, String>,
{
    struct Convert<F>(F);
    impl<T, F: FnOnce(&str) -> Result<T, String>> Visitor<'_> for Convert<F> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: Error>(self, s: &str) -> Result<T, E> {
            (self.0)(s).map_err(E::custom)
        }
    }
    d.deserialize_str(Convert(convert))
}

/// `Serialize` through `Display` and `Deserialize` through `FromStr<Err = String>` for a type
/// whose wire form is its string form.
macro_rules! string_form {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<$t, D::Error> {
                $crate::serde_str::from_str_form(d)
            }
        }
    };
}
pub(crate) use string_form;

/// Deserialize a value from its string form (`FromStr`).
pub(crate) fn from_str_form<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = String>,
{
    with_str(d, str::parse)
}
