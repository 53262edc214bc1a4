// The task of the worker round-trip micro benchmark: what a chunk I/O task does with its payload, minus the disk.
// The payload sits in a SharedArrayBuffer slot both threads see (nothing is copied across), the task touches it
// and answers with a small result object carrying a code, not an exception (STYLE.md example 8).
import { workerData } from 'node:worker_threads';

const slots = new Uint8Array(workerData.shared as SharedArrayBuffer);
const slotBytes = workerData.slotBytes as number;

export interface RoundTripTask {
  slot: number;
  lengthBytes: number;
}

export interface RoundTripResult {
  code: 'OK' | 'EINVAL';
  firstByte: number;
}

export default function roundTrip(task: RoundTripTask): RoundTripResult {
  if (task.lengthBytes > slotBytes) return { code: 'EINVAL', firstByte: -1 };
  const at = task.slot * slotBytes;
  // Touch the first and the last byte of the payload, as a copy into a file would read it.
  slots[at + task.lengthBytes - 1] = slots[at]! ^ 1;
  return { code: 'OK', firstByte: slots[at]! };
}
