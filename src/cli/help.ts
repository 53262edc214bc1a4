// Every command's help, and the options its parser takes, in one table keyed by the command's words ("serve",
// "volume create"). A command parses with its entry's options (parseArgs ignores the help fields), so the help
// lists every option a command takes and no other. A group ("volume", "replica") needs no entry of its own: its
// help lists the entries under it. A new command is one entry here and one `case` in main.ts.
import { UsageError } from './errors.ts';

export interface OptionSpec {
  type: 'string' | 'boolean';
  multiple?: boolean;
  short?: string;
  /** What the value looks like in the help: SIZE, DIR, HOST:PORT. */
  value?: string;
  help: string;
  /** The value when the command line (and, for serve, the environment) gives none; applied by the command (a parseArgs default would hide that none was given). */
  fallback?: string;
}

export interface CommandSpec {
  /** Each way to call it, after "chunkd ". */
  usage: readonly string[];
  /** One line for the list of commands. */
  summary: string;
  /** Paragraphs after the summary in the command's own help. */
  details?: readonly string[];
  options: Readonly<Record<string, OptionSpec>>;
  /** Each option can also come from the environment, CHUNKD_<OPTION> (environmentName); the command line wins. */
  environment?: boolean;
  /** Its options belong to another program, which prints them for --help (bench: bench/suite.ts). */
  helpFromCommand?: boolean;
}

const api = {
  api: { type: 'string', value: 'PATH|HOST:PORT', help: "the node's API: a unix socket (default $CHUNKD_API, else ./data/chunkd.sock), or HOST:PORT for serve --api-listen" },
  'tls-dir': { type: 'string', value: 'DIR', help: 'with --api HOST:PORT: a set from chunkd tls init holding ca-cert.pem and a client pair (default $CHUNKD_TLS_DIR)' },
} as const;
const json = { json: { type: 'boolean', help: 'machine-readable output; an error is {"error":{"code","message"}} on stderr' } } as const;
const size = { size: { type: 'string', value: 'SIZE', help: 'declared size in bytes or binary units: 512, 4KiB, 64MiB, 10GiB, 1TiB (K/M/G/T the same)' } } as const;

