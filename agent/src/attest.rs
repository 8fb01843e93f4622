//! Attesters: who signs the agent's REPORT_DATA.
//!
//! - [`SevSnp`]: the AMD secure processor. First through configfs-tsm
//!   (`/sys/kernel/config/tsm/report`: mkdir a fresh entry, write the 64-byte `inblob`, read
//!   `outblob`, rmdir), else `/dev/sev-guest` through `sev::firmware::guest::Firmware` (its ioctl
//!   structs stay inside `sev`; no `unsafe` here).
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
    #[error("/dev/sev-guest SNP_GET_REPORT failed: {0}")]
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
    Dev(sev::firmware::guest::Firmware),
}

/// The configfs-tsm report directory.
pub const TSM_REPORT_DIR: &str = "/sys/kernel/config/tsm/report";

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
    sev::firmware::guest::Firmware::open().ok().map(SevSnp::Dev)
}

/// One configfs-tsm request in its own entry directory (`generation` races cannot happen).
fn tsm_report(base: &Path, report_data: &[u8; 64]) -> Result<Vec<u8>, AttestError> {
    let entry = base.join(format!("vouch-{}", std::process::id()));
    let err = |p: &Path| {
        let p = p.to_owned();
        move |e| AttestError::Tsm(p, e)
    };
    fs::create_dir(&entry).map_err(err(&entry))?;
    let result = (|| {
        let inblob = entry.join("inblob");
        fs::write(&inblob, report_data).map_err(err(&inblob))?;
        let outblob = entry.join("outblob");
        fs::read(&outblob).map_err(err(&outblob))
    })();
    let _ = fs::remove_dir(&entry);
    let raw = result?;
    if raw.len() != REPORT_LEN {
        return Err(AttestError::TsmLength(raw.len()));
    }
    Ok(raw)
}

impl Attester for SevSnp {
    fn kind(&self) -> AttesterKind {
        AttesterKind::SevSnp
    }

    fn report(&mut self, report_data: &[u8; 64]) -> Result<Vec<u8>, AttestError> {
        match self {
            SevSnp::Tsm(base) => match tsm_report(base, report_data) {
                Ok(r) => Ok(r),
                // configfs-tsm without a registered provider: fall back to the ioctl.
                Err(e) => match sev::firmware::guest::Firmware::open() {
                    Ok(fw) => {
                        *self = SevSnp::Dev(fw);
                        self.report(report_data)
                    }
                    Err(_) => Err(e),
                },
            },
            SevSnp::Dev(fw) => {
                let raw = fw
                    .get_report(None, Some(*report_data), Some(0))
                    .map_err(|e| AttestError::SevGuest(e.to_string()))?;
                if raw.len() != REPORT_LEN {
                    return Err(AttestError::SevGuest(format!(
                        "{} bytes, not {REPORT_LEN}",
                        raw.len()
                    )));
                }
                Ok(raw)
            }
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
