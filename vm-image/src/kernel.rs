//! The guest kernel: built from Debian's `linux-source-6.12` with our committed config fragment,
//! and cached outside the checkout.
//!
//! What is here: the [`KernelKey`] (exact source package version, gcc and ld versions, fragment
//! hash and build path: everything that changes the bytes), and [`ensure_kernel`], which returns
//! the cached build for that key or builds it (`make tinyconfig`, merge `kernel/vouch.fragment`,
//! `make olddefconfig`, check every fragment line survived, `make bzImage` with fixed
//! `KBUILD_BUILD_*`), publishing the result atomically under `<cache>/kernel/<key>/`.
//!
//! What is not here: the initramfs, the command line, or booting.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

/// The committed kernel config fragment (merged on top of `tinyconfig`).
pub const FRAGMENT: &str = include_str!("../kernel/vouch.fragment");

/// Where Debian's `linux-source-6.12` package puts the source tarball.
pub const DEFAULT_SOURCE_TARBALL: &str = "/usr/src/linux-source-6.12.tar.xz";
/// The Debian package that provides it.
pub const SOURCE_PACKAGE: &str = "linux-source-6.12";
/// Fixed build identity (`KBUILD_BUILD_*`), so two builds give the same bytes.
pub const BUILD_TIMESTAMP: &str = "Thu Jan  1 00:00:00 UTC 1970";
/// Fixed `KBUILD_BUILD_USER` / `KBUILD_BUILD_HOST`.
pub const BUILD_IDENTITY: &str = "vouch";

/// Errors from building or finding the kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The source tarball is missing.
    #[error("kernel source {0} not found (run scripts/setup-host.sh: apt-get install linux-source-6.12)")]
    NoSource(PathBuf),
    /// A tool could not be run.
    #[error("running {0}")]
    Spawn(String, #[source] std::io::Error),
    /// A build step failed.
    #[error("kernel build step `{step}` failed; last lines of {log}:\n{tail}")]
    Step {
        /// The step that failed.
        step: String,
        /// Its log file.
        log: PathBuf,
        /// The end of that log.
        tail: String,
    },
    /// A fragment option did not make it into the final `.config`.
    #[error(
        "kernel config fragment lines not set in the final .config (typo or unmet dependency): {0}"
    )]
    FragmentNotApplied(String),
    /// File system trouble in the cache.
    #[error("kernel cache {0}")]
    Io(PathBuf, #[source] std::io::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KernelError + '_ {
    move |e| KernelError::Io(path.to_owned(), e)
}

/// Everything that determines the kernel's bytes. Its [`KernelKey::id`] names the cache entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelKey {
    /// `linux-source-6.12 <exact Debian version>` (or `sha256:<tarball hash>` off Debian).
    pub source: String,
    /// First line of `gcc --version`.
    pub gcc: String,
    /// First line of `ld --version`.
    pub ld: String,
    /// SHA-256 of the config fragment.
    pub fragment_sha256: String,
    /// Absolute directory the kernel is compiled in.
    pub build_path: String,
}

impl KernelKey {
    /// Hex SHA-256 over the key's fields (first 32 characters name the cache directory).
    pub fn id(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"vouch-kernel-key-v1\0");
        for field in [&self.source, &self.gcc, &self.ld, &self.fragment_sha256, &self.build_path] {
            h.update((field.len() as u64).to_le_bytes());
            h.update(field.as_bytes());
        }
        hex::encode(h.finalize())[..32].to_owned()
    }
}

/// A built kernel in the cache.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The compressed, EFI-stub kernel (SNP boots it through OVMF).
    pub bzimage: PathBuf,
    /// The uncompressed ELF with the PVH note (kvm/tcg boot it directly).
    pub vmlinux: PathBuf,
    /// The final `.config`.
    pub config: PathBuf,
    /// What it was built from.
    pub key: KernelKey,
}

fn first_line(cmd: &str, args: &[&str]) -> Result<String, KernelError> {
    let out = Command::new(cmd)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .map_err(|e| KernelError::Spawn(format!("{cmd} {}", args.join(" ")), e))?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").trim().to_owned())
}

