//! Unpacking a NAR into a new path, never writing outside it.
//!
//! Every node is created relative to an open directory descriptor, with `O_CREAT|O_EXCL|
//! O_NOFOLLOW` (files), `mkdirat` + `O_DIRECTORY|O_NOFOLLOW` (directories) and `symlinkat`, so a
//! symlink the NAR created is never followed and nothing existing is overwritten; names are
//! validated by [`NarReader`] (no `.`, `..`, `/`, NUL, duplicates). Files are created `0666`
//! (minus umask) and executables get `+x` for everyone, as Nix's `restorePath` does. With
//! [`UnpackOptions::canonical`] the result also gets Nix's canonical store metadata: files
//! `0444`/`0555`, directories `0555`, modification time 1 (symlinks too). On error the partly
//! written destination is removed.
//!
//! What is not here: choosing the destination, registering anything, ownership changes.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{openat, OFlag, AT_FDCWD};
use nix::sys::stat::{fchmod, futimens, mkdirat, utimensat, Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::symlinkat;

use super::reader::{NarError, NarEvent, NarLimits, NarReader};

/// How to unpack.
#[derive(Clone, Debug, Default)]
pub struct UnpackOptions {
    /// Limits applied while parsing.
    pub limits: NarLimits,
    /// Give the tree Nix's canonical store metadata (read-only modes, mtime 1). Directories
    /// then are `0555`: make them writable again before deleting the tree.
    pub canonical: bool,
}

/// What was unpacked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// NAR size in bytes.
    pub nar_size: u64,
    /// Regular files created.
    pub files: u64,
    /// Directories created.
    pub directories: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Bytes of file contents written.
    pub content_bytes: u64,
}

