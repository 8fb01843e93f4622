//! [`NarWriter`]: a token-level NAR encoder for building NARs by hand (tests, fuzz seeds,
//! synthetic store objects).
//!
//! It writes exactly the tokens it is told to and checks nothing (so it can also build the
//! hostile NARs the reader must refuse): the caller keeps entries sorted and nested. To serialise
//! a directory tree use [`super::dump`].

use std::io::{self, Read, Write};

use super::{padding, NAR_MAGIC};

/// Token-level NAR encoder over any [`Write`]; see the grammar in [`super`].
#[derive(Debug)]
pub struct NarWriter<W: Write> {
    w: W,
}

impl<W: Write> NarWriter<W> {
    /// Starts a NAR: writes the magic string.
    pub fn new(w: W) -> io::Result<Self> {
        let mut this = Self { w };
        this.str(NAR_MAGIC)?;
        Ok(this)
    }

    /// Starts without the magic (for crafting broken archives).
    pub fn without_magic(w: W) -> Self {
        Self { w }
    }

    /// Writes one string token: u64 length, the bytes, zero padding.
    pub fn str(&mut self, s: &[u8]) -> io::Result<()> {
        self.w.write_all(&(s.len() as u64).to_le_bytes())?;
        self.w.write_all(s)?;
        self.w.write_all(&[0u8; 8][..padding(s.len() as u64)])
    }

    /// Writes several string tokens.
    pub fn strs(&mut self, ss: &[&[u8]]) -> io::Result<()> {
        ss.iter().try_for_each(|s| self.str(s))
    }

    /// A whole regular-file node with the given contents.
    pub fn regular(&mut self, executable: bool, contents: &[u8]) -> io::Result<()> {
        self.regular_header(executable, contents.len() as u64)?;
        self.w.write_all(contents)?;
        self.regular_trailer(contents.len() as u64)
    }

    /// A whole regular-file node whose `size` bytes are copied from `r` (streaming).
    pub fn regular_from(
        &mut self,
        executable: bool,
        size: u64,
        r: &mut impl Read,
    ) -> io::Result<()> {
        self.regular_header(executable, size)?;
        let copied = io::copy(&mut r.take(size), &mut self.w)?;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("regular file contents: expected {size} bytes, got {copied}"),
            ));
        }
        self.regular_trailer(size)
    }

    fn regular_header(&mut self, executable: bool, size: u64) -> io::Result<()> {
        self.strs(&[b"(", b"type", b"regular"])?;
        if executable {
            self.strs(&[b"executable", b""])?;
        }
        self.str(b"contents")?;
        self.w.write_all(&size.to_le_bytes())
    }

    fn regular_trailer(&mut self, size: u64) -> io::Result<()> {
        self.w.write_all(&[0u8; 8][..padding(size)])?;
        self.str(b")")
    }

    /// A whole symlink node.
    pub fn symlink(&mut self, target: &[u8]) -> io::Result<()> {
        self.strs(&[b"(", b"type", b"symlink", b"target", target, b")"])
    }

    /// Opens a directory node; follow with [`Self::entry`]s and [`Self::dir_end`].
    pub fn dir_start(&mut self) -> io::Result<()> {
        self.strs(&[b"(", b"type", b"directory"])
    }

    /// Opens a directory entry; follow with exactly one node and [`Self::entry_end`].
    pub fn entry(&mut self, name: &[u8]) -> io::Result<()> {
        self.strs(&[b"entry", b"(", b"name", name, b"node"])
    }

    /// Closes a directory entry.
    pub fn entry_end(&mut self) -> io::Result<()> {
        self.str(b")")
    }

    /// Closes a directory node.
    pub fn dir_end(&mut self) -> io::Result<()> {
        self.str(b")")
    }

    /// Writes raw bytes (for crafting broken archives).
    pub fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.w.write_all(bytes)
    }

    /// Returns the underlying writer.
    pub fn into_inner(self) -> W {
        self.w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_file_layout() {
        let mut w = NarWriter::new(Vec::new()).unwrap();
        w.regular(false, b"hi").unwrap();
        let nar = w.into_inner();
        // magic(8+16) ( type regular contents len "hi"+pad )
        assert_eq!(nar.len(), 24 + 16 + 16 + 16 + 16 + 8 + 8 + 16);
        assert_eq!(&nar[0..8], &13u64.to_le_bytes());
        assert_eq!(&nar[8..21], NAR_MAGIC);
        assert_eq!(&nar[21..24], &[0, 0, 0]);
        assert_eq!(&nar[nar.len() - 16..], &[1, 0, 0, 0, 0, 0, 0, 0, b')', 0, 0, 0, 0, 0, 0, 0]);
    }
}