/// Compute the key for building `tarball` under `cache` (`<cache>/kernel/build`).
pub fn kernel_key(cache: &Path, tarball: &Path) -> Result<KernelKey, KernelError> {
    if !tarball.is_file() {
        return Err(KernelError::NoSource(tarball.to_owned()));
    }
    let source = match Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", SOURCE_PACKAGE])
        .stderr(Stdio::null())
        .output()
    {
        Ok(o)
            if o.status.success()
                && !o.stdout.is_empty()
                && tarball == Path::new(DEFAULT_SOURCE_TARBALL) =>
        {
            format!("{SOURCE_PACKAGE} {}", String::from_utf8_lossy(&o.stdout).trim())
        }
        _ => {
            let bytes = fs::read(tarball).map_err(io_err(tarball))?;
            format!("sha256:{}", hex::encode(Sha256::digest(&bytes)))
        }
    };
    Ok(KernelKey {
        source,
        gcc: first_line("gcc", &["--version"])?,
        ld: first_line("ld", &["--version"])?,
        fragment_sha256: hex::encode(Sha256::digest(FRAGMENT.as_bytes())),
        build_path: build_dir(cache).join(SRC_DIR).to_string_lossy().into_owned(),
    })
}

const SRC_DIR: &str = "linux-source-6.12";

fn build_dir(cache: &Path) -> PathBuf {
    cache.join("kernel").join("build")
}

/// The cached kernel for this key, if it is complete.
pub fn cached_kernel(cache: &Path, key: &KernelKey) -> Option<Kernel> {
    let dir = cache.join("kernel").join(key.id());
    let k = Kernel {
        bzimage: dir.join("bzImage"),
        vmlinux: dir.join("vmlinux"),
        config: dir.join("config"),
        key: key.clone(),
    };
    (k.bzimage.is_file() && k.vmlinux.is_file() && k.config.is_file()).then_some(k)
}

/// Return the cached kernel for the current toolchain and source, building it first if needed
/// (about 5–6 minutes on an idle 2-core machine). `progress` gets one line per step.
/// Concurrent callers are serialised by a lock file; the cache entry appears atomically.
pub fn ensure_kernel(
    cache: &Path,
    tarball: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Kernel, KernelError> {
    let key = kernel_key(cache, tarball)?;
    if let Some(k) = cached_kernel(cache, &key) {
        return Ok(k);
    }
    let kdir = cache.join("kernel");
    fs::create_dir_all(&kdir).map_err(io_err(&kdir))?;
    let lock_path = kdir.join(".lock");
    let lock_file = fs::File::create(&lock_path).map_err(io_err(&lock_path))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| KernelError::Io(lock_path.clone(), e.into()))?;
    if let Some(k) = cached_kernel(cache, &key) {
        return Ok(k);
    }
    build(cache, tarball, &key, progress)?;
    cached_kernel(cache, &key).ok_or_else(|| {
        KernelError::Io(kdir.join(key.id()), std::io::Error::other("incomplete after build"))
    })
}

fn run_step(cmd: &mut Command, step: &str, log: &Path) -> Result<(), KernelError> {
    let mut logf =
        fs::OpenOptions::new().create(true).append(true).open(log).map_err(io_err(log))?;
    let _ = writeln!(logf, "== {step}");
    let errf = logf.try_clone().map_err(io_err(log))?;
    let status = cmd
        .stdout(Stdio::from(logf))
        .stderr(Stdio::from(errf))
        .status()
        .map_err(|e| KernelError::Spawn(step.to_owned(), e))?;
    if status.success() {
        return Ok(());
    }
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(30)..].join("\n");
    Err(KernelError::Step { step: step.to_owned(), log: log.to_owned(), tail })
}

fn make(src: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("make");
    c.current_dir(src)
        .args(args)
        .env("LC_ALL", "C")
        .env("KBUILD_BUILD_TIMESTAMP", BUILD_TIMESTAMP)
        .env("KBUILD_BUILD_USER", BUILD_IDENTITY)
        .env("KBUILD_BUILD_HOST", BUILD_IDENTITY)
        .env("KBUILD_BUILD_VERSION", "1")
        .env("SOURCE_DATE_EPOCH", "0");
    for var in
        ["ARCH", "CROSS_COMPILE", "KCFLAGS", "KCPPFLAGS", "KBUILD_OUTPUT", "LOCALVERSION", "O"]
    {
        c.env_remove(var);
    }
    c
}

/// The fragment's `CONFIG_X=y` lines that are not in `config`.
pub fn missing_fragment_lines(config: &str) -> Vec<String> {
    let have: std::collections::HashSet<&str> = config.lines().map(str::trim).collect();
    FRAGMENT
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("CONFIG_"))
        .filter(|l| !have.contains(l))
        .map(str::to_owned)
        .collect()
}