export const commands = {
  serve: {
    usage: ['serve [OPTIONS]'],
    summary: 'run a node in the foreground (pool ./data, NBD on 127.0.0.1:10809)',
    details: [
      'Prints one "chunkd ready: ..." line on stdout when it serves; logs go to stderr. SIGINT/SIGTERM: stop accepting, finish in-flight requests, sync and unmount attached file systems, commit, exit 0.',
      'One --tls-dir (a node\'s set from chunkd tls init) serves NBD\'s TLS, the peer port and the API on TCP.',
    ],
    environment: true,
    options: {
      pool: { type: 'string', value: 'DIR', fallback: 'data', help: 'the pool directory (created if missing)' },
      listen: { type: 'string', value: 'HOST:PORT|none', fallback: '127.0.0.1:10809', help: 'NBD on TCP (port 0: any free port), or none' },
      socket: { type: 'string', value: 'PATH', help: 'NBD on a unix socket as well' },
      api: { type: 'string', value: 'PATH', help: 'the management API\'s unix socket, mode 0600 (default <pool>/chunkd.sock)' },
      'default-volume': { type: 'string', value: 'NAME:SIZE', help: 'create this volume at start when it is missing' },
      workers: { type: 'string', value: 'N', help: 'threads for chunk I/O and checksums (default one per CPU; 0: all on the main thread)' },
      'nbd-threads': { type: 'string', value: 'N', fallback: '0', help: 'threads that each listen on the NBD TCP port and serve their own connections (0: the main thread does)' },
      'verify-reads': { type: 'string', value: 'on|off', fallback: 'on', help: 'check every block read against its checksum (off only to measure what checking costs)' },
      'read-defrag': { type: 'string', value: 'on|off', fallback: 'on', help: 'the second read of 256 KiB or more that finds its range in many small pieces (rewritten at random) rewrites it in the background as one piece, while the pool has no snapshot, so later reads of it cost less (chunkd_read_defrag_bytes_total counts the bytes)' },
      'poll-us': { type: 'string', value: 'N', fallback: '50', help: 'microseconds an NBD connection polls its socket for the next request once its replies are out and nothing is in flight, instead of sleeping (queue-depth-1 latency on virtual machines whose idle CPUs halt; backs off when clients do not answer that fast; 0: off; chunkd_nbd_idle_polls_total counts them)' },
      metadata: { type: 'string', value: 'memory|paged', fallback: 'memory', help: 'the metadata a pool created now gets: memory (all in memory, format 3) or paged (on disk behind a bounded cache, format 4; experimental: fsck --repair repairs damage in one copy, reference counts and a journal damaged in both copies, not a page damaged in both). Without it an existing pool opens as it is; paged on a pool of format 3 is refused (chunkd pool upgrade converts it)' },
      'metadata-cache': { type: 'string', value: 'SIZE', fallback: '256MiB', help: 'paged metadata: the cache of metadata pages in memory' },
      'heap-growth': { type: 'string', value: 'auto|PERCENT', fallback: 'auto', help: "how far the JavaScript heap may grow past what the last full collection left live before the next one (V8's --heap-growing-percent; auto: V8's own, up to 4x). Lower trades CPU for memory: with a 16 MiB metadata cache and 4 KiB random writes, 150 took 9-21 % off the RSS for 3-6 % more CPU a write, 50 18-21 % for 8-10 % (README, Quick start)" },
      fuse: { type: 'string', value: 'DIR', help: 'every volume as a file DIR/<volume>, every snapshot read-only in DIR/.snapshots/' },
      'plugin-socket': { type: 'string', value: 'PATH', help: "Docker's volume plugin protocol on this socket (Docker looks for /run/docker/plugins/chunkd.sock)" },
      tls: { type: 'string', value: 'off|on|require', fallback: 'off', help: 'NBD over TLS (STARTTLS): on offers it, require insists; needs --tls-dir' },
      'tls-dir': { type: 'string', value: 'DIR', help: "this node's credentials in qemu's layout (ca-cert.pem, server-cert.pem, server-key.pem, ...)" },
      'tls-verify-peer': { type: 'boolean', help: 'NBD clients must present a certificate from the CA in ca-cert.pem' },
      'peer-listen': { type: 'string', value: 'HOST:PORT', help: 'the node-to-node port, mutual TLS with the CA of --tls-dir only (off by default)' },
      'peer-allow': { type: 'string', multiple: true, value: 'NAME,...', help: 'let in only these peer names (repeatable; default: any the CA signed)' },
      'peer-timeout': { type: 'string', value: 'DURATION', fallback: '60s', help: 'a peer that answers nothing for this long (paused, its disk stuck) fails the replication cycle, which is retried and resumes' },
      'api-listen': { type: 'string', value: 'HOST:PORT', help: 'the management API on TCP as well, mutual TLS with client certificates from the CA of --tls-dir' },
      'metrics-listen': { type: 'string', value: 'HOST:PORT', help: 'GET /metrics (Prometheus text) on plain HTTP over TCP, read-only, nothing else on that port (off by default)' },
      'log-level': { type: 'string', value: 'debug|info|warn|error', fallback: 'info', help: 'log events of this level and above on stderr' },
      'log-format': { type: 'string', value: 'text|json', fallback: 'text', help: 'json: one object per line, {"time","level","msg"} (no time under journald, which stamps each line)' },
      etcd: { type: 'string', value: 'URL,...', help: 'join the cluster kept in this etcd (http://HOST:PORT, several comma-separated; https:// takes --tls-dir: etcd\'s certificate checked against its ca-cert.pem, the node presenting its client-cert.pem); needs --node-name. Off by default: the node works alone' },
      'node-name': { type: 'string', value: 'NAME', help: "this node's name in the cluster (with --peer-listen, the name in its certificate)" },
      'lease-ttl': { type: 'string', value: 'DURATION', fallback: '10s', help: "the TTL of the node's etcd lease: writes to its volumes stop when it cannot renew it for the TTL less a margin (a fifth, at least 0.5 s)" },
    },
  },
  'cluster status': {
    usage: ['cluster status [--json]'],
    summary: 'the cluster as etcd has it, from any node in it: nodes (alive while their lease lives), capacity, free space, volumes per node',
    options: { ...json, ...api },
  },
  'volume create': {
    usage: ['volume create NAME --size SIZE [--node NODE] [--replicas N [--sync [--sync-timeout 5s]]] [--json]'],
    summary: 'create a thin volume: nothing is allocated until written; in a cluster, owned by the live node with the most free space unless --node names one',
    options: {
      ...size,
      node: { type: 'string', value: 'NODE', help: 'in a cluster: the node that owns it (default: the live node with the most free space; within 2% or 1 GiB of the most counts as a tie, which goes to the node asked, else to the first name)' },
      replicas: { type: 'string', value: 'N', help: 'in a cluster: replicas on N other nodes, those with the most free space (default 0)' },
      sync: { type: 'boolean', help: 'with --replicas: synchronous replicas (every acknowledged write on each in-sync one; etcd records which are in sync, and only those may take the volume over)' },
      'sync-timeout': { type: 'string', value: 'DURATION', fallback: '5s', help: 'with --sync: a replica that leaves a write unanswered this long is out of sync' },
      ...json,
      ...api,
    },
  },
  'volume list': {
    usage: ['volume list [--json]'],
    summary: "every volume: declared size and bytes allocated; on a clustered node, every volume of the cluster from etcd with its owner, epoch and replicas",
    options: { ...json, ...api },
  },
  'volume info': { usage: ['volume info NAME [--json]'], summary: "one volume's size, bytes allocated and snapshots", options: { ...json, ...api } },
  'volume resize': {
    usage: ['volume resize NAME --size SIZE [--force] [--json]'],
    summary: 'grow at once; shrinking discards the data past the new end and needs --force and no open clients',
    options: { ...size, force: { type: 'boolean', help: 'allow shrinking (the data past the new end is lost)' }, ...json, ...api },
  },
  'volume rm': { usage: ['volume rm NAME [--json]'], summary: 'remove a volume (refused while open, attached, or while it has snapshots)', options: { ...json, ...api } },
  'volume set': {
    usage: ['volume set NAME --sync on|off [--sync-timeout 5s] [--json]'],
    summary: "make the volume's replicas synchronous, or asynchronous again, while clients use it (on its owner)",
    details: [
      'on: each asynchronous replica becomes a synchronous one on the same node; its first resync compares the whole volume by chunk checksums and sends only what differs, and the command returns once every replica is in sync. off: a replication snapshot (repl-<ms>) is taken on the volume and on every replica, which must all be in sync, with no write between it and the end of the synchronous links (a replica that fails to take it makes the command fail, and the snapshot is removed again); each then is an asynchronous replica (chunkd replica add --every 30s) whose first cycle sends only what was written since. In a cluster the volume\'s record in etcd says which (a synchronous volume goes only to a replica in sync when its owner fails).',
    ],
    options: {
      sync: { type: 'string', value: 'on|off', help: 'on: synchronous replicas (every acknowledged write on each in-sync one); off: asynchronous ones' },
      'sync-timeout': { type: 'string', value: 'DURATION', fallback: '5s', help: 'with --sync on: a replica that leaves a write unanswered this long is out of sync' },
      ...json,
      ...api,
    },
  },
  'volume handoff': {
    usage: ['volume handoff VOL --to HOST:PORT [--json]'],
    summary: 'move VOL to another node (its replica is made current first); this node keeps a read-only replica',
    details: [
      'Two phases: increments while clients keep writing, until the rest is small; then writes stop (clients get the shutdown error and are disconnected), the last increment goes, and the other node owns VOL at the next epoch. Run it again after a crash of either node to finish or roll back what was interrupted.',
    ],
    options: { to: { type: 'string', value: 'HOST:PORT', help: "the new owner's peer port (serve --peer-listen)" }, ...json, ...api },
  },
  'volume move': {
    usage: ['volume move VOL --to NODE [--json]', 'volume move VOL --cancel [--json]'],
    summary: 'in a cluster, from any node: move VOL to node NODE (the handoff, recorded in etcd); waits until etcd names NODE its owner',
    details: [
      'The move is recorded in etcd first; the owner hands the volume over (increments while clients write, then a short write pause) and the record names NODE at the next epoch. A crash of either node resumes or rolls the handoff back when it restarts, and the move goes on from etcd.',
      '--cancel stops a move in progress: the owner rolls its handoff back (writes resume there) unless the target has already taken the volume, in which case the move completes; it says which. If the owner dies mid-move, a failover takes the volume over and the move is dropped.',
    ],
    options: { to: { type: 'string', value: 'NODE', help: 'the node name of the new owner (chunkd cluster status lists them)' }, cancel: { type: 'boolean', help: 'stop the move of VOL in progress (recorded in etcd)' }, ...json, ...api },
  },
  'snapshot create': { usage: ['snapshot create VOL SNAP [--json]'], summary: 'an instant, crash-consistent snapshot, durable on return', options: { ...json, ...api } },
  'snapshot list': { usage: ['snapshot list VOL [--json]'], summary: "a volume's snapshots with the bytes each alone holds", options: { ...json, ...api } },
  'snapshot rm': { usage: ['snapshot rm VOL SNAP [--json]'], summary: 'remove a snapshot; space held only by it goes back, clones keep what they share', options: { ...json, ...api } },
  'snapshot rollback': { usage: ['snapshot rollback VOL SNAP [--json]'], summary: 'the volume becomes the snapshot again (not while exported)', options: { ...json, ...api } },
  'snapshot diff': {
    usage: ['snapshot diff VOL FROM [TO] [--json]'],
    summary: 'byte extents that differ between two snapshots (TO omitted: the live volume), from metadata only',
    options: { ...json, ...api },
  },
  clone: { usage: ['clone VOL@SNAP NEWVOL [--json]'], summary: "a writable volume sharing the snapshot's data", options: { ...json, ...api } },
  send: {
    usage: ['send VOL@SNAP [--from SNAP0] [--out FILE|-]', 'send --resume TOKEN [--out FILE|-]'],
    summary: 'a replication stream of a snapshot (incremental from SNAP0) to a file or stdout',
    details: ['A pipe works: chunkd send vol@s2 --from s1 | ssh host chunkd receive vol. The stream never goes to a terminal; a progress line goes to stderr when it is one.'],
    options: {
      from: { type: 'string', value: 'SNAP0', help: 'send only what changed since this snapshot (the receiver holds it)' },
      out: { type: 'string', value: 'FILE|-', help: 'where the stream goes (default -: stdout)' },
      resume: { type: 'string', value: 'TOKEN', help: 'the rest of an interrupted stream (TOKEN from receive --resume-token)' },
      ...api,
    },
  },
  receive: {
    usage: ['receive VOL [--in FILE|-] [--json]', 'receive --resume-token VOL [--json]', 'receive --abort VOL'],
    summary: 'apply a replication stream; the snapshot appears only once the stream checks out whole',
    details: ['A full stream makes VOL; an incremental one needs VOL at its base snapshot.'],
    options: {
      in: { type: 'string', value: 'FILE|-', help: 'where the stream comes from (default -: stdin)' },
      'resume-token': { type: 'boolean', help: 'print the token that continues an interrupted receive into VOL (for send --resume)' },
      abort: { type: 'boolean', help: 'give up an interrupted receive (VOL removed, or rolled back to the base)' },
      ...json,
      ...api,
    },
  },
  attach: {
    usage: ['attach VOL --mountpoint DIR [--fs ext4|xfs] [--format] [--via fuse|nbdfuse] [--json]'],
    summary: "mount a volume's file system at DIR (through a loop device over its file)",
    details: ['A file system is made only on a volume never written, or with --format on one that holds data blkid does not recognise (destroying it); one blkid recognises is never reformatted.'],
    options: {
      mountpoint: { type: 'string', value: 'DIR', help: 'where to mount it (created if missing; must be empty)' },
      fs: { type: 'string', value: 'ext4|xfs', help: 'the file system to make on a volume never written (default ext4)' },
      format: { type: 'boolean', help: 'make a new file system on a volume whose data blkid does not recognise, destroying it' },
      via: { type: 'string', value: 'fuse|nbdfuse', help: "the volume's file: the node's FUSE front end (default) or libnbd's nbdfuse" },
      ...json,
      ...api,
    },
  },
  detach: { usage: ['detach VOL [--json]'], summary: 'unmount, detach the loop device, flush (refused while in use)', options: { ...json, ...api } },
  status: { usage: ['status [--json]'], summary: "the node's pool, volumes, connections, threads and attachments", options: { ...json, ...api } },
  scrub: {
    usage: ['scrub VOL [--json]', 'scrub --all [--json]'],
    summary: "read every block of a volume and its snapshots and check its checksum; exit 1 if any is damaged",
    options: { all: { type: 'boolean', help: 'every volume' }, ...json, ...api },
  },
  fsck: {
    usage: ['fsck [--pool DIR] [--repair] [--json]'],
    summary: 'offline check of a pool no node holds: exit 0 clean, 1 damage found, 2 could not run',
    details: [
      '--repair rewrites damaged metadata copies from the good ones, or salvages what it can, moves the damaged files to damaged-<time>/ and lists exactly what was lost (exit 1 then).',
      'On paged metadata (format 4) fsck also reads both copies of every metadata page and checks the reference counts against the maps; --repair rewrites a copy damaged in one place from the other, sets reference counts that disagree to what the maps name, and starts a fresh journal; a journal commit damaged in both copies is salvaged as on format 3 (exit 1, what was lost listed). A page damaged in both copies is not salvaged there: --repair lists it with the bytes of each volume and snapshot it affects, changes nothing, and exits 1.',
    ],
    options: {
      pool: { type: 'string', value: 'DIR', fallback: 'data', help: 'the pool to check' },
      repair: { type: 'boolean', help: 'repair what it finds (see above)' },
      ...json,
    },
  },
  'pool upgrade': {
    usage: ['pool upgrade --metadata paged [--pool DIR] [--json]'],
    summary: 'offline: convert a pool no node holds from in-memory metadata (format 3) to paged metadata (format 4)',
    details: [
      'For a pool whose metadata (maps, checksums, reference counts) has outgrown memory or whose start takes too long: the chunk files stay as they are, the metadata is rebuilt in pages (every volume, snapshot with its id and creation time, clone and their sharing), read back and compared with the old, and only then does the pool switch to format 4; a crash at any point leaves the old pool or the new one, whole. There is no way back to format 3. On paged metadata fsck --repair rewrites copies damaged in one place, recounts reference counts and salvages a journal damaged in both copies, but not a page damaged in both copies (it lists it and changes nothing).',
    ],
    options: {
      pool: { type: 'string', value: 'DIR', fallback: 'data', help: 'the pool to upgrade (stop its node first)' },
      metadata: { type: 'string', value: 'paged', help: 'the metadata to upgrade to (only paged)' },
      ...json,
    },
  },
  'tls init': {
    usage: ['tls init DIR [--node NAME ...] [--client NAME ...] [--san SAN ...] [--days N] [--add|--force] [--json]'],
    summary: 'a cluster CA and certificates in the qemu/libnbd/nbdkit layout',
    details: ['DIR/NAME/ holds each node\'s set (CA certificate, server and client pairs) and each client\'s; DIR itself holds the CA and the first node\'s set. No name: one node named after the host.'],
    options: {
      node: { type: 'string', multiple: true, value: 'NAME', help: 'issue a node set (repeatable, or commas: --node a,b)' },
      client: { type: 'string', multiple: true, value: 'NAME', help: 'issue a client set (repeatable, or commas)' },
      san: { type: 'string', multiple: true, value: 'SAN', help: 'another subject alternative name for server certificates: DNS:host, IP:addr, or a bare name or address' },
      days: { type: 'string', value: 'N', help: 'validity in days (default 3650)' },
      add: { type: 'boolean', help: 'issue more from the existing CA in DIR' },
      force: { type: 'boolean', help: "make a new CA even though DIR has one (the old one's sets are removed)" },
      ...json,
    },
  },
  'peer status': {
    usage: ['peer status HOST:PORT --tls-dir DIR [--expect NAME] [--json]'],
    summary: "hello to a node's peer port with DIR's client pair: its name, version, pool",
    options: {
      'tls-dir': { type: 'string', value: 'DIR', help: 'a set from chunkd tls init holding ca-cert.pem and a client pair' },
      expect: { type: 'string', value: 'NAME', help: "insist that the node's certificate names it NAME" },
      ...json,
    },
  },
  'replica add': {
    usage: ['replica add VOL --peer HOST:PORT [--every 30s] [--max-rate 200MiB/s] [--json]', 'replica add VOL --peer HOST:PORT --sync [--sync-timeout 5s] [--max-rate 200MiB/s] [--json]'],
    summary: "keep a read-only replica of VOL on another node (its --peer-listen), updated by incremental streams, or synchronously",
    details: [
      'The node needs --tls-dir with a client pair (its set from chunkd tls init). Every --every it snapshots VOL (repl-<ms>), sends the change since the last point both nodes hold, and prunes older replication snapshots on both; a dropped link or a restart resumes where the replica stopped.',
      'With --sync, every write is sent to the replica as it happens and acknowledged only once the replica has it (FLUSH and FUA: durable there too). A replica that does not answer within --sync-timeout is out of sync: writes go on without it, the regions written meanwhile are recorded, and only those are resent when it is back, and of those only the chunks whose checksums differ there (chunkd replica status VOL shows the state, dirty bytes and resync progress).',
    ],
    options: {
      peer: { type: 'string', value: 'HOST:PORT', help: "the other node's peer port (serve --peer-listen)" },
      sync: { type: 'boolean', help: 'a synchronous replica: every acknowledged write is on it while it is in sync' },
      'sync-timeout': { type: 'string', value: 'DURATION', fallback: '5s', help: 'with --sync: a replica that leaves a write unanswered this long is out of sync' },
      every: { type: 'string', value: 'DURATION', fallback: '30s', help: 'how often to replicate: 500ms, 30s, 5m, 1h' },
      'max-rate': { type: 'string', value: 'RATE', help: 'at most this many bytes per second on the link (with --sync: of a resync), e.g. 200MiB/s (default: no limit)' },
      ...api,
      ...json,
    },
  },
  'replica list': {
    usage: ['replica list [--json]'],
    summary: "every replica of this node's volumes: peer, last point, lag, bytes pending, throughput, last error",
    options: { ...api, ...json },
  },
  'replica status': {
    usage: ['replica status VOL [--json]'],
    summary: "the replicas of one volume, as replica list shows them",
    options: { ...api, ...json },
  },
  'replica sync': {
    usage: ['replica sync VOL [--peer HOST:PORT] [--json]'],
    summary: 'replicate now (after any cycle running) and wait for it: what it sent, or that the replica was current',
    options: { peer: { type: 'string', value: 'HOST:PORT', help: 'only the replica on this peer' }, ...api, ...json },
  },
  'replica remove': {
    usage: ['replica remove VOL --peer HOST:PORT [--json]'],
    summary: 'stop replicating VOL to that peer (the replica there stays as it is)',
    options: { peer: { type: 'string', value: 'HOST:PORT', help: "the peer the replica is on" }, ...api, ...json },
  },
  'replica promote': {
    usage: ['replica promote VOL [--json]'],
    summary: "failover: this node's replica of VOL becomes its owner at its last replicated point, epoch plus one",
    details: ['Only for a replica whose owner is gone: the old owner, when it comes back, learns of the higher epoch from its peers and refuses writes (fenced).'],
    options: { ...api, ...json },
  },
  'replica demote': {
    usage: ['replica demote VOL [--owner HOST:PORT] [--json]'],
    summary: "a fenced volume becomes a replica of its new owner; writes that never replicated are kept as snapshot fenced-<ms>",
    options: { owner: { type: 'string', value: 'HOST:PORT', help: "the new owner's peer port, when this node does not know it" }, ...api, ...json },
  },
  bench: {
    usage: ['bench [OPTIONS]'],
    summary: 'chunkd against the raw disk and its peers (bench/README.md; a checkout only)',
    details: ['The options are the benchmark suite\'s (bench/suite.ts, as npm run bench takes them):'],
    helpFromCommand: true,
    options: {},
  },
  iostat: {
    usage: ['iostat [VOL] [INTERVAL] [--count N] [--json]'],
    summary: "live I/O per volume: IOPS, MB/s and latency percentiles every INTERVAL seconds (default 1), from every front end",
    details: ['Each report covers the interval before it; latency is the device\'s (lock wait, chunk I/O, commit for flush and FUA), its percentiles the upper bounds of the histogram buckets of /metrics\' chunkd_volume_request_seconds. VOL: only that volume (and its snapshots\' exports); otherwise every export that served a request.'],
    options: { count: { type: 'string', value: 'N', help: 'stop after N reports (default: until interrupted)' }, ...json, ...api },
  },
  completion: { usage: ['completion bash'], summary: 'a bash completion script for every command and option: source <(chunkd completion bash)', options: {} },
  help: { usage: ['help [COMMAND ...]'], summary: "a command's help: what it does and every option", options: {} },
} as const satisfies Record<string, CommandSpec>;

