//! Attesters: who signs the agent's REPORT_DATA.
//!
//! - [`SevSnp`]: the AMD secure processor. First through configfs-tsm
//!   (`/sys/kernel/config/tsm/report`: mkdir a fresh entry, write the 64-byte `inblob`, read
//!   `outblob` and, when the host supplied a certificate table, `auxblob`; rmdir), else
//!   `/dev/sev-guest`'s `SNP_GET_EXT_REPORT` ([`crate::sev_guest`], which holds the ioctl
//!   structs; no `unsafe` here). The certificate table is passed on to the host untouched
//!   ([`Attester::report_with_certs`]).
//! - [`Simulated`]: machines without SNP. The host sends a simulated VCEK key and platform fields
//!   over the channel (only in this mode), and the report is signed with `build-trace`'s
//!   simulated signer in the exact AMD layout. Everything about it says "simulated".
//!
//! [`detect`] picks `sev-snp` when the hardware is there; the agent says loudly when it is not.
//! What is not here: verifying reports (`build-trace`).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use build_trace::evidence::report::offset;
use build_trace::evidence::{SimulatedAttester, SimulatedLaunch, SimulatedPlatform};

pub use channel::messages::AttesterKind;

/// Errors getting a report.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// configfs-tsm failed.
    #[error("configfs-tsm {0}")]
    Tsm(PathBuf, #[source] io::Error),
    /// configfs-tsm returned something that is not a report.
    #[error("configfs-tsm returned {0} bytes, not a 1184-byte report")]
    TsmLength(usize),
    /// `/dev/sev-guest` failed.
    #[error("/dev/sev-guest SNP_GET_EXT_REPORT failed: {0}")]
    SevGuest(String),
    /// Simulated mode without the host's simulated key.
    #[error("no SEV-SNP hardware and the host sent no simulated signing key")]
    NoSimulatedKey,
    /// The simulated key is unusable.
    #[error("simulated signer")]
    Simulated(#[source] build_trace::evidence::SimulatedError),
}

/// Something that turns REPORT_DATA into a raw 1184-byte attestation report.
pub trait Attester {
    /// Which kind.
    fn kind(&self) -> AttesterKind;
    /// A report whose REPORT_DATA is `report_data`.
    fn report(&mut self, report_data: &[u8; 64]) -> Result<Vec<u8>, AttestError>;
    /// A report and the host's certificate table (GHCB format; empty when the host supplies
    /// none, which upstream KVM never does).
    fn report_with_certs(
        &mut self,
        report_data: &[u8; 64],
    ) -> Result<(Vec<u8>, Vec<u8>), AttestError> {
        Ok((self.report(report_data)?, Vec::new()))
    }
}

/// Length of an SNP attestation report.
pub const REPORT_LEN: usize = 1184;

/// MEASUREMENT of a raw report.
pub fn report_measurement(raw: &[u8]) -> [u8; 48] {
    let mut m = [0u8; 48];
    m.copy_from_slice(&raw[offset::MEASUREMENT..offset::MEASUREMENT + 48]);
    m
}

/// HOST_DATA of a raw report.
pub fn report_host_data(raw: &[u8]) -> [u8; 32] {
    let mut h = [0u8; 32];
    h.copy_from_slice(&raw[offset::HOST_DATA..offset::HOST_DATA + 32]);
    h
}

/// Where the SNP hardware interface is.
#[derive(Debug)]
pub enum SevSnp {
    /// configfs-tsm report directory (`/sys/kernel/config/tsm/report`).
    Tsm(PathBuf),
    /// `/dev/sev-guest`.
    Dev(fs::File),
}

/// The configfs-tsm report directory.
pub const TSM_REPORT_DIR: &str = "/sys/kernel/config/tsm/report";
/// The attributes of a configfs-tsm report entry the agent uses: REPORT_DATA in, the report
/// out, the host's certificate table (Documentation/ABI/testing/configfs-tsm; the ABI test
/// checks them against it).
pub const TSM_INBLOB: &str = "inblob";
/// See [`TSM_INBLOB`].
pub const TSM_OUTBLOB: &str = "outblob";
/// See [`TSM_INBLOB`].
pub const TSM_AUXBLOB: &str = "auxblob";

/// SNP hardware if present. `/dev/sev-guest` appears only in a running SNP guest (the
/// `sev-guest` platform device is registered only then), whereas the configfs-tsm directory
/// exists whenever the kernel has TSM_REPORTS; so the device decides, and configfs-tsm is then
/// preferred for the reports.
pub fn detect() -> Option<SevSnp> {
    if !Path::new("/dev/sev-guest").exists() {
        return None;
    }
    let tsm = Path::new(TSM_REPORT_DIR);
    if tsm.is_dir() {
        return Some(SevSnp::Tsm(tsm.to_owned()));
    }
    open_dev().ok().map(SevSnp::Dev)
}

fn open_dev() -> io::Result<fs::File> {
    fs::OpenOptions::new().read(true).open("/dev/sev-guest")
}

/// `outblob` and `auxblob` (absent or empty when the host supplied no certificate table) of a
/// configfs-tsm entry whose `inblob` was written.
fn tsm_read(entry: &Path) -> Result<(Vec<u8>, Vec<u8>), AttestError> {
    let outblob = entry.join(TSM_OUTBLOB);
    let raw = fs::read(&outblob).map_err(|e| AttestError::Tsm(outblob, e))?;
    let auxblob = entry.join(TSM_AUXBLOB);
    let certs = match fs::read(&auxblob) {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(AttestError::Tsm(auxblob, e)),
    };
    Ok((raw, certs))
}

/// One configfs-tsm request in its own entry directory (`generation` races cannot happen).
fn tsm_report(base: &Path, report_data: &[u8; 64]) -> Result<(Vec<u8>, Vec<u8>), AttestError> {
    let entry = base.join(format!("vouch-{}", std::process::id()));
    let err = |p: &Path| {
        let p = p.to_owned();
        move |e| AttestError::Tsm(p, e)
    };
    fs::create_dir(&entry).map_err(err(&entry))?;
    let result = (|| {
        let inblob = entry.join(TSM_INBLOB);
        fs::write(&inblob, report_data).map_err(err(&inblob))?;
        tsm_read(&entry)
    })();
    let _ = fs::remove_dir(&entry);
    let (raw, certs) = result?;
    if raw.len() != REPORT_LEN {
        return Err(AttestError::TsmLength(raw.len()));
    }
    Ok((raw, certs))
}

impl Attester for SevSnp {
    fn kind(&self) -> AttesterKind {
        AttesterKind::SevSnp
    }

    fn report(&mut self, report_data: &[u8; 64]) -> Result<Vec<u8>, AttestError> {
        self.report_with_certs(report_data).map(|(r, _)| r)
    }

    fn report_with_certs(
        &mut self,
        report_data: &[u8; 64],
    ) -> Result<(Vec<u8>, Vec<u8>), AttestError> {
        match self {
            SevSnp::Tsm(base) => match tsm_report(base, report_data) {
                Ok(r) => Ok(r),
                // configfs-tsm without a registered provider: fall back to the ioctl.
                Err(e) => match open_dev() {
                    Ok(fw) => {
                        *self = SevSnp::Dev(fw);
                        self.report_with_certs(report_data)
                    }
                    Err(_) => Err(e),
                },
            },
            SevSnp::Dev(dev) => crate::sev_guest::get_ext_report(dev, report_data, 0)
                .map_err(|e| AttestError::SevGuest(build_trace::error_chain(&e))),
        }
    }
}

/// The simulated attester (see the module doc).
#[derive(Debug)]
pub struct Simulated(SimulatedAttester);

impl Simulated {
    /// From the host's simulated VCEK key (PKCS#8 DER), platform and the launch values.
    pub fn new(
        vcek_key_pkcs8: &[u8],
        platform: SimulatedPlatform,
        measurement: [u8; 48],
        host_data: [u8; 32],
    ) -> Result<Simulated, AttestError> {
        SimulatedAttester::new(
            vcek_key_pkcs8,
            platform,
            SimulatedLaunch::new(measurement, host_data),
        )
        .map(Simulated)
        .map_err(AttestError::Simulated)
    }
}

impl Attester for Simulated {
    fn kind(&self) -> AttesterKind {
        AttesterKind::Simulated
    }

    fn report(&mut self, report_data: &[u8; 64]) -> Result<Vec<u8>, AttestError> {
        Ok(self.0.report(report_data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use build_trace::evidence::SimulatedRoot;

    /// configfs-tsm protocol against a plain directory: a fresh entry per request, exactly the
    /// 64 REPORT_DATA bytes written to `inblob`, then `outblob` read (absent here: the error
    /// names it).
    #[test]
    fn tsm_request_layout() {
        let t = tempfile::tempdir().unwrap();
        let e = tsm_report(t.path(), &[7; 64]).unwrap_err();
        assert!(matches!(e, AttestError::Tsm(ref p, _) if p.ends_with("outblob")), "{e}");
        let entry = t.path().join(format!("vouch-{}", std::process::id()));
        assert_eq!(fs::read(entry.join("inblob")).unwrap(), vec![7u8; 64]);
    }

    /// `outblob` and `auxblob` of an entry: the report and the certificate table come back;
    /// without `auxblob` (a host that supplies none) the table is empty.
    #[test]
    fn tsm_reads_the_certificate_table_when_present() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("outblob"), vec![1u8; REPORT_LEN]).unwrap();
        let (raw, certs) = tsm_read(t.path()).unwrap();
        assert_eq!(raw.len(), REPORT_LEN);
        assert!(certs.is_empty());
        fs::write(t.path().join("auxblob"), b"table").unwrap();
        assert_eq!(tsm_read(t.path()).unwrap().1, b"table");
    }

    #[test]
    fn simulated_reports_carry_the_launch_values() {
        let root = SimulatedRoot::generate().unwrap();
        let key = root.vcek_key_pkcs8().unwrap();
        let mut a = Simulated::new(&key, root.platform(), [3; 48], [4; 32]).unwrap();
        assert_eq!(a.kind(), AttesterKind::Simulated);
        let raw = a.report(&[5; 64]).unwrap();
        assert_eq!(raw.len(), REPORT_LEN);
        assert_eq!(report_measurement(&raw), [3; 48]);
        assert_eq!(report_host_data(&raw), [4; 32]);
        assert_eq!(&raw[offset::REPORT_DATA..offset::REPORT_DATA + 64], &[5; 64]);
        assert!(Simulated::new(b"not a key", root.platform(), [0; 48], [0; 32]).is_err());
    }

    #[test]
    fn kinds_print_as_the_issue_names_them() {
        assert_eq!(AttesterKind::SevSnp.to_string(), "sev-snp");
        assert_eq!(serde_json::to_string(&AttesterKind::Simulated).unwrap(), "\"simulated\"");
    }
}
