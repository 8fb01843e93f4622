//! [`NarReader`]: a strict, streaming, event-based NAR parser over any [`Read`].
//!
//! It accepts exactly the canonical form Nix writes (so every accepted NAR re-serialises to the
//! same bytes) and refuses everything else, each cause with its own [`NarError`] variant: bad
//! magic or tokens, non-zero padding, invalid entry names (empty, `.`, `..`, containing `/` or
//! NUL), unsorted or duplicate entries, trailing data, and the [`NarLimits`] (file size, total
//! size, entry count, name length, depth, symlink target length). Lengths are checked before
//! anything is allocated. Memory is flat: the previous name of each open directory.
//!
//! The reader does not buffer: wrap a file or socket in a `BufReader` for speed. It never reads
//! past the end of the NAR except, when [`NarReader::new`] is used, to check for trailing data;
//! [`NarReader::embedded`] stops exactly at the end (for NARs inside a protocol stream).

use std::io::{self, Read};

use super::{padding, NAR_MAGIC};

/// Limits on what a NAR may contain. Defaults are generous for real store objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NarLimits {
    /// Largest regular file, in bytes.
    pub max_file_size: u64,
    /// Largest NAR, in bytes (all tokens, contents and padding).
    pub max_total_size: u64,
    /// Most nodes (files, symlinks, directories, the root included).
    pub max_entries: u64,
    /// Longest entry name, in bytes.
    pub max_name_len: usize,
    /// Deepest directory nesting (the root directory is depth 1).
    pub max_depth: usize,
    /// Longest symlink target, in bytes.
    pub max_symlink_target_len: usize,
}

impl Default for NarLimits {
    fn default() -> Self {
        Self {
            max_file_size: 1 << 40,
            max_total_size: 1 << 42,
            max_entries: 1 << 24,
            max_name_len: 255,
            max_depth: 256,
            max_symlink_target_len: 4095,
        }
    }
}

