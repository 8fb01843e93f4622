//! A serve-protocol client's byte stream against `vouch nix-builder`'s front-end (body:
//! `host_launcher::nixproto::fuzzing::serve_session`).
#![no_main]

use host_launcher::nixproto::fuzzing::{serve_session, BOUND};

libfuzzer_sys::fuzz_target!(|data: &[u8]| vouch_fuzz::run("serve", data, BOUND, serve_session));
