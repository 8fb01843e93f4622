//! The host↔guest channel of a vouch build VM, specified in `docs/channel.md`: the one contract
//! the host launcher and the guest agent share.
//!
//! What is here: the framing ([`proto`]), what the frames carry and in which order
//! ([`messages`]), keeping the channel observably alive ([`liveness`]: the guest's heartbeat and
//! the record a host watchdog reads), and the guest's kernel-command-line config ([`config`]:
//! the host reads the channel port from the image's command line with the same function).
//!
//! `fuzzing` (hidden) holds the body of the channel's fuzz target.
//!
//! What is not here: sockets or VMs (the host launcher), anything PID 1 does (the agent), or any
//! trust decision. This crate depends on neither side.
#![forbid(unsafe_code)]

pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod liveness;
pub mod messages;
pub mod proto;
