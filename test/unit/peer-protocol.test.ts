// The peer protocol's codec (src/peer/protocol.ts) without sockets: frames round-trip, every malformed header
// (magic, kind, flags, oversized payloads) is EPROTO before its payload is waited for, hello payloads are checked
// and versions negotiated, and a seeded fuzz of the frame reader against random and mutated streams, whose
// oracle is that only a frame, "need more" or our own EPROTO may come out. Replay with SEED=<n>.
import assert from 'node:assert/strict';
import { test } from 'vitest';
import { ChunkdError } from '../../src/core/errors.ts';
import { peerControlBytesMax, peerFrameBytesMax } from '../../src/core/limits.ts';
import {
  FrameKind, FrameReader, PeerVerb, decodeFrame, decodeFrameHeader, encodeErrorFrame, encodeFrame, encodeHelloReply, encodeHelloRequest,
  encodeJsonFrame, frameHeaderBytes, negotiateVersion, parseErrorPayload, parseHelloReply, parseHelloRequest, peerFrameMagic,
} from '../../src/peer/protocol.ts';
import { makeRandom, randomInt, testSeed } from '../helpers/random.ts';

const poolId = '0b0e8d1c-6a53-4c5e-9d0f-1f1e2d3c4b5a';

function isProtocolError(error: unknown): boolean {
  return error instanceof ChunkdError && error.code === 'EPROTO';
}

function header(fields: { magic?: number; kind?: number; flags?: number; verb?: number; requestId?: number; payloadBytes?: number }): Buffer {
  const buffer = Buffer.alloc(frameHeaderBytes);
  buffer.writeUInt32BE(fields.magic ?? peerFrameMagic, 0);
  buffer.writeUInt8(fields.kind ?? FrameKind.request, 4);
  buffer.writeUInt8(fields.flags ?? 0, 5);
  buffer.writeUInt16BE(fields.verb ?? PeerVerb.hello, 6);
  buffer.writeUInt32BE(fields.requestId ?? 1, 8);
  buffer.writeUInt32BE(fields.payloadBytes ?? 0, 12);
  return buffer;
}

test('frames round-trip, and a partial frame asks for exactly the bytes it needs', () => {
  const frame = Buffer.concat(encodeHelloRequest(7));
  const decoded = decodeFrame(frame, 0);
  assert.ok(decoded.done);
  assert.deepEqual([decoded.value.kind, decoded.value.verb, decoded.value.requestId, decoded.bytesConsumed], [FrameKind.request, PeerVerb.hello, 7, frame.length]);
  assert.deepEqual(parseHelloRequest(decoded.value.payload), { versionMin: 1, versionMax: 1 });
  assert.deepEqual(decodeFrame(frame.subarray(0, 5), 0), { done: false, bytesNeeded: frameHeaderBytes });
  assert.deepEqual(decodeFrame(frame.subarray(0, frame.length - 1), 0), { done: false, bytesNeeded: frame.length });
  // At an offset inside a larger buffer, as a socket chunk holds it.
  const shifted = Buffer.concat([Buffer.from('xyz'), frame, Buffer.from('tail')]);
  const again = decodeFrame(shifted, 3);
  assert.ok(again.done && again.bytesConsumed === frame.length);

  const reply = { version: 1, name: 'node-a', software: 'chunkd 0.1.0', poolId };
  const replyFrame = decodeFrame(Buffer.concat(encodeHelloReply(7, reply)), 0);
  assert.ok(replyFrame.done);
  assert.equal(replyFrame.value.kind, FrameKind.reply);
  assert.deepEqual(parseHelloReply(replyFrame.value.payload), reply);

  const errorFrame = decodeFrame(Buffer.concat(encodeErrorFrame(9, 3, new ChunkdError('ENOTSUP', 'no such verb'))), 0);
  assert.ok(errorFrame.done);
  assert.deepEqual([errorFrame.value.kind, errorFrame.value.verb, errorFrame.value.requestId], [FrameKind.error, 9, 3]);
  const carried = parseErrorPayload(errorFrame.value.payload);
  assert.deepEqual([carried.code, carried.message], ['ENOTSUP', 'no such verb']);
  // A code this build does not know reads as EIO, so a newer peer's errors still read.
  assert.equal(parseErrorPayload(Buffer.from('{"code":"ENEWTHING","message":"m"}')).code, 'EIO');
  // A long message is cut so that an error frame stays within its cap.
  const long = decodeFrame(Buffer.concat(encodeErrorFrame(1, 1, ChunkdError.invalid('x'.repeat(100_000)))), 0);
  assert.ok(long.done && long.value.payloadBytes < 2048);
});

