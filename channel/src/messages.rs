//! What the frames of the channel carry (JSON payloads), and the order they come in.
//! Specified with the framing in `docs/channel.md`.
//!
//! ```text
//! guest                                   host
//!   Hello ─────────────────────────────▶             (agent version, attester kind)
//!         ◀───────────────────────────── Setup        (simulated key: only in simulated mode)
//!         ◀───────────────────────────── Launch       (canonical launch bytes: HOST_DATA)
//!   Ready ─────────────────────────────▶             (launch checked; a pool VM waits here)
//!         ◀───────────────────────────── Job          (canonical job bytes: exactly one)
//!         ◀───────────────────────────── NarBegin/NarChunk…/NarEnd   per closure path
//!         ◀───────────────────────────── InputsDone
//!   Phase, Log … ──────────────────────▶
//!   NarBegin/NarChunk…/NarEnd ─────────▶ per output (final path, NAR as hashed)
//!   Outcome ───────────────────────────▶ (canonical statement + raw report)
//!   or Failure ────────────────────────▶
//!   Bye ───────────────────────────────▶ then sync + power off
//! ```
//! From the `Job` until `Bye` the guest also sends a `Heartbeat` every few seconds, between any
//! two frames (`crate::liveness`); a pool VM waiting for its job is silent. After `Bye` the guest
//! powers off: one VM, one job.
//! What is not here: the framing ([`crate::proto`]).

use serde::{Deserialize, Serialize};

/// Which attester produced a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AttesterKind {
    /// The AMD secure processor.
    #[serde(rename = "sev-snp")]
    SevSnp,
    /// The simulated signer (no SNP hardware): proves nothing about hardware.
    #[serde(rename = "simulated")]
    Simulated,
}

impl std::fmt::Display for AttesterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttesterKind::SevSnp => "sev-snp",
            AttesterKind::Simulated => "simulated",
        })
    }
}

/// First frame from the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// [`crate::proto::PROTOCOL_VERSION`].
    pub protocol: u32,
    /// `vouch-agent <version>`.
    pub agent_version: String,
    /// The attester the agent found.
    pub attester: AttesterKind,
    /// Guest uptime when it connected, in milliseconds.
    pub uptime_ms: u64,
}

/// The simulated signer's material (sent only when the VM is not an SNP guest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedSetup {
    /// PKCS#8 DER of the simulated VCEK key, base64.
    pub vcek_key_pkcs8: String,
    /// CHIP_ID, hex (64 bytes).
    pub chip_id: String,
    /// Reported TCB: bootloader, tee, snp, microcode.
    pub tcb: [u8; 4],
    /// The simulated measurement of the image (hex, 48 bytes).
    pub measurement: String,
}

/// Second frame from the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Setup {
    /// Present exactly when the host launched a non-SNP VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulated: Option<SimulatedSetup>,
}

/// The guest accepted the launch (HOST_DATA and the VM's configuration checked, attester ready)
/// and waits for its one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ready {
    /// Guest uptime, milliseconds.
    pub uptime_ms: u64,
}

/// Announces one NAR stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NarBegin {
    /// The store path.
    pub path: nix_formats::StorePath,
    /// The NAR size that will follow.
    pub nar_size: u64,
}

/// Progress points of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PhaseName {
    /// The job was accepted (it fits the launch).
    JobAccepted,
    /// All inputs are unpacked and checked.
    InputsReady,
    /// The builder was started.
    Building,
    /// The builder exited successfully.
    Built,
    /// Outputs are being hashed.
    Hashing,
    /// The statement is being attested.
    Attesting,
    /// Outputs are being sent.
    Sending,
}

/// A progress frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    /// Which point.
    pub phase: PhaseName,
    /// Guest uptime, milliseconds.
    pub uptime_ms: u64,
}

/// The guest is alive (link-level; see `crate::liveness`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// 1, 2, 3, … per session.
    pub seq: u64,
    /// Guest uptime, milliseconds.
    pub uptime_ms: u64,
}

/// The successful end of a step (after all output NARs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    /// The canonical statement bytes, as a string (they are UTF-8 JSON).
    pub statement: String,
    /// The raw attestation report, base64.
    pub report: String,
    /// Who signed it.
    pub attester: AttesterKind,
    /// The certificate table the host attached to the report (GHCB format, base64), when it
    /// supplied one (`auxblob` / `SNP_GET_EXT_REPORT`); untrusted, like everything the host
    /// hands the guest. Absent on the wire otherwise, so older hosts read the message unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certs: Option<String>,
}

/// Why a step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// The channel or the job did not follow the protocol.
    Protocol,
    /// The launch does not hash to the VM's HOST_DATA.
    HostDataMismatch,
    /// The launch does not describe this VM, or does not admit the job.
    Launch,
    /// An input's NAR hash or size differs from the job.
    InputHash,
    /// An input's recomputed content address differs from the job's claim.
    InputCa,
    /// The builder ran longer than the timeout.
    Timeout,
    /// The builder was silent longer than allowed.
    MaxSilent,
    /// The builder logged more than allowed.
    LogLimit,
    /// The build hit a resource limit of its sandbox (memory, processes, tmpfs).
    ResourceLimit,
    /// The builder exited unsuccessfully.
    BuilderFailed,
    /// An output is missing or unusable.
    Output,
    /// Getting the attestation report failed.
    Attestation,
    /// Anything else inside the agent.
    Internal,
}

/// The failed end of a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failure {
    /// Category.
    pub kind: FailureKind,
    /// The agent's error chain.
    pub message: String,
}
