// The NBD codec against byte layouts written out from doc/proto.md, and round trips with the test client's
// encoders and decoders. Also the pure pieces beside it: request validation, block descriptors, the input queue.
import { test } from 'vitest';
import assert from 'node:assert/strict';
import { ChunkdError } from '../../src/core/errors.ts';
import { blockStatusExtentsMax, optionBytesMax, rangeRequestBytesMax, requestBytesMax } from '../../src/core/limits.ts';
import * as nbd from '../../src/nbd/protocol.ts';
import { validateRequest, splitRange } from '../../src/nbd/validate.ts';
import type { ValidationContext } from '../../src/nbd/validate.ts';
import { blockDescriptors } from '../../src/nbd/extents.ts';
import { InputQueue } from '../../src/nbd/input-queue.ts';
import { transmissionFlagsFor } from '../../src/nbd/handshake.ts';
import {
  decodeOptionReply, encodeClientFlags, encodeInfoRequestData, encodeMetaContextData, encodeOptionMessage,
  encodeRequestMessage,
} from './helpers/nbd-raw-client.ts';

const hex = (text: string): Buffer => Buffer.from(text.replace(/\s+/g, ''), 'hex');

function assertProtocolError(action: () => unknown): void {
  assert.throws(action, (error: unknown) => error instanceof ChunkdError && error.code === 'EPROTO');
}

test('constants match the spec', () => {
  assert.equal(nbd.NBD_MAGIC, 0x4e42444d41474943n);
  assert.equal(Buffer.from('NBDMAGIC').readBigUInt64BE(0), nbd.NBD_MAGIC);
  assert.equal(Buffer.from('IHAVEOPT').readBigUInt64BE(0), nbd.NBD_OPTS_MAGIC);
  assert.equal(nbd.NBD_REP_MAGIC, 0x3e889045565a9n);
  assert.equal(nbd.NBD_REQUEST_MAGIC, 0x25609513);
  assert.equal(nbd.NBD_SIMPLE_REPLY_MAGIC, 0x67446698);
  assert.equal(nbd.NBD_STRUCTURED_REPLY_MAGIC, 0x668e33ef);
  assert.deepEqual(
    [nbd.NBD_OPT_EXPORT_NAME, nbd.NBD_OPT_ABORT, nbd.NBD_OPT_LIST, nbd.NBD_OPT_STARTTLS, nbd.NBD_OPT_INFO, nbd.NBD_OPT_GO,
      nbd.NBD_OPT_STRUCTURED_REPLY, nbd.NBD_OPT_LIST_META_CONTEXT, nbd.NBD_OPT_SET_META_CONTEXT],
    [1, 2, 3, 5, 6, 7, 8, 9, 10],
  );
  assert.equal(nbd.NBD_REP_ERR_UNSUP, 0x80000001);
  assert.equal(nbd.NBD_REP_ERR_UNKNOWN, 0x80000006);
  assert.equal(nbd.NBD_REP_ERR_TOO_BIG, 0x80000009);
  assert.equal(nbd.NBD_REPLY_TYPE_ERROR, 0x8001);
  assert.equal(nbd.NBD_REPLY_TYPE_ERROR_OFFSET, 0x8002);
  assert.equal(nbd.NBD_FLAG_SEND_CACHE, 0x400);
  assert.equal(nbd.NBD_FLAG_SEND_FAST_ZERO, 0x800);
  assert.equal(nbd.NBD_CMD_FLAG_FAST_ZERO, 0x10);
});

test('greeting: NBDMAGIC, IHAVEOPT, fixed newstyle and no zeroes', () => {
  assert.deepEqual(nbd.encodeGreeting(), Buffer.concat([Buffer.from('NBDMAGICIHAVEOPT'), hex('0003')]));
});

test('client flags: known bits decode, unknown bits are a protocol error, short input needs more', () => {
  assert.deepEqual(nbd.decodeClientFlags(hex('00000003'), 0), { done: true, value: { fixedNewstyle: true, noZeroes: true }, bytesConsumed: 4 });
  assert.deepEqual(nbd.decodeClientFlags(hex('ff00000001'), 1), { done: true, value: { fixedNewstyle: true, noZeroes: false }, bytesConsumed: 4 });
  assert.deepEqual(nbd.decodeClientFlags(hex('000000'), 0), { done: false, bytesNeeded: 4 });
  assertProtocolError(() => nbd.decodeClientFlags(hex('00000004'), 0));
  assertProtocolError(() => nbd.decodeClientFlags(encodeClientFlags(0x80000000), 0));
});

