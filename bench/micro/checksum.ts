// Block checksums: computed for every block written and verified for every block read.
import type { Bench } from 'tinybench';
import { blockChecksum } from '../../src/store/checksum.ts';
import type { MicroModule } from './harness.ts';

export const checksum: MicroModule = {
  name: 'checksum',
  async register(bench: Bench) {
    const block = Buffer.alloc(4096);
    const large = Buffer.alloc(2 ** 20);
    for (let i = 0; i < large.length; i++) large[i] = (i * 31) & 0xff;
    block.set(large.subarray(0, block.length));
    let sink = 0;
    bench
      .add('blockChecksum 4 KiB', () => {
        sink ^= blockChecksum(block);
      })
      .add('blockChecksum 1 MiB', () => {
        sink ^= blockChecksum(large);
      });
    return async () => {
      if (sink === 0.5) throw new Error('unreachable: keeps the results alive');
    };
  },
};
