//! Uploads the way Nix's HTTP binary cache store makes them (`nix copy --to
//! 'http://HOST:PORT?compression=none' PATHS`): for each path, `PUT nar/<nix32 file hash>.nar`,
//! then `PUT <hash>.narinfo`.
//!
//! - A NAR is **staged** ([`Staging::put_nar`]): received into `<state>/serve/staging/` under a
//!   temporary name, its SHA-256 and length checked against the name it was sent under (the
//!   file hash of an uncompressed NAR), then renamed into its uploader's directory. A staged NAR
//!   is nothing: it is not in the content store and is never served.
//! - **The bound** on staging (the content store's size) is kept by a ledger, not by listing the
//!   directory: an upload reserves its `Content-Length` under a lock before its first byte is
//!   written, and gives it back if it fails, or when its NAR is taken; so concurrent uploads can
//!   never together pass the bound (two of them used to both see the same listing).
//! - **Staged NARs belong to their uploader** ([`Uploader`]: the credential it presented — the
//!   trusted token, the access token, or none — and its IP address). A narinfo may name only
//!   its own uploader's staged NAR, or a NAR the binary cache already publishes (public bytes,
//!   which Nix's `nix copy` names without uploading when `HEAD nar/…` finds them, and which any
//!   client could fetch and upload itself); never another client's staged NAR, which it could
//!   otherwise consume (making the owner's narinfo fail) or use as an oracle of what others are
//!   uploading. Nix sends a path's NAR and narinfo from one process, possibly on two connections
//!   (its transfer pool), so the binding is not to a connection. Clients sharing a credential and
//!   an address (behind one proxy, one token) are one uploader to vouch.
//! - Its narinfo makes it an upload ([`Staging::take`]): `Compression: none` (anything else is
//!   refused, naming it), a `URL` naming a NAR as above, `FileHash`/`FileSize` equal to
//!   `NarHash`/`NarSize`. The path then goes through the same checked path as a Nix-protocol
//!   upload: `ContentStore::add` with the store's upload rules (NAR parsed, NAR hash and size,
//!   claimed content address recomputed, references valid), and is consumed from staging
//!   whatever the outcome.
//! - Uploaded paths go to the **content store** only, never to the trace store: they are inputs,
//!   not attested outputs, and are never served as signed cache entries.
//!
//! What is not here: HTTP ([`super::http`]), the content store's checks (`crate::store`).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use nix_formats::hash::HashAlgo;
use nix_formats::narinfo::NarInfo;
use sha2::{Digest, Sha256};

use crate::core::ValidPathInfo;

use super::auth::Caller;
use super::ApiError;

/// File extensions of compressed NARs, and the compression they mean.
const COMPRESSED: &[(&str, &str)] = &[
    (".xz", "xz"),
    (".bz2", "bzip2"),
    (".zst", "zstd"),
    (".br", "br"),
    (".gz", "gzip"),
    (".lz4", "lz4"),
];

/// How to upload, for error messages.
pub const HOW: &str = "upload with `nix copy --to 'http://HOST:PORT?compression=none' …`";

/// Who staged a NAR (see the module docs): a directory name derived from the credential class
/// and the IP address, never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Uploader(String);

impl Uploader {
    /// The uploader `caller` connecting from `peer`.
    pub fn new(caller: &Caller, peer: IpAddr) -> Uploader {
        let class = if caller.trusted {
            "trusted"
        } else if caller.authenticated {
            "token"
        } else {
            "open"
        };
        let digest = Sha256::digest(format!("{class} {peer}").as_bytes());
        Uploader(format!("u-{}", hex::encode(&digest[..8])))
    }
}

/// Bytes held in staging: reserved by uploads being received and by staged NARs.
#[derive(Debug, Default)]
struct Ledger {
    reserved: u64,
    staged: HashMap<PathBuf, u64>,
}

/// The staging directory of NARs waiting for their narinfo.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    counter: AtomicU64,
    ledger: Mutex<Ledger>,
}

fn io500(what: String) -> impl FnOnce(std::io::Error) -> ApiError {
    move |e| ApiError::new(500, format!("{what}: {e}"))
}

