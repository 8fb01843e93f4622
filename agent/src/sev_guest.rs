//! `/dev/sev-guest`: the SNP guest driver's ioctl ABI, and the one request the agent makes
//! through it (`SNP_GET_EXT_REPORT`: a report plus the host's certificate table, if any).
//!
//! The structs mirror `include/uapi/linux/sev-guest.h` (Linux 6.12) field for field; the
//! `abi_check` test of the `tests` crate compiles a C program against that header and compares
//! every size and offset with [`LAYOUT`]. Every `unsafe` block of the SNP guest path is here.
//!
//! What is not here: configfs-tsm (plain files, see `crate::attest`) or parsing the
//! certificate table (`build_trace::evidence::cert_table`).

use std::fs::File;
use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::AsRawFd;

/// `struct snp_report_req`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SnpReportReq {
    /// REPORT_DATA.
    pub user_data: [u8; 64],
    /// VMPL to report.
    pub vmpl: u32,
    /// Zero.
    pub rsvd: [u8; 28],
}

/// `struct snp_report_resp`: the firmware's MSG_REPORT_RSP (status, size, 24 reserved bytes,
/// the 1184-byte report), padded.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SnpReportResp {
    /// Response bytes.
    pub data: [u8; 4000],
}

/// `struct snp_ext_report_req`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SnpExtReportReq {
    /// The plain request.
    pub data: SnpReportReq,
    /// Where the kernel copies the certificate table.
    pub certs_address: u64,
    /// Its length: a multiple of 4096, at most 16 KiB (the kernel's SEV_FW_BLOB_MAX_SIZE);
    /// on `SNP_GUEST_VMM_ERR_INVALID_LEN` the kernel writes back the length the host needs.
    pub certs_len: u32,
}

/// `struct snp_guest_request_ioctl`; `exitinfo2` is the union of `fw_error` (low 32 bits) and
/// `vmm_error` (high 32 bits).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SnpGuestRequestIoctl {
    /// Message version (1).
    pub msg_version: u8,
    /// Address of the request struct.
    pub req_data: u64,
    /// Address of the response struct.
    pub resp_data: u64,
    /// Firmware and VMM error codes.
    pub exitinfo2: u64,
}

const IOC_TYPE: u64 = b'S' as u64;
/// `_IOWR('S', nr, struct snp_guest_request_ioctl)`.
const fn iowr(nr: u64) -> u64 {
    (3 << 30) | ((size_of::<SnpGuestRequestIoctl>() as u64) << 16) | (IOC_TYPE << 8) | nr
}
/// `SNP_GET_REPORT`.
pub const SNP_GET_REPORT: u64 = iowr(0);
/// `SNP_GET_EXT_REPORT`.
pub const SNP_GET_EXT_REPORT: u64 = iowr(2);
/// `SNP_GUEST_VMM_ERR_INVALID_LEN`: the certificate buffer is too small.
pub const VMM_ERR_INVALID_LEN: u32 = 1;
/// The kernel's largest certificate buffer (`SEV_FW_BLOB_MAX_SIZE`).
pub const CERTS_MAX: usize = 16 * 1024;

/// Sizes and offsets the ABI check compares with the kernel's header: `(C name, value)`.
pub const LAYOUT: &[(&str, usize)] = &[
    ("sizeof(struct snp_report_req)", size_of::<SnpReportReq>()),
    ("offsetof(struct snp_report_req, vmpl)", offset_of!(SnpReportReq, vmpl)),
    ("offsetof(struct snp_report_req, rsvd)", offset_of!(SnpReportReq, rsvd)),
    ("sizeof(struct snp_report_resp)", size_of::<SnpReportResp>()),
    ("sizeof(struct snp_ext_report_req)", size_of::<SnpExtReportReq>()),
    (
        "offsetof(struct snp_ext_report_req, certs_address)",
        offset_of!(SnpExtReportReq, certs_address),
    ),
    ("offsetof(struct snp_ext_report_req, certs_len)", offset_of!(SnpExtReportReq, certs_len)),
    ("sizeof(struct snp_guest_request_ioctl)", size_of::<SnpGuestRequestIoctl>()),
    (
        "offsetof(struct snp_guest_request_ioctl, req_data)",
        offset_of!(SnpGuestRequestIoctl, req_data),
    ),
    (
        "offsetof(struct snp_guest_request_ioctl, resp_data)",
        offset_of!(SnpGuestRequestIoctl, resp_data),
    ),
    (
        "offsetof(struct snp_guest_request_ioctl, exitinfo2)",
        offset_of!(SnpGuestRequestIoctl, exitinfo2),
    ),
    ("SNP_GET_REPORT", SNP_GET_REPORT as usize),
    ("SNP_GET_EXT_REPORT", SNP_GET_EXT_REPORT as usize),
    ("SNP_GUEST_VMM_ERR_INVALID_LEN", VMM_ERR_INVALID_LEN as usize),
];

