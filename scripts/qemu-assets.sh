#!/usr/bin/env bash
# Fetches what the QEMU guest tests boot, without installing anything:
#   - Debian 12's cloud kernel (linux-image-*-cloud-amd64, Linux 6.1) with
#     its modules, from the machine's configured bookworm mirror;
#   - Debian 12's Linux 6.12 (linux-image-6.12.*+deb12-amd64-unsigned, the
#     bookworm point-release kernel with vDPA, vhost-vdpa and VDUSE modules)
#     for the tests that run the relay on the kernel's vhost-vdpa;
#   - QEMU 10 (qemu-system-x86/-common/-data) from bookworm-backports, read
#     through a private apt configuration so the system's sources stay as
#     they are. It runs from DIR/qemu10 beside the system's QEMU 7.2 with
#     `-L DIR/qemu10/usr/share/qemu`.
# Idempotent: a second run with everything in place does nothing.
#
# Usage: scripts/qemu-assets.sh [DIR]   (default: target/qemu-assets)
# Prints KERNEL=, MODULES=, VDPA_KERNEL=, VDPA_MODULES=, QEMU10=, QEMU10_DATA= lines.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-${SVQ_RELAY_QEMU_ASSETS:-$ROOT/target/qemu-assets}}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
cd "$DIR"

# apt-get download writes into the current directory; as root it warns that
# _apt cannot write there, which is harmless.
download() { apt-get "$@" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true; }

# Runs COMMAND... (which prints a package name) and prints what it found,
# reading the package lists again once if they do not know it yet.
resolve() {
  local pkg
  pkg=$("$@")
  if [ -z "$pkg" ]; then
    ${SUDO:-} apt-get update -qq >&2
    pkg=$("$@")
  fi
  echo "$pkg"
}

# Downloads the kernel image package PKG and unpacks it into DEST.
unpack_kernel() { # PKG DEST
  rm -f linux-image-*.deb
  download download "$1"
  ls linux-image-*.deb >/dev/null || { echo "qemu-assets: download of $1 failed" >&2; exit 2; }
  rm -rf "$2.tmp" && dpkg-deb -x linux-image-*.deb "$2.tmp" && rm -rf "$2" && mv "$2.tmp" "$2"
  rm -f linux-image-*.deb
}

cloud_kernel() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}'
}

# The newest 6.12 image of the configured bookworm suites.
kernel612() {
  apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$' 2>/dev/null \
    | awk '{print $1}' | sort -V | tail -n1
}

if ! ls kernel/boot/vmlinuz-* >/dev/null 2>&1; then
  pkg=$(resolve cloud_kernel)
  [ -n "$pkg" ] || { echo "qemu-assets: cannot resolve linux-image-cloud-amd64" >&2; exit 2; }
  unpack_kernel "$pkg" kernel
fi

if ! ls kernel612/boot/vmlinuz-* >/dev/null 2>&1; then
  pkg=$(resolve kernel612)
  [ -n "$pkg" ] || { echo "qemu-assets: no linux-image-6.12.*+deb12-amd64-unsigned package" >&2; exit 2; }
  unpack_kernel "$pkg" kernel612
fi

if [ ! -x qemu10/usr/bin/qemu-system-x86_64 ]; then
  apt_dir=$DIR/apt
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
  echo "deb http://deb.debian.org/debian bookworm-backports main" >"$apt_dir/sources.list"
  opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=/nonexistent"
        -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o "Debug::NoLocking=1")
  apt-get "${opts[@]}" update -qq
  rm -f qemu-system-*.deb
  download "${opts[@]}" download qemu-system-x86 qemu-system-common qemu-system-data
  rm -rf qemu10.tmp && mkdir qemu10.tmp
  for f in qemu-system-*.deb; do dpkg-deb -x "$f" qemu10.tmp; done
  rm -rf qemu10 && mv qemu10.tmp qemu10
  rm -f qemu-system-*.deb
fi

kernel=$(ls "$DIR"/kernel/boot/vmlinuz-* | head -n1)
modules=$(ls -d "$DIR"/kernel/lib/modules/* | head -n1)
echo "KERNEL=$kernel"
echo "MODULES=$modules"
echo "VDPA_KERNEL=$(ls "$DIR"/kernel612/boot/vmlinuz-* | head -n1)"
echo "VDPA_MODULES=$(ls -d "$DIR"/kernel612/lib/modules/* | head -n1)"
echo "QEMU10=$DIR/qemu10/usr/bin/qemu-system-x86_64"
echo "QEMU10_DATA=$DIR/qemu10/usr/share/qemu"
"$DIR/qemu10/usr/bin/qemu-system-x86_64" --version | head -n1 >&2