impl Staging {
    /// Open `dir`, emptying it (staged NARs of an earlier run never got their narinfo here).
    pub fn open(dir: &Path) -> Result<Staging, std::io::Error> {
        if dir.exists() {
            fs::remove_dir_all(dir)?;
        }
        fs::create_dir_all(dir)?;
        Ok(Staging { dir: dir.to_owned(), counter: AtomicU64::new(0), ledger: Mutex::default() })
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where `uploader`'s NAR `name` is staged.
    fn staged_path(&self, uploader: &Uploader, name: &str) -> PathBuf {
        self.dir.join(&uploader.0).join(name)
    }

    /// Reserve `len` bytes for `name`, unless that would take staging past `max`.
    fn reserve(&self, name: &str, len: u64, max: u64) -> Result<(), ApiError> {
        let mut l = self.ledger();
        if l.reserved.saturating_add(len) > max {
            return Err(ApiError::new(
                507,
                format!(
                    "nar/{name}: {} bytes of NARs already wait for their narinfo or are being \
                     received; {len} more exceed the bound of {max} bytes",
                    l.reserved
                ),
            ));
        }
        l.reserved += len;
        Ok(())
    }

    /// Receive `uploader`'s NAR `name` (`<nix32 sha256>.nar`) of `len` bytes from `body`,
    /// refusing more than `max` bytes in staging at once (reserved before the first byte).
    pub fn put_nar(
        &self,
        uploader: &Uploader,
        name: &str,
        body: &mut dyn Read,
        len: u64,
        max: u64,
    ) -> Result<(), ApiError> {
        let Some(stem) = name.strip_suffix(".nar") else {
            if let Some((ext, comp)) = COMPRESSED.iter().find(|(e, _)| name.ends_with(e)) {
                return Err(ApiError::new(
                    415,
                    format!(
                        "nar/{name} is compressed ({comp}, `{ext}`): vouch accepts uncompressed NARs \
                         only; {HOW}"
                    ),
                ));
            }
            return Err(ApiError::new(400, format!("nar/{name}: expected nar/<nix32 hash>.nar")));
        };
        let want = nix_formats::hash::Hash::parse_digest(HashAlgo::Sha256, stem).map_err(|e| {
            ApiError::new(400, format!("nar/{name}: the name is not a nix32 SHA-256 ({e})"))
        })?;
        if len > max {
            return Err(ApiError::new(
                413,
                format!("nar/{name} ({len} bytes) is larger than the content store's bound ({max} bytes)"),
            ));
        }
        self.reserve(name, len, max)?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!("tmp-{n}"));
        let result = (|| {
            let mut f = File::create(&tmp).map_err(io500(format!("creating {}", tmp.display())))?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 16];
            let mut got = 0u64;
            loop {
                let k = body
                    .read(&mut buf)
                    .map_err(|e| ApiError::new(400, format!("receiving nar/{name}: {e}")))?;
                if k == 0 {
                    break;
                }
                got += k as u64;
                h.update(&buf[..k]);
                f.write_all(&buf[..k]).map_err(io500(format!("writing {}", tmp.display())))?;
            }
            if got != len {
                return Err(ApiError::new(
                    400,
                    format!("nar/{name}: the body ended after {got} of {len} bytes"),
                ));
            }
            let digest: [u8; 32] = h.finalize().into();
            if digest[..] != *want.digest() {
                return Err(ApiError::new(
                    400,
                    format!(
                        "nar/{name}: its SHA-256 is {}, not the one its name says; nothing was staged",
                        nix_formats::base32::encode(&digest)
                    ),
                ));
            }
            let dest = self.staged_path(uploader, name);
            let parent = dest.parent().unwrap_or(&self.dir);
            fs::create_dir_all(parent).map_err(io500(format!("creating {}", parent.display())))?;
            fs::rename(&tmp, &dest).map_err(io500(format!("staging nar/{name}")))?;
            Ok(dest)
        })();
        let mut l = self.ledger();
        match result {
            Ok(dest) => {
                // The same uploader sent the same NAR again: the older copy was replaced.
                if let Some(old) = l.staged.insert(dest, len) {
                    l.reserved -= old;
                }
                Ok(())
            }
            Err(e) => {
                l.reserved -= len;
                drop(l);
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Check `uploader`'s narinfo for path `hash` against the NAR it names and take that NAR out
    /// of `uploader`'s staging: the path's info, the file holding its NAR, and whether that file
    /// is the caller's to remove once registered. Nix skips the NAR upload when `HEAD nar/<name>`
    /// finds it: then the NAR is the binary cache's own file in `cache_nar_dir` (read, never
    /// removed; the content store checks it like any upload). Another uploader's staged NAR is
    /// never used.
    pub fn take(
        &self,
        uploader: &Uploader,
        hash: &str,
        info: &NarInfo,
        cache_nar_dir: &Path,
    ) -> Result<(ValidPathInfo, PathBuf, bool), ApiError> {
        let path = &info.store_path;
        if path.hash_part() != hash {
            return Err(ApiError::new(
                400,
                format!("{hash}.narinfo describes {path}, whose hash part is not {hash}"),
            ));
        }
        match info.compression.as_deref() {
            Some("none") => {}
            other => {
                return Err(ApiError::new(
                    415,
                    format!(
                        "{hash}.narinfo: Compression {} (Nix reads an absent one as bzip2): vouch \
                         accepts uncompressed NARs only; {HOW}",
                        other.unwrap_or("absent")
                    ),
                ))
            }
        }
        let name =
            info.url.strip_prefix("nar/").filter(|n| !n.contains('/') && !n.starts_with('.'));
        let Some(name) = name else {
            return Err(ApiError::new(
                400,
                format!("{hash}.narinfo: URL {:?} is not nar/<name>", info.url),
            ));
        };
        let staged = self.staged_path(uploader, name);
        let in_cache = cache_nar_dir.join(name);
        let (staged, owned) = if staged.is_file() || !in_cache.is_file() {
            (staged, true)
        } else {
            (in_cache, false)
        };
        if !name.ends_with(".nar") || name.starts_with("tmp-") || !staged.is_file() {
            return Err(ApiError::new(
                409,
                format!(
                    "{hash}.narinfo: its NAR {} was not uploaded before it by this client (a \
                     narinfo may name only a NAR its own client staged, same credential and \
                     address, or one the cache publishes; PUT the NAR first)",
                    info.url
                ),
            ));
        }
        let nar_hash = info.nar_hash.sha256_bytes().map(build_trace::NarHash).map_err(|e| {
            ApiError::new(400, format!("{hash}.narinfo: NarHash is not SHA-256 ({e})"))
        })?;
        if info.file_hash.as_ref().is_some_and(|f| *f != info.nar_hash)
            || info.file_size.is_some_and(|s| s != info.nar_size)
        {
            return Err(ApiError::new(
                400,
                format!("{hash}.narinfo: FileHash/FileSize differ from NarHash/NarSize, but the NAR is uncompressed"),
            ));
        }
        let taken = if owned {
            let taken =
                self.dir.join(format!("tmp-take-{}", self.counter.fetch_add(1, Ordering::Relaxed)));
            fs::rename(&staged, &taken).map_err(|_| {
                ApiError::new(
                    409,
                    format!("{hash}.narinfo: its NAR {} was taken by another upload", info.url),
                )
            })?;
            let mut l = self.ledger();
            if let Some(len) = l.staged.remove(&staged) {
                l.reserved -= len;
            }
            taken
        } else {
            staged
        };
        let pi = ValidPathInfo {
            path: path.clone(),
            info: build_trace::PathInfo {
                nar_hash,
                nar_size: info.nar_size,
                references: info.references.clone(),
                ca: info.ca.clone(),
            },
            deriver: info.deriver.clone(),
            registration_time: crate::store::db::now().max(0) as u64,
            ultimate: false,
            sigs: info.sigs.iter().map(|s| s.to_string()).collect(),
        };
        Ok((pi, taken, owned))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix_formats::hash::Hash;
    use nix_formats::StorePath;

    fn nar() -> (Vec<u8>, [u8; 32], String) {
        let mut w = nix_formats::nar::NarWriter::new(Vec::new()).unwrap();
        w.regular(false, b"staged").unwrap();
        let nar = w.into_inner();
        let h: [u8; 32] = Sha256::digest(&nar).into();
        let name = format!("{}.nar", nix_formats::base32::encode(&h));
        (nar, h, name)
    }

    fn info(name: &str, h: [u8; 32], size: usize) -> NarInfo {
        NarInfo {
            store_path: StorePath::from_parts([3; 20], "p").unwrap(),
            url: format!("nar/{name}"),
            compression: Some("none".into()),
            file_hash: Some(Hash::sha256(h)),
            file_size: Some(size as u64),
            nar_hash: Hash::sha256(h),
            nar_size: size as u64,
            references: Default::default(),
            deriver: None,
            system: None,
            sigs: Vec::new(),
            ca: None,
        }
    }

    fn uploader(ip: &str) -> Uploader {
        Uploader::new(&Caller::default(), ip.parse().unwrap())
    }

    #[test]
    fn staging_is_bounded_and_a_nar_already_in_the_cache_is_used_in_place() {
        let t = tempfile::tempdir().unwrap();
        let st = Staging::open(&t.path().join("staging")).unwrap();
        let a = uploader("127.0.0.1");
        let (nar, h, name) = nar();
        let len = nar.len() as u64;
        st.put_nar(&a, &name, &mut &nar[..], len, len).unwrap();
        let e = st.put_nar(&a, &name, &mut &nar[..], len, len).unwrap_err();
        assert_eq!(e.status, 507, "{e}");
        let e = st.put_nar(&a, &name, &mut &nar[..len as usize - 1], len, 10 * len).unwrap_err();
        assert_eq!(e.status, 400, "a short body: {e}");
        // The same NAR again replaces the staged copy: counted once.
        st.put_nar(&a, &name, &mut &nar[..], len, 2 * len).unwrap();
        assert_eq!(st.ledger().reserved, len);
        let i = info(&name, h, nar.len());
        let hp = i.store_path.hash_part().to_owned();
        let cache_nar = t.path().join("cache/nar");
        let (pi, file, owned) = st.take(&a, &hp, &i, &cache_nar).unwrap();
        assert!(owned && file.starts_with(t.path().join("staging")));
        assert_eq!((pi.info.nar_hash.0, pi.info.nar_size), (h, len));
        assert_eq!(st.ledger().reserved, 0, "taken: no longer counted");
        // Taken: a second narinfo finds nothing, unless the cache has the NAR (Nix skipped the
        // upload after `HEAD nar/…` found it there).
        assert_eq!(st.take(&a, &hp, &i, &cache_nar).unwrap_err().status, 409);
        fs::create_dir_all(&cache_nar).unwrap();
        fs::write(cache_nar.join(&name), &nar).unwrap();
        let (_, file, owned) = st.take(&a, &hp, &i, &cache_nar).unwrap();
        assert!(!owned && file == cache_nar.join(&name));
        let mut wrong = i.clone();
        wrong.file_size = Some(1);
        assert_eq!(st.take(&a, &hp, &wrong, &cache_nar).unwrap_err().status, 400);
    }

    #[test]
    fn a_staged_nar_is_its_uploaders_alone() {
        let t = tempfile::tempdir().unwrap();
        let st = Staging::open(&t.path().join("staging")).unwrap();
        let (nar, h, name) = nar();
        let len = nar.len() as u64;
        let (a, b) = (uploader("192.0.2.1"), uploader("192.0.2.2"));
        let trusted_a = Uploader::new(
            &Caller { access: true, authenticated: true, trusted: true },
            "192.0.2.1".parse().unwrap(),
        );
        assert!(a != b && a != trusted_a, "address and credential both count");
        st.put_nar(&a, &name, &mut &nar[..], len, 10 * len).unwrap();
        let i = info(&name, h, nar.len());
        let hp = i.store_path.hash_part().to_owned();
        let none = t.path().join("no-cache");
        for other in [&b, &trusted_a] {
            let e = st.take(other, &hp, &i, &none).unwrap_err();
            assert_eq!(e.status, 409, "{e}");
            assert!(e.to_string().contains("by this client"), "{e}");
        }
        assert!(st.take(&a, &hp, &i, &none).is_ok(), "still there for its uploader");
    }
}
