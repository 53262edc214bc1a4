// HOST:PORT, as every TCP address chunkd takes is written (an IPv6 host in brackets: [::1]:10810): the listeners
// (serve --listen, --peer-listen, --api-listen, --metrics-listen), the API's address (--api), and peers' addresses
// (replica add --peer, volume handoff --to). One pattern for all of them.
const hostPortPattern = /^(?:\[([0-9a-fA-F:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})$/;

/** The host and port of `text`, or null when it is not HOST:PORT with a port up to 65535. */
export function parseHostPort(text: unknown): { host: string; port: number } | null {
  if (typeof text !== 'string') return null;
  const match = hostPortPattern.exec(text);
  if (match === null) return null;
  const port = Number(match[3]);
  return port <= 65535 ? { host: match[1] ?? match[2]!, port } : null;
}
