// CRC-32 of many 4 KiB blocks in one native call: native/crc32.c, built at npm install into
// native/build/libchunkd-crc32.so and called through koffi (as libc is, core/libc.ts). A 1 MiB write's 256 chunk
// checksums through @node-rs/crc32 are 256 calls, each with its N-API glue; here they are one, with a CRC kernel
// on 256-bit registers where the CPU has VPCLMULQDQ (BENCHMARKS.md, issue 19, "The chunk checksums in one native
// call"). Loaded on first use, never at import: a worker thread terminated while an addon loads aborts the process
// (core/libc.ts). Where the library was not built (no C compiler at install) or CHUNKD_CRC says so, checksum.ts
// uses @node-rs/crc32: the same values, slower.
import fs from 'node:fs';
import path from 'node:path';
import { ChunkdError } from '../core/errors.ts';
import { koffi } from '../core/libc.ts';
import { packageRoot } from '../core/source-files.ts';

/** Where native/build.sh puts the library. */
export const nativeCrcLibrary = path.join(packageRoot, 'native', 'build', 'libchunkd-crc32.so');

/** The native kernels, by the number native/crc32.c knows them by. */
const kernelNames = ['table', 'pclmul', 'vpclmul'] as const;
export type NativeCrcKernel = (typeof kernelNames)[number];

/** CHUNKD_CRC's values: `auto` (the default: the best native kernel, else @node-rs/crc32), a native kernel, or `node-rs`. */
export const crcChoices = ['auto', ...kernelNames, 'node-rs'] as const;

export interface NativeCrc {
  /** The kernel in use: `vpclmul` (VPCLMULQDQ with AVX2), `pclmul` (PCLMULQDQ), `table` (a byte at a time). */
  kernel: NativeCrcKernel;
  /** The CRC-32 of `bytes`. */
  checksum(bytes: Uint8Array): number;
  /** The CRC-32 of each of `count` blocks of `blockBytes` from the start of `bytes`, into out[0..count). */
  blocks(bytes: Uint8Array, blockBytes: number, count: number, out: Uint32Array): void;
}

/**
 * The native CRC with the kernel `choice` asks for (a kernel this CPU lacks is refused), or null where the
 * library is not built or `choice` is `node-rs`. Throws on a choice it does not know.
 */
export function loadNativeCrc(choice: string = process.env.CHUNKD_CRC ?? 'auto'): NativeCrc | null {
  if (!(crcChoices as readonly string[]).includes(choice)) throw ChunkdError.invalid(`CHUNKD_CRC="${choice}": expected one of ${crcChoices.join(', ')}`);
  if (choice === 'node-rs' || !fs.existsSync(nativeCrcLibrary)) return null;
  const library = koffi().load(nativeCrcLibrary);
  const best = library.func('int chunkd_crc32_best_kernel(void)')() as number;
  const kernel = choice === 'auto' ? best : kernelNames.indexOf(choice as NativeCrcKernel);
  if (kernel > best) throw ChunkdError.invalid(`CHUNKD_CRC="${choice}": this CPU runs no more than ${kernelNames[best]}`);
  const checksumFn = library.func('uint32_t chunkd_crc32(int kernel, const uint8_t *bytes, size_t length)');
  const blocksFn = library.func('void chunkd_crc32_blocks(int kernel, const uint8_t *bytes, size_t block_bytes, size_t count, uint32_t *out)');
  return {
    kernel: kernelNames[kernel]!,
    checksum: (bytes) => checksumFn(kernel, bytes, bytes.length) as number,
    blocks: (bytes, blockBytes, count, out) => {
      if (bytes.length < blockBytes * count || out.length < count) throw new RangeError(`${count} blocks of ${blockBytes} bytes: ${bytes.length} bytes, ${out.length} sums`);
      blocksFn(kernel, bytes, blockBytes, count, out);
    },
  };
}
