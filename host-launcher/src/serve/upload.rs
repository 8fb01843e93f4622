//! Uploads the way Nix's HTTP binary cache store makes them (`nix copy --to http://HOST:PORT
//! PATHS`, with Nix's default xz compression, `?compression=zstd` or `?compression=none`): for
//! each path, `PUT nar/<nix32 file hash>.nar[.xz|.zst]`, then `PUT <hash>.narinfo`.
//!
//! - A NAR is **staged** ([`Staging::put_nar`]): received into `<state>/serve/staging/` under a
//!   temporary name, its SHA-256 and length checked against the name it was sent under (the
//!   file hash: of the compressed bytes when compressed), then renamed into its uploader's
//!   directory. A staged NAR is nothing: it is not in the content store and is never served.
//!   It is **not decompressed** yet: what it must decompress to is not known before its narinfo.
//! - **The bound** on staging (the content store's size) is kept by a ledger, not by listing the
//!   directory: an upload reserves its `Content-Length` under a lock before its first byte is
//!   written, and gives it back if it fails, or when its NAR is taken; so concurrent uploads can
//!   never together pass the bound (two of them used to both see the same listing). A
//!   decompression reserves its narinfo's `NarSize` the same way, until its path is registered.
//! - **Staged NARs belong to their uploader** ([`Uploader`]: the token it presented, or none,
//!   and its IP address). A narinfo may name only its own uploader's staged NAR, or a NAR the
//!   binary cache already publishes (public bytes, which Nix's `nix copy` names without
//!   uploading when `HEAD nar/…` finds them, and which any client could fetch and upload
//!   itself); never another client's staged NAR, which it could otherwise consume (making the
//!   owner's narinfo fail) or use as an oracle of what others are uploading. Nix sends a path's
//!   NAR and narinfo from one process, possibly on two connections (its transfer pool), so the
//!   binding is not to a connection. Clients sharing a token and an address (behind one proxy)
//!   are one uploader to vouch.
//! - Its narinfo makes it an upload ([`Staging::take`]): `Compression` `none`, `xz` or `zstd`,
//!   matching the NAR's name (anything else is refused, naming it), a `URL` naming a NAR as
//!   above, `FileHash`/`FileSize` those of the staged file. A compressed NAR is then
//!   decompressed, **stopping at `NarSize`**: a stream that decompresses to more is refused
//!   after `NarSize + 1` bytes (no decompression bombs), one that decompresses to less too; the
//!   xz decoder's memory is bounded ([`XZ_MEMLIMIT`]), zstd's window by its decoder (100 MiB).
//!   The path then goes through the same checked path as a Nix-protocol upload:
//!   `ContentStore::add` with the store's upload rules (NAR parsed, NAR hash and size, claimed
//!   content address recomputed, references valid), and is consumed from staging whatever the
//!   outcome.
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

/// The compressions accepted: a NAR's file extension and the narinfo's `Compression`.
const ACCEPTED: &[(&str, &str)] = &[(".nar", "none"), (".nar.xz", "xz"), (".nar.zst", "zstd")];

/// Most memory the xz decoder may use (Nix's default preset needs 9 MiB; `xz -9e` 65 MiB).
pub const XZ_MEMLIMIT: u64 = 128 << 20;

/// How to upload, for error messages.
pub const HOW: &str =
    "upload with `nix copy --to 'http://HOST:PORT' …` (compression xz, zstd or none)";

/// The compression a NAR file name says, and its file hash (nix32), if it is one vouch accepts.
fn split_name(name: &str) -> Option<(&'static str, &str)> {
    ACCEPTED.iter().find_map(|(ext, comp)| name.strip_suffix(ext).map(|stem| (*comp, stem)))
}

/// Who staged a NAR (see the module docs): a directory name derived from the credential class
/// and the IP address, never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Uploader(String);

