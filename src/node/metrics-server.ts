// serve --metrics-listen HOST:PORT: the node's /metrics (node/metrics.ts) on plain HTTP over TCP, where Prometheus
// scrapes. Read-only and nothing else: GET or HEAD /metrics answers, another method on it is 405, any other path
// 404; the management API never appears on this port (it stays on its 0600 socket, or mutual TLS).
import http from 'node:http';
import type net from 'node:net';
import { ChunkdError } from '../core/errors.ts';
import { metricsConnectionsMax, metricsRequestTimeoutMs } from '../core/limits.ts';
import { closeHttpServer } from '../core/unix-socket.ts';
import type { Log } from '../core/log.ts';

export class MetricsServer {
  readonly #server: http.Server;

  private constructor(server: http.Server) {
    this.#server = server;
  }

  /** Listens on host:port (port 0: any free one) and answers each scrape with `render()`. */
  static async listen(host: string, port: number, render: () => Promise<string>, log: Log): Promise<MetricsServer> {
    const server = http.createServer((request, response) => {
      const pathname = (request.url ?? '/').split('?')[0];
      if (pathname !== '/metrics') return answer(response, 404, 'not found: this port serves GET /metrics only\n');
      if (request.method !== 'GET' && request.method !== 'HEAD') return answer(response, 405, 'method not allowed: GET /metrics only\n', { allow: 'GET, HEAD' });
      render().then(
        (text) => {
          response.writeHead(200, { 'content-type': 'text/plain; version=0.0.4; charset=utf-8', 'content-length': Buffer.byteLength(text) });
          response.end(request.method === 'HEAD' ? undefined : text);
        },
        (error: unknown) => {
          // A node whose status cannot be read (it is stopping) has no metrics to give; anything else is a bug.
          if (!(error instanceof ChunkdError)) throw error;
          log(`metrics scrape failed: ${error.message}`, 'warn');
          answer(response, 503, `${error.message}\n`);
        },
      );
    });
    server.maxConnections = metricsConnectionsMax;
    server.requestTimeout = metricsRequestTimeoutMs;
    server.headersTimeout = metricsRequestTimeoutMs;
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen({ host, port }, () => {
        server.off('error', reject);
        resolve();
      });
    });
    return new MetricsServer(server);
  }

  /** HOST:PORT it listens on ([::1]:PORT for IPv6). */
  address(): string {
    const address = this.#server.address() as net.AddressInfo;
    return address.family === 'IPv6' ? `[${address.address}]:${address.port}` : `${address.address}:${address.port}`;
  }

  close(): Promise<void> {
    return closeHttpServer(this.#server, null);
  }
}

function answer(response: http.ServerResponse, status: number, text: string, headers: Record<string, string> = {}): void {
  response.writeHead(status, { 'content-type': 'text/plain; charset=utf-8', 'content-length': Buffer.byteLength(text), ...headers });
  response.end(text);
}