export type CommandKey = keyof typeof commands;

/** The table as plain specs (for code that walks it). */
const table: Readonly<Record<string, CommandSpec>> = commands;

/** CHUNKD_<OPTION>: the environment variable of an option (serve --tls-dir: CHUNKD_TLS_DIR). */
export function environmentName(option: string): string {
  return `CHUNKD_${option.toUpperCase().replaceAll('-', '_')}`;
}

/**
 * The entry that the leading words of `words` name, longest first ("volume create vol1" is "volume create"), or
 * a group ("volume") when only entries under it exist; null when nothing matches.
 */
export function findCommand(words: readonly string[]): { key: string; group: boolean } | null {
  for (let count = words.length; count > 0; count--) {
    const key = words.slice(0, count).join(' ');
    if (key in table) return { key, group: false };
    if (Object.keys(table).some((other) => other.startsWith(`${key} `))) return { key, group: true };
  }
  return null;
}

/** The usage error of a group's missing or unknown command ("volume", "snapshot", "tls"). */
export function unknownVerb(group: string, verb: string | undefined): UsageError {
  const verbs = Object.keys(table).filter((key) => key.startsWith(`${group} `)).map((key) => key.slice(group.length + 1));
  const what = verb === undefined || verb.startsWith('-') ? `${group} needs a command` : `unknown ${group} command "${verb}"`;
  return new UsageError(`${what}: ${verbs.join(', ')} (chunkd ${group} --help)`);
}

