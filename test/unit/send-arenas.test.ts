// The sender's record arenas (replication/send.ts): scattered 4 KiB records are carved from 1 MiB arenas, and an
// arena is reused once every record carved from it was recycled, never before. Records a consumer holds keep their
// bytes while later records are carved from reused arenas, and every record decodes to the chunk it names.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'vitest';
import { sendSmallReadsAheadMax } from '../../src/core/limits.ts';
import { prepareSend } from '../../src/replication/send.ts';
import { StreamDecoder } from '../../src/replication/stream-format.ts';
import { Pool } from '../../src/store/pool.ts';
import { testPoolOptions } from '../../src/testing/test-metadata.ts';

const chunkBytes = 4096;
/** Scattered chunks: several arenas' worth of 4 KiB records (about 250 fit an arena), beyond what is read ahead. */
const chunkCount = 1200;
/** For the test of reuse: twice the small reads a sender keeps ahead, so that later reads find arenas recycled. */
const reuseChunkCount = 2 * sendSmallReadsAheadMax;

/** The bytes written at virtual chunk `chunk`: its index in every word, so a record holding another's bytes shows. */
function chunkBytesOf(chunk: number): Buffer {
  const bytes = Buffer.alloc(chunkBytes);
  for (let at = 0; at < chunkBytes; at += 4) bytes.writeUInt32LE(chunk * 4099 + at + 1, at);
  return bytes;
}

