// The replication stream codec (src/replication/stream-format.ts): a round trip in pieces of every size, the
// invariants the decoder enforces, and an oracle over flipped bytes: a damaged stream gives only our own errors
// (ECORRUPT or EPROTO) or, where the damage cannot be told from a shorter stream, records that still check out.
import assert from 'node:assert/strict';
import { test } from 'vitest';
import { ChunkdError } from '../../src/core/errors.ts';
import {
  dataRecordDataStart,
  dataRecordOverheadBytes,
  decodeResumeToken,
  encodeAbort,
  encodeData,
  encodeEnd,
  encodeHeader,
  encodeResumeToken,
  encodeZero,
  sealDataRecord,
  StreamDecoder,
  type StreamHeader,
  type StreamRecord,
} from '../../src/replication/stream-format.ts';
import { blockChecksum, combinedChecksum, shortChecksum } from '../../src/store/checksum.ts';
import { makeRandom, randomInt, testSeed } from '../helpers/random.ts';

const header: StreamHeader = {
  volumeSizeBytes: 1 << 20,
  base: { uuid: 'a'.repeat(32), name: 'base' },
  target: { uuid: 'b'.repeat(32), name: 'target' },
  resumeOffsetBytes: 0,
  dataBytes: 3 * 4096,
};
const digest = Buffer.alloc(32, 7);

function stream(): Buffer {
  return Buffer.concat([encodeHeader(header), ...encodeData(4096, Buffer.alloc(8192, 1)), encodeZero(65536, 4096), encodeEnd(3, 8192, digest)]);
}

function decodeAll(bytes: Buffer, pieceBytes: number): StreamRecord[] {
  const decoder = new StreamDecoder();
  const records: StreamRecord[] = [];
  for (let i = 0; i < bytes.length; i += pieceBytes) records.push(...decoder.push(bytes.subarray(i, i + pieceBytes)));
  return records;
}

test('a stream decodes whole from pieces of any size', () => {
  const bytes = stream();
  for (const pieceBytes of [1, 7, 100, 4096, bytes.length]) {
    const records = decodeAll(bytes, pieceBytes);
    assert.deepEqual(records.map((r) => r.type), ['header', 'data', 'zero', 'end'], `pieces of ${pieceBytes}`);
    assert.deepEqual((records[0] as { header: StreamHeader }).header, header);
    const data = records[1] as { offsetBytes: number; data: Buffer };
    assert.equal(data.offsetBytes, 4096);
    assert.ok(data.data.equals(Buffer.alloc(8192, 1)));
    assert.deepEqual(records[2], { type: 'zero', offsetBytes: 65536, lengthBytes: 4096 });
    assert.ok((records[3] as { digest: Buffer }).digest.equals(digest));
  }
});

