#!/usr/bin/env bash
# Install everything vouch's main job and test suite need on a fresh Debian 12 (bookworm) machine.
# Idempotent: re-running it only installs what is missing. Needs root (apt).
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }

# QEMU 10.0.2 (with the sev-snp-guest object) lives in bookworm-backports; bookworm's own 7.2 would
# remove the preinstalled qemu-utils 10.0.2.
BPO=/etc/apt/sources.list.d/bookworm-backports.sources
if [ ! -f "$BPO" ]; then
  uris=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  uris=${uris:-http://deb.debian.org/debian}
  log "adding bookworm-backports ($uris)"
  $SUDO tee "$BPO" >/dev/null <<SRC
Types: deb
URIs: $uris
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  APT_UPDATED=""
fi

have nix-build || need_apt+=(nix-bin)
[ -x /bin/busybox ] || need_apt+=(busybox-static)
have cpio || need_apt+=(cpio)
have sqlite3 || need_apt+=(sqlite3)
have openssl || need_apt+=(openssl)
[ -f /usr/src/linux-source-6.12.tar.xz ] || need_apt+=(linux-source-6.12)
have flex || need_apt+=(flex)
have bison || need_apt+=(bison)
have bc || need_apt+=(bc)
dpkg -s libelf-dev >/dev/null 2>&1 || need_apt+=(libelf-dev)
have python3 || need_apt+=(python3)
# pip for the provenance test's in-toto bindings (below); a pyenv Python brings its own.
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
# Go's sumdb tlog/note (x/mod 0.7.0), the independent implementation the transparency log's
# interoperation test builds offline (build-trace/tests/tlog_go.rs).
have go || need_apt+=(golang-go)
[ -d /usr/share/gocode/src/golang.org/x/mod/sumdb/tlog ] || need_apt+=(golang-golang-x-mod-dev)
have debootstrap || need_apt+=(debootstrap)
# `vouch verify --graph svg` and the diagrams of docs/img/ (tests/tests/verify_graph.rs).
have dot || need_apt+=(graphviz)
# A networked (fixed-output) VM's QEMU runs in a network namespace of its own behind nftables
# rules (host-launcher/src/vm/egress): `ip` and `nft`, which live in /usr/sbin.
have_sbin() { have "$1" || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
have_sbin ip || need_apt+=(iproute2)
have_sbin nft || need_apt+=(nftables)
# The CI service's web page is tested in a real headless Chromium through WebDriver
# (tests/tests/serve_web_vm.rs); its TLS test uses curl; its benchmark compares it with nginx
# under wrk (scripts/bench-serve.sh).
have chromium || need_apt+=(chromium)
have chromedriver || need_apt+=(chromium-driver)
have curl || need_apt+=(curl)
have_sbin nginx || need_apt+=(nginx-light)
have wrk || need_apt+=(wrk)

if [ ${#need_apt[@]} -gt 0 ]; then
  log "apt-get install ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! qemu-system-x86_64 --version 2>/dev/null | grep -q 'version 10\.'; then
  log "installing qemu-system-x86 from bookworm-backports"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    -t bookworm-backports qemu-system-x86 >/dev/null
fi

# in-toto's own Python bindings, the independent implementation the provenance test validates
# vouch's SLSA provenance with (tests/tests/provenance_cli.rs, tests/tests/provenance_slsa.py).
# The DSSE signature is checked with `cryptography`'s Ed25519.
if ! python3 -c 'import in_toto_attestation, google.protobuf, cryptography' 2>/dev/null; then
  log "pip install in-toto-attestation 0.9.3, protobuf, cryptography"
  pkgs=(in-toto-attestation==0.9.3 protobuf cryptography)
  python3 -m pip install --quiet --user "${pkgs[@]}" \
    || python3 -m pip install --quiet --user --break-system-packages "${pkgs[@]}"
fi

# The userspace vsock backend (no /dev/vhost-vsock on these machines).
VOUCH_CACHE=${VOUCH_CACHE:-$HOME/.cache/vouch}
mkdir -p "$VOUCH_CACHE/bin"
if [ ! -x "$VOUCH_CACHE/bin/vhost-device-vsock" ]; then
  log "cargo install vhost-device-vsock 0.3.0 (about a minute)"
  cargo install --quiet --locked vhost-device-vsock --version 0.3.0 --root "$VOUCH_CACHE/cargo-root" \
    || cargo install --quiet vhost-device-vsock --version 0.3.0 --root "$VOUCH_CACHE/cargo-root"
  ln -sf "$VOUCH_CACHE/cargo-root/bin/vhost-device-vsock" "$VOUCH_CACHE/bin/vhost-device-vsock"
fi

# Linux 6.12 UAPI headers for the SEV ABI test (host-launcher/tests/snp_abi.rs): bookworm's own
# linux-libc-dev is 6.1, which lacks SNP_PLATFORM_STATUS; bookworm-backports has 6.12. Unpacked
# into the cache (apt-get download + dpkg -x), not installed: the system's headers stay 6.1.
UAPI=$VOUCH_CACHE/linux-uapi-6.12
if ! grep -qs SNP_PLATFORM_STATUS "$UAPI/usr/include/linux/psp-sev.h"; then
  log "unpacking linux-libc-dev 6.12 (bookworm-backports) into $UAPI"
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download -qq "linux-libc-dev/bookworm-backports" 2>/dev/null \
    || { $SUDO apt-get update -qq && apt-get download -qq "linux-libc-dev/bookworm-backports"; })
  mkdir -p "$UAPI"
  dpkg -x "$tmp"/linux-libc-dev_*.deb "$UAPI"
  rm -rf "$tmp"
fi
# The configfs-tsm ABI document and the kernel-internal sizes the guest interface depends on,
# from the 6.12 source the guest kernel is built from (same test).
if [ ! -f "$UAPI/abi/Documentation/ABI/testing/configfs-tsm" ]; then
  log "extracting the configfs-tsm ABI document from linux-source-6.12"
  mkdir -p "$UAPI/abi"
  tar -xJf /usr/src/linux-source-6.12.tar.xz -C "$UAPI/abi" --strip-components=1 --wildcards \
    '*/Documentation/ABI/testing/configfs-tsm' '*/include/linux/tsm.h' '*/include/linux/psp-sev.h'
fi

# Nix 2.8 from Debian: make sure the store and db exist (nix-setup-systemd normally does this).
$SUDO mkdir -p /nix/store /nix/var/nix
# The second real Nix the tests use: Debian 13's Nix 2.26 in a chroot, made once and cached
# (about 2.5 min and 230 MiB; scripts/nix-chroot.sh).
$SUDO env VOUCH_CACHE="$VOUCH_CACHE" "$(dirname "$0")/nix-chroot.sh"
# The host routes the networked VMs' namespaces out; vouch refuses networked builds, naming this,
# while it is off. Turning a host into a router is the operator's call, so it is only reported.
if [ "$(cat /proc/sys/net/ipv4/ip_forward 2>/dev/null)" != 1 ]; then
  log "note: net.ipv4.ip_forward is 0: fixed-output builds are refused until you enable it"
  log "      (sysctl -w net.ipv4.ip_forward=1, or a file in /etc/sysctl.d); see docs/vm.md"
fi
log "host ready: $(nix --version 2>/dev/null | head -1); $(qemu-system-x86_64 --version | head -1)"