/// Why a NAR was refused.
#[derive(Debug, thiserror::Error)]
pub enum NarError {
    /// Reading the input failed.
    #[error("reading the NAR")]
    Io(#[source] io::Error),
    /// The input ended inside the NAR.
    #[error("the NAR ends early, at byte {offset}")]
    UnexpectedEof {
        /// Bytes read before the end.
        offset: u64,
    },
    /// The input does not start with `nix-archive-1`.
    #[error("not a NAR: the magic string 'nix-archive-1' is missing")]
    BadMagic,
    /// A token other than the grammar's next one.
    #[error("malformed NAR at byte {offset}: expected {expected}, found {found}")]
    UnexpectedToken {
        /// Offset of the token.
        offset: u64,
        /// What the grammar allows here.
        expected: &'static str,
        /// What was there (printable prefix).
        found: String,
    },
    /// Padding after a string or file contents is not all zero.
    #[error("non-zero padding at byte {offset}")]
    NonZeroPadding {
        /// Offset of the padding.
        offset: u64,
    },
    /// An entry name is empty.
    #[error("entry name is empty")]
    EmptyName,
    /// An entry is named `.`.
    #[error("entry name is '.'")]
    DotName,
    /// An entry is named `..`.
    #[error("entry name is '..'")]
    DotDotName,
    /// An entry name contains `/`.
    #[error("entry name {name:?} contains '/'")]
    NameContainsSlash {
        /// The name, lossily decoded.
        name: String,
    },
    /// An entry name contains a NUL byte.
    #[error("entry name {name:?} contains a NUL byte")]
    NameContainsNul {
        /// The name, lossily decoded.
        name: String,
    },
    /// Entries of a directory are not in ascending byte order.
    #[error("directory entries are not sorted: {name:?} after {prev:?}")]
    UnsortedEntries {
        /// The previous name.
        prev: String,
        /// The name that should have come first.
        name: String,
    },
    /// Two entries of a directory have the same name.
    #[error("duplicate directory entry {name:?}")]
    DuplicateEntry {
        /// The repeated name.
        name: String,
    },
    /// A symlink target is empty.
    #[error("symlink target is empty")]
    EmptySymlinkTarget,
    /// A symlink target contains a NUL byte.
    #[error("symlink target contains a NUL byte")]
    SymlinkTargetContainsNul,
    /// Bytes follow the end of the NAR.
    #[error("trailing data after the end of the NAR (at byte {offset})")]
    TrailingData {
        /// Offset of the first extra byte.
        offset: u64,
    },
    /// A regular file exceeds [`NarLimits::max_file_size`].
    #[error("file of {size} bytes exceeds the limit of {limit}")]
    FileTooLarge {
        /// Declared size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The NAR exceeds [`NarLimits::max_total_size`].
    #[error("NAR exceeds the size limit of {limit} bytes")]
    TotalSizeExceeded {
        /// The limit.
        limit: u64,
    },
    /// More nodes than [`NarLimits::max_entries`].
    #[error("NAR has more than {limit} entries")]
    TooManyEntries {
        /// The limit.
        limit: u64,
    },
    /// An entry name is longer than [`NarLimits::max_name_len`].
    #[error("entry name of {len} bytes exceeds the limit of {limit}")]
    NameTooLong {
        /// Declared length.
        len: u64,
        /// The limit.
        limit: usize,
    },
    /// Directories nest deeper than [`NarLimits::max_depth`].
    #[error("directories nest deeper than {limit}")]
    TooDeep {
        /// The limit.
        limit: usize,
    },
    /// A symlink target is longer than [`NarLimits::max_symlink_target_len`].
    #[error("symlink target of {len} bytes exceeds the limit of {limit}")]
    SymlinkTargetTooLong {
        /// Declared length.
        len: u64,
        /// The limit.
        limit: usize,
    },
}

/// One step of a NAR, in document order.
///
/// A directory is `DirectoryStart`, then for each entry an `Entry` followed by that entry's node
/// events, then `DirectoryEnd`. After `Regular`, the contents can be read with
/// [`NarReader::read_contents`]; whatever is not read is skipped by the next
/// [`NarReader::next_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NarEvent {
    /// A regular file of `size` bytes.
    Regular {
        /// Whether it is executable.
        executable: bool,
        /// Size of its contents.
        size: u64,
    },
    /// A symlink.
    Symlink {
        /// Its target (non-empty, no NUL).
        target: Vec<u8>,
    },
    /// A directory starts.
    DirectoryStart,
    /// The next entry of the current directory (a valid name, in order).
    Entry {
        /// The entry's name.
        name: Vec<u8>,
    },
    /// The current directory ends.
    DirectoryEnd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    /// Expecting a node (after the magic, or after an entry's `node` token).
    Node,
    /// Inside a directory, expecting `entry` or `)`.
    InDirectory,
    /// Streaming a file's contents.
    Contents {
        remaining: u64,
        size: u64,
    },
    Finished,
}

/// Streaming NAR parser; see the module docs.
#[derive(Debug)]
pub struct NarReader<R: Read> {
    r: R,
    limits: NarLimits,
    state: State,
    /// Per open directory: the previous entry name.
    dirs: Vec<Option<Vec<u8>>>,
    offset: u64,
    entries: u64,
    check_trailing: bool,
}

const MAX_TAG: u64 = 16;

impl<R: Read> NarReader<R> {
    /// A parser that, at the end, requires the input to end too.
    pub fn new(r: R, limits: NarLimits) -> Self {
        Self {
            r,
            limits,
            state: State::Start,
            dirs: Vec::new(),
            offset: 0,
            entries: 0,
            check_trailing: true,
        }
    }

    /// A parser for a NAR embedded in a larger stream: it stops exactly after the NAR's last
    /// byte and does not look further.
    pub fn embedded(r: R, limits: NarLimits) -> Self {
        Self { check_trailing: false, ..Self::new(r, limits) }
    }

    /// Bytes consumed so far (the NAR size once [`Self::next_event`] has returned `None`).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Returns the underlying reader.
    pub fn into_inner(self) -> R {
        self.r
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<(), NarError> {
        let end = self.offset + buf.len() as u64;
        if end > self.limits.max_total_size {
            return Err(NarError::TotalSizeExceeded { limit: self.limits.max_total_size });
        }
        self.r.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => NarError::UnexpectedEof { offset: self.offset },
            _ => NarError::Io(e),
        })?;
        self.offset = end;
        Ok(())
    }

