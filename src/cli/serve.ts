// chunkd serve: runs a node in the foreground until SIGINT or SIGTERM, then stops it cleanly and exits 0.
import { caCertFile, clientCertFile, clientKeyFile, readPem } from '../core/tls-files.ts';
import { parseArgs } from 'node:util';
import v8 from 'node:v8';
import { ChunkdError } from '../core/errors.ts';
import { parseHostPort } from '../core/host-port.ts';
import { installFailStop } from '../core/fail-stop.ts';
import { validateName } from '../core/names.ts';
import { pollUsMax, workersMax } from '../core/limits.ts';
import { formatSize, parseDuration, parseSize } from '../core/units.ts';
import { metadataKinds, type MetadataKind } from '../store/pool-layout.ts';
import type { NodeConfig, PeerConfig } from '../node/node.ts';
import { needs } from '../core/lazy-import.ts';
import type { ClusterConfig } from '../cluster/cluster.ts';
import { parseEtcdEndpoints } from '../cluster/records.ts';
import { parsing, UsageError } from './errors.ts';
import { commands, environmentName, type OptionSpec } from './help.ts';
import { notifyServiceManager, stderrIsJournal } from './service-manager.ts';
import { logLevels, makeLog, parseLogLevel, type LogLevel } from '../core/log.ts';

/** Parses HOST:PORT (IPv6 as [::1]:PORT), or "none" for no TCP listener. */
export function parseListen(text: string, option = '--listen', example = '127.0.0.1:10809'): { host: string; port: number } | null {
  if (text === 'none') return null;
  const address = parseHostPort(text);
  if (address === null) throw ChunkdError.invalid(`invalid ${option} "${text}": use HOST:PORT, e.g. ${example}, or none`);
  return address;
}

/** The peer port's settings from --peer-listen, --tls-dir and --peer-allow, or null when --peer-listen is absent or none. */
export function parsePeerOptions(listen: string | undefined, tlsDirectory: string | undefined, allow: string[] | undefined): PeerConfig | null {
  const address = listen === undefined ? null : parseListen(listen, '--peer-listen', '0.0.0.0:10810');
  if (address === null) {
    if (allow !== undefined) throw ChunkdError.invalid('--peer-allow needs --peer-listen HOST:PORT');
    return null;
  }
  if (tlsDirectory === undefined) throw ChunkdError.invalid('--peer-listen needs --tls-dir DIR: this node\'s directory from chunkd tls init (DIR/NODE)');
  const names = allow === undefined ? null : allow.flatMap((item) => item.split(',')).filter((item) => item !== '').map((name) => validateName(name, 'node'));
  if (names !== null && names.length === 0) throw ChunkdError.invalid('--peer-allow needs at least one name');
  return { listen: address, tlsDirectory, allow: names };
}

/** Parses NAME:SIZE for --default-volume. */
export function parseDefaultVolume(text: string): { name: string; sizeBytes: number } {
  const colon = text.lastIndexOf(':');
  if (colon < 0) throw ChunkdError.invalid(`invalid --default-volume "${text}": use NAME:SIZE, e.g. default:10GiB`);
  return { name: validateName(text.slice(0, colon)), sizeBytes: parseSize(text.slice(colon + 1)) };
}

/** Parses --workers N: 0 (all chunk I/O on the main thread) up to limits.workersMax. */
export function parseWorkers(text: string, option = '--workers'): number {
  const count = Number(text);
  if (!/^\d+$/.test(text) || count > workersMax) throw ChunkdError.invalid(`invalid ${option} "${text}": a whole number from 0 (none: the main thread does it) to ${workersMax}`);
  return count;
}

/** serve --heap-growth: null for auto (V8's own factor), else a percent from 1 to 1000. */
export function parseHeapGrowth(text: string): number | null {
  if (text === 'auto') return null;
  const percent = Number(text);
  if (!/^\d+$/.test(text) || percent < 1 || percent > heapGrowthPercentMax) throw ChunkdError.invalid(`invalid --heap-growth "${text}": auto, or a whole percent from 1 to ${heapGrowthPercentMax}`);
  return percent;
}

const heapGrowthPercentMax = 1000;

/**
 * Sets how far V8's heap may grow past what the last full collection left live (its --heap-growing-percent, read at
 * every full collection when it sets the next limit, so setting it once the process runs takes effect from the next
 * one: checked in serve-heap-growth.test.ts by the full collections a workload makes). Left to V8 (up to 4x live on
 * a machine with this much memory) unless asked: the garbage a node's writes promote, and the array buffers that
 * wait for a full collection, then sit in the RSS that much longer (BENCHMARKS.md, issue 15, "The RSS's level").
 */
