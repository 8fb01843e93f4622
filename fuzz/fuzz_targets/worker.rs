//! A worker-protocol client's byte stream against `vouch nix-builder`'s front-end (body:
//! `host_launcher::nixproto::fuzzing::worker_session`).
#![no_main]

use host_launcher::nixproto::fuzzing::{worker_session, BOUND};

libfuzzer_sys::fuzz_target!(|data: &[u8]| vouch_fuzz::run("worker", data, BOUND, worker_session));