/** The leading words of argv up to its first option: what names the command. */
export function commandWords(argv: readonly string[]): string[] {
  const words: string[] = [];
  for (const word of argv) {
    if (word.startsWith('-')) break;
    words.push(word);
  }
  return words;
}

const column = 26;
/** Stands for a space that wrap() must not break at. */
const keepTogether = '\u0000';
const widthMax = 116;

/** `text` cut into lines of at most `width` characters at spaces. */
function wrap(text: string, width: number): string[] {
  const lines: string[] = [];
  let line = '';
  for (const word of text.split(' ')) {
    if (line !== '' && line.length + 1 + word.length > width) {
      lines.push(line);
      line = word;
    } else line = line === '' ? word : `${line} ${word}`;
  }
  return [...lines, line];
}

/** Two columns: each left item, and its text wrapped beside it (below it when the item is too wide). */
function formatRows(rows: Array<[string, string]>, at = column): string[] {
  return rows.flatMap(([left, right]) => {
    const [first = '', ...more] = right === '' ? [''] : wrap(right, widthMax - at);
    const indent = ' '.repeat(at);
    const head = left.length + 4 <= at ? [`  ${left.padEnd(at - 2)}${first}`.trimEnd()] : [`  ${left}`, ...(first === '' ? [] : [`${indent}${first}`])];
    return [...head, ...more.map((line) => `${indent}${line}`)].map((line) => line.replaceAll(keepTogether, ' '));
  });
}