export function applyHeapGrowth(percent: number | null): void {
  if (percent !== null) v8.setFlagsFromString(`--heap-growing-percent=${percent}`);
}

/** --poll-us: 0 (off) to pollUsMax microseconds. */
function parsePollUs(text: string): number {
  const micros = Number(text);
  if (!/^\d+$/.test(text) || micros > pollUsMax) throw ChunkdError.invalid(`invalid --poll-us "${text}": a whole number of microseconds from 0 (off) to ${pollUsMax}`);
  return micros;
}

/**
 * Checks --tls, --tls-dir and --tls-verify-peer together; null when NBD's TLS is off. One --tls-dir serves NBD,
 * the peer port and the API on TCP alike (`directoryInUse`: one of the others takes it, so it may come without --tls).
 */
export function parseTls(mode: string, directory: string | undefined, verifyPeer: boolean, directoryInUse = false): { mode: 'on' | 'require'; directory: string; verifyPeer: boolean } | null {
  if (mode !== 'off' && mode !== 'on' && mode !== 'require') throw ChunkdError.invalid(`invalid --tls "${mode}": off, on or require`);
  if (mode === 'off') {
    if (directory !== undefined && !directoryInUse) throw ChunkdError.invalid('--tls-dir is given but --tls is off: add --tls on or --tls require');
    if (verifyPeer) throw ChunkdError.invalid('--tls-verify-peer needs --tls on or --tls require');
    return null;
  }
  if (directory === undefined) throw ChunkdError.invalid(`--tls ${mode} needs --tls-dir DIR (ca-cert.pem, server-cert.pem, server-key.pem)`);
  return { mode, directory, verifyPeer };
}

function parseOnOff(text: string, option: string): boolean {
  if (text !== 'on' && text !== 'off') throw ChunkdError.invalid(`invalid ${option} "${text}": on or off`);
  return text === 'on';
}

const serveOptions = commands.serve.options;

/**
 * The values of serve's options: the command line's, else the environment's (CHUNKD_POOL for --pool, ...; an
 * empty variable is unset); and which came from the environment.
 */
function serveValues(argv: string[], env: NodeJS.ProcessEnv): { values: ServeValues; fromEnvironment: Set<string> } {
  const { values } = parseArgs({ args: argv, options: serveOptions });
  const merged: Record<string, string | boolean | string[] | undefined> = { ...values };
  const fromEnvironment = new Set<string>();
  for (const [name, option] of Object.entries(serveOptions) as Array<[string, OptionSpec]>) {
    const text = env[environmentName(name)];
    if (merged[name] !== undefined || text === undefined || text === '') continue;
    fromEnvironment.add(name);
    if (option.type === 'boolean') {
      if (!/^(1|true|yes|on|0|false|no|off)$/i.test(text)) throw ChunkdError.invalid(`invalid ${environmentName(name)}="${text}": 1, true, yes or on, or 0, false, no or off`);
      merged[name] = /^(1|true|yes|on)$/i.test(text);
    } else merged[name] = option.multiple === true ? text.split(',') : text;
  }
  return { values: merged as ServeValues, fromEnvironment };
}

type ServeValues = ReturnType<typeof parseArgs<{ options: typeof serveOptions }>>['values'];

/**
 * The node's configuration (all but its log) from serve's arguments and the environment (`env`, CHUNKD_*); a
 * wrong one is a usage error, and nothing has started.
 */
function parseLogFormat(text: string): 'text' | 'json' {
  if (text !== 'text' && text !== 'json') throw ChunkdError.invalid(`invalid --log-format "${text}": text or json`);
  return text;
}

function checkedLogLevel(text: string): LogLevel {
  const level = parseLogLevel(text);
  if (level === null) throw ChunkdError.invalid(`invalid --log-level "${text}": ${logLevels.join(', ')}`);
  return level;
}

export type ServeConfig = Omit<NodeConfig, 'log'> & { logLevel: LogLevel; logFormat: 'text' | 'json'; heapGrowthPercent: number | null };