test('the decoder refuses extents out of order, misaligned, past the end, and records after the end', () => {
  const refuse = (parts: Buffer[], pattern: RegExp): void => {
    assert.throws(() => decodeAll(Buffer.concat(parts), 64 * 1024), (error: unknown) => error instanceof ChunkdError && pattern.test(error.message));
  };
  refuse([encodeHeader(header), encodeZero(8192, 4096), encodeZero(4096, 4096)], /comes before the end of the previous one/);
  refuse([encodeHeader(header), encodeZero(100, 4096)], /not whole chunks/);
  refuse([encodeHeader(header), encodeZero(1 << 20, 4096)], /ends past the volume/);
  refuse([encodeZero(0, 4096)], /does not start with a header/);
  refuse([encodeHeader(header), encodeHeader(header)], /a second header/);
  refuse([encodeHeader(header), encodeEnd(1, 0, digest), encodeZero(0, 4096)], /follow the stream's last record/);
  refuse([encodeHeader(header), encodeZero(0, 4096), encodeEnd(1, 0, digest)], /records are missing/);
  refuse([encodeHeader({ ...header, resumeOffsetBytes: 8192 }), encodeZero(4096, 4096)], /comes before/);
  const aborted = decodeAll(Buffer.concat([encodeHeader(header), encodeAbort('damaged block at 4096')]), 10);
  assert.deepEqual(aborted[1], { type: 'abort', message: 'damaged block at 4096' });
});

test('every flipped byte of a stream is refused with our own error', () => {
  const bytes = stream();
  for (let i = 0; i < bytes.length; i++) {
    for (const mask of [0x01, 0x80]) {
      const damaged = Buffer.from(bytes);
      damaged[i]! ^= mask;
      let records: StreamRecord[] = [];
      try {
        records = decodeAll(damaged, 1000);
      } catch (error) {
        assert.ok(error instanceof ChunkdError && (error.code === 'ECORRUPT' || error.code === 'EPROTO'), `byte ${i}: ${String(error)}`);
        continue;
      }
      // A flip in a length field can only make the decoder wait for bytes that never come: never an END.
      assert.ok(!records.some((record) => record.type === 'end'), `byte ${i} ^ ${mask}: a damaged stream decoded to its end`);
    }
  }
});

test('resume tokens round-trip and bad ones are refused clearly', () => {
  const token = { base: null, target: 'c'.repeat(32), offsetBytes: 8192 };
  assert.deepEqual(decodeResumeToken(encodeResumeToken(token)), token);
  assert.throws(() => decodeResumeToken('nope'), /invalid resume token/);
  assert.throws(() => decodeResumeToken(encodeResumeToken({ ...token, offsetBytes: 100 })), /no offset/);
});

test('a data record sealed in place has the bytes of encodeData, past 4 GiB offsets too', () => {
  for (const offsetBytes of [0, 4096, 2 ** 32 - 4096, 2 ** 32 + 3 * 4096, 2 ** 44 + 4096]) {
    const data = Buffer.alloc(8192);
    for (let i = 0; i < data.length; i++) data[i] = (i * 31 + offsetBytes / 4096) & 0xff;
    const record = Buffer.alloc(data.length + dataRecordOverheadBytes, 0xee);
    data.copy(record, dataRecordDataStart);
    assert.deepEqual(sealDataRecord(record, offsetBytes), Buffer.concat(encodeData(offsetBytes, data)));
  }
});

test('a data record sealed from its chunks\' checksums has the bytes of one sealed over its data, and a wrong checksum shows', () => {
  const random = makeRandom(testSeed('sealed from checksums'));
  for (const chunks of [1, 2, 16]) {
    const data = Buffer.alloc(chunks * 4096);
    for (let i = 0; i < data.length; i++) data[i] = randomInt(random, 256);
    const sums = new Uint32Array(chunks);
    for (let i = 0; i < chunks; i++) sums[i] = blockChecksum(data.subarray(i * 4096, (i + 1) * 4096));
    const offsetBytes = 2 ** 32 + 4096 * randomInt(random, 1000);
    const record = Buffer.alloc(data.length + dataRecordOverheadBytes);
    data.copy(record, dataRecordDataStart);
    const expected = Buffer.concat(encodeData(offsetBytes, data));
    assert.deepEqual(sealDataRecord(record, offsetBytes, combinedChecksum(sums, 0, chunks)), expected);
    // A checksum that is not the data's gives a record the decoder refuses.
    sealDataRecord(record, offsetBytes, (combinedChecksum(sums, 0, chunks) ^ 1) >>> 0);
    assert.notDeepEqual(record, expected);
    const decoder = new StreamDecoder();
    decoder.push(encodeHeader(header));
    assert.throws(() => decoder.push(record), /checksum/);
  }
});

test('shortChecksum, which seals and checks a data record\'s head, is blockChecksum over the same bytes', () => {
  const random = makeRandom(testSeed('short checksum'));
  const bytes = Buffer.alloc(256);
  for (let round = 0; round < 200; round++) {
    for (let i = 0; i < bytes.length; i++) bytes[i] = randomInt(random, 256);
    const start = randomInt(random, 64);
    const end = start + randomInt(random, 65);
    assert.equal(shortChecksum(bytes, start, end), blockChecksum(bytes.subarray(start, end)), `bytes ${start}-${end} of round ${round}`);
  }
  assert.equal(shortChecksum(bytes, 5, 5), blockChecksum(Buffer.alloc(0)));
});

// A data record's CRC is checked from its chunks' own sums (one pass over its bytes), which go out with the
// record for the receiver to record: they must be the chunks' real checksums, and damage to any byte of the record
// (head, offset, any chunk, tail) must still fail the check, in records of one chunk, of several and of the most a
// record holds (1 MiB).
test('a data record decodes with its chunks\' checksums, and a flipped byte anywhere in it is refused as damaged', () => {
  const random = makeRandom(testSeed('small records summed once'));
  for (const chunks of [1, 3, 63, 64, 256]) {
    const data = Buffer.alloc(chunks * 4096);
    for (let i = 0; i < data.length; i++) data[i] = randomInt(random, 256);
    const offsetBytes = 4096 * 8;
    const big = { ...header, volumeSizeBytes: 1 << 30 };
    const record = Buffer.concat(encodeData(offsetBytes, data));
    const decoder = new StreamDecoder();
    decoder.push(encodeHeader(big));
    const [decoded] = decoder.push(record) as Array<{ type: 'data'; offsetBytes: number; data: Buffer; sums?: Uint32Array }>;
    assert.equal(decoded!.offsetBytes, offsetBytes);
    assert.ok(decoded!.data.equals(data));
    const expected = Array.from({ length: chunks }, (_, i) => blockChecksum(data.subarray(i * 4096, (i + 1) * 4096)));
    assert.deepEqual([...decoded!.sums!], expected, `${chunks} chunk(s): the sums are the chunks' checksums`);
    // Every byte of the head and offset, a few in each chunk, every byte of the tail.
    const positions = [...Array.from({ length: dataRecordDataStart }, (_, i) => i)];
    for (let chunk = 0; chunk < chunks; chunk++) for (let k = 0; k < 3; k++) positions.push(dataRecordDataStart + chunk * 4096 + randomInt(random, 4096));
    for (let i = record.length - 4; i < record.length; i++) positions.push(i);
    for (const position of positions) {
      const damaged = Buffer.from(record);
      damaged[position]! ^= 1 << randomInt(random, 8);
      const fresh = new StreamDecoder();
      fresh.push(encodeHeader(big));
      let records: StreamRecord[] = [];
      try {
        records = fresh.push(damaged);
      } catch (error) {
        assert.ok(error instanceof ChunkdError && (error.code === 'ECORRUPT' || error.code === 'EPROTO'), `byte ${position}: ${String(error)}`);
        continue;
      }
      // Only a flipped length can pass, as a record not yet whole.
      assert.ok(position >= 4 && position < 8 && records.length === 0, `${chunks} chunk(s): byte ${position} flipped decoded to ${records.length} record(s)`);
    }
  }
});
