//! A deterministic writer for the `newc` cpio format (what the Linux initramfs unpacker reads).
//!
//! What is here: [`Entry`] (directory, regular file, symlink, character device) and
//! [`write_newc`], which sorts entries by path, numbers inodes in that order, and writes fixed
//! metadata (uid/gid 0, mtime 0, one link) so the same entries always give the same bytes.
//!
//! What is not here: reading cpio archives, compression, hard links.

use std::collections::BTreeMap;
use std::io::{self, Write};

/// Errors from building an archive.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// A path is empty, absolute, has an empty, `.` or `..` component, or contains NUL.
    #[error("invalid cpio entry path {0:?}")]
    BadPath(String),
    /// The same path was given twice.
    #[error("duplicate cpio entry {0:?}")]
    Duplicate(String),
    /// An entry's parent directory is not in the archive.
    #[error("cpio entry {0:?} has no parent directory entry")]
    MissingParent(String),
    /// A file is larger than newc's 32-bit size field.
    #[error("cpio entry {0:?} is too large for the newc format")]
    TooLarge(String),
    /// Writing failed.
    #[error("writing cpio archive")]
    Io(#[from] io::Error),
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file with these contents.
    File(Vec<u8>),
    /// A symbolic link to this target.
    Symlink(String),
    /// A character device node.
    CharDev {
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
}

/// One archive member: a relative path (no leading `/`), permission bits and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path relative to the archive root, `/`-separated.
    pub path: String,
    /// Permission bits (`0o755` etc.); the file type bits are added from `kind`.
    pub perm: u32,
    /// What the entry is.
    pub kind: Kind,
}

impl Entry {
    /// A directory.
    pub fn dir(path: &str, perm: u32) -> Self {
        Entry { path: path.to_owned(), perm, kind: Kind::Dir }
    }
    /// A regular file.
    pub fn file(path: &str, perm: u32, data: Vec<u8>) -> Self {
        Entry { path: path.to_owned(), perm, kind: Kind::File(data) }
    }
    /// A character device.
    pub fn char_dev(path: &str, perm: u32, major: u32, minor: u32) -> Self {
        Entry { path: path.to_owned(), perm, kind: Kind::CharDev { major, minor } }
    }
    /// A symbolic link.
    pub fn symlink(path: &str, target: &str) -> Self {
        Entry { path: path.to_owned(), perm: 0o777, kind: Kind::Symlink(target.to_owned()) }
    }

    fn mode(&self) -> u32 {
        let ty = match self.kind {
            Kind::Dir => 0o040000,
            Kind::File(_) => 0o100000,
            Kind::Symlink(_) => 0o120000,
            Kind::CharDev { .. } => 0o020000,
        };
        ty | (self.perm & 0o7777)
    }
}

fn check_path(path: &str) -> Result<(), CpioError> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\0')
        || path.split('/').any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(CpioError::BadPath(path.to_owned()));
    }
    Ok(())
}

/// Write `entries` as a newc archive (sorted by path, inodes 1.., uid/gid 0, mtime 0) followed
/// by the `TRAILER!!!` record. Every parent directory must be an entry itself.
pub fn write_newc(entries: &[Entry], out: &mut impl Write) -> Result<(), CpioError> {
    let mut sorted: BTreeMap<&str, &Entry> = BTreeMap::new();
    for e in entries {
        check_path(&e.path)?;
        if sorted.insert(e.path.as_str(), e).is_some() {
            return Err(CpioError::Duplicate(e.path.clone()));
        }
    }
    for path in sorted.keys() {
        if let Some((parent, _)) = path.rsplit_once('/') {
            match sorted.get(parent) {
                Some(p) if p.kind == Kind::Dir => {}
                _ => return Err(CpioError::MissingParent((*path).to_owned())),
            }
        }
    }
    for (ino, (path, entry)) in sorted.iter().enumerate() {
        let data: &[u8] = match &entry.kind {
            Kind::File(d) => d,
            Kind::Symlink(t) => t.as_bytes(),
            Kind::Dir | Kind::CharDev { .. } => &[],
        };
        let size =
            u32::try_from(data.len()).map_err(|_| CpioError::TooLarge((*path).to_owned()))?;
        let (rmaj, rmin) = match entry.kind {
            Kind::CharDev { major, minor } => (major, minor),
            _ => (0, 0),
        };
        let nlink = if entry.kind == Kind::Dir { 2 } else { 1 };
        let ino = u32::try_from(ino + 1).map_err(|_| CpioError::TooLarge((*path).to_owned()))?;
        write_record(out, path, ino, entry.mode(), nlink, size, rmaj, rmin)?;
        out.write_all(data)?;
        pad4(out, data.len())?;
    }
    write_record(out, "TRAILER!!!", 0, 0, 1, 0, 0, 0)?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn write_record(
    out: &mut impl Write,
    name: &str,
    ino: u32,
    mode: u32,
    nlink: u32,
    size: u32,
    rdev_major: u32,
    rdev_minor: u32,
) -> io::Result<()> {
    let namesize = name.len() + 1;
    // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
    // rdevminor, namesize, check
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}\
         {rdev_major:08x}{rdev_minor:08x}{namesize:08x}{:08x}",
        0, 0, 0, 0, 0, 0
    );
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    pad4(out, header.len() + namesize)
}

