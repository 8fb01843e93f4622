#!/usr/bin/env bash
# Run every vouch test on a fresh Debian 12 machine: installs what it needs, then runs the unit,
# property, real-Nix, real-AMD-vector and real-VM tests.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-host.sh
export VOUCH_CACHE=${VOUCH_CACHE:-$HOME/.cache/vouch}
export PATH="$VOUCH_CACHE/bin:$PATH"
# A one-shot run gains nothing from incremental compilation, which only adds to the target's size.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
# A fresh run needs about 3 GiB (debug target ~1.5 GiB, the kernel build ~1 GiB while it runs,
# VM scratch); what the target already holds counts towards it. Say so up front instead of
# failing mid-build with ENOSPC.
target_dir=${CARGO_TARGET_DIR:-target}
mkdir -p "$target_dir"
have_kib=$(du -sk "$target_dir" | awk '{print $1}')
need_kib=$((3 * 1024 * 1024 - have_kib))
[ "$need_kib" -gt $((512 * 1024)) ] || need_kib=$((512 * 1024))
free_kib=$(df -Pk "$target_dir" | awk 'NR==2 {print $4}')
if [ "${free_kib:-0}" -lt "$need_kib" ]; then
  echo "error: only $((free_kib / 1024)) MiB free for $target_dir; the test suite needs about $((need_kib / 1024)) MiB more" >&2
  exit 1
fi
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== guest image (static agent, cached kernel)" >&2
export VOUCH_IMAGE_DIR=${VOUCH_IMAGE_DIR:-$VOUCH_CACHE/image}
./scripts/build-image.sh
echo "== cargo test" >&2
cargo test --workspace --all-targets --no-fail-fast