/// Why unpacking failed.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The NAR was refused.
    #[error("invalid NAR")]
    Nar(#[from] NarError),
    /// The destination has no parent directory or no file name.
    #[error("destination '{0}' must be a path with a parent directory and a file name")]
    BadDestination(PathBuf),
    /// A file-system operation failed.
    #[error("{action} '{path}'")]
    Fs {
        /// What was being done ("creating", "writing", ...).
        action: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn fs_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> UnpackError + 'a {
    move |e| UnpackError::Fs { action, path: path.to_owned(), source: io::Error::from(e) }
}

const CANONICAL_MTIME: TimeSpec = TimeSpec::new(1, 0);

/// Unpacks the NAR read from `r` at `dest`, which must not exist; its parent must. The input must
/// end with the NAR.
pub fn unpack(r: impl Read, dest: &Path, opts: &UnpackOptions) -> Result<UnpackStats, UnpackError> {
    let mut reader = NarReader::new(r, opts.limits.clone());
    unpack_from(&mut reader, dest, opts.canonical)
}

/// Like [`unpack`] with a reader the caller set up (e.g. [`NarReader::embedded`]).
pub fn unpack_from<R: Read>(
    reader: &mut NarReader<R>,
    dest: &Path,
    canonical: bool,
) -> Result<UnpackStats, UnpackError> {
    let (Some(parent), Some(name)) = (dest.parent(), dest.file_name()) else {
        return Err(UnpackError::BadDestination(dest.to_owned()));
    };
    let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
    let parent_fd = openat(
        AT_FDCWD,
        parent,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(fs_err("opening directory", parent))?;
    let mut u = Unpacker {
        dirs: vec![parent_fd],
        path: dest.to_owned(),
        dir_path: parent.to_owned(),
        name: name.as_bytes().to_vec(),
        canonical,
        stats: UnpackStats::default(),
        buf: vec![0u8; 128 * 1024],
        created_root: false,
    };
    match u.run(reader) {
        Ok(()) => {
            u.stats.nar_size = reader.offset();
            Ok(u.stats)
        }
        Err(e) => {
            if u.created_root {
                drop(u.dirs);
                remove_tree(dest);
            }
            Err(e)
        }
    }
}

struct Unpacker {
    /// Open directories: the destination's parent, then each directory being filled.
    dirs: Vec<OwnedFd>,
    /// Path of the node about to be created (for messages).
    path: PathBuf,
    /// Path of the directory being filled (for messages).
    dir_path: PathBuf,
    /// Name of the node about to be created, inside `dirs.last()`.
    name: Vec<u8>,
    canonical: bool,
    stats: UnpackStats,
    buf: Vec<u8>,
    created_root: bool,
}

impl Unpacker {
    fn run<R: Read>(&mut self, reader: &mut NarReader<R>) -> Result<(), UnpackError> {
        while let Some(ev) = reader.next_event()? {
            match ev {
                NarEvent::Regular { executable, .. } => self.regular(reader, executable)?,
                NarEvent::Symlink { target } => {
                    let dir = self.dirs.last().expect("parent").as_fd();
                    symlinkat(&target[..], dir, &self.name[..])
                        .map_err(fs_err("creating symlink", &self.path))?;
                    self.created_root = true;
                    if self.canonical {
                        utimensat(
                            dir,
                            &self.name[..],
                            &TimeSpec::UTIME_OMIT,
                            &CANONICAL_MTIME,
                            UtimensatFlags::NoFollowSymlink,
                        )
                        .map_err(fs_err("setting the time of", &self.path))?;
                    }
                    self.stats.symlinks += 1;
                }
                NarEvent::DirectoryStart => {
                    let dir = self.dirs.last().expect("parent").as_fd();
                    mkdirat(dir, &self.name[..], Mode::from_bits_truncate(0o777))
                        .map_err(fs_err("creating directory", &self.path))?;
                    self.created_root = true;
                    let fd = openat(
                        dir,
                        &self.name[..],
                        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(fs_err("opening directory", &self.path))?;
                    self.dirs.push(fd);
                    self.dir_path = self.path.clone();
                    self.stats.directories += 1;
                }
                NarEvent::Entry { name } => {
                    self.path = self.dir_path.join(std::ffi::OsStr::from_bytes(&name));
                    self.name = name;
                }
                NarEvent::DirectoryEnd => {
                    let fd = self.dirs.pop().expect("directory");
                    self.path = self.dir_path.clone();
                    self.dir_path.pop();
                    if self.canonical {
                        fchmod(&fd, Mode::from_bits_truncate(0o555))
                            .map_err(fs_err("setting the mode of", &self.path))?;
                        futimens(&fd, &TimeSpec::UTIME_OMIT, &CANONICAL_MTIME)
                            .map_err(fs_err("setting the time of", &self.path))?;
                    }
                }
            }
        }
        Ok(())
    }

    fn regular<R: Read>(
        &mut self,
        reader: &mut NarReader<R>,
        executable: bool,
    ) -> Result<(), UnpackError> {
        let dir = self.dirs.last().expect("parent").as_fd();
        let fd = openat(
            dir,
            &self.name[..],
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o666),
        )
        .map_err(fs_err("creating file", &self.path))?;
        self.created_root = true;
        let mut file = File::from(fd);
        loop {
            let n = reader.read_contents(&mut self.buf)?;
            if n == 0 {
                break;
            }
            file.write_all(&self.buf[..n]).map_err(|source| UnpackError::Fs {
                action: "writing",
                path: self.path.clone(),
                source,
            })?;
            self.stats.content_bytes += n as u64;
        }
        if executable || self.canonical {
            let mode = file
                .metadata()
                .map_err(|source| UnpackError::Fs {
                    action: "reading the mode of",
                    path: self.path.clone(),
                    source,
                })?
                .permissions()
                .mode()
                & 0o7777;
            let mode = match (self.canonical, executable) {
                (true, true) => 0o555,
                (true, false) => 0o444,
                (false, _) => mode | 0o111,
            };
            fchmod(&file, Mode::from_bits_truncate(mode))
                .map_err(fs_err("setting the mode of", &self.path))?;
        }
        if self.canonical {
            futimens(&file, &TimeSpec::UTIME_OMIT, &CANONICAL_MTIME)
                .map_err(fs_err("setting the time of", &self.path))?;
        }
        self.stats.files += 1;
        Ok(())
    }
}

/// Best-effort removal of a partly unpacked tree (making read-only directories writable first).
fn remove_tree(path: &Path) {
    fn walk(p: &Path) {
        let Ok(md) = std::fs::symlink_metadata(p) else { return };
        if md.is_dir() {
            let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700));
            if let Ok(rd) = std::fs::read_dir(p) {
                for e in rd.flatten() {
                    walk(&e.path());
                }
            }
            let _ = std::fs::remove_dir(p);
        } else {
            let _ = std::fs::remove_file(p);
        }
    }
    walk(path);
}
