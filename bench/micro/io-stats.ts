// What counting a request costs (node/io-stats.ts): a 4 KiB read through a MeasuredDevice against the same read
// on the device itself, whose read does nothing but resolve (so the difference is all the counting: two
// performance.now() calls, a bucket scan, the increments and one more promise), and the store's stage wrapper's
// cost the same way. Compare with a 4 KiB read's cost through NBD at QD32 (tens of microseconds). And the same
// counting done with prom-client (a labelled counter for requests, one for bytes, a histogram of the same buckets),
// the library issue 18 names: what writing the counters by hand saves per request.
import type { Bench } from 'tinybench';
import type { BlockDevice } from '../../src/core/block-device.ts';
import { Counter, Histogram, Registry } from 'prom-client';
import { latencyBucketsSeconds } from '../../src/core/latency-histogram.ts';
import { emptyIoStats, MeasuredDevice } from '../../src/node/io-stats.ts';
import type { MicroModule } from './harness.ts';

const resolved = Promise.resolve();
const device: BlockDevice = {
  name: 'vol',
  sizeBytes: 2 ** 30,
  readOnly: false,
  read: () => resolved,
  write: () => resolved,
  trim: () => resolved,
  writeZeroes: () => resolved,
  flush: () => resolved,
  blockStatus: async () => [],
  close: () => resolved,
};

export const ioStats: MicroModule = {
  name: 'io-stats',
  async register(bench: Bench) {
    const measured = new MeasuredDevice(device, emptyIoStats());
    const target = Buffer.alloc(4096);
    bench.add('4 KiB read, device alone (baseline)', async () => {
      await device.read(0, target);
    });
    bench.add('4 KiB read through MeasuredDevice', async () => {
      await measured.read(0, target);
    });
    // prom-client's way: the label values looked up per call, as a Prometheus client is used.
    const registry = new Registry();
    const requests = new Counter({ name: 'requests_total', help: 'requests', labelNames: ['volume', 'op'], registers: [registry] });
    const bytes = new Counter({ name: 'bytes_total', help: 'bytes', labelNames: ['volume', 'op'], registers: [registry] });
    const latency = new Histogram({ name: 'request_seconds', help: 'latency', labelNames: ['volume', 'op'], buckets: [...latencyBucketsSeconds], registers: [registry] });
    bench.add('4 KiB read counted with prom-client (2 counters, 1 histogram)', async () => {
      const start = performance.now();
      await device.read(0, target);
      const labels = { volume: 'vol', op: 'read' };
      requests.inc(labels);
      bytes.inc(labels, target.length);
      latency.observe(labels, (performance.now() - start) / 1000);
    });
    return async () => {};
  },
};
