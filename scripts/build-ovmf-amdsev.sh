#!/usr/bin/env bash
# Build the AmdSev OVMF (OvmfPkg/AmdSev/AmdSevX64.dsc: SEV-SNP with measured direct kernel boot,
# the SNP_KERNEL_HASHES page QEMU's kernel-hashes=on fills) from a pinned edk2 source, and record
# its hash. Debian ships no such build before sid's ovmf-amdsev; bookworm's edk2 (2022.11) predates
# the kernel-hashes metadata (edk2-stable202402), trixie's 2025.02 has it.
#
#   scripts/build-ovmf-amdsev.sh [OUT_DIR]       (default: $VOUCH_CACHE/ovmf, ~/.cache/vouch/ovmf)
#
# Source: Debian trixie's edk2 2025.02-8+deb13u1, fetched with apt from a temporary deb-src list
# (nothing is added to the system's sources) and checked against the SHA-256 values pinned below
# (the ones Debian's signed Sources index lists). Debian's patches are applied from its
# debian/patches/series. Set EDK2_SOURCE_DIR to a directory holding the two tarballs to build
# offline. Needs gcc, make, python3, nasm, iasl (acpica-tools), uuid-dev; about 15 CPU-minutes.
# The build tree is removed afterwards (its logs stay in the work directory); KEEP_BUILD=1 keeps it.
#
# Reproducibility: fixed build path ($VOUCH_CACHE/ovmf-build), SOURCE_DATE_EPOCH from
# debian/changelog, RELEASE build with the GCC5 toolchain tag (as Debian builds), no network. Two
# builds from fresh unpacks on Debian bookworm gave the same file, sha256
# 9148ea6f0af13a29c2298e0245fd132fe27f56682445e60302df5e340d2d5770 (see docs/snp-host.md).
# The firmware's SHA-256 goes to OUT_DIR/OVMF.amdsev.fd.sha256 and OUT_DIR/provenance.txt; the
# measurement of every image built with it depends on every byte, so pin that hash.
#
# grub.efi: AmdSevX64 embeds a grub.efi for booting from an encrypted disk. vouch boots the kernel
# directly (-kernel with kernel-hashes=on), so an empty placeholder stands in for it; it must be
# newer than Grub/grub.sh and grub.cfg, or the PREBUILD step tries to build grub.
#
# Next: vouch image build --ovmf OUT_DIR/OVMF.amdsev.fd   (records the expected SNP measurement)
set -euo pipefail

EDK2_VERSION=2025.02-8+deb13u1
ORIG=edk2_2025.02.orig.tar.xz
ORIG_SHA256=b63b6053d6d89c74d9291f9e96fde1584be99e6fb9c169ba9511505129d6b049
DEBIAN=edk2_${EDK2_VERSION}.debian.tar.xz
DEBIAN_SHA256=e2a7f6fc58640818416a028d6d5e9dfc255697a7cdc60c14566c236df6bd9b08

log() { printf '[ovmf] %s\n' "$*" >&2; }
die() { printf '[ovmf] error: %s\n' "$*" >&2; exit 1; }

VOUCH_CACHE=${VOUCH_CACHE:-$HOME/.cache/vouch}
OUT=${1:-$VOUCH_CACHE/ovmf}
WORK=$VOUCH_CACHE/ovmf-build
SRC=${EDK2_SOURCE_DIR:-$VOUCH_CACHE/ovmf-src}
JOBS=${JOBS:-$(nproc)}

for tool in gcc make python3 nasm iasl; do
  command -v "$tool" >/dev/null || die "$tool is missing (apt-get install build-essential python3 nasm acpica-tools uuid-dev)"
done
[ -f /usr/include/uuid/uuid.h ] || die "uuid-dev is missing (apt-get install uuid-dev)"

# 1. The source tarballs, pinned.
mkdir -p "$SRC"
have() { [ -f "$SRC/$1" ] && echo "$2  $SRC/$1" | sha256sum -c --quiet >/dev/null 2>&1; }
if ! have "$ORIG" "$ORIG_SHA256" || ! have "$DEBIAN" "$DEBIAN_SHA256"; then
  [ -z "${EDK2_SOURCE_DIR:-}" ] || die "$SRC does not hold $ORIG and $DEBIAN with the pinned hashes"
  log "fetching Debian's edk2 $EDK2_VERSION source with apt (temporary trixie deb-src list)"
  apt_dir=$(mktemp -d)
  trap 'rm -rf "$apt_dir"' EXIT
  mkdir -p "$apt_dir/lists/partial"
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${mirror:-http://deb.debian.org/debian} trixie main" \
    > "$apt_dir/sources.list"
  apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
            -o "Dir::State::Lists=$apt_dir/lists" -q)
  apt-get "${apt_opts[@]}" update >&2
  # Downloads the .dsc too where the mirror serves it; the two tarballs are what the build uses.
  (cd "$SRC" && apt-get "${apt_opts[@]}" source --download-only "edk2=$EDK2_VERSION" >&2) || true
  have "$ORIG" "$ORIG_SHA256" || die "$SRC/$ORIG missing or not the pinned $ORIG_SHA256"
  have "$DEBIAN" "$DEBIAN_SHA256" || die "$SRC/$DEBIAN missing or not the pinned $DEBIAN_SHA256"
