// chunkd tls init DIR [--node NAME ...] [--client NAME ...] [--san SAN ...] [--days N] [--add | --force]
import { parseArgs } from 'node:util';
import { ChunkdError } from '../core/errors.ts';
import { defaultNodeName, defaultValidityDays, initTls } from '../peer/certificates.ts';
import { parsing, UsageError } from './errors.ts';
import { commands, unknownVerb } from './help.ts';

export async function tlsCommand(argv: string[]): Promise<number> {
  const [verb, ...rest] = argv;
  if (verb !== 'init') throw unknownVerb('tls', verb);
  const { values, positionals } = parsing(() => parseArgs({ args: rest, allowPositionals: true, options: commands['tls init'].options }));
  const split = (list: string[] | undefined): string[] => (list ?? []).flatMap((item) => item.split(',')).filter((item) => item !== '');
  parsing(() => {
    if (positionals.length !== 1) throw new UsageError(`usage: chunkd ${commands['tls init'].usage[0]}`);
    if (values.add && values.force) throw new UsageError('--add keeps the CA and --force replaces it: pass one of them');
    if (values.days !== undefined && !/^\d{1,6}$/.test(values.days)) throw new UsageError(`invalid --days "${values.days}": a whole number of days`);
  });
  let nodes = split(values.node);
  const clients = split(values.client);
  if (nodes.length === 0 && clients.length === 0 && !values.add) {
    const name = defaultNodeName();
    if (name === null) throw ChunkdError.invalid('this host name is not a valid node name: pass --node NAME');
    nodes = [name];
  }
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