export function serveConfig(argv: string[], env: NodeJS.ProcessEnv = process.env): ServeConfig {
  let fromEnvironment = new Set<string>();
  try {
    return parsing(() => {
      const parsed = serveValues(argv, env);
      fromEnvironment = parsed.fromEnvironment;
      return configFrom(parsed.values, fromEnvironment);
    });
  } catch (error) {
    // "invalid --listen ..." where the value came from CHUNKD_LISTEN says so.
    if (!(error instanceof UsageError)) throw error;
    const names = [...fromEnvironment].filter((name) => error.message.includes(`--${name}`));
    if (names.length === 0) throw error;
    throw new UsageError(`${error.message} (from ${names.map((name) => `$${environmentName(name)}`).join(', ')})`, error.code);
  }
}

function parseMetadataKind(text: string): MetadataKind {
  const kind = metadataKinds.find((k) => k === text);
  if (kind === undefined) throw new UsageError(`invalid --metadata ${JSON.stringify(text)}: ${metadataKinds.join(' or ')}`);
  return kind;
}

function parseMetadataCache(text: string): number {
  const bytes = parseSize(text);
  if (bytes < metadataCacheBytesMin) throw new UsageError(`invalid --metadata-cache ${text}: at least ${formatSize(metadataCacheBytesMin)}`);
  return bytes;
}

/** The least page cache that holds a map pass's pins (paged-map.ts) with room to spare. */
const metadataCacheBytesMin = 4 * 1024 * 1024;

function configFrom(values: ServeValues, fromEnvironment: Set<string>): ServeConfig {
  const given = (text: string | undefined): boolean => text !== undefined && text !== 'none';
  const etcdTls = given(values.etcd) && /(^|,)\s*https:/.test(values.etcd!);
  const tlsInUse = (values.tls ?? 'off') !== 'off' || given(values['peer-listen']) || given(values['api-listen']) || etcdTls;
  // The other commands read CHUNKD_TLS_DIR for their client pair: set for them, it must not stop a plain serve.
  const tlsDirectory = fromEnvironment.has('tls-dir') && !tlsInUse ? undefined : values['tls-dir'];
  const peer = parsePeerOptions(values['peer-listen'], tlsDirectory, values['peer-allow']);
  const apiListen = values['api-listen'] === undefined ? null : parseListen(values['api-listen'], '--api-listen', '0.0.0.0:10811');
  if (apiListen !== null && tlsDirectory === undefined) throw ChunkdError.invalid('--api-listen needs --tls-dir DIR: the API on TCP is mutual TLS only');
  return {
    poolDirectory: values.pool ?? serveOptions.pool.fallback,
    listen: parseListen(values.listen ?? serveOptions.listen.fallback),
    nbdSocketPath: values.socket ?? null,
    // CHUNKD_API may name a node's API on TCP for the other commands (HOST:PORT): no socket path for serve.
    apiSocketPath: values.api === undefined || (fromEnvironment.has('api') && parseHostPort(values.api) !== null) ? null : values.api,
    defaultVolume: values['default-volume'] !== undefined ? parseDefaultVolume(values['default-volume']) : null,
    workers: values.workers !== undefined ? parseWorkers(values.workers) : undefined,
    nbdThreads: parseWorkers(values['nbd-threads'] ?? serveOptions['nbd-threads'].fallback, '--nbd-threads'),
    verifyReads: parseOnOff(values['verify-reads'] ?? serveOptions['verify-reads'].fallback, '--verify-reads'),
    readDefrag: parseOnOff(values['read-defrag'] ?? serveOptions['read-defrag'].fallback, '--read-defrag'),
    pollUs: parsePollUs(values['poll-us'] ?? serveOptions['poll-us'].fallback),
    // Only when given: a pool of format 3 asked for paged is refused (pool.ts), one asked for nothing opens as it is.
    metadata: values.metadata === undefined ? undefined : parseMetadataKind(values.metadata),
    metadataCacheBytes: parseMetadataCache(values['metadata-cache'] ?? serveOptions['metadata-cache'].fallback),
    fuseDirectory: values.fuse ?? null,
    pluginSocketPath: values['plugin-socket'] ?? null,
    peer,
    apiTls: apiListen === null ? null : { listen: apiListen, tlsDirectory: tlsDirectory! },
    tls: parseTls(values.tls ?? serveOptions.tls.fallback, tlsDirectory, values['tls-verify-peer'] === true, peer !== null || apiListen !== null || etcdTls),
    metricsListen: values['metrics-listen'] === undefined ? null : parseListen(values['metrics-listen'], '--metrics-listen', '0.0.0.0:9810'),
    peerTimeoutMs: parseDuration(values['peer-timeout'] ?? serveOptions['peer-timeout'].fallback, '--peer-timeout'),
    logLevel: checkedLogLevel(values['log-level'] ?? serveOptions['log-level'].fallback),
    logFormat: parseLogFormat(values['log-format'] ?? serveOptions['log-format'].fallback),
    heapGrowthPercent: parseHeapGrowth(values['heap-growth'] ?? serveOptions['heap-growth'].fallback),
    cluster: parseClusterOptions(values.etcd, values['node-name'], values['lease-ttl'], tlsDirectory),
  };
}

