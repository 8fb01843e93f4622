#!/usr/bin/env bash
# The soak benchmark (not part of .ci/run; about 10 minutes under TCG): 200 consecutive short
# builds through one `vouch nix-builder --listen` from 2 concurrent Nix 2.8 clients, sampling the
# launcher's RSS, descriptors, threads and temporary directories every 10 builds
# (tests/tests/soak.rs). Prints the table that goes to docs/benchmarks.md.
#   VOUCH_SOAK_BUILDS=20 scripts/soak.sh            a quick trial
#   VOUCH_BIN=target/release/vouch scripts/soak.sh  measure a release build of vouch
set -euo pipefail
cd "$(dirname "$0")/.."
export VOUCH_CACHE=${VOUCH_CACHE:-$HOME/.cache/vouch}
export PATH="$VOUCH_CACHE/bin:$PATH"
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
cargo build --quiet -p host-launcher --bin vouch
echo "== $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" >&2
echo "== vouch: ${VOUCH_BIN:-target/debug/vouch}; image: ${VOUCH_IMAGE_DIR:-$VOUCH_CACHE/image}" >&2
exec cargo test --quiet -p tests --test soak -- --ignored --nocapture
