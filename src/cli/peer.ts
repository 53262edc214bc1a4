// chunkd peer status HOST:PORT --tls-dir DIR [--expect NAME] [--json]: says hello to a node's peer port with the
// client pair of DIR and prints who answered.
import { parseArgs } from 'node:util';
import { validateName } from '../core/names.ts';
import { PeerClient } from '../peer/client.ts';
import { loadCredentials } from '../peer/credentials.ts';
import { parseListen } from './serve.ts';
import { parsing, UsageError } from './errors.ts';
import { commands, unknownVerb } from './help.ts';

export async function peerCommand(argv: string[]): Promise<number> {
  const [verb, ...rest] = argv;
  if (verb !== 'status') throw unknownVerb('peer', verb);
  const { values, positionals } = parsing(() => parseArgs({ args: rest, allowPositionals: true, options: commands['peer status'].options }));
  const { address, tlsDirectory, expectName } = parsing(() => {
    const usage = `usage: chunkd ${commands['peer status'].usage[0]}`;
    if (positionals.length !== 1) throw new UsageError(usage);
    const address = positionals[0] === 'none' ? null : parseListen(positionals[0]!, 'peer address', '10.0.0.2:10810');
    if (address === null) throw new UsageError(usage);
    if (values['tls-dir'] === undefined) throw new UsageError(`peer status needs --tls-dir DIR: a directory from chunkd tls init holding ca-cert.pem and a client pair`);
    return { address, tlsDirectory: values['tls-dir'], expectName: values.expect === undefined ? undefined : validateName(values.expect, 'node') };
  });
  const credentials = loadCredentials(tlsDirectory, 'client');
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