test('option: layout, data as a view, need-more, bad magic, too long', () => {
  const bytes = hex('49484156454f5054 00000007 00000003 616263');
  assert.deepEqual(encodeOptionMessage(7, Buffer.from('abc')), bytes);
  const decoded = nbd.decodeOption(Buffer.concat([hex('ff'), bytes, hex('ee')]), 1);
  assert.ok(decoded.done);
  assert.equal(decoded.value.option, 7);
  assert.equal(decoded.value.data.toString(), 'abc');
  assert.equal(decoded.bytesConsumed, 19);
  assert.deepEqual(nbd.decodeOption(bytes.subarray(0, 10), 0), { done: false, bytesNeeded: 16 });
  assert.deepEqual(nbd.decodeOption(bytes.subarray(0, 18), 0), { done: false, bytesNeeded: 19 });
  assertProtocolError(() => nbd.decodeOption(hex('49484156454f5055 00000007 00000000'), 0));
  const tooLong = encodeOptionMessage(1);
  tooLong.writeUInt32BE(optionBytesMax + 1, 12);
  assertProtocolError(() => nbd.decodeOption(tooLong, 0));
  tooLong.writeUInt32BE(optionBytesMax, 12);
  assert.deepEqual(nbd.decodeOption(tooLong, 0), { done: false, bytesNeeded: 16 + optionBytesMax });
});

test('request: layout, 64-bit offsets, bad magic', () => {
  const bytes = hex('25609513 0001 0001 0102030405060708 0000000100000200 00001000');
  assert.deepEqual(encodeRequestMessage({ flags: 1, type: 1, handle: 0x0102030405060708n, offsetBytes: 2 ** 32 + 512, lengthBytes: 4096 }), bytes);
  assert.deepEqual(nbd.decodeRequest(bytes, 0), {
    done: true,
    value: { flags: 1, type: 1, handle: 0x0102030405060708n, offsetBytes: 2 ** 32 + 512, lengthBytes: 4096 },
    bytesConsumed: 28,
  });
  assert.deepEqual(nbd.decodeRequest(bytes.subarray(0, 27), 0), { done: false, bytesNeeded: 28 });
  const largest = encodeRequestMessage({ type: 0, handle: 0n, offsetBytes: BigInt(Number.MAX_SAFE_INTEGER) });
  assert.equal((nbd.decodeRequest(largest, 0) as { value: nbd.NbdRequest }).value.offsetBytes, Number.MAX_SAFE_INTEGER);
  for (const offset of [2n ** 53n, 2n ** 64n - 1n, 0xffffffff00000000n]) {
    const decoded = nbd.decodeRequest(encodeRequestMessage({ type: 0, handle: 0n, offsetBytes: offset }), 0);
    assert.ok(decoded.done);
    assert.equal(decoded.value.offsetBytes, Number.POSITIVE_INFINITY);
  }
  assertProtocolError(() => nbd.decodeRequest(hex('25609514 0000 0000 0000000000000000 0000000000000000 00000000'), 0));
});

test('strings: UTF-8, no NUL, at most 4096 bytes', () => {
  assert.equal(nbd.decodeString(Buffer.from('vol@snap é'), 'name'), 'vol@snap é');
  assertProtocolError(() => nbd.decodeString(hex('616200'), 'name'));
  assertProtocolError(() => nbd.decodeString(hex('c3'), 'name'));
  assertProtocolError(() => nbd.decodeString(hex('ff'), 'name'));
  assertProtocolError(() => nbd.decodeString(Buffer.alloc(4097, 0x61), 'name'));
  assert.equal(nbd.parseExportNameData(Buffer.from('')), '');
});