fi

# 2. Unpack into a fixed path, apply Debian's patches.
rm -rf "$WORK"
mkdir -p "$WORK"
tar -xJf "$SRC/$ORIG" -C "$WORK"
E=$WORK/edk2-2025.02
tar -xJf "$SRC/$DEBIAN" -C "$E"
while read -r patch; do
  case "$patch" in ''|'#'*) continue ;; esac
  patch -d "$E" -p1 --quiet --forward < "$E/debian/patches/$patch"
done < "$E/debian/patches/series"
SOURCE_DATE_EPOCH=$(date -d "$(sed -n 's/^ -- .*>  //p' "$E/debian/changelog" | head -1)" +%s)
export SOURCE_DATE_EPOCH
log "edk2 $EDK2_VERSION unpacked in $E (SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH)"

# 3. The empty grub.efi placeholder, newer than grub.sh and grub.cfg.
: > "$E/OvmfPkg/AmdSev/Grub/grub.efi"
touch -d "@$((SOURCE_DATE_EPOCH + 1))" "$E/OvmfPkg/AmdSev/Grub/grub.efi"
touch -d "@$SOURCE_DATE_EPOCH" "$E/OvmfPkg/AmdSev/Grub/grub.sh" "$E/OvmfPkg/AmdSev/Grub/grub.cfg"

# 4. BaseTools, then the platform.
log "building BaseTools and OvmfPkg/AmdSev/AmdSevX64.dsc with $JOBS jobs"
cd "$E"
make -s -C BaseTools -j"$JOBS" >"$WORK/basetools.log" 2>&1 || { tail -30 "$WORK/basetools.log"; die "BaseTools failed ($WORK/basetools.log)"; }
# edksetup.sh is not written for `set -eu`, and reads the positional parameters as its options.
set --
set +eu
# shellcheck disable=SC1091
. ./edksetup.sh >"$WORK/edksetup.log" 2>&1
rc=$?
set -eu
[ "$rc" -eq 0 ] || { cat "$WORK/edksetup.log"; die "edksetup.sh failed"; }
build -q -a X64 -t GCC5 -b RELEASE -n "$JOBS" -p OvmfPkg/AmdSev/AmdSevX64.dsc \
  >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; die "edk2 build failed ($WORK/build.log)"; }

# 5. Publish with its hash.
FD=$E/Build/AmdSev/RELEASE_GCC5/FV/OVMF.fd
[ -f "$FD" ] || die "$FD was not produced"
mkdir -p "$OUT"
cp "$FD" "$OUT/OVMF.amdsev.fd"
sha=$(sha256sum "$OUT/OVMF.amdsev.fd" | cut -d' ' -f1)
echo "$sha  OVMF.amdsev.fd" > "$OUT/OVMF.amdsev.fd.sha256"
cat > "$OUT/provenance.txt" <<EOF
OVMF.amdsev.fd sha256 $sha
source: Debian trixie edk2 $EDK2_VERSION ($ORIG $ORIG_SHA256, $DEBIAN $DEBIAN_SHA256)
platform: OvmfPkg/AmdSev/AmdSevX64.dsc, RELEASE, GCC5, $(gcc --version | head -1), $(nasm -v), iasl $(iasl -v 2>/dev/null | sed -n 's/.*version \([0-9]*\).*/\1/p' | head -1)
grub.efi: empty placeholder (direct kernel boot)
SOURCE_DATE_EPOCH: $SOURCE_DATE_EPOCH
EOF
# The build tree is ~650 MiB; keep only the logs unless asked.
[ -n "${KEEP_BUILD:-}" ] || rm -rf "$E"
log "OVMF.amdsev.fd sha256 $sha"
echo "$OUT/OVMF.amdsev.fd"
log "next: vouch image build --ovmf $OUT/OVMF.amdsev.fd"
