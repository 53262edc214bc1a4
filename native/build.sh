#!/bin/sh
# Builds native/build/libchunkd-crc32.so from native/crc32.c (npm runs this at install: package.json's "install").
# chunkd runs without it (its checksums then go through @node-rs/crc32, slower per block: README, Durability),
# so a machine with no C compiler gets a line saying so and a successful install.
cd "$(dirname "$0")" || exit 0
compiler="${CC:-}"
if [ -z "$compiler" ]; then
  for candidate in cc gcc clang; do
    if command -v "$candidate" >/dev/null 2>&1; then compiler=$candidate; break; fi
  done
fi
if [ -z "$compiler" ] || ! command -v "$compiler" >/dev/null 2>&1; then
  echo "chunkd: no C compiler (cc, gcc, clang or \$CC): checksums will use @node-rs/crc32 (install gcc, then run sh native/build.sh)" >&2
  exit 0
fi
mkdir -p build
if "$compiler" -O2 -Wall -shared -fPIC -o build/libchunkd-crc32.so.tmp crc32.c; then
  mv build/libchunkd-crc32.so.tmp build/libchunkd-crc32.so
else
  rm -f build/libchunkd-crc32.so.tmp
  echo "chunkd: native/crc32.c did not build: checksums will use @node-rs/crc32" >&2
fi
exit 0
