#!/usr/bin/env bash
# Run the tests that read test data in a fresh copy of this checkout that has nothing beside it
# (no `shared` directory, no sibling checkout): what a user who clones vouch gets.
# scripts/test-all.sh runs it after the full suite; the `self_contained` test of test-support is
# the cheap half of the same guard (a text search) and runs here too.
#
# The copy is the commit a clone would check out: HEAD, plus uncommitted changes to tracked
# files (`git stash create` records them without touching the checkout); untracked files are
# left out, as a clone would not have them. It builds in its own target directory,
# $CARGO_TARGET_DIR/self-contained (kept, so crates.io dependencies build once), after removing
# vouch's own crates from it: every test binary is built from the copy, so a path compiled in
# (env!("CARGO_MANIFEST_DIR")) points into the copy and nowhere else.
#
# Tests run: test-support (the text guard, the vectors' licences), nix-formats' derivation JSON
# of the real Nix 2.8 and 2.26 (tests/data/derivation-json), build-trace's evidence tests
# and its evidence bench in test mode, vm-image's unit tests (launch-digest vectors), `vouch
# evidence` through the CLI, and `vouch image measure` on the vectors (tests/tests/vm_image.rs,
# which also needs the guest image: VOUCH_IMAGE_DIR, as scripts/test-all.sh sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
target_dir=${CARGO_TARGET_DIR:-target}
case $target_dir in /*) ;; *) target_dir=$repo/$target_dir ;; esac
export CARGO_TARGET_DIR=$target_dir/self-contained
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}

rev=$(git stash create)
rev=${rev:-$(git rev-parse HEAD)}
untracked=$(git ls-files --others --exclude-standard)
if [ -n "$untracked" ]; then
  echo "note: untracked files are not in the copy (a clone would not have them):" >&2
  echo "$untracked" | sed 's/^/  /' >&2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/vouch-self-contained.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir "$work/vouch"
# -m: the files get the current time, not the commit's, so no build output looks newer.
git archive "$rev" | tar -x -m -C "$work/vouch"
if [ -e "$work/shared" ]; then
  echo "error: $work/shared exists; the copy must have nothing beside it" >&2
  exit 1
fi
cd "$work/vouch"
echo "== self-contained: $rev in $work/vouch (target $CARGO_TARGET_DIR)" >&2

# Every test binary and library of vouch's own crates is rebuilt from the copy.
cargo clean --quiet -p nix-formats -p build-trace -p agent -p host-launcher -p vm-image \
  -p test-support -p tests 2>/dev/null || true
run() {
  echo "== self-contained: cargo test $*" >&2
  cargo test --locked --quiet "$@"
}
run -p test-support
run -p nix-formats --test derivation_json_vectors
run -p build-trace --test evidence_real --test evidence_simulated --bench evidence
run -p vm-image --lib
run -p host-launcher --test evidence_cli
# `vouch image measure` (tests/tests/vm_image.rs) runs the binary the previous step built.
run -p tests --test vm_image
echo "== self-contained: passed with nothing beside the copy" >&2
