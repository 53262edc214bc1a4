// chunkd peer status HOST:PORT --tls-dir DIR [--expect NAME] [--json]: says hello to a node's peer port with the
// client pair of DIR and prints who answered.
import { parseArgs } from 'node:util';
import { ChunkdError } from '../core/errors.ts';
import { validateName } from '../core/names.ts';
import { PeerClient } from '../peer/client.ts';
import { loadCredentials } from '../peer/credentials.ts';
import { parseListen } from './serve.ts';

export async function peerCommand(argv: string[]): Promise<number> {
  const [verb, ...rest] = argv;
  if (verb !== 'status') throw ChunkdError.invalid(`unknown peer command "${verb ?? ''}": use status`);
  const { values, positionals } = parseArgs({
    args: rest,
    allowPositionals: true,
    options: { 'tls-dir': { type: 'string' }, expect: { type: 'string' }, json: { type: 'boolean' } },
  });
  const usage = 'usage: chunkd peer status HOST:PORT --tls-dir DIR [--expect NAME] [--json]';
  if (positionals.length !== 1) throw ChunkdError.invalid(usage);
  const address = positionals[0] === 'none' ? null : parseListen(positionals[0]!, 'peer address', '10.0.0.2:10810');
  if (address === null) throw ChunkdError.invalid(usage);
  if (values['tls-dir'] === undefined) throw ChunkdError.invalid(`peer status needs --tls-dir DIR: a directory from chunkd tls init holding ca-cert.pem and a client pair`);
  const credentials = loadCredentials(values['tls-dir'], 'client');
  const expectName = values.expect === undefined ? undefined : validateName(values.expect, 'node');
  const client = await PeerClient.connect({ host: address.host, port: address.port, credentials, expectName });
  try {
    const { hello } = client;
    const where = positionals[0]!;
    if (values.json) process.stdout.write(`${JSON.stringify({ address: where, ...hello, client: credentials.name }, null, 2)}\n`);
    else process.stdout.write(`peer ${hello.name} at ${where}: ${hello.software}, protocol version ${hello.version}, pool ${hello.poolId} (connected as ${credentials.name})\n`);
    return 0;
  } finally {
    client.close();
  }
}
