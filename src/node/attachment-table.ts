// Attachments as data: what is attached where, the checks an attach or a Docker mount must pass, whether a
// volume gets a new file system, and the file format of `<pool>/attachments.json`. Pure (no I/O): attachments.ts
// does the probing and mounting and calls in here.
import { ChunkdError } from '../core/errors.ts';
import { checkName } from '../core/names.ts';
import { formatSize } from '../core/units.ts';

export const fsTypes = ['ext4', 'xfs'] as const;
export type FsType = (typeof fsTypes)[number];
export const vias = ['fuse', 'nbdfuse'] as const;
export type Via = (typeof vias)[number];

export interface AttachmentRecord {
  volume: string;
  /** Absolute path where the volume's file system is mounted. */
  mountpoint: string;
  /** The file system found on (or made on) the volume, as blkid names it. */
  fsType: string;
  via: Via;
  /** Who asked: `chunkd attach`, or the Docker volume plugin (detached when its last container unmounts). */
  owner: 'cli' | 'docker';
  /** Docker's caller IDs that hold the mount (Mount adds one, Unmount removes it). */
  dockerIds: string[];
  attachedAt: string;
}

export interface AttachRequest {
  volume: string;
  mountpoint: string;
  /** The file system to make when the volume has none; when given, one already there must be this type. */
  fsType: FsType | null;
  via: Via;
  /** Make a file system also on a volume that holds data but none that blkid recognises, destroying that data. */
  format: boolean;
}

const fileFormat = 'chunkd-attachments';
const fileFormatVersion = 1;

/** Validates an attach request from the API; returns it normalised or throws a ChunkdError. */
export function validateAttachRequest(volume: unknown, body: Record<string, unknown>): AttachRequest {
  const nameError = checkName(volume);
  if (nameError) throw nameError;
  const mountpoint = body.mountpoint;
  if (typeof mountpoint !== 'string' || !mountpoint.startsWith('/') || mountpoint.length > 4096 || mountpoint.includes('\0')) {
    throw ChunkdError.invalid('mountpoint must be an absolute path');
  }
  const fsType = body.fs ?? null;
  if (fsType !== null && !fsTypes.includes(fsType as FsType)) throw ChunkdError.invalid(`--fs must be ${fsTypes.join(' or ')}`);
  const via = body.via ?? 'fuse';
  if (!vias.includes(via as Via)) throw ChunkdError.invalid(`--via must be ${vias.join(' or ')}`);
  const format = body.format ?? false;
  if (typeof format !== 'boolean') throw ChunkdError.invalid('format must be true or false');
  return { volume: volume as string, mountpoint: normalisePath(mountpoint), fsType: fsType as FsType | null, via: via as Via, format };
}

/** Removes repeated and trailing slashes and `.` parts; `..` is refused rather than resolved. */
export function normalisePath(absolute: string): string {
  const parts = absolute.split('/').filter((part) => part !== '' && part !== '.');
  if (parts.includes('..')) throw ChunkdError.invalid(`mountpoint ${absolute} must not contain ".."`);
  return `/${parts.join('/')}`;
}

/** The attachments of one node, by volume. */
export class AttachmentTable {
  readonly #byVolume = new Map<string, AttachmentRecord>();

  constructor(records: AttachmentRecord[] = []) {
    for (const record of records) this.#byVolume.set(record.volume, record);
  }

  get(volume: string): AttachmentRecord | undefined {
    return this.#byVolume.get(volume);
  }

