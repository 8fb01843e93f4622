#!/usr/bin/env bash
# Create, once, the Debian trixie chroot with Nix 2.26 that the real-Nix tests run beside the
# host's Nix 2.8 (test-support's `chroot` module uses it; the support matrix is in the README).
#
#   scripts/nix-chroot.sh            # create $VOUCH_CACHE/nix-2.26-chroot if missing or stale
#   scripts/nix-chroot.sh --print    # print the directory (creating it first)
#
# Contents: debootstrap's minbase variant, nix-bin (2.26.3 in trixie) and socat (the tests'
# `remote-program`, which joins Nix's stdio to a socket, as ssh would), plus the mount points the
# tests bind their per-test directories onto (/nix, /run/vouch; /srv and /tmp are there
# already). The chroot's own /nix is never used: each test mounts a fresh store of its own there,
# in a private mount namespace (test-support/src/chroot.rs).
#
# Cached outside the checkout, keyed by the stamp below (change it to force a rebuild); built in a
# temporary directory and renamed into place, under a lock, so parallel callers neither race nor
# see a half-made chroot. Needs root (debootstrap) and the network (the Debian mirror of
# /etc/apt/sources.list.d/debian.sources). Measured on a 2-core CI machine under load: 141 s
# (21 s user + 11 s system CPU; the rest is download and dpkg waiting) and 230 MiB.
set -euo pipefail

STAMP="vouch nix chroot 1: debootstrap minbase trixie + nix-bin socat"
VOUCH_CACHE=${VOUCH_CACHE:-$HOME/.cache/vouch}
DIR=${VOUCH_NIX_CHROOT:-$VOUCH_CACHE/nix-2.26-chroot}
log() { printf '[nix-chroot] %s\n' "$*" >&2; }

ready() { [ -f "$DIR/.vouch-stamp" ] && [ "$(cat "$DIR/.vouch-stamp")" = "$STAMP" ]; }

create() {
  [ "$(id -u)" -eq 0 ] || { log "error: creating the chroot needs root (debootstrap)"; exit 1; }
  command -v debootstrap >/dev/null || {
    log "error: debootstrap is missing: scripts/setup-host.sh installs it (apt-get install debootstrap)"
    exit 1
  }
  local mirror
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  tmp="$DIR.tmp.$$"
  rm -rf "$tmp"
  trap 'rm -rf "$tmp"' EXIT
  log "debootstrap --variant=minbase trixie ($mirror), then apt-get install nix-bin socat"
  local t0=$SECONDS
  # debootstrap's own resolver cannot install nix-bin (--include leaves perl modules
  # unconfigured): apt inside the chroot does it, in a private mount namespace with /proc and
  # /dev bound (the mounts end with the namespace, also on failure).
  if ! { debootstrap --variant=minbase trixie "$tmp" "$mirror" &&
      unshare --mount --propagation private -- sh -ec '
        mount --rbind /proc "$1/proc"; mount --rbind /dev "$1/dev"
        DEBIAN_FRONTEND=noninteractive chroot "$1" apt-get install -y --no-install-recommends nix-bin socat
        chroot "$1" apt-get clean
        chroot "$1" nix --version' sh "$tmp"; } >"$tmp.log" 2>&1; then
    tail -20 "$tmp.log" >&2
    log "error: creating the chroot failed (full log: $tmp.log)"
    exit 1
  fi
  grep '^nix (Nix)' "$tmp.log" >"$tmp/.nix-version"
  rm -f "$tmp.log"
  # The package cache is not needed again.
  rm -rf "$tmp"/var/lib/apt/lists/*_Packages
  mkdir -p "$tmp/nix" "$tmp/run/vouch"
  echo "$STAMP" >"$tmp/.vouch-stamp"
  rm -rf "$DIR"
  mv "$tmp" "$DIR"
  trap - EXIT
  log "created $DIR in $((SECONDS - t0)) s, $(du -sm "$DIR" | cut -f1) MiB: $(cat "$DIR/.nix-version")"
}

mkdir -p "$(dirname "$DIR")"
if ! ready; then
  exec 9>"$DIR.lock"
  flock 9
  ready || create
fi
[ "${1:-}" = "--print" ] && echo "$DIR"
exit 0
