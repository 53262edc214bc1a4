// A Docker plugin request as the engine sends it (curl on the plugin's unix socket): the HTTP status and the reply.
import { mustRun } from './node-process.ts';

export async function plugin(socket: string, route: string, body: unknown): Promise<{ status: number; reply: Record<string, unknown> }> {
  const result = await mustRun('curl', [
    '-s', '--unix-socket', socket, '-X', 'POST', '-H', 'Content-Type: application/vnd.docker.plugins.v1+json',
    '-d', JSON.stringify(body), '-w', '\n%{http_code}', `http://localhost${route}`,
  ]);
  const lines = result.trimEnd().split('\n');
  return { status: Number(lines.at(-1)), reply: JSON.parse(lines.slice(0, -1).join('\n')) };
}
