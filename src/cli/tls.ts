// chunkd tls init DIR [--node NAME ...] [--client NAME ...] [--san SAN ...] [--days N] [--add | --force]
import { parseArgs } from 'node:util';
import { ChunkdError } from '../core/errors.ts';
import { defaultNodeName, defaultValidityDays, initTls } from '../peer/certificates.ts';

export async function tlsCommand(argv: string[]): Promise<number> {
  const [verb, ...rest] = argv;
  if (verb !== 'init') throw ChunkdError.invalid(`unknown tls command "${verb ?? ''}": use init`);
  const { values, positionals } = parseArgs({
    args: rest,
    allowPositionals: true,
    options: {
      node: { type: 'string', multiple: true },
      client: { type: 'string', multiple: true },
      san: { type: 'string', multiple: true },
      days: { type: 'string' },
      add: { type: 'boolean' },
      force: { type: 'boolean' },
      json: { type: 'boolean' },
    },
  });
  if (positionals.length !== 1) throw ChunkdError.invalid('usage: chunkd tls init DIR [--node NAME ...] [--client NAME ...] [--san SAN ...] [--days N] [--add | --force]');
  if (values.add && values.force) throw ChunkdError.invalid('--add keeps the CA and --force replaces it: pass one of them');
  const split = (list: string[] | undefined): string[] => (list ?? []).flatMap((item) => item.split(',')).filter((item) => item !== '');
  let nodes = split(values.node);
  const clients = split(values.client);
  if (nodes.length === 0 && clients.length === 0 && !values.add) {
    const name = defaultNodeName();
    if (name === null) throw ChunkdError.invalid('this host name is not a valid node name: pass --node NAME');
    nodes = [name];
  }
  if (values.days !== undefined && !/^\d{1,6}$/.test(values.days)) throw ChunkdError.invalid(`invalid --days "${values.days}": a whole number of days`);
  const days = values.days === undefined ? defaultValidityDays : Number(values.days);
  const report = await initTls({
    directory: positionals[0]!,
    nodes,
    clients,
    sans: split(values.san),
    days,
    mode: values.add ? 'add' : values.force ? 'replace' : 'new',
  });
  if (values.json) {
    process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
    return 0;
  }
  const lines = [
    report.caCreated ? `created CA "${report.caSubject}" in ${report.directory} (ca-key.pem: keep it there; copy out only the name directories)` : `issued from CA "${report.caSubject}" in ${report.directory}`,
    ...report.issued.map((entry) => `  ${entry.kind} ${entry.name}: ${entry.directory}/ (valid until ${entry.notAfter})`),
    ...(report.topLevelNode !== null ? [`  ${report.directory}/ itself holds the set of node ${report.topLevelNode}`] : []),
  ];
  process.stdout.write(`${lines.join('\n')}\n`);
  return 0;
}