test('NBD_OPT_INFO / GO data: round trip and malformed variants', () => {
  assert.deepEqual(nbd.parseInfoRequest(encodeInfoRequestData('vol', [3, 1])), { exportName: 'vol', infoTypes: [3, 1] });
  assert.deepEqual(nbd.parseInfoRequest(hex('00000000 0000')), { exportName: '', infoTypes: [] });
  assertProtocolError(() => nbd.parseInfoRequest(hex('0000000000')));
  assertProtocolError(() => nbd.parseInfoRequest(hex('00000001 0000')));
  assertProtocolError(() => nbd.parseInfoRequest(hex('00000000 0001')));
  assertProtocolError(() => nbd.parseInfoRequest(hex('00000000 0000 0003')));
  assertProtocolError(() => nbd.parseInfoRequest(hex('ffffffff 0000')));
});

test('meta context data: round trip and malformed variants', () => {
  const data = encodeMetaContextData('vol', ['base:allocation', 'qemu:dirty-bitmap:x']);
  assert.deepEqual(data, Buffer.concat([hex('00000003'), Buffer.from('vol'), hex('00000002 0000000f'), Buffer.from('base:allocation'), hex('00000013'), Buffer.from('qemu:dirty-bitmap:x')]));
  assert.deepEqual(nbd.parseMetaContextRequest(data), { exportName: 'vol', queries: ['base:allocation', 'qemu:dirty-bitmap:x'] });
  assert.deepEqual(nbd.parseMetaContextRequest(encodeMetaContextData('', [])), { exportName: '', queries: [] });
  assertProtocolError(() => nbd.parseMetaContextRequest(Buffer.concat([data, hex('00')])));
  assertProtocolError(() => nbd.parseMetaContextRequest(data.subarray(0, data.length - 1)));
  assertProtocolError(() => nbd.parseMetaContextRequest(hex('00000000 ffffffff')));
  assertProtocolError(() => nbd.parseMetaContextRequest(hex('00000000')));
  assertProtocolError(() => nbd.parseMetaContextRequest(hex('000000')));
});

test('option replies: header layout and each payload', () => {
  const ack = nbd.encodeOptionReply(nbd.NBD_OPT_STRUCTURED_REPLY, nbd.NBD_REP_ACK);
  assert.deepEqual(ack, hex('0003e889045565a9 00000008 00000001 00000000'));
  assert.deepEqual(nbd.encodeOptionError(99, nbd.NBD_REP_ERR_UNSUP, 'no'), hex('0003e889045565a9 00000063 80000001 00000002 6e6f'));
  assert.deepEqual(nbd.encodeInfoExport(7, 2 ** 40, 0x1234), hex('0003e889045565a9 00000007 00000003 0000000c 0000 0000010000000000 1234'));
  assert.deepEqual(nbd.encodeInfoBlockSize(7, 1, 4096, requestBytesMax), hex('0003e889045565a9 00000007 00000003 0000000e 0003 00000001 00001000 02000000'));
  assert.deepEqual(nbd.encodeInfoName(6, 'v'), hex('0003e889045565a9 00000006 00000003 00000003 0001 76'));
  assert.deepEqual(nbd.encodeInfoDescription(6, 'd'), hex('0003e889045565a9 00000006 00000003 00000003 0002 64'));
  assert.deepEqual(nbd.encodeServerReply(3, 'ab', 'xyz'), hex('0003e889045565a9 00000003 00000002 00000009 00000002 6162 78797a'));
  assert.deepEqual(nbd.encodeMetaContextReply(10, 1, 'base:allocation'), Buffer.concat([hex('0003e889045565a9 0000000a 00000004 00000013 00000001'), Buffer.from('base:allocation')]));
  const decoded = decodeOptionReply(nbd.encodeServerReply(3, 'ab', ''));
  assert.deepEqual(decoded?.reply, { option: 3, type: nbd.NBD_REP_SERVER, data: hex('00000002 6162') });
  assert.throws(() => nbd.encodeOptionError(1, nbd.NBD_REP_ACK, 'not an error'));
});

test('NBD_OPT_EXPORT_NAME reply: 124 zeroes unless NO_ZEROES', () => {
  const withZeroes = nbd.encodeExportNameReply(1 << 20, 0x0003, false);
  assert.equal(withZeroes.length, 134);
  assert.deepEqual(withZeroes.subarray(0, 10), hex('0000000000100000 0003'));
  assert.ok(withZeroes.subarray(10).every((byte) => byte === 0));
  assert.deepEqual(nbd.encodeExportNameReply(1 << 20, 0x0003, true), hex('0000000000100000 0003'));
});

