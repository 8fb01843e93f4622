//! The host↔guest channel's frame reader and messages (body: `channel::fuzzing::frames`).
#![no_main]

use channel::fuzzing::{frames, BOUND};

libfuzzer_sys::fuzz_target!(|data: &[u8]| vouch_fuzz::run("channel", data, BOUND, frames));
