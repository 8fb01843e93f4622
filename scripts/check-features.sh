#!/usr/bin/env bash
# The crate and feature boundaries of docs/architecture.md, checked on the dependency graph cargo
# resolves (`cargo tree`, normal dependencies, each package resolved on its own as its own build
# resolves it), then every feature combination linted (`cargo clippy -D warnings`).
#
# 1. host-launcher does not link the PID-1 crate (`agent`); `channel` links neither side.
# 2. A verifier-only build-trace (`--no-default-features --features verifier`) has no key
#    generation: no `producer`/`simulated-attester`, no nix-formats `keygen` (SecretKey::generate),
#    no rand_core of its own, no tempfile
#    (the trace-store writer). getrandom itself stays in the graph: RustCrypto's `std` features
#    (p384 and rsa under `sev`'s chain verification) turn on rand_core/getrandom; nothing of vouch
#    that generates a key is compiled.
# 3. The measured agent links no verifier: build-trace with `simulated-attester` only, no
#    aws-lc-rs (the verifier's signature checks), no RSA, no X.509 chains (`x509-cert`,
#    `sev/crypto_nossl`), no TOML trust policy, no tempfile, no `keygen`; and, without
#    `--features bench`, no benchmark modes (`channel/bench`).
# 4. The shipped `vouch` (`-p host-launcher`) has no `bench` feature.
# Each check has a positive control (the same pattern matches where the thing is present), so
# a check that cannot fail fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
  echo "check-features: $*" >&2
  exit 1
}
# `name vX [features]`, one line per package.
graph() { cargo tree --quiet -e normal --prefix none --format '{p} [{f}]' "$@" | sort -u; }
has() { grep -Eq "$2" <<<"$1"; }
# must_not GRAPH PATTERN WHAT; control GRAPH PATTERN WHAT
must_not() { if has "$1" "$2"; then fail "$3: $(grep -E "$2" <<<"$1" | head -3 | tr '\n' ' ')"; fi; }
control() { has "$1" "$2" || fail "positive control failed ($3): the pattern '$2' matches nothing"; }

echo "== crate boundaries" >&2
host=$(graph -p host-launcher)
must_not "$host" '^agent ' "host-launcher depends on the agent crate"
control "$host" '^channel ' "host-launcher links channel"
chan=$(graph -p channel)
must_not "$chan" '^(agent|host-launcher|build-trace|vm-image) ' "channel depends on a side"
must_not "$host" '^host-launcher .*\bbench\b' "the shipped vouch has the bench feature"
control "$(graph -p host-launcher --features bench)" '^host-launcher .*\bbench\b' "bench vouch"

echo "== verifier-only build-trace: no key generation" >&2
ver=$(graph -p build-trace --no-default-features --features verifier)
prod=$(graph -p build-trace)
has "$ver" '^build-trace v[^ ]+ \([^)]*\) \[verifier\]$' || fail "build-trace features: $(grep '^build-trace ' <<<"$ver")"
for check in \
  '^nix-formats .*\bkeygen\b@@nix-formats keygen (SecretKey::generate)' \
  '^tempfile @@tempfile (the trace-store writer)' \
  '^build-trace .*\b(producer|simulated-attester)\b@@build-trace producer side'; do
  must_not "$ver" "${check%%@@*}" "verifier-only build has ${check#*@@}"
  control "$prod" "${check%%@@*}" "producer build has ${check#*@@}"
done
direct=$(cargo tree --quiet -e normal --depth 1 --prefix none -p build-trace --no-default-features --features verifier)
must_not "$direct" '^rand_core ' "verifier-only build-trace depends on rand_core itself"
control "$(cargo tree --quiet -e normal --depth 1 --prefix none -p build-trace)" '^rand_core ' "producer rand_core"

echo "== the measured agent: no verifier, no bench modes" >&2
agent=$(graph -p agent)
has "$agent" '^build-trace v[^ ]+ \([^)]*\) \[simulated-attester\]$' || fail "agent's build-trace features: $(grep '^build-trace ' <<<"$agent")"
for check in \
  '^aws-lc-rs @@aws-lc-rs (every signature verification)' \
  '^rsa @@rsa (AMD chain signatures)' \
  '^x509-cert @@x509-cert (certificate chains)' \
  '^sev .*\bcrypto_nossl\b@@sev crypto_nossl (chain verification)' \
  '^toml @@toml (trust policy files)' \
  '^tempfile @@tempfile (the trace-store writer)' \
  '^nix-formats .*\bkeygen\b@@nix-formats keygen'; do
  must_not "$agent" "${check%%@@*}" "the agent links ${check#*@@}"
  control "$prod" "${check%%@@*}" "producer build has ${check#*@@}"
done
must_not "$agent" '^channel .*\bbench\b' "the real agent has the bench modes"
control "$(graph -p agent --features bench)" '^channel .*\bbench\b' "bench agent"

echo "== every feature combination builds clean" >&2
for f in "" verifier simulated-attester verifier,simulated-attester producer; do
  cargo clippy --quiet -p build-trace --no-default-features --features "$f" --lib -- -D warnings
done
cargo clippy --quiet -p nix-formats --no-default-features --lib -- -D warnings
cargo clippy --quiet -p channel -p agent --all-targets --features agent/bench -- -D warnings
cargo clippy --quiet -p agent --all-targets -- -D warnings
cargo clippy --quiet -p host-launcher --all-targets -- -D warnings
cargo clippy --quiet -p host-launcher --all-targets --features bench -- -D warnings
echo "check-features: ok" >&2