fn build(
    cache: &Path,
    tarball: &Path,
    key: &KernelKey,
    progress: &mut dyn FnMut(&str),
) -> Result<(), KernelError> {
    let bdir = build_dir(cache);
    if bdir.exists() {
        fs::remove_dir_all(&bdir).map_err(io_err(&bdir))?;
    }
    fs::create_dir_all(&bdir).map_err(io_err(&bdir))?;
    let log = bdir.join("build.log");
    let src = bdir.join(SRC_DIR);
    progress(&format!("unpacking {}", tarball.display()));
    let mut tar = Command::new("tar");
    tar.arg("xJf").arg(tarball).arg("-C").arg(&bdir);
    run_step(&mut tar, "tar xJf", &log)?;

    progress("configuring (tinyconfig + kernel/vouch.fragment)");
    let frag = bdir.join("vouch.fragment");
    fs::write(&frag, FRAGMENT).map_err(io_err(&frag))?;
    run_step(&mut make(&src, &["tinyconfig"]), "make tinyconfig", &log)?;
    let mut merge = Command::new("./scripts/kconfig/merge_config.sh");
    merge.current_dir(&src).args(["-m", ".config"]).arg(&frag);
    run_step(&mut merge, "merge_config.sh", &log)?;
    run_step(&mut make(&src, &["olddefconfig"]), "make olddefconfig", &log)?;
    let config_path = src.join(".config");
    let config = fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
    let missing = missing_fragment_lines(&config);
    if !missing.is_empty() {
        return Err(KernelError::FragmentNotApplied(missing.join(", ")));
    }

    let jobs = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    progress(&format!(
        "compiling bzImage with {jobs} jobs (about 5-6 min on an idle 2-core machine; log {})",
        log.display()
    ));
    let j = format!("-j{jobs}");
    run_step(&mut make(&src, &[&j, "bzImage"]), "make bzImage", &log)?;

    let id = key.id();
    let kdir = cache.join("kernel");
    let tmp = kdir.join(format!(".{id}.tmp"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    for (from, to) in
        [("arch/x86/boot/bzImage", "bzImage"), ("vmlinux", "vmlinux"), (".config", "config")]
    {
        fs::copy(src.join(from), tmp.join(to)).map_err(io_err(&src.join(from)))?;
    }
    let key_json =
        serde_json::to_vec_pretty(key).map_err(|e| KernelError::Io(tmp.clone(), e.into()))?;
    fs::write(tmp.join("key.json"), key_json).map_err(io_err(&tmp))?;
    let dest = kdir.join(&id);
    if dest.exists() {
        fs::remove_dir_all(&dest).map_err(io_err(&dest))?;
    }
    fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
    progress(&format!("kernel cached in {}", dest.display()));
    // The tree is ~0.5 GB; only the artifacts are kept.
    let _ = fs::remove_dir_all(&src);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragment_has_what_the_issue_requires() {
        for opt in [
            "CONFIG_PVH=y",
            "CONFIG_EFI_STUB=y",
            "CONFIG_AMD_MEM_ENCRYPT=y",
            "CONFIG_SEV_GUEST=y",
            "CONFIG_TSM_REPORTS=y",
            "CONFIG_CONFIGFS_FS=y",
            "CONFIG_VIRTIO_VSOCKETS=y",
            "CONFIG_VIRTIO_NET=y",
            "CONFIG_SECCOMP_FILTER=y",
            "CONFIG_PRINTK_TIME=y",
        ] {
            assert!(FRAGMENT.lines().any(|l| l == opt), "{opt}");
        }
        assert!(!FRAGMENT.contains("CONFIG_MODULES=y"), "everything must be built in");
    }

    #[test]
    fn missing_lines_are_reported() {
        let config = FRAGMENT.replace("CONFIG_SEV_GUEST=y", "# CONFIG_SEV_GUEST is not set");
        assert_eq!(missing_fragment_lines(&config), ["CONFIG_SEV_GUEST=y"]);
        assert!(missing_fragment_lines(FRAGMENT).is_empty());
    }

    #[test]
    fn key_changes_with_every_field() {
        let base = KernelKey {
            source: "linux-source-6.12 6.12.117-1~deb12u1".into(),
            gcc: "gcc 12".into(),
            ld: "ld 2.40".into(),
            fragment_sha256: "00".into(),
            build_path: "/c/kernel/build/linux-source-6.12".into(),
        };
        let id = base.id();
        assert_eq!(id.len(), 32);
        let mut variants = vec![base.clone(); 5];
        variants[0].source.push('1');
        variants[1].gcc.push('1');
        variants[2].ld.push('1');
        variants[3].fragment_sha256.push('1');
        variants[4].build_path.push('1');
        for v in variants {
            assert_ne!(v.id(), id);
        }
    }
}
