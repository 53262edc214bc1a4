// Which metadata the tests' pools get: CHUNKD_TEST_METADATA=paged runs the store's crash, model and power-loss
// tests and the client tests over paged metadata (npm run test:paged), as CHUNKD_TEST_WORKERS runs them over
// other thread layouts. Unset: the default (memory).
import type { PoolOptions } from '../store/pool.ts';

/** The metadata kind CHUNKD_TEST_METADATA asks for, or undefined for the default. */
export function testMetadata(): 'paged' | undefined {
  const value = process.env.CHUNKD_TEST_METADATA;
  if (value === undefined || value === '' || value === 'memory') return undefined;
  if (value !== 'paged') throw new Error(`CHUNKD_TEST_METADATA=${value}: memory or paged`);
  return value;
}

/**
 * Pool options for an in-process test pool: paged metadata with a cache of a few pages (so that lookups and
 * map passes miss and read pages), checkpoints that give the event loop a turn every few map nodes they encode
 * (so that what runs beside them runs between their slices), and a checkpoint of a few pages written on the page
 * writer thread (page-writer.ts; a node's takes 256), when CHUNKD_TEST_METADATA=paged, nothing otherwise.
 */
export function testPoolOptions(): Pick<PoolOptions, 'metadata' | 'metadataCacheBytes' | 'metadataCommitSliceMs' | 'metadataPageWriterMinPages'> {
  return testMetadata() === 'paged' ? { metadata: 'paged', metadataCacheBytes: 64 * 1024, metadataCommitSliceMs: 0, metadataPageWriterMinPages: 4 } : {};
}
