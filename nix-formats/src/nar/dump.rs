//! Streaming NAR serialisation of a directory tree, byte-identical to `nix-store --dump`.
//!
//! [`NarDump`] is pull-based (`impl Read`): it produces the NAR lazily, reading file contents
//! straight into the caller's buffer, so any consumer (hasher, reference scanner, rewriter,
//! socket) can drive it and memory stays flat in the tree's size (one open file, plus the sorted
//! entry names of the directories on the current path). [`dump_path`] copies it into a writer.
//!
//! As Nix does: the root is not followed if it is a symlink; a regular file is executable when
//! its owner-execute bit is set; entries are sorted by name bytes; anything that is not a regular
//! file, symlink or directory (sockets, FIFOs, devices) is refused with
//! [`DumpError::Unsupported`]. What is not here: Nix's macOS case hack and path filters.

use std::ffi::OsString;
use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{padding, put_str, NAR_MAGIC};

/// Why a tree could not be serialised. Returned inside an [`io::Error`] by [`NarDump`] (recover it
/// with [`DumpError::from_io`]) and directly by [`dump_path`].
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// The tree holds something NAR cannot represent.
    #[error("'{path}' is a {kind}, which a NAR cannot hold")]
    Unsupported {
        /// The offending path.
        path: PathBuf,
        /// What it is ("socket", "FIFO", "block device", "character device").
        kind: &'static str,
    },
    /// A regular file shrank while it was being read.
    #[error(
        "'{path}' changed while it was being serialised ({expected} bytes expected, {got} read)"
    )]
    FileChanged {
        /// The file.
        path: PathBuf,
        /// Size from its metadata.
        expected: u64,
        /// Bytes actually read.
        got: u64,
    },
    /// A file-system operation failed.
    #[error("reading '{path}'")]
    Io {
        /// The path being read.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing the NAR to its destination failed.
    #[error("writing the NAR")]
    Write(#[source] io::Error),
}

impl DumpError {
    /// Takes a [`DumpError`] back out of an [`io::Error`] produced by [`NarDump`]; other I/O errors
    /// become [`DumpError::Write`].
    pub fn from_io(e: io::Error) -> Self {
        if e.get_ref().is_some_and(|inner| inner.is::<DumpError>()) {
            match e.into_inner().map(|b| b.downcast::<DumpError>()) {
                Some(Ok(d)) => *d,
                _ => unreachable_io(),
            }
        } else {
            DumpError::Write(e)
        }
    }

    fn into_io(self) -> io::Error {
        io::Error::other(self)
    }
}

fn unreachable_io() -> DumpError {
    DumpError::Write(io::Error::other("lost NAR dump error"))
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |source| DumpError::Io { path: path.to_owned(), source }.into_io()
}

/// One directory being listed: its path, its sorted entry names, the next one to emit.
#[derive(Debug)]
struct DirFrame {
    path: PathBuf,
    names: Vec<OsString>,
    next: usize,
}

/// The regular file whose contents are being streamed.
#[derive(Debug)]
struct OpenFile {
    path: PathBuf,
    file: File,
    size: u64,
    remaining: u64,
}

/// A NAR of a directory tree (or single file or symlink), produced lazily as it is read.
#[derive(Debug)]
pub struct NarDump {
    root: Option<PathBuf>,
    stack: Vec<DirFrame>,
    file: Option<OpenFile>,
    pending: Vec<u8>,
    pending_pos: usize,
    done: bool,
}

impl NarDump {
    /// Prepares the NAR of `root`; nothing is read until the first `read`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: Some(root.into()),
            stack: Vec::new(),
            file: None,
            pending: Vec::with_capacity(512),
            pending_pos: 0,
            done: false,
        }
    }

    /// Emits the tokens of the node at `path` (all of it for a symlink; the header for a file or
    /// directory, whose body follows).
    fn start_node(&mut self, path: PathBuf) -> io::Result<()> {
        let md = fs::symlink_metadata(&path).map_err(io_at(&path))?;
        let ft = md.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(&path).map_err(io_at(&path))?;
            for t in
                [&b"("[..], b"type", b"symlink", b"target", target.as_os_str().as_bytes(), b")"]
            {
                put_str(&mut self.pending, t);
            }
            self.node_done();
        } else if ft.is_file() {
            let file = fs::OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
                .open(&path)
                .map_err(io_at(&path))?;
            // Use the metadata of what was opened, in case the path changed since the lstat.
            let md: Metadata = file.metadata().map_err(io_at(&path))?;
            if !md.file_type().is_file() {
                return Err(unsupported(path, &md));
            }
            for t in [&b"("[..], b"type", b"regular"] {
                put_str(&mut self.pending, t);
            }
            if md.permissions().mode() & 0o100 != 0 {
                put_str(&mut self.pending, b"executable");
                put_str(&mut self.pending, b"");
            }
            put_str(&mut self.pending, b"contents");
            self.pending.extend_from_slice(&md.len().to_le_bytes());
            self.file = Some(OpenFile { path, file, size: md.len(), remaining: md.len() });
        } else if ft.is_dir() {
            let mut names = Vec::new();
            for entry in fs::read_dir(&path).map_err(io_at(&path))? {
                names.push(entry.map_err(io_at(&path))?.file_name());
            }
            names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            for t in [&b"("[..], b"type", b"directory"] {
                put_str(&mut self.pending, t);
            }
            self.stack.push(DirFrame { path, names, next: 0 });
        } else {
            return Err(unsupported(path, &md));
        }
        Ok(())
    }

    /// Closes a finished node: `)` for the entry around it, if it is inside a directory.
    fn node_done(&mut self) {
        if self.stack.is_empty() {
            self.done = true;
        } else {
            put_str(&mut self.pending, b")");
        }
    }

    /// Produces the next tokens when nothing is pending and no file is open.
    fn advance(&mut self) -> io::Result<()> {
        if let Some(root) = self.root.take() {
            put_str(&mut self.pending, NAR_MAGIC);
            return self.start_node(root);
        }
        let Some(top) = self.stack.last_mut() else {
            self.done = true;
            return Ok(());
        };
        if top.next < top.names.len() {
            let name = std::mem::take(&mut top.names[top.next]).into_vec();
            top.next += 1;
            let child = top.path.join(std::ffi::OsStr::from_bytes(&name));
            for t in [&b"entry"[..], b"(", b"name", &name, b"node"] {
                put_str(&mut self.pending, t);
            }
            self.start_node(child)
        } else {
            self.stack.pop();
            put_str(&mut self.pending, b")");
            self.node_done();
            Ok(())
        }
    }
}