test('simple and structured replies: layouts', () => {
  assert.deepEqual(nbd.encodeSimpleReply(22, 0xabn), hex('67446698 00000016 00000000000000ab'));
  assert.deepEqual(nbd.encodeStructuredNone(7n), hex('668e33ef 0001 0000 0000000000000007 00000000'));
  assert.deepEqual(nbd.encodeOffsetData(1, 7n, 2 ** 33, hex('aabb')), hex('668e33ef 0001 0001 0000000000000007 0000000a 0000000200000000 aabb'));
  const inPlace = Buffer.alloc(nbd.offsetDataHeaderBytes + 2);
  nbd.writeOffsetDataHeader(inPlace, 0, 1, 7n, 2 ** 33, 2);
  assert.deepEqual(inPlace.subarray(0, 28), hex('668e33ef 0001 0001 0000000000000007 0000000a 0000000200000000'));
  assert.deepEqual(nbd.encodeOffsetHole(0, 7n, 4096, 8192), hex('668e33ef 0000 0002 0000000000000007 0000000c 0000000000001000 00002000'));
  assert.deepEqual(
    nbd.encodeBlockStatus(1, 7n, 1, [{ lengthBytes: 4096, statusFlags: 0 }, { lengthBytes: 8192, statusFlags: 3 }]),
    hex('668e33ef 0001 0005 0000000000000007 00000014 00000001 00001000 00000000 00002000 00000003'),
  );
  assert.deepEqual(nbd.encodeStructuredError(1, 7n, 5, 'io'), hex('668e33ef 0001 8001 0000000000000007 00000008 00000005 0002 696f'));
  assert.deepEqual(nbd.encodeStructuredErrorOffset(1, 7n, 5, 'io', 512), hex('668e33ef 0001 8002 0000000000000007 00000010 00000005 0002 696f 0000000000000200'));
  assert.throws(() => nbd.encodeBlockStatus(1, 7n, 1, []));
  assert.throws(() => nbd.encodeStructuredError(1, 7n, 0, ''));
});

test('messages are cut to 4096 bytes on a character boundary, NUL replaced', () => {
  assert.equal(nbd.encodeMessage('a\0b').toString(), 'a b');
  const cut = nbd.encodeMessage('é'.repeat(3000));
  assert.equal(cut.length, 4096);
  assert.equal(cut.toString('utf8'), 'é'.repeat(2048));
  const odd = nbd.encodeMessage(`a${'é'.repeat(3000)}`);
  assert.equal(odd.length, 4095);
  assert.doesNotThrow(() => new TextDecoder('utf-8', { fatal: true }).decode(odd));
});

test('transmission flags: read-only drops write features, SEND_DF only with structured replies', () => {
  const writable = transmissionFlagsFor(false, true);
  for (const flag of [nbd.NBD_FLAG_HAS_FLAGS, nbd.NBD_FLAG_SEND_FLUSH, nbd.NBD_FLAG_SEND_FUA, nbd.NBD_FLAG_SEND_TRIM, nbd.NBD_FLAG_SEND_WRITE_ZEROES,
    nbd.NBD_FLAG_SEND_FAST_ZERO, nbd.NBD_FLAG_SEND_CACHE, nbd.NBD_FLAG_CAN_MULTI_CONN, nbd.NBD_FLAG_SEND_DF]) {
    assert.ok(writable & flag, `flag 0x${flag.toString(16)}`);
  }
  assert.equal(writable & nbd.NBD_FLAG_READ_ONLY, 0);
  const readOnly = transmissionFlagsFor(true, false);
  assert.ok(readOnly & nbd.NBD_FLAG_READ_ONLY);
  assert.equal(readOnly & (nbd.NBD_FLAG_SEND_TRIM | nbd.NBD_FLAG_SEND_WRITE_ZEROES | nbd.NBD_FLAG_SEND_DF), 0);
});

