#!/usr/bin/env bash
# Short smoke run of every cargo-fuzz target in nix-formats/fuzz (see docs/fuzzing.md).
# Needs a nightly toolchain (installed with rustup if missing) and cargo-fuzz (installed into
# $VOUCH_CACHE/cargo-root if missing). FUZZ_SECONDS (default 30) bounds each target's run;
# pass target names as arguments to run only those.
set -euo pipefail
cd "$(dirname "$0")/../nix-formats/fuzz"
SECS=${FUZZ_SECONDS:-30}
VOUCH_CACHE=${VOUCH_CACHE:-$HOME/.cache/vouch}
export PATH="$VOUCH_CACHE/cargo-root/bin:$PATH"

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "[fuzz] installing the nightly toolchain (cargo-fuzz needs it)" >&2
  rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "[fuzz] cargo install cargo-fuzz 0.13.2 (a few minutes)" >&2
  cargo install --quiet --locked cargo-fuzz --version 0.13.2 --root "$VOUCH_CACHE/cargo-root"
fi

targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
failed=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  dirs=("corpus/$t")
  [ -d "seeds/$t" ] && dirs+=("seeds/$t")
  echo "[fuzz] $t for ${SECS}s" >&2
  cargo +nightly fuzz run "$t" "${dirs[@]}" -- -max_total_time="$SECS" || failed+=("$t")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "[fuzz] FAILED: ${failed[*]} (crash inputs under nix-formats/fuzz/artifacts/)" >&2
  exit 1
fi
echo "[fuzz] all targets ran ${SECS}s without a crash" >&2