impl Uploader {
    /// The uploader `caller` connecting from `peer`.
    pub fn new(caller: &Caller, peer: IpAddr) -> Uploader {
        let class = match caller.token {
            Some(i) => format!("token {i}"),
            None => "anonymous".into(),
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
    max_bytes: u64,
}

fn io500(what: String) -> impl FnOnce(std::io::Error) -> ApiError {
    move |e| ApiError::new(500, format!("{what}: {e}"))
}

impl Staging {
    /// Open `dir`, emptying it (staged NARs of an earlier run never got their narinfo here);
    /// decompressed NARs are bounded by `max_bytes` (the content store's size).
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Staging, std::io::Error> {
        if dir.exists() {
            fs::remove_dir_all(dir)?;
        }
        fs::create_dir_all(dir)?;
        Ok(Staging {
            dir: dir.to_owned(),
            counter: AtomicU64::new(0),
            ledger: Mutex::default(),
            max_bytes,
        })
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
        let Some((_, stem)) = split_name(name) else {
            if name.contains(".nar.") {
                return Err(ApiError::new(
                    415,
                    format!(
                        "nar/{name}: vouch accepts NARs compressed with xz (.nar.xz) or zstd \
                         (.nar.zst), or uncompressed (.nar); {HOW}"
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
        let tmp = self.tmp("put");
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
    /// of `uploader`'s staging, decompressed (see the module docs): the path's info and the
    /// file holding its NAR ([`Taken`]; dropping it removes what is the service's to remove).
    /// Nix skips the NAR upload when `HEAD nar/…` finds it: then the NAR is the binary cache's
    /// own file in `cache_nar_dir` (read, never removed; the content store checks it like any
    /// upload). Another uploader's staged NAR is never used.
    pub fn take(
        &self,
        uploader: &Uploader,
        hash: &str,
        info: &NarInfo,
        cache_nar_dir: &Path,
    ) -> Result<Taken<'_>, ApiError> {
        let path = &info.store_path;
        if path.hash_part() != hash {
            return Err(ApiError::new(
                400,
                format!("{hash}.narinfo describes {path}, whose hash part is not {hash}"),
            ));
        }
        let name =
            info.url.strip_prefix("nar/").filter(|n| !n.contains('/') && !n.starts_with('.'));
        let Some(name) = name else {
            return Err(ApiError::new(
                400,
                format!("{hash}.narinfo: URL {:?} is not nar/<name>", info.url),
            ));
        };
        let compression = info.compression.as_deref().unwrap_or("bzip2");
        let Some((named, _)) = split_name(name) else {
            return Err(ApiError::new(
                415,
                format!(
                    "{hash}.narinfo: URL {} is not a NAR vouch accepts (.nar, .nar.xz, .nar.zst); {HOW}",
                    info.url
                ),
            ));
        };
        if named != compression {
            return Err(ApiError::new(
                415,
                format!(
                    "{hash}.narinfo: Compression {compression} (Nix reads an absent one as bzip2) \
                     but its URL {} is a {named} NAR; vouch accepts xz, zstd and none, each with \
                     its own extension; {HOW}",
                    info.url
                ),
            ));
        }
        let staged = self.staged_path(uploader, name);
        let in_cache = cache_nar_dir.join(name);
        let (staged, owned) = if staged.is_file() || !in_cache.is_file() {
            (staged, true)
        } else {
            (in_cache, false)
        };
        if name.starts_with("tmp-") || !staged.is_file() {
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
        check_file_fields(hash, info, name, compression, &staged)?;
        let plain = compression == "none";
        let mut taken = if owned {
            let tmp = self.tmp("take");
            fs::rename(&staged, &tmp).map_err(|_| {
                ApiError::new(
                    409,
                    format!("{hash}.narinfo: its NAR {} was taken by another upload", info.url),
                )
            })?;
            let mut l = self.ledger();
            if let Some(len) = l.staged.remove(&staged) {
                l.reserved -= len;
            }
            Taken { staging: self, file: tmp, owned: true, reserved: 0, pi: None }
        } else {
            Taken { staging: self, file: staged, owned: false, reserved: 0, pi: None }
        };
        if !plain {
            taken = self.decompress(taken, compression, info.nar_size, &info.url)?;
        }
        taken.pi = Some(ValidPathInfo {
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
        });
        Ok(taken)
    }

    fn tmp(&self, what: &str) -> PathBuf {
        self.dir.join(format!("tmp-{what}-{}", self.counter.fetch_add(1, Ordering::Relaxed)))
    }

    /// Decompress `compressed` into a new staged file of exactly `nar_size` bytes, reserving
    /// them first; `compressed` is dropped (removed) either way.
    fn decompress<'a>(
        &'a self,
        compressed: Taken<'a>,
        compression: &str,
        nar_size: u64,
        url: &str,
    ) -> Result<Taken<'a>, ApiError> {
        let max = self.max_bytes;
        if nar_size > max {
            return Err(ApiError::new(
                413,
                format!("{url}: NarSize {nar_size} is larger than the content store's bound ({max} bytes)"),
            ));
        }
        self.reserve(url.trim_start_matches("nar/"), nar_size, max)?;
        let out = Taken {
            staging: self,
            file: self.tmp("nar"),
            owned: true,
            reserved: nar_size,
            pi: None,
        };
        let src = File::open(&compressed.file)
            .map_err(io500(format!("opening {}", compressed.file.display())))?;
        let src = std::io::BufReader::with_capacity(1 << 16, src);
        let bad = |e: std::io::Error| {
            ApiError::new(400, format!("{url}: decompressing ({compression}): {e}"))
        };
        let mut reader: Box<dyn Read> = match compression {
            "xz" => {
                let stream = liblzma::stream::Stream::new_stream_decoder(
                    XZ_MEMLIMIT,
                    liblzma::stream::CONCATENATED,
                )
                .map_err(|e| ApiError::new(500, format!("the xz decoder: {e}")))?;
                Box::new(liblzma::read::XzDecoder::new_stream(src, stream))
            }
            _ => Box::new(
                ruzstd::decoding::StreamingDecoder::new(src)
                    .map_err(|e| ApiError::new(400, format!("{url}: not a zstd stream: {e}")))?,
            ),
        };
        let mut dst =
            File::create(&out.file).map_err(io500(format!("creating {}", out.file.display())))?;
        let got = std::io::copy(&mut (&mut reader).take(nar_size + 1), &mut dst).map_err(bad)?;
        if got != nar_size {
            let how = if got > nar_size { "more than" } else { "fewer than" };
            return Err(ApiError::new(
                400,
                format!(
                    "{url} decompresses to {how} its narinfo's NarSize ({nar_size} bytes){}; \
                     nothing was registered",
                    if got > nar_size { ", stopped there" } else { "" }
                ),
            ));
        }
        drop(compressed);
        Ok(out)
    }
}

/// The narinfo's `FileHash`/`FileSize` must describe the staged file `staged` (named `name`, its
/// checked SHA-256): equal to `NarHash`/`NarSize` when uncompressed.
fn check_file_fields(
    hash: &str,
    info: &NarInfo,
    name: &str,
    compression: &str,
    staged: &Path,
) -> Result<(), ApiError> {
    let plain = compression == "none";
    let mismatch = if plain {
        info.file_hash.as_ref().is_some_and(|f| *f != info.nar_hash)
            || info.file_size.is_some_and(|s| s != info.nar_size)
    } else {
        let file_len = fs::metadata(staged).map(|m| m.len()).unwrap_or(0);
        let named_hash = name.split('.').next().unwrap_or_default();
        info.file_hash.as_ref().is_some_and(|f| f.to_nix32() != named_hash)
            || info.file_size.is_some_and(|s| s != file_len)
    };
    if mismatch {
        let what =
            if plain { "uncompressed: they must equal NarHash/NarSize" } else { "the staged file" };
        return Err(ApiError::new(
            400,
            format!("{hash}.narinfo: FileHash/FileSize do not describe {} ({what})", info.url),
        ));
    }
    Ok(())
}

/// A NAR taken out of staging for registration ([`Staging::take`]); dropping it removes the
/// file if it is staging's and gives back the bytes it reserved.
#[derive(Debug)]
pub struct Taken<'a> {
    staging: &'a Staging,
    /// The uncompressed NAR.
    pub file: PathBuf,
    owned: bool,
    reserved: u64,
    pi: Option<ValidPathInfo>,
}

impl Taken<'_> {
    /// The path's info from its narinfo.
    pub fn path_info(&self) -> ValidPathInfo {
        self.pi.clone().expect("set by take")
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if self.owned {
            let _ = fs::remove_file(&self.file);
        }
        if self.reserved > 0 {
            self.staging.ledger().reserved -= self.reserved;
        }
    }
}

#[cfg(test)]
#[path = "upload_tests.rs"]
mod tests;