/** The list of every command: what `chunkd help` and `chunkd --help` print. */
export function generalHelp(): string {
  const rows: Array<[string, string]> = [];
  for (const spec of Object.values(table)) for (const [i, usage] of spec.usage.entries()) rows.push([usage, i === 0 ? spec.summary : '']);
  return [
    'usage: chunkd <command> [options]',
    '',
    ...formatRows(rows, 38),
    '',
    '  chunkd --version                    the version',
    '  chunkd help COMMAND, chunkd COMMAND --help',
    '                                      a command\'s help: what it does and every option',
    '',
    'The CLI finds the node through --api PATH, else $CHUNKD_API, else ./data/chunkd.sock; --api HOST:PORT reaches',
    "a node's API on TCP (serve --api-listen) with the client pair of --tls-dir DIR (or $CHUNKD_TLS_DIR).",
    'Sizes take binary units: 512, 4KiB, 64MiB, 10GiB, 1TiB (K/M/G/T the same).',
    'Exit status: 0 success; 1 failure; 2 a usage error (an unknown command or option, a missing or malformed',
    'argument). scrub and fsck exit 1 when they find damage; fsck exits 2 when it cannot run. Under --json an',
    'error is one line {"error":{"code","message"}} on stderr, code as the API\'s (ENOENT, EEXIST, EBUSY, ...) or',
    'EUSAGE.',
  ].join('\n');
}

