//! The builder's file system view and the guest's network, prepared by the agent (in its own
//! mount namespace, before the builder starts).
//!
//! [`prepare_root`] builds, on a fresh size-limited tmpfs (`nosuid`), the tree that becomes the
//! builder's `/` — the same shape as Nix's sandbox:
//! ```text
//! /nix/store   bind of the guest store (nosuid, nodev): inputs, and where outputs are written
//! /build       bind of the build directory (nosuid, nodev)
//! /tmp         1777, on the root tmpfs
//! /etc         passwd, group, hosts (and resolv.conf for a networked fixed-output build)
//! /dev         null zero full random urandom tty; pts (a new devpts instance), ptmx, shm (1777),
//!              fd/stdin/stdout/stderr links — no console, no serial ports, no kmsg, no sev-guest
//! /proc        mounted by the builder's first process, inside its PID namespace
//! ```
//! Not there: `/sys` (so no configfs-tsm and no cgroupfs), the agent's `/init` and state, the
//! guest's `/dev`. The builder's first process moves this tree onto `/` and chroots into it
//! (`super::sys`); the guest's own mounts are detached in its namespace first.
//!
//! Also here: the guest-wide sysctls the sandbox relies on ([`harden_sysctls`]), the tmpfs size
//! limits ([`limit_tmpfs`]), and the network: [`physical_interfaces`] (a non-networked job must
//! see none) and [`configure_user_net`] (QEMU user-mode networking's fixed addresses).

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

/// Where the builder's root is assembled.
pub const SANDBOX_ROOT: &str = "/run/vouch-sandbox";

/// QEMU user-mode networking (slirp) defaults: the guest's address, netmask, gateway (the host)
/// and DNS server.
pub const SLIRP_GUEST: [u8; 4] = [10, 0, 2, 15];
/// /24.
pub const SLIRP_NETMASK: [u8; 4] = [255, 255, 255, 0];
/// The host, as seen from the guest.
pub const SLIRP_GATEWAY: [u8; 4] = [10, 0, 2, 2];
/// slirp's DNS forwarder.
pub const SLIRP_DNS: [u8; 4] = [10, 0, 2, 3];