/** A pool in a fresh directory with volume `v` of `sizeBytes`, open for `body`; the directory is removed after. */
async function withVolume(sizeBytes: number, body: (pool: Pool, volume: ReturnType<Pool['openVolume']>) => Promise<void>): Promise<void> {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-send-arenas-'));
  try {
    const pool = await Pool.open({ directory, ...testPoolOptions() });
    await pool.createVolume('v', sizeBytes);
    await body(pool, pool.openVolume('v'));
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
}

test('record arenas are reused once their records are recycled, and a record still held keeps its bytes', async () => {
  await withVolume(2 * reuseChunkCount * chunkBytes, async (pool, volume) => {
    // Every other chunk, so that no two written chunks make one extent: one 4 KiB record each.
    for (let i = 0; i < reuseChunkCount; i++) await volume.write(2 * i * chunkBytes, chunkBytesOf(2 * i));
    await volume.close();
    await pool.createSnapshot('v', 's');

    const prepared = await prepareSend(pool, { volume: 'v', snapshot: 's', from: null, resumeOffsetBytes: 0 }, () => {});
    /** Records held back (never recycled), with the bytes each had when it was yielded. */
    const held: Array<{ record: Buffer[]; bytes: Buffer }> = [];
    const arenasSeen = new Set<ArrayBufferLike>();
    let lastArena: ArrayBufferLike | null = null;
    let arenasReused = 0;
    let dataRecords = 0;
    const decoder = new StreamDecoder();
    let index = 0;
    for await (const record of prepared.records) {
      const bytes = Buffer.concat(record);
      for (const decoded of decoder.push(bytes)) {
        if (decoded.type !== 'data') continue;
        dataRecords += 1;
        assert.equal(decoded.data.length, chunkBytes);
        assert.ok(decoded.data.equals(chunkBytesOf(decoded.offsetBytes / chunkBytes)), `the record at byte ${decoded.offsetBytes} holds other bytes`);
      }
      if (record.length === 1 && index > 0) {
        // A record from an arena left before: that arena came back.
        const memory = record[0]!.buffer;
        if (memory !== lastArena && arenasSeen.has(memory)) arenasReused += 1;
        arenasSeen.add(memory);
        lastArena = memory;
      }
      // Two records of the first arena are held for good (it must never come back); the rest are recycled at once.
      if (index === 7 || index === 107) held.push({ record, bytes });
      else prepared.recycle([record]);
      index += 1;
    }
    assert.equal(prepared.failure(), null);
    assert.equal(dataRecords, reuseChunkCount);
    for (const { record, bytes } of held) assert.ok(Buffer.concat(record).equals(bytes), 'a record still held was overwritten by a later one');
    assert.ok(arenasReused > 0, 'no arena was reused');
    await pool.close();
  });
});

test('batches carry the same records as records, in order, a bounded number at a time', async () => {
  await withVolume(4 * chunkCount * chunkBytes, async (pool, volume) => {
    // Scattered 4 KiB chunks, some of zeros (ZERO records), and a 1.5 MiB extent (records of their own buffers).
    for (let i = 0; i < chunkCount; i++) await volume.write(2 * i * chunkBytes, i % 50 === 7 ? Buffer.alloc(chunkBytes) : chunkBytesOf(2 * i));
    const big = Buffer.concat(Array.from({ length: 384 }, (_, i) => chunkBytesOf(2 * chunkCount + i)));
    await volume.write(2 * chunkCount * chunkBytes, big);
    await volume.close();
    await pool.createSnapshot('v', 's');
    const request = { volume: 'v', snapshot: 's', from: null, resumeOffsetBytes: 0 };

    const one = await prepareSend(pool, request, () => {});
    const byRecord: Buffer[] = [];
    for await (const record of one.records) {
      byRecord.push(Buffer.concat(record));
      one.recycle([record]);
    }
    const many = await prepareSend(pool, request, () => {});
    const byBatch: Buffer[] = [];
    let batches = 0;
    for await (const batch of many.batches) {
      batches += 1;
      assert.ok(batch.length >= 1 && batch.length <= 65, `a batch of ${batch.length} records`);
      for (const record of batch) byBatch.push(Buffer.concat(record));
      many.recycle(batch);
    }
    assert.equal(many.failure(), null);
    assert.equal(byBatch.length, byRecord.length);
    for (let i = 0; i < byRecord.length; i++) assert.ok(byBatch[i]!.equals(byRecord[i]!), `record ${i} differs`);
    assert.ok(batches < byRecord.length / 8, `${batches} batches for ${byRecord.length} records: not batched`);
    assert.equal(many.coveredBytes(), many.header.dataBytes);
    // The stream decodes whole: every chunk as written, its END last.
    const decoder = new StreamDecoder();
    const types: string[] = [];
    for (const bytes of byBatch) for (const decoded of decoder.push(bytes)) types.push(decoded.type);
    assert.equal(types[0], 'header');
    assert.equal(types[types.length - 1], 'end');
    assert.ok(types.includes('zero'));
    await pool.close();
  });
});

test('a large extent\'s records go as one buffer each, sealed from the checksums their reads verified, and their buffers come back only once recycled', async () => {
  const MiB = 1024 * 1024;
  await withVolume(20 * MiB, async (pool, volume) => {
    // 16 MiB of data (twice the sender's read-ahead, so that buffers are read into again): sixteen 1 MiB records,
    // the fourth with a zero chunk in its middle (a data, a zero, a data record).
    const data = Buffer.concat(Array.from({ length: (16 * MiB) / chunkBytes }, (_, i) => (i === 3 * 256 + 100 ? Buffer.alloc(chunkBytes) : chunkBytesOf(i))));
    await volume.write(0, data);
    await volume.close();
    await pool.createSnapshot('v', 's');

    const prepared = await prepareSend(pool, { volume: 'v', snapshot: 's', from: null, resumeOffsetBytes: 0 }, () => {});
    const decoder = new StreamDecoder();
    const received = Buffer.alloc(16 * MiB);
    let held: { record: Buffer[]; bytes: Buffer } | null = null;
    const memories = new Map<ArrayBufferLike, number>();
    let wholeRecords = 0;
    for await (const record of prepared.records) {
      const bytes = Buffer.concat(record);
      for (const decoded of decoder.push(bytes)) if (decoded.type === 'data') decoded.data.copy(received, decoded.offsetBytes);
      if (record.length === 1 && record[0]!.length === MiB + 20) {
        // A whole 1 MiB record in one buffer: head, data and CRC side by side, nothing copied to make it.
        wholeRecords += 1;
        memories.set(record[0]!.buffer, (memories.get(record[0]!.buffer) ?? 0) + 1);
      }
      // The first record of data is held for good (its buffer must never come back); the rest are recycled at once.
      if (held === null && bytes[0] === 2) held = { record, bytes };
      else prepared.recycle([record]);
    }
    assert.equal(prepared.failure(), null);
    assert.equal(wholeRecords, 15, 'each 1 MiB record of data with no zero chunk is one buffer');
    assert.ok(received.equals(data), 'the stream decodes to the bytes written');
    assert.ok(Buffer.concat(held!.record).equals(held!.bytes), 'a record still held was overwritten by a later read');
    assert.equal(memories.get(held!.record[0]!.buffer), 1, 'a held record\'s buffer was read into again');
    assert.ok([...memories.values()].some((count) => count > 1), 'no recycled buffer was read into again');
    await pool.close();
  });
});

test('a large record\'s CRC is its chunks\' recorded checksums combined, not one taken over the bytes sent: damage a read did not verify is refused', async () => {
  const MiB = 1024 * 1024;
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-send-crc-'));
  try {
    // Reads not verified (serve --verify-reads off, a benchmark's setting), so that a damaged chunk reaches the sender.
    const pool = await Pool.open({ directory, ...testPoolOptions(), verifyReads: false });
    await pool.createVolume('v', 4 * MiB);
    const volume = pool.openVolume('v');
    const data = Buffer.concat(Array.from({ length: (2 * MiB) / chunkBytes }, (_, i) => chunkBytesOf(i)));
    await volume.write(0, data);
    await volume.close();
    await pool.createSnapshot('v', 's');
    // One byte of chunk 300 (the second record's) flipped on disk.
    const chunks = path.join(directory, 'chunks');
    let damaged = 0;
    for (const file of fs.readdirSync(chunks)) {
      const bytes = fs.readFileSync(path.join(chunks, file));
      const at = bytes.indexOf(chunkBytesOf(300));
      if (at < 0) continue;
      const fd = fs.openSync(path.join(chunks, file), 'r+');
      fs.writeSync(fd, Buffer.from([bytes[at + 77]! ^ 0x40]), 0, 1, at + 77);
      fs.closeSync(fd);
      damaged += 1;
    }
    assert.equal(damaged, 1);
    const prepared = await prepareSend(pool, { volume: 'v', snapshot: 's', from: null, resumeOffsetBytes: 0 }, () => {});
    const decoder = new StreamDecoder();
    const types: string[] = [];
    await assert.rejects(async () => {
      for await (const record of prepared.records) for (const decoded of decoder.push(Buffer.concat(record))) types.push(decoded.type);
    }, /record 2 at stream byte \d+ fails its checksum/);
    assert.deepEqual(types, ['header', 'data'], 'the first record, intact, decodes; the damaged one does not');
    await pool.close();
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});

test("every stream's steps are the same functions, and its generators' objects share their prototype (so V8 keeps the code it optimized for one stream for the next)", async () => {
  await withVolume(64 * chunkBytes, async (pool, volume) => {
    for (let i = 0; i < 8; i++) await volume.write(2 * i * chunkBytes, chunkBytesOf(2 * i));
    await volume.close();
    await pool.createSnapshot('v', 's1');
    await pool.createSnapshot('v', 's2');
    const streams = [
      await prepareSend(pool, { volume: 'v', snapshot: 's1', from: null, resumeOffsetBytes: 0 }, () => {}),
      await prepareSend(pool, { volume: 'v', snapshot: 's2', from: 's1', resumeOffsetBytes: 0 }, () => {}),
    ];
    const [a, b] = streams as [typeof streams[0], typeof streams[0]];
    // Generator objects made by two instances of one generator function each take their function's own prototype
    // (and map): the replicator's framing loop then met a new map every cycle, and V8 compiled it again.
    assert.equal(Object.getPrototypeOf(a.batches), Object.getPrototypeOf(b.batches));
    assert.equal(Object.getPrototypeOf(a.records), Object.getPrototypeOf(b.records));
    assert.equal(a.recycle, b.recycle);
    assert.equal(a.coveredBytes, b.coveredBytes);
    assert.equal(a.failure, b.failure);
    // And each still is its own stream: the first is full (8 chunks), the second has nothing to send.
    let fullData = 0;
    for await (const batch of a.batches) {
      fullData += batch.length;
      a.recycle(batch);
    }
    assert.equal(fullData, 1 + 8 + 1, 'header, eight data records, end');
    assert.equal(a.coveredBytes(), 8 * chunkBytes);
    assert.equal(a.failure(), null);
    let incremental = 0;
    for await (const record of b.records) incremental += record.length > 0 ? 1 : 0;
    assert.equal(incremental, 2, 'header and end');
    assert.equal(b.coveredBytes(), 0);
  });
});

test('only a read with a chunk whose recorded checksum is that of zeros is scanned for zero chunks: a chunk zeroed on disk under its checksum goes as data and is refused', async () => {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-send-zeros-'));
  try {
    // Reads not verified, so that bytes that lost their checksum reach the sender.
    const pool = await Pool.open({ directory, ...testPoolOptions(), verifyReads: false });
    await pool.createVolume('v', 64 * chunkBytes);
    const volume = pool.openVolume('v');
    // Scattered 4 KiB chunks: 2 written with zeros (its checksum is that of zeros), 4 and 6 with data.
    for (const chunk of [2, 4, 6]) await volume.write(chunk * chunkBytes, chunk === 2 ? Buffer.alloc(chunkBytes) : chunkBytesOf(chunk));
    await volume.close();
    await pool.createSnapshot('v', 's');
    // Chunk 6's bytes zeroed on disk, its recorded checksum left as it was.
    const chunks = path.join(directory, 'chunks');
    let zeroed = 0;
    for (const file of fs.readdirSync(chunks)) {
      const at = fs.readFileSync(path.join(chunks, file)).indexOf(chunkBytesOf(6));
      if (at < 0) continue;
      const fd = fs.openSync(path.join(chunks, file), 'r+');
      fs.writeSync(fd, Buffer.alloc(chunkBytes), 0, chunkBytes, at);
      fs.closeSync(fd);
      zeroed += 1;
    }
    assert.equal(zeroed, 1);
    const prepared = await prepareSend(pool, { volume: 'v', snapshot: 's', from: null, resumeOffsetBytes: 0 }, () => {});
    const decoder = new StreamDecoder();
    const types: string[] = [];
    await assert.rejects(async () => {
      for await (const record of prepared.records) for (const decoded of decoder.push(Buffer.concat(record))) types.push(`${decoded.type}${decoded.type === 'header' ? '' : ` ${(decoded as { offsetBytes: number }).offsetBytes / chunkBytes}`}`);
    }, /fails its checksum/);
    // Scanned as before, chunk 6 would have gone as a ZERO record, accepted.
    assert.deepEqual(types, ['header', 'zero 2', 'data 4'], 'chunk 2 (zeros, by its checksum) goes as ZERO; chunk 6 as data, refused');
    await pool.close();
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});