    fn u64(&mut self) -> Result<u64, NarError> {
        let mut b = [0u8; 8];
        self.fill(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn pad(&mut self, len: u64) -> Result<(), NarError> {
        let n = padding(len);
        if n > 0 {
            let at = self.offset;
            let mut b = [0u8; 8];
            self.fill(&mut b[..n])?;
            if b[..n].iter().any(|&x| x != 0) {
                return Err(NarError::NonZeroPadding { offset: at });
            }
        }
        Ok(())
    }

    /// Reads a string of at most `max` bytes; `too_long` builds the error for longer ones.
    fn string(
        &mut self,
        max: u64,
        too_long: impl FnOnce(u64) -> NarError,
    ) -> Result<Vec<u8>, NarError> {
        let len = self.u64()?;
        if len > max {
            return Err(too_long(len));
        }
        let mut s = vec![0u8; len as usize];
        self.fill(&mut s)?;
        self.pad(len)?;
        Ok(s)
    }

    /// Reads a short grammar token.
    fn tag(&mut self, expected: &'static str) -> Result<Vec<u8>, NarError> {
        let at = self.offset;
        self.string(MAX_TAG, |len| NarError::UnexpectedToken {
            offset: at,
            expected,
            found: format!("a string of {len} bytes"),
        })
    }

    fn expect(&mut self, want: &'static str) -> Result<(), NarError> {
        let at = self.offset;
        let got = self.tag(want)?;
        if got != want.as_bytes() {
            return Err(bad_token(at, want, &got));
        }
        Ok(())
    }

    /// Reads the next event; `None` once the NAR has ended (and, for [`Self::new`], the input
    /// too).
    pub fn next_event(&mut self) -> Result<Option<NarEvent>, NarError> {
        loop {
            match self.state {
                State::Start => {
                    let got = self.string(MAX_TAG, |_| NarError::BadMagic)?;
                    if got != NAR_MAGIC {
                        return Err(NarError::BadMagic);
                    }
                    self.state = State::Node;
                }
                State::Node => return self.node().map(Some),
                State::InDirectory => return self.directory_item().map(Some),
                State::Contents { remaining, size } => {
                    if remaining > 0 {
                        self.skip_contents(remaining)?;
                    }
                    self.pad(size)?;
                    self.expect(")")?;
                    self.node_done()?;
                }
                State::Finished => return Ok(None),
            }
        }
    }

    fn count_node(&mut self) -> Result<(), NarError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(NarError::TooManyEntries { limit: self.limits.max_entries });
        }
        Ok(())
    }

    fn node(&mut self) -> Result<NarEvent, NarError> {
        self.count_node()?;
        self.expect("(")?;
        self.expect("type")?;
        let at = self.offset;
        let kind = self.tag("'regular', 'symlink' or 'directory'")?;
        match &kind[..] {
            b"regular" => {
                let at = self.offset;
                let mut t = self.tag("'executable' or 'contents'")?;
                let executable = t == b"executable";
                if executable {
                    self.expect("")?;
                    t = self.tag("'contents'")?;
                    if t != b"contents" {
                        return Err(bad_token(at, "'contents'", &t));
                    }
                } else if t != b"contents" {
                    return Err(bad_token(at, "'executable' or 'contents'", &t));
                }
                let size = self.u64()?;
                if size > self.limits.max_file_size {
                    return Err(NarError::FileTooLarge { size, limit: self.limits.max_file_size });
                }
                if self.offset.saturating_add(size) > self.limits.max_total_size {
                    return Err(NarError::TotalSizeExceeded { limit: self.limits.max_total_size });
                }
                self.state = State::Contents { remaining: size, size };
                Ok(NarEvent::Regular { executable, size })
            }
            b"symlink" => {
                self.expect("target")?;
                let limit = self.limits.max_symlink_target_len;
                let target =
                    self.string(limit as u64, |len| NarError::SymlinkTargetTooLong { len, limit })?;
                if target.is_empty() {
                    return Err(NarError::EmptySymlinkTarget);
                }
                if target.contains(&0) {
                    return Err(NarError::SymlinkTargetContainsNul);
                }
                self.expect(")")?;
                self.node_done()?;
                Ok(NarEvent::Symlink { target })
            }
            b"directory" => {
                if self.dirs.len() >= self.limits.max_depth {
                    return Err(NarError::TooDeep { limit: self.limits.max_depth });
                }
                self.dirs.push(None);
                self.state = State::InDirectory;
                Ok(NarEvent::DirectoryStart)
            }
            _ => Err(bad_token(at, "'regular', 'symlink' or 'directory'", &kind)),
        }
    }

