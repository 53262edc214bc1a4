// Turns a device's allocation map into base:allocation descriptors for an NBD_REPLY_TYPE_BLOCK_STATUS chunk.
// The spec's rules: at least one descriptor, each nonzero; with REQ_ONE exactly one, no longer than the
// request; the server SHOULD use different statuses for consecutive descriptors (so neighbours are merged),
// and MAY report less than was asked (so the count is capped at limits.blockStatusExtentsMax).
import { assert } from '../core/assert.ts';
import type { Extent } from '../core/block-device.ts';
import { blockStatusExtentsMax } from '../core/limits.ts';
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from './protocol.ts';
import type { BlockDescriptor } from './protocol.ts';

/** Descriptors for `extents` (what the device answered for a query of `queriedBytes`). */
export function blockDescriptors(extents: readonly Extent[], queriedBytes: number, requestOne: boolean): BlockDescriptor[] {
  assert(extents.length >= 1, 'blockStatus answers at least one extent');
  const descriptors: BlockDescriptor[] = [];
  let coveredBytes = 0;
  for (const extent of extents) {
    assert(Number.isSafeInteger(extent.lengthBytes) && extent.lengthBytes >= 1, 'an extent is at least one byte');
    coveredBytes += extent.lengthBytes;
    assert(coveredBytes <= queriedBytes, 'blockStatus answers no more than was asked');
    const statusFlags = (extent.hole ? NBD_STATE_HOLE : 0) | (extent.zero ? NBD_STATE_ZERO : 0);
    const last = descriptors.at(-1);
    if (last !== undefined && last.statusFlags === statusFlags) {
      last.lengthBytes += extent.lengthBytes; // stays below 2^32: queriedBytes does
      continue;
    }
    if (descriptors.length === blockStatusExtentsMax || (requestOne && descriptors.length === 1)) break;
    descriptors.push({ lengthBytes: extent.lengthBytes, statusFlags });
  }
  return descriptors;
}