  list(): AttachmentRecord[] {
    return [...this.#byVolume.values()].sort((a, b) => a.volume.localeCompare(b.volume));
  }

  /** Throws the error an attach must fail with (already attached, mountpoint taken or nested), or returns. */
  checkAttach(request: Pick<AttachRequest, 'volume' | 'mountpoint'>): void {
    const existing = this.#byVolume.get(request.volume);
    if (existing !== undefined) throw ChunkdError.busy(`volume ${request.volume} is already attached at ${existing.mountpoint}`);
    for (const record of this.#byVolume.values()) {
      const a = `${record.mountpoint}/`;
      const b = `${request.mountpoint}/`;
      if (a.startsWith(b) || b.startsWith(a)) throw ChunkdError.busy(`mountpoint ${request.mountpoint} overlaps ${record.mountpoint}, where volume ${record.volume} is attached`);
    }
  }

  add(record: AttachmentRecord): void {
    this.checkAttach(record);
    this.#byVolume.set(record.volume, record);
  }

  remove(volume: string): void {
    this.#byVolume.delete(volume);
  }

  /** Docker Mount: counts a caller (an ID already counted is counted once). */
  addDockerId(volume: string, id: string): void {
    const record = this.#byVolume.get(volume);
    if (record === undefined) throw ChunkdError.notFound(`volume ${volume} is not attached`);
    if (!record.dockerIds.includes(id)) record.dockerIds.push(id);
  }

  /** Docker Unmount: removes a caller; returns whether the volume should now be detached. */
  removeDockerId(volume: string, id: string): boolean {
    const record = this.#byVolume.get(volume);
    if (record === undefined) return false;
    record.dockerIds = record.dockerIds.filter((held) => held !== id);
    return record.dockerIds.length === 0 && record.owner === 'docker';
  }

  encode(): string {
    return `${JSON.stringify({ format: fileFormat, formatVersion: fileFormatVersion, attachments: this.list() }, null, 2)}\n`;
  }

  /** Parses attachments.json; a file that is not ours is a clear error, never silently dropped. */
  static decode(text: string): AttachmentTable {
    let value: { format?: unknown; formatVersion?: unknown; attachments?: unknown };
    try {
      value = JSON.parse(text) as typeof value;
    } catch {
      throw ChunkdError.corrupt('attachments.json is not JSON');
    }
    if (value.format !== fileFormat || value.formatVersion !== fileFormatVersion || !Array.isArray(value.attachments)) {
      throw ChunkdError.corrupt('attachments.json is not a chunkd attachments file of this version');
    }
    const records: AttachmentRecord[] = [];
    for (const item of value.attachments as Array<Partial<AttachmentRecord>>) {
      if (
        checkName(item.volume) !== null ||
        typeof item.mountpoint !== 'string' ||
        !item.mountpoint.startsWith('/') ||
        typeof item.fsType !== 'string' ||
        !vias.includes(item.via as Via) ||
        (item.owner !== 'cli' && item.owner !== 'docker') ||
        !Array.isArray(item.dockerIds)
      ) {
        throw ChunkdError.corrupt(`attachments.json has a malformed record: ${JSON.stringify(item).slice(0, 200)}`);
      }
      records.push({
        volume: item.volume!,
        mountpoint: item.mountpoint,
        fsType: item.fsType,
        via: item.via!,
        owner: item.owner,
        dockerIds: item.dockerIds.filter((id): id is string => typeof id === 'string'),
        attachedAt: typeof item.attachedAt === 'string' ? item.attachedAt : new Date(0).toISOString(),
      });
    }
    return new AttachmentTable(records);
  }
}

/** Reads blkid's `-o export` output: the TYPE and USAGE of a signature, the PTTYPE of a partition table. */
export function parseBlkid(output: string): { type: string | null; usage: string | null; partitionTable: string | null } {
  const values = new Map<string, string>();
  for (const line of output.split('\n')) {
    const eq = line.indexOf('=');
    if (eq > 0) values.set(line.slice(0, eq), line.slice(eq + 1));
  }
  return { type: values.get('TYPE') ?? null, usage: values.get('USAGE') ?? null, partitionTable: values.get('PTTYPE') ?? null };
}

/** What `blkid -p -o export DEVICE` answered. */
export interface BlkidProbe {
  exitCode: number;
  stdout: string;
  stderr: string;
}

/** What an attach has learnt about a volume's block device before it mounts it. */
export interface FileSystemFacts {
  volume: string;
  device: string;
  probe: BlkidProbe;
  /** The volume's allocated bytes: 0 means it was never written (or all of it was trimmed), so it reads as zeros. */
  allocatedBytes: number;
  /** `--fs`: the type to make, and the type one already there must be. */
  wantedFs: FsType | null;
  /** `--format`: make a file system also on a volume that holds data but none that blkid recognises. */
  format: boolean;
  /** The node re-attaching a recorded volume at start: it never makes a file system. */
  reattach: boolean;
}

export type FileSystemPlan = { action: 'mount'; fsType: string } | { action: 'format'; fsType: FsType };

/**
 * Decides whether an attach mounts the file system blkid found, makes a new one, or is refused (throws).
 *
 * A file system is made only where blkid recognised nothing (exit 2, nothing on stderr) and either the volume was
 * never written, so that mkfs destroys nothing, or the request says `format`. blkid cannot tell raw data, or a
 * file system whose superblock is damaged, from an empty device: only the volume's allocation can, so a volume
 * that holds data is never formatted unless asked. A signature blkid recognises (file system, partition table,
 * swap, crypto or raid member) is never formatted, `format` or not. blkid also exits 2 when it cannot open the
 * device (saying so on stderr) or read it (silently: attachments.ts reads the device's ends itself before it
 * trusts an exit 2), so exit 2 with anything on stderr, like any other failure, is an error, never "no file system".
 */
export function planFileSystem(facts: FileSystemFacts): FileSystemPlan {
  const { volume, device, probe } = facts;
  const blkidSaid = (probe.stderr.trim() || probe.stdout.trim()).split('\n').at(-1) ?? '';
  if (probe.exitCode === 2 && probe.stderr.trim() !== '') throw ChunkdError.io(`blkid -p ${device} could not probe volume ${volume}'s device (exit 2): ${blkidSaid}`);
  if (probe.exitCode !== 0 && probe.exitCode !== 2) throw ChunkdError.io(`blkid -p ${device} failed on volume ${volume} (exit ${probe.exitCode}): ${blkidSaid}`);
  if (probe.exitCode === 0) {
    const found = parseBlkid(probe.stdout);
    if (found.type === null && found.partitionTable !== null) {
      throw ChunkdError.invalid(`volume ${volume} holds a ${found.partitionTable} partition table, not a file system; refusing to format or mount it`);
    }
    if (found.type === null) throw ChunkdError.io(`blkid -p ${device} found something on volume ${volume} but named no file system: ${probe.stdout.trim().split('\n').join(' ')}`);
    if (found.usage !== null && found.usage !== 'filesystem') {
      throw ChunkdError.invalid(`volume ${volume} holds ${found.type} (${found.usage}), not a file system; refusing to format or mount it`);
    }
    if (facts.wantedFs !== null && found.type !== facts.wantedFs) throw ChunkdError.invalid(`volume ${volume} holds ${found.type}, not ${facts.wantedFs}; it is never reformatted`);
    return { action: 'mount', fsType: found.type };
  }
  if (facts.reattach) throw ChunkdError.io(`volume ${volume} holds no file system blkid recognises any more; not formatting a volume that was attached before`);
  if (facts.allocatedBytes === 0 || facts.format) return { action: 'format', fsType: facts.wantedFs ?? 'ext4' };
  throw ChunkdError.invalid(
    `volume ${volume} holds ${formatSize(facts.allocatedBytes)} (${facts.allocatedBytes} bytes) of data but no file system blkid recognises (raw data, or a damaged superblock); ` +
      'chunkd never formats a volume that was written: attach it with --format to make a new file system on it, destroying its contents',
  );
}
