#!/usr/bin/env bash
# Build the vouch guest image: the static agent, the guest kernel (built once from Debian's
# linux-source-6.12 and cached in $VOUCH_CACHE/kernel), the initramfs and the manifest, into
# $VOUCH_IMAGE_DIR (default $VOUCH_CACHE/image). Idempotent; VM tests and `vouch build` find the
# image there. Set VOUCH_OVMF to an AmdSev OVMF to also record the expected SNP measurement.
#
# `--bench` builds the bench image instead, the same way but with the agent's `bench` feature
# (the `vouch.bench=` modes; its version ends in `+bench`), into $VOUCH_BENCH_IMAGE_DIR (default
# $VOUCH_CACHE/bench-image), and `vouch` with its `bench` feature (`vouch bench vm`, `vouch bench
# boot`). The real image's agent never has the feature.
set -euo pipefail
cd "$(dirname "$0")/.."
export VOUCH_CACHE=${VOUCH_CACHE:-$HOME/.cache/vouch}
FEATURES=()
case "${1:-}" in
  "") OUT=${VOUCH_IMAGE_DIR:-$VOUCH_CACHE/image} ;;
  --bench)
    OUT=${VOUCH_BENCH_IMAGE_DIR:-$VOUCH_CACHE/bench-image}
    FEATURES=(--features bench)
    ;;
  *) echo "usage: $0 [--bench]" >&2; exit 2 ;;
esac
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
# The static agent gets its own target directory: its RUSTFLAGS would otherwise invalidate the
# host build's cache.
AGENT_TARGET="$TARGET/agent-static"
echo "[image] building the static vouch-agent ${FEATURES[*]}" >&2
RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR="$AGENT_TARGET" \
  cargo build --quiet --profile agent --target x86_64-unknown-linux-gnu -p agent --bin vouch-agent "${FEATURES[@]}"
AGENT="$AGENT_TARGET/x86_64-unknown-linux-gnu/agent/vouch-agent"
echo "[image] building vouch ${FEATURES[*]}" >&2
CARGO_TARGET_DIR="$TARGET" cargo build --quiet -p host-launcher --bin vouch "${FEATURES[@]}"
echo "[image] assembling the image (the kernel build takes ~4-6 min the first time, then it is cached)" >&2
"$TARGET/debug/vouch" image build --agent "$AGENT" --out "$OUT" ${VOUCH_OVMF:+--ovmf "$VOUCH_OVMF"}
