//! NAR (Nix ARchive): the serialisation Nix hashes, signs and ships store objects in.
//!
//! What is here:
//! * [`encode`]: the token encoder ([`NarWriter`]) for building NARs by hand;
//! * [`dump`]: a streaming, pull-based NAR serialiser of a directory tree ([`NarDump`], an
//!   `impl Read`) and [`dump_path`] (`nix-store --dump`);
//! * [`reader`]: a strict, streaming, event-based parser ([`NarReader`]) that checks names, order,
//!   padding, trailing data and [`NarLimits`], each violation with its own [`NarError`] variant;
//! * [`mod@unpack`]: writes a NAR into a new path without ever leaving it ([`unpack()`]);
//! * [`hash`]: the NAR hashing sink ([`NarHasher`]: SHA-256 + size while streaming);
//! * [`fuzzing`]: the invariant of the `nar_unpack` fuzz target, as a plain function.
//!
//! What is not here: compression, the export/import framing, where trees live. The grammar
//! (from Nix's `archive.cc`; all strings are a little-endian u64 length, the bytes, zero padding
//! to 8):
//!
//! ```text
//! nar       = str("nix-archive-1") node
//! node      = str("(") str("type") ( regular | symlink | directory ) str(")")
//! regular   = str("regular") [ str("executable") str("") ] str("contents") str(data)
//! symlink   = str("symlink") str("target") str(target)
//! directory = str("directory") { str("entry") str("(") str("name") str(name) str("node") node str(")") }
//! ```
//!
//! Directory entries are sorted by the bytes of their names, without duplicates.

pub mod dump;
pub mod encode;
pub mod fuzzing;
pub mod hash;
pub mod reader;
pub mod unpack;

#[cfg(test)]
mod tests;

pub use dump::{dump_path, DumpError, NarDump};
pub use encode::NarWriter;
pub use hash::{hash_nar, hash_path, NarDigest, NarHasher};
pub use reader::{NarError, NarEvent, NarLimits, NarReader};
pub use unpack::{unpack, unpack_from, UnpackError, UnpackOptions, UnpackStats};

/// The first string of every NAR.
pub const NAR_MAGIC: &[u8] = b"nix-archive-1";

/// Appends one NAR string token (length, bytes, zero padding) to `out`.
pub(crate) fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    out.extend_from_slice(&[0u8; 8][..padding(s.len() as u64)]);
}

/// Number of zero bytes that follow `len` bytes of string data.
pub(crate) fn padding(len: u64) -> usize {
    ((8 - (len % 8)) % 8) as usize
}
