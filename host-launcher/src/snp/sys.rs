//! `/dev/sev`: the host's PSP driver ioctl ABI, and the two read-only commands vouch issues
//! through it (`SNP_PLATFORM_STATUS`, `SEV_GET_ID2`).
//!
//! The structs mirror `include/uapi/linux/psp-sev.h` (Linux 6.12) field for field; the
//! `abi_check` test of the `tests` crate compiles a C program against that header and compares
//! every size, offset and command number with [`LAYOUT`]. The bit fields of
//! `struct sev_user_data_snp_status` are decoded from its raw bytes by
//! [`super::platform::PlatformStatus::decode`]. Every `unsafe` block of the host's SNP code is
//! here. Neither command needs write access or changes the platform; `SNP_PLATFORM_STATUS` works
//! in any SNP state (Linux 6.12 `sev_ioctl_do_snp_platform_status`).

use std::fs::File;
use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::AsRawFd;

/// `struct sev_issue_cmd` (packed).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy)]
pub struct SevIssueCmd {
    /// Command id (the `enum` of psp-sev.h).
    pub cmd: u32,
    /// Address of the command's struct.
    pub data: u64,
    /// Firmware status on failure.
    pub error: u32,
}

/// `struct sev_user_data_snp_status` (packed, 32 bytes), kept as raw bytes: bytes 3 and 8..12
/// hold C bit fields, which [`super::platform::PlatformStatus::decode`] reads.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy)]
pub struct SnpStatusRaw {
    /// The struct's bytes.
    pub bytes: [u8; SNP_STATUS_LEN],
}

/// Size of `struct sev_user_data_snp_status`.
pub const SNP_STATUS_LEN: usize = 32;

/// `struct sev_user_data_get_id2` (packed).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy)]
pub struct GetId2 {
    /// Buffer address.
    pub address: u64,
    /// Buffer length in; ID length out.
    pub length: u32,
}

/// `SEV_GET_ID2` in psp-sev.h's command enum.
pub const SEV_GET_ID2: u32 = 8;
/// `SNP_PLATFORM_STATUS`.
pub const SNP_PLATFORM_STATUS: u32 = 9;
/// `SEV_ISSUE_CMD = _IOWR('S', 0, struct sev_issue_cmd)`.
pub const SEV_ISSUE_CMD: u64 =
    (3 << 30) | ((size_of::<SevIssueCmd>() as u64) << 16) | ((b'S' as u64) << 8);

/// Byte offsets inside `struct sev_user_data_snp_status`.
pub mod status_offset {
    /// `api_major`.
    pub const API_MAJOR: usize = 0;
    /// `api_minor`.
    pub const API_MINOR: usize = 1;
    /// `state`.
    pub const STATE: usize = 2;
    /// The byte holding `is_rmp_initialized:1`.
    pub const RMP_BYTE: usize = 3;
    /// `build_id`.
    pub const BUILD_ID: usize = 4;
    /// The u32 holding `mask_chip_id:1, mask_chip_key:1, vlek_en:1`.
    pub const FLAGS: usize = 8;
    /// `guest_count`.
    pub const GUEST_COUNT: usize = 12;
    /// `current_tcb_version`.
    pub const CURRENT_TCB: usize = 16;
    /// `reported_tcb_version`.
    pub const REPORTED_TCB: usize = 24;
}