test('validateRequest: the edge checks, in nbdkit order', () => {
  const context: ValidationContext = { sizeBytes: 1 << 20, readOnly: false, structuredReplies: true, metaContextId: 1 };
  const check = (fields: Partial<nbd.NbdRequest>, overrides: Partial<ValidationContext> = {}): number =>
    validateRequest({ flags: 0, type: nbd.NBD_CMD_READ, handle: 1n, offsetBytes: 0, lengthBytes: 4096, ...fields }, { ...context, ...overrides });
  assert.equal(check({}), 0);
  assert.equal(check({ type: 9 }), nbd.NBD_EINVAL);
  assert.equal(check({ type: 0xffff }), nbd.NBD_EINVAL);
  assert.equal(check({ flags: 0x20 }), nbd.NBD_EINVAL);
  assert.equal(check({ flags: nbd.NBD_CMD_FLAG_FUA }), 0);
  assert.equal(check({ flags: nbd.NBD_CMD_FLAG_NO_HOLE }), nbd.NBD_EINVAL);
  assert.equal(check({ flags: nbd.NBD_CMD_FLAG_DF }), 0);
  assert.equal(check({ flags: nbd.NBD_CMD_FLAG_DF }, { structuredReplies: false }), nbd.NBD_EINVAL);
  assert.equal(check({ flags: nbd.NBD_CMD_FLAG_REQ_ONE }), nbd.NBD_EINVAL);
  assert.equal(check({ type: nbd.NBD_CMD_WRITE, flags: nbd.NBD_CMD_FLAG_FAST_ZERO }), nbd.NBD_EINVAL);
  // Ranges.
  assert.equal(check({ offsetBytes: (1 << 20) - 4096 }), 0);
  assert.equal(check({ offsetBytes: (1 << 20) - 4095 }), nbd.NBD_EINVAL);
  assert.equal(check({ offsetBytes: Number.POSITIVE_INFINITY }), nbd.NBD_EINVAL);
  assert.equal(check({ offsetBytes: Number.MAX_SAFE_INTEGER, lengthBytes: 2 }), nbd.NBD_EINVAL);
  assert.equal(check({ type: nbd.NBD_CMD_WRITE, offsetBytes: 1 << 20 }), nbd.NBD_ENOSPC);
  assert.equal(check({ type: nbd.NBD_CMD_WRITE_ZEROES, offsetBytes: 1 << 20 }), nbd.NBD_ENOSPC);
  assert.equal(check({ type: nbd.NBD_CMD_TRIM, offsetBytes: 1 << 20 }), nbd.NBD_EINVAL);
  assert.equal(check({ type: nbd.NBD_CMD_CACHE, offsetBytes: 1 << 20 }), nbd.NBD_EINVAL);
  assert.equal(check({ type: nbd.NBD_CMD_BLOCK_STATUS, offsetBytes: 1 << 20 }), nbd.NBD_EINVAL);
  // Sizes.
  const big = { sizeBytes: 2 ** 40 };
  assert.equal(check({ lengthBytes: requestBytesMax }, big), 0);
  assert.equal(check({ lengthBytes: requestBytesMax + 1 }, big), nbd.NBD_EINVAL);
  assert.equal(check({ type: nbd.NBD_CMD_WRITE, lengthBytes: requestBytesMax + 1 }, big), nbd.NBD_EINVAL);
  assert.equal(check({ type: nbd.NBD_CMD_TRIM, lengthBytes: 0xffffffff }, big), 0);
  assert.equal(check({ type: nbd.NBD_CMD_WRITE_ZEROES, lengthBytes: 0xffffffff }, big), 0);
  // Zero lengths.
  assert.equal(check({ lengthBytes: 0, offsetBytes: 1 << 20 }), 0);
  assert.equal(check({ type: nbd.NBD_CMD_BLOCK_STATUS, lengthBytes: 0 }), nbd.NBD_EINVAL);
  // Read-only.
  for (const type of [nbd.NBD_CMD_WRITE, nbd.NBD_CMD_TRIM, nbd.NBD_CMD_WRITE_ZEROES]) assert.equal(check({ type }, { readOnly: true }), nbd.NBD_EPERM);
  assert.equal(check({}, { readOnly: true }), 0);
  // FLUSH carries no range.
  assert.equal(check({ type: nbd.NBD_CMD_FLUSH, lengthBytes: 0 }), 0);
  assert.equal(check({ type: nbd.NBD_CMD_FLUSH, lengthBytes: 1 }), nbd.NBD_EINVAL);
  assert.equal(check({ type: nbd.NBD_CMD_FLUSH, offsetBytes: 1, lengthBytes: 0 }), nbd.NBD_EINVAL);
  // BLOCK_STATUS needs a context; REQ_ONE and FAST_ZERO/NO_HOLE go with their commands.
  assert.equal(check({ type: nbd.NBD_CMD_BLOCK_STATUS, flags: nbd.NBD_CMD_FLAG_REQ_ONE }), 0);
  assert.equal(check({ type: nbd.NBD_CMD_BLOCK_STATUS }, { metaContextId: 0 }), nbd.NBD_EINVAL);
  assert.equal(check({ type: nbd.NBD_CMD_BLOCK_STATUS }, { structuredReplies: false }), nbd.NBD_EINVAL);
  assert.equal(check({ type: nbd.NBD_CMD_WRITE_ZEROES, flags: nbd.NBD_CMD_FLAG_NO_HOLE | nbd.NBD_CMD_FLAG_FAST_ZERO | nbd.NBD_CMD_FLAG_FUA }), 0);
});

