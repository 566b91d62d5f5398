#!/usr/bin/env bash
# Installs the Debian packages the tests, the demo and the benchmark drive flexnbd with.
# Real NBD clients and servers: qemu-utils (qemu-img, qemu-io, qemu-nbd), libnbd-bin
# (nbdinfo, nbdcopy, nbdsh) with python3-libnbd (nbdsh needs it), nbdkit, fio; and groff-base,
# with which tests/man.rs checks that the manual page formats without warnings; and
# libssl-dev with pkg-config, which building the `openssl` crate (TLS, docs/tls.md) needs.
set -euo pipefail

packages=(qemu-utils libnbd-bin python3-libnbd nbdkit fio procps groff-base libssl-dev pkg-config)
commands=(qemu-img qemu-io qemu-nbd nbdinfo nbdcopy nbdsh nbdkit fio pgrep groff)

missing=0
for c in "${commands[@]}"; do
    command -v "$c" >/dev/null 2>&1 || missing=1
done
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || missing=1
# OpenSSL's headers and pkg-config file, for building.
pkg-config --exists openssl >/dev/null 2>&1 || missing=1
[ "$missing" = 0 ] && exit 0

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
echo "Installing ${packages[*]} ..." >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${packages[@]}" >/dev/null