/**
 * The cluster's settings from --etcd, --node-name and --lease-ttl, or null without --etcd. https:// endpoints take
 * the node's --tls-dir: etcd's certificate is checked against ca-cert.pem, and the node presents client-cert.pem.
 */
export function parseClusterOptions(etcd: string | undefined, nodeName: string | undefined, leaseTtl: string | undefined, tlsDirectory?: string): ClusterConfig | null {
  if (etcd === undefined || etcd === 'none') {
    if (nodeName !== undefined) throw ChunkdError.invalid('--node-name needs --etcd URL: it names the node in a cluster');
    if (leaseTtl !== undefined) throw ChunkdError.invalid('--lease-ttl needs --etcd URL');
    return null;
  }
  const endpoints = parseEtcdEndpoints(etcd);
  if (nodeName === undefined) throw ChunkdError.invalid('--etcd needs --node-name NAME: the name of this node in the cluster');
  const leaseTtlMs = parseDuration(leaseTtl ?? serveOptions['lease-ttl'].fallback, '--lease-ttl');
  if (leaseTtlMs < 2000 || leaseTtlMs % 1000 !== 0) throw ChunkdError.invalid(`invalid --lease-ttl "${leaseTtl}": whole seconds, at least 2s (etcd's leases count in seconds)`);
  let tls: ClusterConfig['tls'] = null;
  if (endpoints[0]!.startsWith('https:')) {
    if (tlsDirectory === undefined) throw ChunkdError.invalid(`--etcd ${endpoints.join(',')} needs --tls-dir DIR: etcd's certificate is checked against DIR/${caCertFile}, and the node presents DIR/${clientCertFile}`);
    tls = { ca: readPem(tlsDirectory, caCertFile)!, cert: readPem(tlsDirectory, clientCertFile)!, key: readPem(tlsDirectory, clientKeyFile)! };
  }
  return { endpoints, nodeName: validateName(nodeName, 'node'), leaseTtlMs, tls };
}

export async function serve(argv: string[]): Promise<number> {
  const config = serveConfig(argv);
  applyHeapGrowth(config.heapGrowthPercent);
  const log = makeLog({ level: config.logLevel, format: config.logFormat, stamped: !stderrIsJournal() });
  // A bug anywhere, even one no request handler sees, stops the node at once (core/fail-stop.ts).
  installFailStop();
  // The node's modules load here, not when this one does: parsing serve's options (and peer's, which share them)
  // loads none of them (core/lazy-import.ts).
  const { ChunkdNode } = await needs('serve', () => import('../node/node.ts'));
  const node = await ChunkdNode.start({ ...config, log });
  // Listen for the stop signals before saying ready: a SIGTERM sent right after the ready line otherwise found no
  // handler in 2 to 5 of 8 quick starts and stops here (the process died of the signal, exit code null).
  const stopping = new Promise<void>((resolve) => {
    process.once('SIGINT', resolve);
    process.once('SIGTERM', resolve);
  });
  const listening = node.nbdAddresses();
  // One line on stdout when ready: scripts and tests wait for it (and read the port when --listen asked for 0).
  const peerAddresses = node.peerAddresses();
  const apiTls = node.api.tlsAddress();
  const metrics = node.metricsAddress();
  process.stdout.write(`chunkd ready: pool ${node.pool.directory}, nbd ${listening.join(' ') || 'none'}, api ${node.apiSocketPath}${apiTls !== null ? ` ${apiTls}` : ''}${peerAddresses.length > 0 ? `, peer ${peerAddresses.join(' ')}` : ''}${metrics !== null ? `, metrics ${metrics}` : ''}\n`);
  await notifyServiceManager('READY=1', log);
  await stopping;
  await notifyServiceManager('STOPPING=1', log);
  log('stopping: finishing in-flight requests and committing');
  await node.stop();
  log('stopped');
  return 0;
}