fn pad4(out: &mut impl Write, len: usize) -> io::Result<()> {
    let pad = (4 - len % 4) % 4;
    out.write_all(&[0u8; 3][..pad])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Entry> {
        vec![
            Entry::file("init", 0o755, b"#!agent".to_vec()),
            Entry::dir("dev", 0o755),
            Entry::char_dev("dev/console", 0o600, 5, 1),
            Entry::dir("nix", 0o755),
            Entry::dir("nix/store", 0o755),
            Entry::symlink("sh", "/init"),
        ]
    }

    #[test]
    fn same_entries_in_any_order_give_identical_bytes() {
        let mut a = Vec::new();
        write_newc(&sample(), &mut a).unwrap();
        let mut rev = sample();
        rev.reverse();
        let mut b = Vec::new();
        write_newc(&rev, &mut b).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len() % 4, 0);
    }

    #[test]
    fn header_layout_matches_newc() {
        let mut out = Vec::new();
        write_newc(&[Entry::file("a", 0o644, b"xyz".to_vec())], &mut out).unwrap();
        let hdr = std::str::from_utf8(&out[..110]).unwrap();
        assert_eq!(&hdr[..6], "070701");
        assert_eq!(&hdr[6..14], "00000001", "ino");
        assert_eq!(&hdr[14..22], "000081a4", "mode 0100644");
        assert_eq!(&hdr[54..62], "00000003", "filesize");
        assert_eq!(&hdr[94..102], "00000002", "namesize incl. NUL");
        // name "a\0" then pad to 112, data "xyz" then pad to 116
        assert_eq!(&out[110..112], b"a\0");
        assert_eq!(&out[112..115], b"xyz");
        assert_eq!(out[115], 0);
        assert!(std::str::from_utf8(&out[116..]).unwrap().contains("TRAILER!!!"));
    }

    /// The system `cpio` tool (installed by setup-host.sh) must list what we wrote.
    #[test]
    fn gnu_cpio_reads_the_archive() {
        let mut out = Vec::new();
        write_newc(&sample(), &mut out).unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("cpio must be installed (scripts/setup-host.sh)");
        child.stdin.take().unwrap().write_all(&out).unwrap();
        let listing = child.wait_with_output().unwrap();
        assert!(listing.status.success());
        let text = String::from_utf8(listing.stdout).unwrap();
        let names: Vec<&str> = text
            .lines()
            .map(|l| l.split(" -> ").next().unwrap_or(""))
            .map(|l| l.rsplit(' ').next().unwrap_or(""))
            .collect();
        assert_eq!(names, ["dev", "dev/console", "init", "nix", "nix/store", "sh"]);
        assert!(text.contains("sh -> /init"), "{text}");
        assert!(text.contains("-rwxr-xr-x"), "{text}");
        assert!(text.contains("crw-------"), "{text}");
    }

    #[test]
    fn rejects_bad_paths_duplicates_and_orphans() {
        let mut sink = Vec::new();
        for bad in ["", "/abs", "a/../b", "a//b", "./a"] {
            let r = write_newc(&[Entry::dir(bad, 0o755)], &mut sink);
            assert!(matches!(r, Err(CpioError::BadPath(_))), "{bad:?}");
        }
        let dup = [Entry::dir("a", 0o755), Entry::dir("a", 0o700)];
        assert!(matches!(write_newc(&dup, &mut sink), Err(CpioError::Duplicate(_))));
        let orphan = [Entry::file("x/y", 0o644, vec![])];
        assert!(matches!(write_newc(&orphan, &mut sink), Err(CpioError::MissingParent(_))));
    }
}