fn unsupported(path: PathBuf, md: &Metadata) -> io::Error {
    let ft = md.file_type();
    let kind = if ft.is_socket() {
        "socket"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_char_device() {
        "character device"
    } else {
        "file of unknown type"
    };
    DumpError::Unsupported { path, kind }.into_io()
}

impl Read for NarDump {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            if self.pending_pos < self.pending.len() {
                let k = (self.pending.len() - self.pending_pos).min(buf.len() - n);
                buf[n..n + k]
                    .copy_from_slice(&self.pending[self.pending_pos..self.pending_pos + k]);
                self.pending_pos += k;
                n += k;
                if self.pending_pos == self.pending.len() {
                    self.pending.clear();
                    self.pending_pos = 0;
                }
                continue;
            }
            if let Some(f) = &mut self.file {
                if f.remaining > 0 {
                    let want = (f.remaining.min((buf.len() - n) as u64)) as usize;
                    let got = match f.file.read(&mut buf[n..n + want]) {
                        Ok(got) => got,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(io_at(&f.path)(e)),
                    };
                    if got == 0 {
                        let e = DumpError::FileChanged {
                            path: f.path.clone(),
                            expected: f.size,
                            got: f.size - f.remaining,
                        };
                        return Err(e.into_io());
                    }
                    f.remaining -= got as u64;
                    n += got;
                    if f.remaining > 0 {
                        // Hand out what we have: the consumer works while the next read waits.
                        break;
                    }
                    continue;
                }
                let size = f.size;
                self.file = None;
                self.pending.extend_from_slice(&[0u8; 8][..padding(size)]);
                put_str(&mut self.pending, b")");
                self.node_done();
                continue;
            }
            if self.done {
                break;
            }
            self.advance()?;
        }
        Ok(n)
    }
}