/// Errors preparing the builder's world.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// A mount failed.
    #[error("mounting {what} on {target}")]
    Mount {
        /// What was mounted.
        what: String,
        /// Where.
        target: PathBuf,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// Creating a file, directory or node failed.
    #[error("creating {0}")]
    Create(PathBuf, #[source] io::Error),
    /// A sysctl could not be set.
    #[error("setting {0}")]
    Sysctl(&'static str, #[source] io::Error),
    /// Configuring the network failed.
    #[error("configuring {0}")]
    Net(String, #[source] io::Error),
}

/// What the root is assembled from.
#[derive(Debug, Clone)]
pub struct RootSpec {
    /// The root's mount point.
    pub root: PathBuf,
    /// The guest store (bound to `/nix/store`).
    pub store: PathBuf,
    /// The build directory (bound to `/build`).
    pub build: PathBuf,
    /// Size of the root tmpfs (`/tmp`, `/dev/shm`) in bytes; 0 = the kernel's default.
    pub tmpfs_bytes: u64,
    /// Write `/etc/resolv.conf` for user-mode networking.
    pub network: bool,
    /// The builder's uid and gid (for `/etc/passwd`).
    pub uid: u32,
    /// gid.
    pub gid: u32,
}

fn mnt(
    what: &str,
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), RootError> {
    mount(source, target, fstype, flags, data).map_err(|source| RootError::Mount {
        what: what.to_owned(),
        target: target.to_owned(),
        source,
    })
}

fn mkdir(p: &Path, mode: u32) -> Result<(), RootError> {
    fs::create_dir_all(p).map_err(|e| RootError::Create(p.to_owned(), e))?;
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .map_err(|e| RootError::Create(p.to_owned(), e))
}

fn write(p: &Path, text: &str) -> Result<(), RootError> {
    fs::write(p, text).map_err(|e| RootError::Create(p.to_owned(), e))?;
    fs::set_permissions(p, fs::Permissions::from_mode(0o644))
        .map_err(|e| RootError::Create(p.to_owned(), e))
}

fn size_opt(bytes: u64) -> String {
    if bytes == 0 {
        String::new()
    } else {
        format!(",size={bytes}")
    }
}

/// The device nodes of the builder's `/dev`: name, major, minor (all mode 0666).
pub const DEVICES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// `/etc/passwd`, `/etc/group` and `/etc/hosts` as Nix's sandbox writes them, plus
/// `/etc/resolv.conf` for networked builds.
pub fn etc_files(uid: u32, gid: u32, network: bool) -> Vec<(&'static str, String)> {
    let mut files = vec![
        (
            "passwd",
            format!(
                "root:x:0:0:Nix build user:/build:/noshell\n\
                 nixbld:x:{uid}:{gid}:Nix build user:/build:/noshell\n\
                 nobody:x:65534:65534:Nobody:/:/noshell\n"
            ),
        ),
        ("group", format!("root:x:0:\nnixbld:!:{gid}:\nnogroup:x:65534:\n")),
        ("hosts", "127.0.0.1 localhost\n::1 localhost\n".to_owned()),
    ];
    if network {
        let [a, b, c, d] = SLIRP_DNS;
        files.push(("resolv.conf", format!("nameserver {a}.{b}.{c}.{d}\n")));
    }
    files
}

/// Assemble the builder's root (see the module documentation).
pub fn prepare_root(s: &RootSpec) -> Result<(), RootError> {
    let r = &s.root;
    mkdir(r, 0o755)?;
    mnt(
        "the sandbox root tmpfs",
        Some(Path::new("tmpfs")),
        r,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some(&format!("mode=0755{}", size_opt(s.tmpfs_bytes))),
    )?;
    for (dir, mode) in [
        ("nix", 0o755),
        ("nix/store", 0o755),
        ("build", 0o755),
        ("tmp", 0o1777),
        ("etc", 0o755),
        ("proc", 0o555),
        ("dev", 0o755),
        ("dev/pts", 0o755),
        ("dev/shm", 0o1777),
    ] {
        mkdir(&r.join(dir), mode)?;
    }
    for (name, text) in etc_files(s.uid, s.gid, s.network) {
        write(&r.join("etc").join(name), &text)?;
    }
    let dev = r.join("dev");
    for (name, major, minor) in DEVICES {
        let p = dev.join(name);
        mknod(&p, SFlag::S_IFCHR, Mode::from_bits_truncate(0o666), makedev(major, minor))
            .map_err(|e| RootError::Create(p.clone(), e.into()))?;
        // mknod applies the umask; the nodes must be usable by the builder.
        fs::set_permissions(&p, fs::Permissions::from_mode(0o666))
            .map_err(|e| RootError::Create(p.clone(), e))?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let p = dev.join(link);
        std::os::unix::fs::symlink(target, &p).map_err(|e| RootError::Create(p.clone(), e))?;
    }
    mnt(
        "a new devpts instance",
        Some(Path::new("devpts")),
        &dev.join("pts"),
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    for (what, src, dst) in
        [("the store", &s.store, "nix/store"), ("the build directory", &s.build, "build")]
    {
        let target = r.join(dst);
        mnt(what, Some(src), &target, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)?;
        // A bind mount takes its flags only from a remount.
        mnt(what, None, &target, None, MsFlags::MS_REMOUNT | MsFlags::MS_BIND | nosuid, None)?;
    }
    Ok(())
}

/// Fit a root that [`prepare_root`] assembled without a size limit and without network to
/// `s`: the root tmpfs's size limit (a remount; it holds only the skeleton), and
/// `/etc/resolv.conf` for a networked build.
pub fn fit_root(s: &RootSpec) -> Result<(), RootError> {
    if s.tmpfs_bytes > 0 {
        let flags = MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID;
        let data = format!("mode=0755{}", size_opt(s.tmpfs_bytes));
        mnt("a size limit", None, &s.root, None, flags, Some(&data))?;
    }
    for (name, text) in etc_files(s.uid, s.gid, s.network) {
        let p = s.root.join("etc").join(name);
        if s.network && !p.exists() {
            write(&p, &text)?;
        }
    }
    Ok(())
}

/// Limit the tmpfs mounted at `path` to what it holds now plus `extra_bytes`, keeping its mount
/// flags. Returns the new size.
pub fn limit_tmpfs(path: &Path, extra_bytes: u64) -> Result<u64, RootError> {
    use nix::sys::statvfs::FsFlags;
    let st = nix::sys::statvfs::statvfs(path).map_err(|e| RootError::Mount {
        what: "statvfs".into(),
        target: path.to_owned(),
        source: e,
    })?;
    let used = (st.blocks() - st.blocks_free()) * st.fragment_size();
    let size = used + extra_bytes;
    // A remount replaces the per-mount flags: carry the current ones over.
    let mut flags = MsFlags::MS_REMOUNT;
    for (st_flag, ms_flag) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
    ] {
        if st.flags().contains(st_flag) {
            flags |= ms_flag;
        }
    }
    mnt("a size limit", None, path, None, flags, Some(&format!("size={size}")))?;
    Ok(size)
}

/// Whether the file system at `path` is full (no block left for an unprivileged writer).
pub fn is_full(path: &Path) -> bool {
    nix::sys::statvfs::statvfs(path).map(|s| s.blocks_available() == 0).unwrap_or(false)
}

/// Sysctls the sandbox relies on: the kernel log is root's (`dmesg_restrict`), and no user
/// namespaces (an unprivileged builder would otherwise get a "root" with capabilities over new
/// mount, network and other namespaces of its own: more kernel surface for nothing a build
/// needs here).
pub fn harden_sysctls() -> Result<(), RootError> {
    for (key, path, value) in [
        ("kernel.dmesg_restrict", "/proc/sys/kernel/dmesg_restrict", "1"),
        ("user.max_user_namespaces", "/proc/sys/user/max_user_namespaces", "0"),
    ] {
        fs::write(path, value).map_err(|e| RootError::Sysctl(key, e))?;
    }
    Ok(())
}

/// Network interfaces backed by a device (`/sys/class/net/*/device`): NICs, not `lo` or the
/// kernel's virtual tunnel interfaces.
pub fn physical_interfaces(class_net: &Path) -> Vec<String> {
    let Ok(dir) = fs::read_dir(class_net) else { return Vec::new() };
    let mut v: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("device").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Configure `ifname` for QEMU user-mode networking: 10.0.2.15/24, up, default route via
/// 10.0.2.2 (no DHCP client needed: these are slirp's fixed defaults).
pub fn configure_user_net(ifname: &str) -> Result<(), RootError> {
    let err = |e| RootError::Net(ifname.to_owned(), e);
    super::sys::set_ipv4(ifname, SLIRP_GUEST, SLIRP_NETMASK).map_err(err)?;
    super::sys::set_up(ifname).map_err(err)?;
    super::sys::add_default_route(SLIRP_GATEWAY).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etc_like_nix_and_dns_only_with_network() {
        let f = etc_files(1000, 100, false);
        assert_eq!(f.iter().map(|(n, _)| *n).collect::<Vec<_>>(), ["passwd", "group", "hosts"]);
        assert!(f[0].1.contains("nixbld:x:1000:100:"));
        let f = etc_files(1000, 100, true);
        assert_eq!(f.last().unwrap(), &("resolv.conf", "nameserver 10.0.2.3\n".to_owned()));
    }

    #[test]
    fn no_console_or_attestation_device_in_dev() {
        let names: Vec<&str> = DEVICES.iter().map(|d| d.0).collect();
        for bad in ["console", "kmsg", "ttyS0", "hvc0", "sev-guest", "sev", "mem", "port", "vsock"]
        {
            assert!(!names.contains(&bad), "{bad}");
        }
    }

    #[test]
    fn physical_interfaces_need_a_device_link() {
        let t = tempfile::tempdir().unwrap();
        for n in ["lo", "sit0", "eth0"] {
            fs::create_dir(t.path().join(n)).unwrap();
        }
        fs::create_dir(t.path().join("eth0/device")).unwrap();
        assert_eq!(physical_interfaces(t.path()), ["eth0"]);
        assert!(physical_interfaces(&t.path().join("missing")).is_empty());
    }
}
