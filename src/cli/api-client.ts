// The CLI's side of the management API: HTTP + JSON over the node's unix socket, or over TCP with mutual TLS
// when the node offers it (serve --api-listen) and the target is HOST:PORT. The TLS parts (the credentials' checks,
// the peer client's words for a refused handshake) are imported only for a target on TCP: most commands go to the
// unix socket, and each chunkd command is a process of its own that loads what it uses.
import http from 'node:http';
import https from 'node:https';
import { ChunkdError, errorCodes, type ErrorCode } from '../core/errors.ts';
import { parseHostPort } from '../core/host-port.ts';

/** How a failed TLS connection is told (the peer client's describeClientError), or null for a unix socket. */
type DescribeTlsError = (error: Error, where: string, who: string) => ChunkdError;

/** The request options that reach `target`: a unix socket, or TCP with TLS and the client pair of $CHUNKD_TLS_DIR (--tls-dir). */
async function targetOptions(target: string): Promise<{ options: http.RequestOptions | https.RequestOptions; describeTls: DescribeTlsError | null }> {
  // HOST:PORT is the API on TCP; anything else is a unix socket path (write ./a:1 for such a file).
  const tcp = parseHostPort(target);
  if (tcp === null) return { options: { socketPath: target }, describeTls: null };
  const tlsDirectory = process.env.CHUNKD_TLS_DIR;
  if (tlsDirectory === undefined || tlsDirectory === '') throw ChunkdError.invalid(`--api ${target} is the API on TCP, which is mutual TLS only: pass --tls-dir DIR (a set from chunkd tls init with a client pair)`);
  const [{ loadCredentials }, { describeClientError }] = await Promise.all([import('../peer/credentials.ts'), import('../peer/client.ts')]);
  const { ca, cert, key } = loadCredentials(tlsDirectory, 'client');
  // The CA is what vouches for the node; its certificate's host names play no part, as on the peer port.
  return { options: { host: tcp.host, port: tcp.port, ca, cert, key, minVersion: 'TLSv1.3', checkServerIdentity: () => undefined }, describeTls: describeClientError };
}

/**
 * Sends one request to the node's API and returns the parsed JSON; API errors come back as ChunkdError. A long
 * operation answers with newline-delimited JSON (progress lines, then the result): each line goes to `onLine`,
 * and the last line is the result (or an `error` object, thrown as ChunkdError).
 */
export async function callApi(socketPath: string, method: string, route: string, body?: unknown, onLine?: (value: unknown) => void): Promise<unknown> {
  const { options: target, describeTls } = await targetOptions(socketPath);
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    const request = (describeTls === null ? http.request : https.request)(
      // agent: false, a connection per request: a kept-alive socket the node has just timed out would fail with EPIPE.
      { ...target, method, path: route, agent: false, headers: payload === undefined ? {} : { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) } },
      (response) => {
        if ((response.headers['content-type'] ?? '').startsWith('application/x-ndjson')) {
          readLines(response, socketPath, onLine ?? (() => {})).then(resolve, reject);
          return;
        }
        const chunks: Buffer[] = [];
        response.on('data', (chunk: Buffer) => chunks.push(chunk));
        response.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          let value: unknown = text;
          if ((response.headers['content-type'] ?? '').startsWith('application/json')) {
            try {
              value = JSON.parse(text);
            } catch {
              return reject(ChunkdError.io(`the node at ${socketPath} answered with malformed JSON`));
            }
          }
          if ((response.statusCode ?? 500) >= 400) return reject(answerError(response.statusCode ?? 500, value));
          resolve(value);
        });
        response.on('error', reject);
      },
    );
    request.on('error', (error: NodeJS.ErrnoException) => reject(connectionError(error, socketPath, describeTls)));
    request.end(payload);
  });
}

async function readLines(response: http.IncomingMessage, socketPath: string, onLine: (value: unknown) => void): Promise<unknown> {
  let pending = '';
  let last: unknown;
  for await (const chunk of response) {
    pending += (chunk as Buffer).toString('utf8');
    let newline: number;
    while ((newline = pending.indexOf('\n')) >= 0) {
      const line = pending.slice(0, newline);
      pending = pending.slice(newline + 1);
      if (line === '') continue;
      try {
        last = JSON.parse(line);
      } catch {
        throw ChunkdError.io(`the node at ${socketPath} answered with malformed JSON`);
      }
      onLine(last);
    }
  }
  const error = (last as { error?: { code?: string; message?: string } } | undefined)?.error;
  if (last === undefined) throw ChunkdError.io(`the node at ${socketPath} ended the answer early`);
  if (error !== undefined) {
    const code = (error.code !== undefined && error.code in errorCodes ? error.code : 'EIO') as ErrorCode;
    throw new ChunkdError(code, error.message ?? 'failed');
  }
  return last;
}

/** The ChunkdError an API error answer (`{"error": {"code", "message"}}`) stands for. */
export function answerError(statusCode: number, value: unknown): ChunkdError {
  const error = (value as { error?: { code?: string; message?: string } } | null)?.error;
  const code = (error?.code !== undefined && error.code in errorCodes ? error.code : 'EIO') as ErrorCode;
  return new ChunkdError(code, error?.message ?? `HTTP ${statusCode}`);
}

/** What a failure to reach the node's API (its socket, or HOST:PORT over TLS when `describeTls` is given) means, in words. */
export function connectionError(error: NodeJS.ErrnoException, socketPath: string, describeTls: DescribeTlsError | null = null): Error {
  if (error.code === 'ENOENT' || error.code === 'ECONNREFUSED') {
    return new ChunkdError('ENOENT', `no chunkd node answers at ${socketPath} (start one with "chunkd serve", or pass --api PATH / set CHUNKD_API)`);
  }
  if (error.code === 'EACCES') return new ChunkdError('EPERM', `permission denied on ${socketPath} (the API socket is for its owner only)`);
  if (describeTls !== null) return describeTls(error, socketPath, `the node's API at ${socketPath}`);
  return error;
}
