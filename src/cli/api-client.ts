// The CLI's side of the management API: HTTP + JSON over the node's unix socket.
import http from 'node:http';
import { ChunkdError, errorCodes, type ErrorCode } from '../core/errors.ts';

/** Sends one request to the node's API and returns the parsed JSON; API errors come back as ChunkdError. */
export function callApi(socketPath: string, method: string, route: string, body?: unknown): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    const request = http.request(
      // agent: false, a connection per request: a kept-alive socket the node has just timed out would fail with EPIPE.
      { socketPath, method, path: route, agent: false, headers: payload === undefined ? {} : { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) } },
      (response) => {
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
          if ((response.statusCode ?? 500) >= 400) {
            const error = (value as { error?: { code?: string; message?: string } }).error;
            const code = (error?.code !== undefined && error.code in errorCodes ? error.code : 'EIO') as ErrorCode;
            return reject(new ChunkdError(code, error?.message ?? `HTTP ${response.statusCode}`));
          }
          resolve(value);
        });
        response.on('error', reject);
      },
    );
    request.on('error', (error: NodeJS.ErrnoException) => {
      if (error.code === 'ENOENT' || error.code === 'ECONNREFUSED') {
        reject(new ChunkdError('ENOENT', `no chunkd node answers at ${socketPath} (start one with "chunkd serve", or pass --api PATH / set CHUNKD_API)`));
      } else if (error.code === 'EACCES') {
        reject(new ChunkdError('EPERM', `permission denied on ${socketPath} (the API socket is for its owner only)`));
      } else reject(error);
    });
    request.end(payload);
  });
}
