// chunkd send and chunkd receive: replication streams (src/replication/stream-format.ts) between a running node's
// API and a file or a pipe, so that `chunkd send VOL@SNAP | ssh host chunkd receive VOL` works.
//   send VOL@SNAP [--from SNAP0] [--out FILE|-] · send --resume TOKEN [--out FILE|-]
//   receive VOL [--in FILE|-] · receive --resume-token VOL · receive --abort VOL
// The sending CLI decodes the stream as it passes (each record's checksum, its order), so that a stream the node
// stopped at a damaged block (an ABORT record) or cut short exits 1 with the node's words, even through a pipe.
// A progress line goes to stderr when it is a terminal; the stream never goes to a terminal.
import fs from 'node:fs';
import http from 'node:http';
import { Transform, type Readable, type Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { parseArgs } from 'node:util';
import { ChunkdError } from '../core/errors.ts';
import { validateName } from '../core/names.ts';
import { formatSize } from '../core/units.ts';
import type { ReceiveResult } from '../replication/receive.ts';
import { StreamDecoder } from '../replication/stream-format.ts';
import { answerError, callApi, connectionError } from './api-client.ts';
import { parsing, UsageError } from './errors.ts';
import { commands } from './help.ts';

const progressIntervalMs = 250;

export async function sendCommand(argv: string[], apiPath: (option: string | undefined) => string): Promise<number> {
  const { values, positionals } = parsing(() => parseArgs({ args: argv, allowPositionals: true, options: commands.send.options }));
  const { route, what } = parsing(() => {
    if (values.resume !== undefined) {
      if (positionals.length > 0 || values.from !== undefined) throw new UsageError('usage: chunkd send --resume TOKEN [--out FILE|-] (the token names the snapshots)');
      return { route: `/v1/stream?resume=${encodeURIComponent(values.resume)}`, what: 'resumed stream' };
    }
    const source = positionals[0]?.split('@') ?? [];
    if (positionals.length !== 1 || source.length !== 2) throw new UsageError('usage: chunkd send VOL@SNAP [--from SNAP0] [--out FILE|-]');
    const [volume, snapshot] = [validateName(source[0]), validateName(source[1], 'snapshot')];
    const from = values.from === undefined ? null : validateName(values.from, 'snapshot');
    return {
      route: `/v1/volumes/${encodeURIComponent(volume)}/snapshots/${encodeURIComponent(snapshot)}/stream${from === null ? '' : `?from=${encodeURIComponent(from)}`}`,
      what: `${volume}@${snapshot}${from === null ? '' : ` from ${from}`}`,
    };
  });
  const toStdout = values.out === undefined || values.out === '-';
  if (toStdout && process.stdout.isTTY === true) throw new UsageError('refusing to write a binary stream to a terminal: pipe it, or pass --out FILE');
  const socket = apiPath(values.api);
  const response = await new Promise<http.IncomingMessage>((resolve, reject) => {
    const request = http.get({ socketPath: socket, path: route, agent: false }, resolve);
    request.on('error', (error: NodeJS.ErrnoException) => reject(connectionError(error, socket)));
  });
  if ((response.statusCode ?? 500) >= 400) throw answerError(response.statusCode ?? 500, await readJson(response));
  const totalBytes = Number(response.headers['x-chunkd-stream-data-bytes'] ?? 0);
  const decoder = new StreamDecoder();
  let abortMessage: string | null = null;
  let ended = false;
  let dataBytes = 0;
  const progress = new ProgressLine(`send ${what}`);
  const check = new Transform({
    transform(piece: Buffer, _encoding, done) {
      try {
        for (const record of decoder.push(piece)) {
          if (record.type === 'abort') abortMessage = record.message;
          else if (record.type === 'end') ended = true;
          else if (record.type === 'data') dataBytes += record.data.length;
          else if (record.type === 'zero') dataBytes += record.lengthBytes;
        }
      } catch (error) {
        done(error as Error);
        return;
      }
      progress.update(dataBytes, totalBytes, decoder.offsetBytes);
      done(null, piece);
    },
  });
  const out: Writable = toStdout ? process.stdout : fs.createWriteStream(values.out!, { mode: 0o600 });
  try {
    await pipeline(response, check, out);
  } catch (error) {
    // A reader that went away (e.g. `| head`, or the receiver killed): the stream is cut, which the receiver
    // keeps for a resume.
    if ((error as NodeJS.ErrnoException).code === 'EPIPE') throw ChunkdError.io(`send ${what}: the reader of the stream went away after ${decoder.offsetBytes} bytes`);
    if (error instanceof ChunkdError) throw error;
    throw ChunkdError.io(`send ${what}: ${(error as Error).message}`);
  } finally {
    progress.done();
  }
  if (abortMessage !== null) throw ChunkdError.io(abortMessage);
  if (!ended) throw ChunkdError.io(`send ${what}: the node ended the stream after ${decoder.offsetBytes} bytes, before its end record (see its log)`);
  if (!toStdout) process.stdout.write(`sent ${what} to ${values.out}: ${decoder.offsetBytes} bytes of stream, ${formatSize(dataBytes)} of changed extents\n`);
  return 0;
}

export async function receiveCommand(argv: string[], apiPath: (option: string | undefined) => string): Promise<number> {
  const { values, positionals } = parsing(() => parseArgs({ args: argv, allowPositionals: true, options: commands.receive.options }));
  const volume = parsing(() => {
    if (positionals.length !== 1) throw new UsageError('usage: chunkd receive VOL [--in FILE|-] | receive --resume-token VOL | receive --abort VOL');
    if (values['resume-token'] === true && values.abort === true) throw new UsageError('--resume-token and --abort: pass one of them');
    return validateName(positionals[0]);
  });
  const socket = apiPath(values.api);
  const route = `/v1/volumes/${encodeURIComponent(volume)}/receive`;
  if (values['resume-token'] === true) {
    const answer = (await callApi(socket, 'GET', route)) as { token: string };
    process.stdout.write(values.json === true ? `${JSON.stringify(answer, null, 2)}\n` : `${answer.token}\n`);
    return 0;
  }
  if (values.abort === true) {
    await callApi(socket, 'DELETE', route);
    process.stdout.write(`aborted the interrupted receive into ${volume}\n`);
    return 0;
  }
  const fromStdin = values.in === undefined || values.in === '-';
  if (fromStdin && process.stdin.isTTY === true) throw new UsageError('refusing to read a stream from a terminal: pipe one in, or pass --in FILE');
  const input: Readable = fromStdin ? process.stdin : fs.createReadStream(values.in!);
  const progress = new ProgressLine(`receive ${volume}`);
  let sentBytes = 0;
  const count = new Transform({
    transform(piece: Buffer, _encoding, done) {
      sentBytes += piece.length;
      progress.update(sentBytes, 0, sentBytes);
      done(null, piece);
    },
  });
  const result = await new Promise<ReceiveResult>((resolve, reject) => {
    const request = http.request({ socketPath: socket, method: 'PUT', path: route, agent: false, headers: { 'content-type': 'application/octet-stream' } });
    let answered = false;
    request.on('response', (response) => {
      answered = true;
      // The node may answer before it has read everything (a refused stream): stop sending, read the answer.
      input.unpipe(count);
      count.unpipe(request);
      readJson(response)
        .then((value) => {
          if ((response.statusCode ?? 500) >= 400) reject(answerError(response.statusCode ?? 500, value));
          else resolve(value as ReceiveResult);
        }, reject)
        // Bytes of the stream still queued for a node that stopped reading would only meet EPIPE: drop them.
        .finally(() => request.destroy());
    });
    const failed = (error: NodeJS.ErrnoException): void => {
      // Once the node has answered, a write it no longer reads (EPIPE, ECONNRESET) changes nothing.
      if (answered) return;
      if (error.code === 'EPIPE' || error.code === 'ECONNRESET') {
        reject(ChunkdError.io(`the node at ${socket} closed the connection before it answered (see its log)`));
        return;
      }
      reject(error.code === 'ENOENT' && error.syscall === 'open' ? ChunkdError.notFound(`no file ${values.in}`) : connectionError(error, socket));
    };
    request.on('socket', (socketStream) => socketStream.on('error', failed));
    request.on('error', failed);
    input.on('error', failed);
    input.pipe(count).pipe(request);
  }).finally(() => {
    progress.done();
    if (fromStdin) process.stdin.destroy();
  });
  process.stdout.write(
    values.json === true
      ? `${JSON.stringify(result, null, 2)}\n`
      : `received ${result.volume}@${result.snapshot} (id ${result.uuid}): ${result.streamBytes} bytes of stream, ${formatSize(result.dataBytes)} of data${result.resumedFromBytes > 0 ? `, resumed at volume byte ${result.resumedFromBytes}` : ''}\n`,
  );
  return 0;
}

async function readJson(response: http.IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = [];
  for await (const chunk of response) chunks.push(chunk as Buffer);
  const text = Buffer.concat(chunks).toString('utf8');
  try {
    return JSON.parse(text);
  } catch {
    throw ChunkdError.io(`the node answered with malformed JSON: ${text.slice(0, 200)}`);
  }
}

/** One line on stderr, rewritten in place, when stderr is a terminal; nothing otherwise. */
class ProgressLine {
  readonly #label: string;
  readonly #enabled = process.stderr.isTTY === true;
  readonly #startedMs = Date.now();
  #lastMs = 0;
  #shown = false;

  constructor(label: string) {
    this.#label = label;
  }

  update(doneBytes: number, totalBytes: number, streamBytes: number): void {
    if (!this.#enabled) return;
    const now = Date.now();
    if (now - this.#lastMs < progressIntervalMs) return;
    this.#lastMs = now;
    const seconds = Math.max(0.001, (now - this.#startedMs) / 1000);
    const part = totalBytes > 0 ? `${formatSize(doneBytes)} of ${formatSize(totalBytes)} (${Math.floor((100 * doneBytes) / totalBytes)}%)` : formatSize(doneBytes);
    process.stderr.write(`\r\x1b[K${this.#label}: ${part}, ${formatSize(streamBytes)} of stream, ${formatSize(Math.round(streamBytes / seconds))}/s`);
    this.#shown = true;
  }

  done(): void {
    if (this.#shown) process.stderr.write('\n');
  }
}
