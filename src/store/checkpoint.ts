// The checkpoint: the whole catalog (volumes and their maps) as of the start of journal `generation`.
// Layout: "CHUNKDCP" | u32 header length | header JSON | per volume, its mapped runs as triples of f64
// (virtual chunk, physical chunk, chunk count) | u32 crc32 of everything before it.
// A checkpoint is written to a temporary file, fsynced and renamed over the old one, so a crash leaves either
// the old or the new one, whole. Pure: bytes in, values out.
import { crc32 } from 'node:zlib';
import { ChunkdError } from '../core/errors.ts';
import { checkName } from '../core/names.ts';
import { ChunkMap } from './chunk-map.ts';
import { emptyCatalog, type Catalog } from './metadata.ts';

const magic = Buffer.from('CHUNKDCP', 'latin1');
const runBytes = 24;

interface Header {
  generation: number;
  nextVolumeId: number;
  volumes: Array<{ id: number; name: string; sizeBytes: number; runCount: number }>;
}

/** Encodes the catalog as it stands, as the checkpoint that starts journal `generation`. */
export function encodeCheckpoint(catalog: Catalog, generation: number): Buffer {
  const volumes = [...catalog.volumes.values()];
  const runLists = volumes.map((volume) => [...volume.map.mappedRuns()]);
  const header: Header = {
    generation,
    nextVolumeId: catalog.nextVolumeId,
    volumes: volumes.map((v, i) => ({ id: v.id, name: v.name, sizeBytes: v.sizeBytes, runCount: runLists[i]!.length })),
  };
  const headerBytes = Buffer.from(JSON.stringify(header), 'utf8');
  const runTotal = runLists.reduce((sum, runs) => sum + runs.length, 0);
  const out = Buffer.alloc(magic.length + 4 + headerBytes.length + runTotal * runBytes + 4);
  let offset = magic.copy(out, 0);
  offset = out.writeUInt32LE(headerBytes.length, offset);
  offset += headerBytes.copy(out, offset);
  for (const runs of runLists) {
    for (const run of runs) {
      offset = out.writeDoubleLE(run.virtualChunk, offset);
      offset = out.writeDoubleLE(run.physicalChunk, offset);
      offset = out.writeDoubleLE(run.chunkCount, offset);
    }
  }
  out.writeUInt32LE(crc32(out.subarray(0, offset)), offset);
  return out;
}

/** Decodes a checkpoint; throws ECORRUPT on any damage (a checkpoint is never torn: it is renamed into place). */
export function decodeCheckpoint(bytes: Buffer): { catalog: Catalog; generation: number } {
  if (bytes.length < magic.length + 8 || !bytes.subarray(0, magic.length).equals(magic)) throw ChunkdError.corrupt('checkpoint: bad magic');
  const crcOffset = bytes.length - 4;
  if (crc32(bytes.subarray(0, crcOffset)) !== bytes.readUInt32LE(crcOffset)) throw ChunkdError.corrupt('checkpoint: checksum mismatch');
  const headerLength = bytes.readUInt32LE(magic.length);
  let offset = magic.length + 4;
  let header: Header;
  try {
    header = JSON.parse(bytes.subarray(offset, offset + headerLength).toString('utf8')) as Header;
  } catch {
    throw ChunkdError.corrupt('checkpoint: header is not JSON');
  }
  offset += headerLength;
  const catalog = emptyCatalog();
  catalog.nextVolumeId = header.nextVolumeId;
  for (const entry of header.volumes) {
    if (checkName(entry.name) !== null) throw ChunkdError.corrupt(`checkpoint: invalid volume name ${JSON.stringify(entry.name)}`);
    const map = new ChunkMap();
    if (offset + entry.runCount * runBytes > crcOffset) throw ChunkdError.corrupt('checkpoint: truncated runs');
    for (let i = 0; i < entry.runCount; i++) {
      const virtualChunk = bytes.readDoubleLE(offset);
      const physicalChunk = bytes.readDoubleLE(offset + 8);
      const chunkCount = bytes.readDoubleLE(offset + 16);
      offset += runBytes;
      if (![virtualChunk, physicalChunk, chunkCount].every((n) => Number.isSafeInteger(n) && n >= 0) || chunkCount === 0) {
        throw ChunkdError.corrupt(`checkpoint: volume ${entry.name} has an invalid run`);
      }
      if (map.runs(virtualChunk, chunkCount).some((run) => run.physicalChunk >= 0)) {
        throw ChunkdError.corrupt(`checkpoint: volume ${entry.name} maps chunk ${virtualChunk} twice`);
      }
      map.mapRun(virtualChunk, physicalChunk, chunkCount);
    }
    const volume = { id: entry.id, name: entry.name, sizeBytes: entry.sizeBytes, map };
    catalog.volumes.set(volume.id, volume);
    catalog.byName.set(volume.name, volume);
  }
  if (offset !== crcOffset) throw ChunkdError.corrupt('checkpoint: trailing bytes');
  return { catalog, generation: header.generation };
}
