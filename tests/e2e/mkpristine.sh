#!/bin/sh
# Build a cached PRISTINE Debian root file system: what a fresh install has, only enough
# to boot with systemd as PID 1 in systemd-nspawn. No python3, no compiler, no curl:
# tests/e2e/test_pristine.py proves that tests/bootstrap and `pip install unitgen` start
# from there. Usage: mkpristine.sh SUITE DEST. Writes DEST.tmp, then renames, so an
# interrupted build never leaves a half-made DEST behind.
set -eu
suite=$1
dest=$2
rm -rf "$dest.tmp"
mkdir -p "$(dirname "$dest")"
debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus "$suite" "$dest.tmp"
# No getty on the console: boots faster and quieter (as mkrootfs.sh does).
rm -f "$dest.tmp/etc/systemd/system/getty.target.wants/"*
chroot "$dest.tmp" apt-get clean
# The cache is valid for this script only: testbed.py rebuilds when the stamp differs.
sha256sum "$0" | cut -d' ' -f1 > "$dest.tmp/.unitgen-rootfs"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
