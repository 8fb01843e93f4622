#!/usr/bin/env bash
# vouch's main job on a fresh Debian 12 machine: install what is needed, build the guest image,
# let an unmodified Nix build a two-step content-addressed chain through vouch (each step in its
# own VM), then verify the whole closure's build traces under a trust policy.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

./scripts/setup-host.sh
export VOUCH_CACHE=${VOUCH_CACHE:-$HOME/.cache/vouch}
export PATH="$VOUCH_CACHE/bin:$PATH"
./scripts/build-image.sh
VOUCH="${CARGO_TARGET_DIR:-$ROOT/target}/debug/vouch"
export VOUCH_IMAGE_DIR=${VOUCH_IMAGE_DIR:-$VOUCH_CACHE/image}
STATE=${VOUCH_STATE_DIR:-$HOME/.local/share/vouch}
mkdir -p "$STATE"

say() { printf '\n== %s\n' "$*"; }

say "what this host can do"
"$VOUCH" --state-dir "$STATE" doctor || true

# The example expression and a busybox for its builder (a store path made from the host's static
# busybox: `sh` must be a symlink so busybox picks the applet from argv[0]).
WORK=$(mktemp -d /tmp/vouch-main-job.XXXXXX)
mkdir -p "$WORK/bb"
cp /bin/busybox "$WORK/bb/busybox"
ln -s busybox "$WORK/bb/sh"
cp example/ca-chain.nix "$WORK/"
TAG=$(date +%s%N)

# Nix starts `remote-program --stdio` for each step; the wrapper pins vouch's state directory.
cat > "$WORK/vouch-builder" <<WRAP
#!/bin/sh
exec "$VOUCH" --state-dir "$STATE" nix-builder "\$@"
WRAP
chmod +x "$WORK/vouch-builder"

export NIX_CONFIG=$'experimental-features = nix-command ca-derivations\nsubstituters =\nsandbox = false\nbuild-users-group ='
BUILDERS="ssh-ng://localhost?remote-program=$WORK/vouch-builder x86_64-linux - 1 1 ca-derivations"

say "nix-build through vouch (every step in a fresh VM)"
DRV=$(nix-instantiate "$WORK/ca-chain.nix" -A hello --argstr tag "$TAG")
nix-build "$WORK/ca-chain.nix" -A hello --argstr tag "$TAG" --no-out-link \
  --max-jobs 0 --builders "$BUILDERS" 2>&1 >"$WORK/out-path" | tee "$WORK/build.log" >&2
OUT=$(cat "$WORK/out-path")
# Nix names the resolved derivation it sent; Nix 2.8 keys its build trace by that derivation.
RESOLVED=$(sed -n "s|^resolved derivation: '$DRV' -> '\(.*\)'.*|\1|p" "$WORK/build.log" | head -1)
echo "derivation: $DRV"
echo "output:     $OUT"
cat "$OUT/greeting"

say "the realisation Nix registered, signed by vouch"
echo "resolved derivation: $RESOLVED"
nix realisation info --json "$RESOLVED"
echo

# A trust policy for this host. Without SEV-SNP hardware the evidence is simulated: the policy
# must name this host's simulated root explicitly, or the verifier rejects it.
ARK="$STATE/simulated-snp/ark.der"
POLICY="$WORK/policy.toml"
if grep -q 'evidence: SIMULATED' "$WORK/build.log"; then
  KEY_ID=$(openssl x509 -inform der -in "$ARK" -pubkey -noout | openssl pkey -pubin -outform der | sha256sum | cut -d' ' -f1)
  cat > "$POLICY" <<POL
# Accept this development host's SIMULATED evidence, for our image only.
require = "builder:dev"
[builders.dev]
image_manifests = ["$VOUCH_IMAGE_DIR/manifest.json"]
[builders.dev.evidence]
simulated_roots = ["$KEY_ID"]
POL
else
  cat > "$POLICY" <<POL
# Genuine AMD SEV-SNP evidence for our image only.
require = "builder:amd"
[builders.amd]
image_manifests = ["$VOUCH_IMAGE_DIR/manifest.json"]
[builders.amd.evidence]
products = ["Milan", "Genoa", "Turin"]
POL
fi
echo "policy ($POLICY):"
cat "$POLICY"

say "vouch verify: the whole closure, re-resolved on the verifying side"
"$VOUCH" --state-dir "$STATE" verify --policy "$POLICY" --traces "$STATE/cache" --expect "$OUT" "$DRV"

say "the same closure under the default policy (genuine AMD Genoa/Turin, this image's measurements)"
set +e
"$VOUCH" --state-dir "$STATE" verify --image-manifest "$VOUCH_IMAGE_DIR/manifest.json" \
  --traces "$STATE/cache" "$DRV"
rc=$?
set -e
if grep -q 'evidence: SIMULATED' "$WORK/build.log" && [ $rc -ne 0 ]; then
  echo "(rejected, as it must be: this host's evidence is simulated, and an image without an"
  echo " AmdSev OVMF has no SEV-SNP measurement for the default policy to pin)"
fi
rm -rf "$WORK"
