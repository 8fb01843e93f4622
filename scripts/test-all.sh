#!/usr/bin/env bash
# Run every vouch test on a fresh Debian 12 machine: installs what it needs, then runs the unit,
# property, real-Nix, real-AMD-vector and real-VM tests.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-host.sh
export VOUCH_CACHE=${VOUCH_CACHE:-$HOME/.cache/vouch}
export PATH="$VOUCH_CACHE/bin:$PATH"
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== guest image (static agent, cached kernel)" >&2
export VOUCH_IMAGE_DIR=${VOUCH_IMAGE_DIR:-$VOUCH_CACHE/image}
./scripts/build-image.sh
echo "== cargo test" >&2
cargo test --workspace --all-targets --no-fail-fast