test('malformed headers are EPROTO at the header, before any payload is buffered', () => {
  const cases: Array<[string, Buffer, RegExp]> = [
    ['bad magic', header({ magic: 0x4e42444d }), /bad frame magic/],
    ['TLS bytes', Buffer.from('16030100a5010000a103034142434445', 'hex'), /bad frame magic/],
    ['HTTP', Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n'), /bad frame magic/],
    ['unknown kind', header({ kind: 9 }), /unknown frame kind 9/],
    ['kind 0', header({ kind: 0 }), /unknown frame kind 0/],
    ['flags', header({ flags: 0x80 }), /flags 0x80/],
    ['control payload over its cap', header({ payloadBytes: peerControlBytesMax + 1 }), /more than the 65536 allowed/],
    ['unknown verb over the control cap', header({ verb: 999, payloadBytes: peerControlBytesMax + 1 }), /more than/],
    ['error frame over its cap', header({ kind: FrameKind.error, payloadBytes: peerControlBytesMax + 1 }), /more than/],
    ['4 GiB payload', header({ payloadBytes: 0xffffffff }), /more than/],
  ];
  for (const [label, bytes, pattern] of cases) {
    assert.throws(() => decodeFrameHeader(bytes, 0), (error: unknown) => isProtocolError(error) && pattern.test((error as Error).message), label);
    // The reader refuses it as soon as the 16 header bytes are in: it never waits for (or holds) the payload.
    const reader = new FrameReader();
    reader.push(bytes.subarray(0, frameHeaderBytes));
    assert.throws(() => reader.next(), isProtocolError, `${label} (reader)`);
  }
  // Exactly the cap is fine, and the absolute cap is what a bulk verb could ever have.
  assert.ok(decodeFrameHeader(header({ payloadBytes: peerControlBytesMax }), 0).done);
  assert.ok(peerFrameBytesMax >= peerControlBytesMax);
});

test('hello payloads are checked, and the version is the highest both ends speak', () => {
  const bad = ['', 'null', '[]', '"hello"', '{', '{"versionMin":1}', '{"versionMin":0,"versionMax":1}', '{"versionMin":2,"versionMax":1}',
    '{"versionMin":1.5,"versionMax":2}', '{"versionMin":"1","versionMax":1}', '{"versionMin":1,"versionMax":70000}'];
  for (const text of bad) assert.throws(() => parseHelloRequest(Buffer.from(text)), isProtocolError, text);
  assert.throws(() => parseHelloRequest(Buffer.from([0x7b, 0xff, 0xfe, 0x7d])), isProtocolError, 'bytes that are not UTF-8');
  // Fields a newer peer adds are ignored.
  assert.deepEqual(parseHelloRequest(Buffer.from('{"versionMin":1,"versionMax":3,"future":true}')), { versionMin: 1, versionMax: 3 });

  const good = { version: 1, name: 'b', software: 'chunkd 0.1.0', poolId };
  for (const reply of [{ ...good, name: '../etc' }, { ...good, name: '' }, { ...good, poolId: 'not-a-uuid' }, { ...good, version: 0 }, { ...good, software: 7 }]) {
    assert.throws(() => parseHelloReply(Buffer.from(JSON.stringify(reply))), isProtocolError, JSON.stringify(reply));
  }

  assert.equal(negotiateVersion({ versionMin: 1, versionMax: 1 }), 1);
  assert.equal(negotiateVersion({ versionMin: 1, versionMax: 9 }), 1, 'a newer peer comes down to ours');
  assert.equal(negotiateVersion({ versionMin: 2, versionMax: 9 }), null, 'a peer that dropped version 1');
  assert.equal(negotiateVersion({ versionMin: 2, versionMax: 5 }, { versionMin: 1, versionMax: 3 }), 3);
  assert.equal(negotiateVersion({ versionMin: 4, versionMax: 5 }, { versionMin: 1, versionMax: 3 }), null);
});

test('the frame reader takes frames split anywhere and several in one chunk', () => {
  const stream = Buffer.concat([
    ...encodeHelloRequest(1),
    ...encodeJsonFrame(FrameKind.request, 42, 2, { a: 1 }),
    ...encodeFrame(FrameKind.request, 43, 3, Buffer.alloc(0)),
    ...encodeFrame(FrameKind.reply, 44, 4, Buffer.alloc(peerControlBytesMax, 7)),
  ]);
  for (let split = 0; split <= stream.length; split += 13) {
    const reader = new FrameReader();
    const frames = [];
    reader.push(stream.subarray(0, split));
    for (let frame = reader.next(); frame !== null; frame = reader.next()) frames.push(frame);
    reader.push(stream.subarray(split));
    for (let frame = reader.next(); frame !== null; frame = reader.next()) frames.push(frame);
    assert.deepEqual(frames.map((frame) => [frame.verb, frame.requestId, frame.payloadBytes]), [[1, 1, 31], [42, 2, 7], [43, 3, 0], [44, 4, peerControlBytesMax]], `split at ${split}`);
    assert.equal(reader.bufferedBytes, 0);
  }
});

/** A frame reader whose bulk payloads go into fresh shared buffers, listed in `given`. */
function bulkRecordingReader(): { reader: FrameReader; given: Buffer[] } {
  const given: Buffer[] = [];
  const reader = new FrameReader({ bulkPayload: (size) => {
    const buffer = Buffer.from(new SharedArrayBuffer(size));
    given.push(buffer);
    return buffer;
  } });
  return { reader, given };
}

test('the frame reader gathers a bulk request\'s payload into the buffer it is given, whole or split, and no other frame\'s', () => {
  const data = Buffer.alloc(100_000);
  for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 0xff;
  const stream = Buffer.concat([...encodeFrame(FrameKind.request, PeerVerb.receiveData, 5, data), ...encodeJsonFrame(FrameKind.request, PeerVerb.receiveClose, 6, { a: 1 })]);
  for (const split of [0, 10, 16, 5000, 100_016, stream.length]) {
    const { reader, given } = bulkRecordingReader();
    const frames = [];
    reader.push(stream.subarray(0, split));
    for (let frame = reader.next(); frame !== null; frame = reader.next()) frames.push(frame);
    reader.push(stream.subarray(split));
    for (let frame = reader.next(); frame !== null; frame = reader.next()) frames.push(frame);
    assert.deepEqual(frames.map((frame) => [frame.verb, frame.requestId]), [[PeerVerb.receiveData, 5], [PeerVerb.receiveClose, 6]], `split at ${split}`);
    assert.equal(given.length, 1, 'one buffer, for the bulk payload only');
    assert.equal(frames[0]!.payload.buffer, given[0]!.buffer);
    assert.ok(frames[0]!.payload.equals(data));
    assert.equal(reader.bufferedBytes, 0);
  }
});

test('steered reads: a bulk payload is read straight into its own buffer once its header is in; other frames come out of the arena; any split', () => {
  const seed = testSeed('steered frame reader');
  const random = makeRandom(seed);
  const data = Buffer.alloc(300_000);
  for (let i = 0; i < data.length; i++) data[i] = (i * 13) & 0xff;
  const stream = Buffer.concat([
    ...encodeHelloRequest(1),
    ...encodeFrame(FrameKind.request, PeerVerb.receiveData, 2, data),
    ...encodeJsonFrame(FrameKind.request, PeerVerb.receiveClose, 3, { a: 1 }),
    ...encodeFrame(FrameKind.request, PeerVerb.syncWrite, 4, data.subarray(0, 5000)),
  ]);
  for (let round = 0; round < 200; round++) {
    const { reader, given } = bulkRecordingReader();
    const frames = [];
    let intoPayload = 0;
    // A socket: each read copies what it has (at most a TLS record here) into the buffer it is given.
    for (let offset = 0; offset < stream.length;) {
      const target = reader.nextReadBuffer();
      assert.ok(target.length > 0, 'a read always has somewhere to land');
      const count = Math.min(target.length, stream.length - offset, 1 + randomInt(random, 16 * 1024));
      stream.copy(target, 0, offset, offset + count);
      if (given.some((buffer) => buffer.buffer === target.buffer)) intoPayload += count;
      reader.onRead(count, target);
      offset += count;
      for (let frame = reader.next(); frame !== null; frame = reader.next()) frames.push(frame);
    }
    assert.deepEqual(frames.map((frame) => [frame.verb, frame.requestId]), [[PeerVerb.hello, 1], [PeerVerb.receiveData, 2], [PeerVerb.receiveClose, 3], [PeerVerb.syncWrite, 4]], `seed ${seed} round ${round}`);
    assert.equal(given.length, 2, 'a buffer per bulk payload');
    assert.equal(frames[1]!.payload.buffer, given[0]!.buffer);
    assert.ok(frames[1]!.payload.equals(data));
    assert.ok(frames[3]!.payload.equals(data.subarray(0, 5000)));
    // All but what came in the same read as its header went straight into the payload's buffer.
    assert.ok(intoPayload >= data.length - 16 * 1024, `seed ${seed} round ${round}: ${intoPayload} of ${data.length} bytes read in place`);
    assert.equal(reader.bufferedBytes, 0);
  }
});

test('fuzz: random and mutated streams give frames, "need more" or EPROTO, nothing else', () => {
  const seed = testSeed('peer frame fuzz');
  const random = makeRandom(seed);
  const valid = (): Buffer => {
    switch (randomInt(random, 4)) {
      case 0: return Buffer.concat(encodeHelloRequest(randomInt(random, 2 ** 32)));
      case 1: return Buffer.concat(encodeHelloReply(randomInt(random, 100), { version: 1, name: 'n1', software: 'chunkd', poolId }));
      case 2: return Buffer.concat(encodeErrorFrame(randomInt(random, 65536), randomInt(random, 100), ChunkdError.invalid('e')));
      default: return Buffer.concat(encodeFrame(FrameKind.request, randomInt(random, 65536), 5, Buffer.alloc(randomInt(random, 300))));
    }
  };
  let frames = 0;
  let refused = 0;
  for (let round = 0; round < 3000; round++) {
    const parts = Array.from({ length: 1 + randomInt(random, 4) }, valid);
    const stream = Buffer.concat(parts);
    // Mutate: flip bytes, or replace the whole stream with noise.
    if (random() < 0.2) for (let i = 0; i < stream.length; i++) stream[i] = randomInt(random, 256);
    else for (let flips = randomInt(random, 4); flips > 0; flips--) stream[randomInt(random, stream.length)] = randomInt(random, 256);
    const reader = new FrameReader();
    try {
      for (let offset = 0; offset < stream.length;) {
        const step = 1 + randomInt(random, 64);
        reader.push(stream.subarray(offset, offset + step));
        offset += step;
        for (let frame = reader.next(); frame !== null; frame = reader.next()) {
          frames += 1;
          assert.ok(frame.payload.length === frame.payloadBytes && frame.payloadBytes <= peerFrameBytesMax);
          // The payload parsers see whatever a mutated frame carries: they too may only say EPROTO.
          for (const parse of [parseHelloRequest, parseHelloReply, parseErrorPayload]) {
            try {
              parse(frame.payload);
            } catch (error) {
              if (!isProtocolError(error)) throw error;
            }
          }
        }
      }
      // Whatever is left is an incomplete frame: never more than one frame's bytes.
      assert.ok(reader.bufferedBytes <= frameHeaderBytes + peerFrameBytesMax);
    } catch (error) {
      if (!isProtocolError(error)) throw new Error(`seed ${seed} round ${round}: ${(error as Error).stack}`);
      refused += 1;
    }
  }
  console.log(`# ${frames} frames decoded, ${refused} streams refused`);
  assert.ok(frames > 1000 && refused > 100);
});