/// Why a guest request failed.
#[derive(Debug, thiserror::Error)]
pub enum SevGuestError {
    /// The ioctl failed.
    #[error(
        "/dev/sev-guest SNP_GET_EXT_REPORT: {source} (firmware error {fw:#x}, VMM error {vmm:#x})"
    )]
    Ioctl {
        /// errno.
        #[source]
        source: io::Error,
        /// Firmware error code.
        fw: u32,
        /// VMM error code.
        vmm: u32,
    },
    /// The firmware answered with a non-zero status.
    #[error("the SNP firmware answered MSG_REPORT_REQ with status {0:#x}")]
    Status(u32),
    /// The response's report size is not a report.
    #[error("the SNP firmware returned a {0}-byte report, not 1184 bytes")]
    Size(u32),
}

/// A report and the host's certificate table (empty when the host supplies none), via
/// `SNP_GET_EXT_REPORT` with message version 1 at `vmpl`.
pub fn get_ext_report(
    dev: &File,
    report_data: &[u8; 64],
    vmpl: u32,
) -> Result<(Vec<u8>, Vec<u8>), SevGuestError> {
    let mut certs = vec![0u8; CERTS_MAX];
    let mut req = SnpExtReportReq {
        data: SnpReportReq { user_data: *report_data, vmpl, rsvd: [0; 28] },
        certs_address: certs.as_mut_ptr() as u64,
        certs_len: CERTS_MAX as u32,
    };
    let mut resp = SnpReportResp { data: [0; 4000] };
    let mut io_req = SnpGuestRequestIoctl {
        msg_version: 1,
        req_data: &mut req as *mut SnpExtReportReq as u64,
        resp_data: &mut resp as *mut SnpReportResp as u64,
        exitinfo2: 0,
    };
    // SAFETY: SNP_GET_EXT_REPORT reads `io_req`, the request it points to and writes the
    // response, the certificate buffer (at most `certs_len` bytes, which is its size) and
    // `exitinfo2`; all four live on this stack frame or in `certs` until the call returns, and
    // their layouts are those of the kernel's header (checked by the ABI test).
    let rc =
        unsafe { libc::ioctl(dev.as_raw_fd(), SNP_GET_EXT_REPORT as libc::Ioctl, &mut io_req) };
    if rc < 0 {
        return Err(SevGuestError::Ioctl {
            source: io::Error::last_os_error(),
            fw: io_req.exitinfo2 as u32,
            vmm: (io_req.exitinfo2 >> 32) as u32,
        });
    }
    let status = u32::from_le_bytes(resp.data[0..4].try_into().unwrap_or_default());
    let size = u32::from_le_bytes(resp.data[4..8].try_into().unwrap_or_default());
    if status != 0 {
        return Err(SevGuestError::Status(status));
    }
    if size as usize != crate::attest::REPORT_LEN {
        return Err(SevGuestError::Size(size));
    }
    let report = resp.data[32..32 + size as usize].to_vec();
    certs.truncate(req.certs_len.min(CERTS_MAX as u32) as usize);
    Ok((report, certs))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout facts that hold on every Linux since 5.19 (the header's own comments), so a
    /// careless edit fails here even without the kernel headers of the ABI test.
    #[test]
    fn layout_matches_the_header_comments() {
        assert_eq!(size_of::<SnpReportReq>(), 96);
        assert_eq!(size_of::<SnpReportResp>(), 4000);
        assert_eq!(size_of::<SnpExtReportReq>(), 112);
        assert_eq!(size_of::<SnpGuestRequestIoctl>(), 32);
        assert_eq!(SNP_GET_REPORT, 0xc020_5300);
        assert_eq!(SNP_GET_EXT_REPORT, 0xc020_5302);
    }
}