/// Size of the buffer [`dump_path`] and the hashing helpers stream through.
pub const STREAM_BUFFER: usize = 256 * 1024;

/// Writes the NAR of `path` to `w` (what `nix-store --dump` prints); returns its size in bytes.
pub fn dump_path(path: impl AsRef<Path>, w: &mut impl Write) -> Result<u64, DumpError> {
    let mut dump = NarDump::new(path.as_ref());
    let mut buf = vec![0u8; STREAM_BUFFER];
    let mut total = 0u64;
    loop {
        let n = dump.read(&mut buf).map_err(DumpError::from_io)?;
        if n == 0 {
            return Ok(total);
        }
        w.write_all(&buf[..n]).map_err(DumpError::Write)?;
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nar::NarWriter;
    use std::os::unix::fs::symlink;

    fn dump(p: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        dump_path(p, &mut out).unwrap();
        out
    }

    #[test]
    fn tree_matches_hand_encoding() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        fs::create_dir(&root).unwrap();
        fs::write(root.join("b"), b"bee").unwrap();
        fs::write(root.join("a.sh"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(root.join("a.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::create_dir(root.join("d")).unwrap();
        symlink("../b", root.join("d/l")).unwrap();
        fs::create_dir(root.join("e")).unwrap();
        fs::write(root.join("B"), b"").unwrap();

        let mut w = NarWriter::new(Vec::new()).unwrap();
        w.dir_start().unwrap();
        w.entry(b"B").unwrap();
        w.regular(false, b"").unwrap();
        w.entry_end().unwrap();
        w.entry(b"a.sh").unwrap();
        w.regular(true, b"#!/bin/sh\n").unwrap();
        w.entry_end().unwrap();
        w.entry(b"b").unwrap();
        w.regular(false, b"bee").unwrap();
        w.entry_end().unwrap();
        w.entry(b"d").unwrap();
        w.dir_start().unwrap();
        w.entry(b"l").unwrap();
        w.symlink(b"../b").unwrap();
        w.entry_end().unwrap();
        w.dir_end().unwrap();
        w.entry_end().unwrap();
        w.entry(b"e").unwrap();
        w.dir_start().unwrap();
        w.dir_end().unwrap();
        w.entry_end().unwrap();
        w.dir_end().unwrap();
        assert_eq!(dump(&root), w.into_inner());
    }

    #[test]
    fn tiny_reads_give_same_bytes() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("f"), vec![7u8; 10_000]).unwrap();
        let whole = dump(t.path());
        let mut d = NarDump::new(t.path());
        let mut got = Vec::new();
        let mut b = [0u8; 3];
        loop {
            let n = d.read(&mut b).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&b[..n]);
        }
        assert_eq!(got, whole);
    }

    #[test]
    fn root_symlink_and_file() {
        let t = tempfile::tempdir().unwrap();
        symlink("/nowhere", t.path().join("l")).unwrap();
        let mut w = NarWriter::new(Vec::new()).unwrap();
        w.symlink(b"/nowhere").unwrap();
        assert_eq!(dump(&t.path().join("l")), w.into_inner());
    }

    #[test]
    fn refuses_socket_and_fifo() {
        let t = tempfile::tempdir().unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(t.path().join("s")).unwrap();
        match dump_path(t.path(), &mut Vec::new()) {
            Err(DumpError::Unsupported { kind: "socket", path }) => {
                assert_eq!(path, t.path().join("s"))
            }
            other => panic!("{other:?}"),
        }
        let t2 = tempfile::tempdir().unwrap();
        nix::unistd::mkfifo(&t2.path().join("f"), nix::sys::stat::Mode::from_bits_truncate(0o600))
            .unwrap();
        assert!(matches!(
            dump_path(t2.path(), &mut Vec::new()),
            Err(DumpError::Unsupported { kind: "FIFO", .. })
        ));
    }

    #[test]
    fn missing_root_is_io_error() {
        let err = dump_path("/nonexistent/vouch-test", &mut Vec::new()).unwrap_err();
        assert!(matches!(err, DumpError::Io { .. }), "{err:?}");
    }
}