/// Sizes, offsets and numbers the ABI check compares with the kernel's header.
pub const LAYOUT: &[(&str, usize)] = &[
    ("sizeof(struct sev_issue_cmd)", size_of::<SevIssueCmd>()),
    ("offsetof(struct sev_issue_cmd, data)", offset_of!(SevIssueCmd, data)),
    ("offsetof(struct sev_issue_cmd, error)", offset_of!(SevIssueCmd, error)),
    ("sizeof(struct sev_user_data_snp_status)", size_of::<SnpStatusRaw>()),
    ("offsetof(struct sev_user_data_snp_status, state)", status_offset::STATE),
    ("offsetof(struct sev_user_data_snp_status, build_id)", status_offset::BUILD_ID),
    ("offsetof(struct sev_user_data_snp_status, guest_count)", status_offset::GUEST_COUNT),
    ("offsetof(struct sev_user_data_snp_status, current_tcb_version)", status_offset::CURRENT_TCB),
    (
        "offsetof(struct sev_user_data_snp_status, reported_tcb_version)",
        status_offset::REPORTED_TCB,
    ),
    ("sizeof(struct sev_user_data_get_id2)", size_of::<GetId2>()),
    ("offsetof(struct sev_user_data_get_id2, length)", offset_of!(GetId2, length)),
    ("SEV_GET_ID2", SEV_GET_ID2 as usize),
    ("SNP_PLATFORM_STATUS", SNP_PLATFORM_STATUS as usize),
    ("SEV_ISSUE_CMD", SEV_ISSUE_CMD as usize),
];

/// A failed `/dev/sev` command.
#[derive(Debug, thiserror::Error)]
#[error("/dev/sev {command}: {source} (firmware status {status:#x})")]
pub struct SevCmdError {
    /// Which command.
    pub command: &'static str,
    /// errno.
    #[source]
    pub source: io::Error,
    /// The firmware's status code.
    pub status: u32,
}

fn issue(dev: &File, command: &'static str, cmd: u32, data: u64) -> Result<(), SevCmdError> {
    let mut c = SevIssueCmd { cmd, data, error: 0 };
    // SAFETY: SEV_ISSUE_CMD reads `c` and the struct at `c.data` (owned by the caller, alive
    // for this call and large enough for `cmd`), writes that struct and `c.error`; the layouts
    // are the kernel header's (checked by the ABI test).
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), SEV_ISSUE_CMD as libc::Ioctl, &mut c) };
    if rc < 0 {
        let status = c.error;
        return Err(SevCmdError { command, source: io::Error::last_os_error(), status });
    }
    Ok(())
}

/// `SNP_PLATFORM_STATUS`: the raw 32-byte status.
pub fn snp_platform_status(dev: &File) -> Result<[u8; SNP_STATUS_LEN], SevCmdError> {
    let mut raw = SnpStatusRaw { bytes: [0; SNP_STATUS_LEN] };
    issue(dev, "SNP_PLATFORM_STATUS", SNP_PLATFORM_STATUS, &mut raw as *mut SnpStatusRaw as u64)?;
    Ok(raw.bytes)
}

/// `SEV_GET_ID2`: the chip's unique ID (64 bytes per socket; the first 64 are socket 0, the
/// processor that signs reports). The firmware names the length when asked with none (the
/// kernel: "the length of the ID shouldn't be assumed by software").
pub fn get_id(dev: &File) -> Result<Vec<u8>, SevCmdError> {
    let mut req = GetId2 { address: 0, length: 0 };
    // Fails with the length written back; a real failure shows in the second call.
    let _ = issue(dev, "SEV_GET_ID2", SEV_GET_ID2, &mut req as *mut GetId2 as u64);
    let len = match req.length {
        0 => 128,
        n => (n as usize).min(4096),
    };
    let mut buf = vec![0u8; len];
    let mut req = GetId2 { address: buf.as_mut_ptr() as u64, length: len as u32 };
    issue(dev, "SEV_GET_ID2", SEV_GET_ID2, &mut req as *mut GetId2 as u64)?;
    buf.truncate((req.length as usize).min(len));
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_sizes_and_the_request_number() {
        assert_eq!(size_of::<SevIssueCmd>(), 16);
        assert_eq!(size_of::<SnpStatusRaw>(), 32);
        assert_eq!(size_of::<GetId2>(), 12);
        assert_eq!(SEV_ISSUE_CMD, 0xc010_5300);
    }

    #[test]
    fn a_missing_device_is_an_error_not_a_crash() {
        // /dev/null accepts no SEV ioctl: the error names the command.
        let f = File::open("/dev/null").unwrap();
        let e = snp_platform_status(&f).unwrap_err();
        assert!(e.to_string().starts_with("/dev/sev SNP_PLATFORM_STATUS"), "{e}");
    }
}
