#!/usr/bin/env bash
# Run every vouch test on a fresh Debian 12 machine: installs what it needs, then runs the unit,
# property, real-Nix, real-AMD-vector and real-VM tests.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-host.sh
export VOUCH_CACHE=${VOUCH_CACHE:-$HOME/.cache/vouch}
export PATH="$VOUCH_CACHE/bin:$PATH"
# A one-shot run gains nothing from incremental compilation, which would double the target's size.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
# The debug target, the guest image and the VM tests' scratch need a few GiB; say so up front
# instead of failing mid-build with ENOSPC.
target_dir=${CARGO_TARGET_DIR:-target}
mkdir -p "$target_dir"
for dir in "$target_dir" "${TMPDIR:-/tmp}"; do
  free_kib=$(df -Pk "$dir" | awk 'NR==2 {print $4}')
  if [ "${free_kib:-0}" -lt $((4 * 1024 * 1024)) ]; then
    echo "error: only $((free_kib / 1024)) MiB free under $dir; the test suite needs about 4 GiB" >&2
    exit 1
  fi
done
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== guest image (static agent, cached kernel)" >&2
export VOUCH_IMAGE_DIR=${VOUCH_IMAGE_DIR:-$VOUCH_CACHE/image}
./scripts/build-image.sh
echo "== cargo test" >&2
cargo test --workspace --all-targets --no-fail-fast
