#!/usr/bin/env bash
# Run every vouch test on a fresh Debian 12 machine: installs what it needs, then runs the unit,
# property, real-Nix, real-AMD-vector and real-VM tests, and then the tests that read test data
# once more in a fresh copy of the checkout with nothing beside it (scripts/check-self-contained.sh:
# everything a test reads is in the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
export VOUCH_CACHE=${VOUCH_CACHE:-$HOME/.cache/vouch}
# Disk, checked before anything is installed: the debug target takes about 1.5 GiB (plus 0.7 GiB
# for the self-contained run's own target, $target_dir/self-contained), and a first run also
# builds the guest kernel (about 1.5 GiB while it builds, under $VOUCH_CACHE) and the Nix 2.26
# chroot (about 230 MiB there, scripts/nix-chroot.sh). Say so up front instead of failing
# mid-build with ENOSPC.
target_dir=${CARGO_TARGET_DIR:-target}
mkdir -p "$target_dir" "$VOUCH_CACHE"
mount_of() { df -P "$1" | awk 'NR==2 {print $6}'; }
free_mib() { df -Pm "$1" | awk 'NR==2 {print $4}'; }
need_target=2816
need_cache=0
ls "$VOUCH_CACHE"/kernel/*/bzImage >/dev/null 2>&1 || need_cache=1536
[ -f "$VOUCH_CACHE/nix-2.26-chroot/.vouch-stamp" ] || need_cache=$((need_cache + 256))
if [ "$(mount_of "$target_dir")" = "$(mount_of "$VOUCH_CACHE")" ]; then
  need_target=$((need_target + need_cache))
  need_cache=0
fi
for check in "$target_dir:$need_target" "$VOUCH_CACHE:$need_cache"; do
  dir=${check%:*} need=${check##*:}
  if [ "$need" -gt 0 ] && [ "$(free_mib "$dir")" -lt "$need" ]; then
    echo "error: only $(free_mib "$dir") MiB free for $dir; the test suite needs about $need MiB there" >&2
    exit 1
  fi
done
./scripts/setup-host.sh
# The fixed-output VM tests route their network namespaces out through this host (docs/vm.md);
# setup-host.sh leaves forwarding to the operator, the test run (a disposable CI host) turns it on.
if [ "$(cat /proc/sys/net/ipv4/ip_forward 2>/dev/null)" != 1 ]; then
  echo "== enabling net.ipv4.ip_forward for the fixed-output VM tests" >&2
  if [ "$(id -u)" -eq 0 ]; then sysctl -q -w net.ipv4.ip_forward=1; else sudo sysctl -q -w net.ipv4.ip_forward=1; fi
fi
export PATH="$VOUCH_CACHE/bin:$PATH"
# A one-shot run gains nothing from incremental compilation, which only adds to the target's size.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== crate and feature boundaries (verifier without key generation, agent without verifier)" >&2
./scripts/check-features.sh
echo "== guest image (static agent, cached kernel)" >&2
export VOUCH_IMAGE_DIR=${VOUCH_IMAGE_DIR:-$VOUCH_CACHE/image}
./scripts/build-image.sh
echo "== bench image (the agent with its vouch.bench= modes, for vm_agent and vouch bench)" >&2
export VOUCH_BENCH_IMAGE_DIR=${VOUCH_BENCH_IMAGE_DIR:-$VOUCH_CACHE/bench-image}
./scripts/build-image.sh --bench
echo "== cargo test" >&2
cargo test --workspace --all-targets --no-fail-fast
echo "== self-contained: the data-reading tests in a fresh copy with nothing beside it" >&2
./scripts/check-self-contained.sh
