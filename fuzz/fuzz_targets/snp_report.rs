//! SNP evidence against the real AMD samples (body: `build_trace::fuzzing::evidence::snp_report`;
//! the first byte picks the sample). The samples are built, and their chains verified and
//! cached, before the first input, so that the heap bound measures the body alone.
#![no_main]

use build_trace::fuzzing::BOUND;

fn body(data: &[u8]) {
    build_trace::fuzzing::evidence::snp_report(data, vouch_fuzz::snp());
}

libfuzzer_sys::fuzz_target!(
    init: {
        vouch_fuzz::snp();
    },
    |data: &[u8]| vouch_fuzz::run("snp_report", data, BOUND, body)
);
