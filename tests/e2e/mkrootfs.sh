#!/bin/sh
# Build a cached Debian root file system for the e2e test bed (systemd as PID 1 in
# systemd-nspawn). Usage: mkrootfs.sh SUITE DEST. Writes DEST.tmp, then renames, so an
# interrupted build never leaves a half-made DEST behind.
set -eu
suite=$1
dest=$2
# A plain Debian with systemd, plus what the e2e test apps import. unitgen's own
# dependencies are NOT here: each booted container installs the .deb with apt-get,
# which must pull them from Debian (python3-uvicorn, python3-systemd, ...).
pkgs=systemd,systemd-sysv,dbus,procps,iproute2,curl,ca-certificates
pkgs=$pkgs,python3,python3-flask,python3-starlette,python3-venv
# A real ssh.service and ssh.socket: names that install must refuse to shadow.
pkgs=$pkgs,openssh-server
# examples/redis: a real Redis server and redis-py, both from Debian.
pkgs=$pkgs,redis-server,python3-redis
# Debian 12 has no a2wsgi: the worker falls back to uvicorn's WSGI middleware there.
[ "$suite" = bookworm ] || pkgs=$pkgs,python3-a2wsgi
rm -rf "$dest.tmp"
mkdir -p "$(dirname "$dest")"
debootstrap --variant=minbase --include="$pkgs" "$suite" "$dest.tmp"
# No getty on the console, a fixed machine id: boots faster and quieter.
rm -f "$dest.tmp/etc/systemd/system/getty.target.wants/"*
# The containers share the host's network: sshd listens on loopback only.
mkdir -p "$dest.tmp/etc/ssh/sshd_config.d"
echo "ListenAddress 127.0.0.1" > "$dest.tmp/etc/ssh/sshd_config.d/unitgen-testbed.conf"
# The containers share the host's network, so Redis must not take port 6379 at boot in
# every one of them: the redis tests start it themselves, each on a free port.
chroot "$dest.tmp" systemctl disable -q redis-server.service
chroot "$dest.tmp" apt-get clean
# The cache is valid for this script only: testbed.py rebuilds when the stamp differs.
sha256sum "$0" | cut -d' ' -f1 > "$dest.tmp/.unitgen-rootfs"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
