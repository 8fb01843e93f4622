//! One launch, one step: the verifier's check that no two accepted steps of a closure come from
//! the same VM launch.
//!
//! Algorithm. Every trace entry that counts towards an accepted output map contributes its
//! statement's launch nonce and REPORT_DATA ([`LaunchSeen`]; version-1 statements have no
//! launch: HOST_DATA bound their VM to their job). The first time a nonce is seen, it is
//! recorded with its REPORT_DATA and step; seeing it again with the **same** REPORT_DATA is the
//! same statement found twice (two trace sources, two derivations resolving to one step) and is
//! fine; with a **different** REPORT_DATA it is one VM that produced two statements — which the
//! measured agent never does (one job per VM, then power off) — and the closure is not
//! verified. The argument is in `docs/threat-model.md`.
//!
//! What is not here: checking the launch against the report (HOST_DATA, `super::step`).

use std::collections::HashMap;

use super::outcome::{BrokenLink, LinkCheck};
use crate::launch::Hex32;

/// The launch of one statement that counted towards an accepted step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LaunchSeen {
    /// The launch's nonce.
    pub nonce: Hex32,
    /// REPORT_DATA of the statement (which statement it is).
    pub report_data: [u8; 64],
}

/// The nonces seen so far in one verification, with the first statement and step of each.
#[derive(Debug, Default)]
pub(crate) struct Launches(HashMap<Hex32, ([u8; 64], String)>);

impl Launches {
    /// Record `seen` for `step`; a nonce already recorded for another statement is a broken
    /// link at `step`.
    pub(crate) fn record(&mut self, seen: &LaunchSeen, step: &str) -> Result<(), Box<BrokenLink>> {
        match self.0.get(&seen.nonce) {
            None => {
                self.0.insert(seen.nonce, (seen.report_data, step.to_owned()));
                Ok(())
            }
            Some((rd, _)) if *rd == seen.report_data => Ok(()),
            Some((_, first)) => Err(BrokenLink::new(
                LinkCheck::LaunchReused,
                format!(
                    "two different steps carry launch nonce {}: one VM ran two jobs, which the \
                     measured agent never does (the other step: {first})",
                    seen.nonce
                ),
            )
            .expected(
                "a fresh launch nonce for every step",
                format!("nonce {} again", seen.nonce),
            )),
        }
    }
}
