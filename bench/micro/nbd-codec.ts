// NBD codec: decoding request headers (every request passes here) and writing reply headers (every reply).
import type { Bench } from 'tinybench';
import { decodeRequest, encodeSimpleReply, NBD_CMD_READ, NBD_REQUEST_MAGIC, writeOffsetDataHeader, writeSimpleReplyHeader } from '../../src/nbd/protocol.ts';
import type { MicroModule } from './harness.ts';

const requestBytes = 28;
const batch = 64;

/** 64 READ request headers back to back, as a socket read delivers them at queue depth. */
function requestStream(): Buffer {
  const buffer = Buffer.alloc(requestBytes * batch);
  for (let i = 0; i < batch; i++) {
    const at = i * requestBytes;
    buffer.writeUInt32BE(NBD_REQUEST_MAGIC, at);
    buffer.writeUInt16BE(0, at + 4);
    buffer.writeUInt16BE(NBD_CMD_READ, at + 6);
    buffer.writeBigUInt64BE(BigInt(i + 1), at + 8);
    buffer.writeBigUInt64BE(BigInt(i * 4096), at + 16);
    buffer.writeUInt32BE(4096, at + 24);
  }
  return buffer;
}

export const nbdCodec: MicroModule = {
  name: 'nbd-codec',
  async register(bench: Bench) {
    const stream = requestStream();
    const replies = Buffer.alloc(16 * batch);
    const structured = Buffer.alloc(28 * batch);
    let sink = 0;
    bench
      .add('decode 64 request headers', () => {
        for (let at = 0; at < stream.length; ) {
          const decoded = decodeRequest(stream, at);
          if (!decoded.done) throw new Error('short stream');
          sink += decoded.value.lengthBytes;
          at += decoded.bytesConsumed;
        }
      })
      .add('write 64 simple reply headers', () => {
        for (let i = 0; i < batch; i++) writeSimpleReplyHeader(replies, i * 16, 0, BigInt(i));
      })
      .add('write 64 structured offset-data headers', () => {
        for (let i = 0; i < batch; i++) writeOffsetDataHeader(structured, i * 28, 1, BigInt(i), i * 4096, 4096);
      })
      .add('encode 64 simple replies (allocating)', () => {
        for (let i = 0; i < batch; i++) sink += encodeSimpleReply(0, BigInt(i)).length;
      });
    return async () => {
      if (sink < 0) throw new Error('unreachable: keeps the results alive');
    };
  },
};