    fn directory_item(&mut self) -> Result<NarEvent, NarError> {
        let at = self.offset;
        let t = self.tag("'entry' or ')'")?;
        match &t[..] {
            b")" => {
                self.dirs.pop();
                self.node_done()?;
                Ok(NarEvent::DirectoryEnd)
            }
            b"entry" => {
                self.expect("(")?;
                self.expect("name")?;
                let limit = self.limits.max_name_len;
                let name = self.string(limit as u64, |len| NarError::NameTooLong { len, limit })?;
                check_name(&name)?;
                let prev = self.dirs.last_mut().expect("inside a directory");
                if let Some(p) = prev {
                    match name[..].cmp(&p[..]) {
                        std::cmp::Ordering::Less => {
                            return Err(NarError::UnsortedEntries {
                                prev: lossy(p),
                                name: lossy(&name),
                            })
                        }
                        std::cmp::Ordering::Equal => {
                            return Err(NarError::DuplicateEntry { name: lossy(&name) })
                        }
                        std::cmp::Ordering::Greater => {}
                    }
                }
                *prev = Some(name.clone());
                self.expect("node")?;
                self.state = State::Node;
                Ok(NarEvent::Entry { name })
            }
            _ => Err(bad_token(at, "'entry' or ')'", &t)),
        }
    }

    /// After a node's `)`: close the entry around it, or finish the NAR.
    fn node_done(&mut self) -> Result<(), NarError> {
        if self.dirs.is_empty() {
            self.state = State::Finished;
            if self.check_trailing {
                let mut b = [0u8; 1];
                loop {
                    match self.r.read(&mut b) {
                        Ok(0) => break,
                        Ok(_) => return Err(NarError::TrailingData { offset: self.offset }),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(NarError::Io(e)),
                    }
                }
            }
        } else {
            self.expect(")")?;
            self.state = State::InDirectory;
        }
        Ok(())
    }

    /// Reads the current regular file's contents into `buf`; `Ok(0)` at its end. Only valid
    /// right after a [`NarEvent::Regular`].
    pub fn read_contents(&mut self, buf: &mut [u8]) -> Result<usize, NarError> {
        let State::Contents { remaining, size } = self.state else { return Ok(0) };
        if remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = remaining.min(buf.len() as u64) as usize;
        let n = loop {
            match self.r.read(&mut buf[..want]) {
                Ok(0) => return Err(NarError::UnexpectedEof { offset: self.offset }),
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NarError::Io(e)),
            }
        };
        self.offset += n as u64;
        self.state = State::Contents { remaining: remaining - n as u64, size };
        Ok(n)
    }

    fn skip_contents(&mut self, remaining: u64) -> Result<(), NarError> {
        let mut buf = [0u8; 8192];
        let mut left = remaining;
        while left > 0 {
            let n = self.read_contents(&mut buf)?;
            left -= n as u64;
        }
        Ok(())
    }

    /// Parses the rest of the NAR, discarding contents; returns its size in bytes.
    pub fn validate_to_end(&mut self) -> Result<u64, NarError> {
        while self.next_event()?.is_some() {}
        Ok(self.offset)
    }
}

fn check_name(name: &[u8]) -> Result<(), NarError> {
    match name {
        b"" => Err(NarError::EmptyName),
        b"." => Err(NarError::DotName),
        b".." => Err(NarError::DotDotName),
        _ if name.contains(&b'/') => Err(NarError::NameContainsSlash { name: lossy(name) }),
        _ if name.contains(&0) => Err(NarError::NameContainsNul { name: lossy(name) }),
        _ => Ok(()),
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn bad_token(offset: u64, expected: &'static str, found: &[u8]) -> NarError {
    NarError::UnexpectedToken { offset, expected, found: format!("{:?}", lossy(found)) }
}

impl<R: Read> Read for NarReader<R> {
    /// Reads the current file's contents (same as [`NarReader::read_contents`]).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_contents(buf).map_err(io::Error::other)
    }
}