test('splitRange: pieces no longer than rangeRequestBytesMax', () => {
  assert.deepEqual(splitRange(0, 0), []);
  assert.deepEqual(splitRange(512, 4096), [{ offsetBytes: 512, lengthBytes: 4096 }]);
  assert.deepEqual(splitRange(0, 0xffffffff), [
    { offsetBytes: 0, lengthBytes: rangeRequestBytesMax },
    { offsetBytes: rangeRequestBytesMax, lengthBytes: 0xffffffff - rangeRequestBytesMax },
  ]);
});

test('blockDescriptors: merges equal neighbours, honours REQ_ONE, caps the count', () => {
  const extents = [
    { lengthBytes: 4096, hole: false, zero: false },
    { lengthBytes: 4096, hole: false, zero: false },
    { lengthBytes: 8192, hole: true, zero: true },
    { lengthBytes: 512, hole: false, zero: true },
  ];
  assert.deepEqual(blockDescriptors(extents, 1 << 20, false), [
    { lengthBytes: 8192, statusFlags: 0 },
    { lengthBytes: 8192, statusFlags: nbd.NBD_STATE_HOLE | nbd.NBD_STATE_ZERO },
    { lengthBytes: 512, statusFlags: nbd.NBD_STATE_ZERO },
  ]);
  assert.deepEqual(blockDescriptors(extents, 1 << 20, true), [{ lengthBytes: 8192, statusFlags: 0 }]);
  const many = Array.from({ length: blockStatusExtentsMax + 10 }, (_, index) => ({ lengthBytes: 1, hole: index % 2 === 0, zero: index % 2 === 0 }));
  assert.equal(blockDescriptors(many, many.length, false).length, blockStatusExtentsMax);
  assert.throws(() => blockDescriptors([], 10, false));
  assert.throws(() => blockDescriptors([{ lengthBytes: 11, hole: false, zero: false }], 10, false));
});

test('InputQueue: views inside a chunk, gathers across chunks, skips', () => {
  const queue = new InputQueue();
  const first = Buffer.from('abcdef');
  queue.push(first);
  queue.push(Buffer.alloc(0));
  queue.push(Buffer.from('ghij'));
  assert.equal(queue.length, 10);
  const view = queue.contiguous(4)!;
  assert.equal(view.buffer, first);
  assert.equal(queue.contiguous(11), null);
  const taken = queue.take(2);
  assert.equal(taken.toString(), 'ab');
  assert.equal(taken.buffer, first.buffer, 'a view, not a copy');
  const straddling = queue.contiguous(6)!;
  assert.equal(straddling.buffer.toString('latin1', straddling.offset, straddling.offset + 6), 'cdefgh');
  assert.equal(queue.length, 8);
  assert.equal(queue.take(5).toString(), 'cdefg');
  assert.equal(queue.skip(100), 3);
  assert.equal(queue.length, 0);
  assert.equal(queue.contiguous(0)?.buffer.length, 0);
  queue.push(Buffer.from('xy'));
  queue.push(Buffer.from('z'));
  assert.equal(queue.take(3).toString(), 'xyz');
  assert.equal(queue.skip(1), 0);
});
