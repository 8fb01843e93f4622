#!/usr/bin/env bash
# Build the vouch guest image: the static agent, the guest kernel (built once from Debian's
# linux-source-6.12 and cached in $VOUCH_CACHE/kernel), the initramfs and the manifest, into
# $VOUCH_IMAGE_DIR (default $VOUCH_CACHE/image). Idempotent; VM tests and `vouch build` find the
# image there. Set VOUCH_OVMF to an AmdSev OVMF to also record the expected SNP measurement.
set -euo pipefail
cd "$(dirname "$0")/.."
export VOUCH_CACHE=${VOUCH_CACHE:-$HOME/.cache/vouch}
export VOUCH_IMAGE_DIR=${VOUCH_IMAGE_DIR:-$VOUCH_CACHE/image}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
# The static agent gets its own target directory: its RUSTFLAGS would otherwise invalidate the
# host build's cache.
AGENT_TARGET="$TARGET/agent-static"
echo "[image] building the static vouch-agent" >&2
RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR="$AGENT_TARGET" \
  cargo build --quiet --profile agent --target x86_64-unknown-linux-gnu -p agent --bin vouch-agent
AGENT="$AGENT_TARGET/x86_64-unknown-linux-gnu/agent/vouch-agent"
echo "[image] building vouch" >&2
CARGO_TARGET_DIR="$TARGET" cargo build --quiet -p host-launcher --bin vouch
echo "[image] assembling the image (the kernel build takes ~4-6 min the first time, then it is cached)" >&2
"$TARGET/debug/vouch" image build --agent "$AGENT" --out "$VOUCH_IMAGE_DIR" ${VOUCH_OVMF:+--ovmf "$VOUCH_OVMF"}