/** The help of one entry, or of a group (the entries under it). */
export function commandHelp(key: string): string {
  const spec = table[key];
  if (spec === undefined) {
    const entries = Object.entries(table).filter(([other]) => other.startsWith(`${key} `));
    if (entries.length === 0) throw new UsageError(`no command "${key}" (chunkd help lists them)`);
    const rows: Array<[string, string]> = [];
    for (const [, entry] of entries) for (const [i, usage] of entry.usage.entries()) rows.push([usage, i === 0 ? entry.summary : '']);
    return [`usage: chunkd ${key} <command> [options]`, '', ...formatRows(rows), '', `chunkd ${key} <command> --help: a command's options`].join('\n');
  }
  const lines = spec.usage.map((usage, i) => `${i === 0 ? 'usage: ' : '       '}chunkd ${usage}`);
  lines.push('', ...wrap(`${spec.summary[0]!.toUpperCase()}${spec.summary.slice(1)}.`, widthMax));
  for (const paragraph of spec.details ?? []) lines.push('', ...wrap(paragraph, widthMax));
  const rows: Array<[string, string]> = Object.entries(spec.options).map(([name, option]) => {
    const flag = `${option.short === undefined ? '' : `-${option.short}, `}--${name}${option.value === undefined ? '' : ` ${option.value}`}`;
    const notes = [...(spec.environment === true ? [`env ${environmentName(name)}`] : []), ...(option.fallback === undefined ? [] : [`default ${option.fallback}`])];
    // The notes stay whole on one line: their spaces are not places to wrap (formatRows puts them back).
    const noteText = notes.length === 0 ? '' : ` [${notes.join('; ').replaceAll(' ', keepTogether)}]`;
    return [flag, `${option.help}${noteText}`];
  });
  rows.push(['-h, --help', 'this help']);
  lines.push('', 'options:', ...formatRows(rows));
  if (spec.environment === true) {
    const text =
      'Every option can also come from the environment variable named after it: CHUNKD_ and the option in capitals, dashes as underscores ' +
      '(--tls-dir: CHUNKD_TLS_DIR), for a service unit or a container. The command line wins; an empty variable counts as unset. A switch ' +
      'takes 1, true, yes or on, or 0, false, no or off; a repeatable option takes commas (CHUNKD_PEER_ALLOW=b,c). CHUNKD_TLS_DIR and CHUNKD_API, ' +
      "which the other commands read to reach a node, are ignored where they cannot be serve's: CHUNKD_TLS_DIR when nothing of serve's uses it, " +
      'CHUNKD_API when it is HOST:PORT (a node\'s API on TCP, not a socket path).';
    lines.push('', ...wrap(text, widthMax));
  }
  return lines.join('\n');
}
