// fsck and fsck --repair of a pool of paged metadata (format 4; repair.ts's repairPaged, paged-check.ts), each
// case a real byte changed on disk, then checked by opening the pool and reading every volume and snapshot back:
//  - a page damaged in one copy (a map leaf, an interior node, a page of counts, the table, a chain): fsck calls
//    it repairable damage, the repair rewrites that copy from the other (the two copies equal again on disk);
//  - a journal commit damaged in one copy: replayed from the other, and the repair's new generation is whole; in
//    both copies: salvaged (replayed up to the damage, the rest reported lost, every byte that differs after
//    inside a reported lost extent);
//  - reference counts that disagree with the maps (a page of counts rewritten with a valid checksum): recounted,
//    and the chunk whose count had fallen to zero while a map names it is not punched out or reused after;
//  - a map leaf damaged in both copies: fsck names the volume, snapshot and clone bytes it held, and the repair
//    refuses (exit 1 through the command) with every file of the pool left as it was;
//  - power cuts (power-loss.ts) at points spread over a repair: the pool opens and reads back, and a repair after
//    leaves it clean;
//  - a map page that reads whole to the check and not to the writable pass: the repair stops before it commits,
//    and no chunk or page that map names is freed.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'vitest';
import { main } from '../../src/cli/main.ts';
import type { ChunkdError } from '../../src/core/errors.ts';
import { makeRandom } from '../../src/core/random.ts';
import { realFiles, type FileLayer, type OpenMode } from '../../src/store/file-layer.ts';
import { fsckPool } from '../../src/store/fsck.ts';
import { decodePage, encodePage, pageBytes, pageHeaderBytes } from '../../src/store/page-file.ts';
import { PagedCatalog } from '../../src/store/paged-catalog.ts';
import { walkMaps } from '../../src/store/paged-check.ts';
import { Pool } from '../../src/store/pool.ts';
import { repairPool } from '../../src/store/repair.ts';
import { countsPerPage } from '../../src/store/space-map.ts';
import { closeDescriptorsUnder, PowerLossFiles } from '../../src/testing/power-loss.ts';
import { TestFiles } from '../../src/testing/test-files.ts';
import { flipByteUnder } from '../helpers/damage.ts';
import { inScratch } from '../helpers/scratch.ts';

const MiB = 1024 * 1024;
const volumeBytes = 4 * MiB;
const exportsRead = ['v', 'v@s', 'c'];

const fill = (seed: number, bytes = 4096): Buffer => {
  const out = Buffer.alloc(bytes);
  for (let i = 0; i < bytes; i += 32) crypto.createHash('sha256').update(`${seed}:${i}`).digest().copy(out, i);
  return out;
};

/**
 * A paged pool: volume v written, snapshot s, part of v overwritten, clone c of s written; a clean close; then a
 * second life whose writes are only in the journal (the process is killed).
 */
async function buildPool(directory: string): Promise<void> {
  let pool = await Pool.open({ directory, metadata: 'paged', metadataCacheBytes: 64 * 1024 });
  await pool.createVolume('v', volumeBytes);
  const v = pool.openVolume('v');
  for (let block = 0; block < 600; block++) await v.write(block * 4096, fill(block));
  await pool.createSnapshot('v', 's');
  for (let block = 0; block < 600; block += 7) await v.write(block * 4096, fill(1000 + block));
  await v.close();
  await pool.cloneSnapshot('v', 's', 'c');
  const c = pool.openVolume('c');
  await c.write(700 * 4096, fill(2000, 64 * 1024));
  await c.close();
  await pool.close();
  const files = new TestFiles();
  pool = await Pool.open({ directory, files, metadataCacheBytes: 64 * 1024 });
  const again = pool.openVolume('v');
  for (let block = 3; block < 600; block += 50) await again.write(block * 4096, fill(3000 + block));
  await again.flush();
  await again.write(900 * 4096, fill(4000, 8192), { fua: true });
  // kill -9.
  files.freeze();
  await pool.abandon();
  closeDescriptorsUnder(directory);
}

async function contents(directory: string): Promise<Map<string, Buffer>> {
  const pool = await Pool.open({ directory, metadataCacheBytes: 64 * 1024 });
  try {
    const out = new Map<string, Buffer>();
    for (const name of exportsRead) {
      const [volume, snapshot] = name.split('@') as [string, string | undefined];
      const device = snapshot === undefined ? pool.openVolume(volume) : pool.openSnapshot(volume, snapshot);
      const bytes = Buffer.alloc(volumeBytes);
      await device.read(0, bytes);
      await device.close();
      out.set(name, bytes);
    }
    return out;
  } finally {
    await pool.close();
  }
}

function assertSame(found: Map<string, Buffer>, expected: Map<string, Buffer>, label: string): void {
  for (const [name, bytes] of expected) assert.ok(found.get(name)!.equals(bytes), `${label}: ${name} reads back what it held`);
}

/** Every file of the pool (the lock aside), hashed, by path. */
function fingerprint(directory: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const name of fs.readdirSync(directory, { recursive: true }).map(String)) {
    const file = path.join(directory, name);
    if (name !== 'lock' && fs.statSync(file).isFile()) out.set(name, crypto.createHash('sha1').update(fs.readFileSync(file)).digest('hex'));
  }
  return out;
}

/** The metadata files as they are now, to put back before each case. */
function snapshotFiles(directory: string): () => void {
  const names = (): string[] => fs.readdirSync(directory).filter((name) => /^(metadata\.\d|journal-\d+\.\d)$/.test(name));
  const saved = new Map(names().map((name) => [name, fs.readFileSync(path.join(directory, name))]));
  const chunks = path.join(directory, 'chunks');
  const savedChunks = new Map(fs.readdirSync(chunks).map((name) => [name, fs.readFileSync(path.join(chunks, name))]));
  return () => {
    for (const name of names()) fs.rmSync(path.join(directory, name));
    for (const [name, bytes] of saved) fs.writeFileSync(path.join(directory, name), bytes);
    for (const [name, bytes] of savedChunks) fs.writeFileSync(path.join(chunks, name), bytes);
  };
}

/** The pages the durable root names, with their kinds (read from metadata.0). */
async function pagesInUse(directory: string): Promise<Array<{ page: number; kind: number }>> {
  const catalog = await PagedCatalog.open(realFiles, directory, { cacheBytes: MiB, readOnly: true });
  const { nextPage, isFree } = catalog.pagesAtOpen;
  await catalog.close();
  const bytes = fs.readFileSync(path.join(directory, 'metadata.0'));
  const out: Array<{ page: number; kind: number }> = [];
  for (let page = 2; page < nextPage; page++) if (!isFree(page)) out.push({ page, kind: bytes.readUInt8(page * pageBytes + 14) });
  return out;
}

function flip(directory: string, name: string, offset: number): void {
  const file = path.join(directory, name);
  const bytes = fs.readFileSync(file);
  bytes[offset]! ^= 0x5a;
  fs.writeFileSync(file, bytes);
}

const pageOf = (directory: string, name: string, page: number): Buffer => fs.readFileSync(path.join(directory, name)).subarray(page * pageBytes, (page + 1) * pageBytes);

/** `chunkd ARGS` in process: its exit code and what it printed on stdout. */
async function chunkd(args: string[]): Promise<{ code: number; out: string }> {
  const written: string[] = [];
  const write = process.stdout.write;
  process.stdout.write = ((chunk: string) => written.push(chunk) > 0) as typeof process.stdout.write;
  try {
    const code = await main(args);
    return { code, out: written.join('') };
  } finally {
    process.stdout.write = write;
  }
}

/**
 * Opens the pool, waits for its punch of free chunks, writes 1 MiB to a new volume w (it takes free chunks), and
 * closes it: neither may touch a chunk or page a map names.
 */
async function punchAndWrite(directory: string, seed: number): Promise<void> {
  const pool = await Pool.open({ directory, metadataCacheBytes: 64 * 1024 });
  await pool.freeSpacePunched();
  await pool.createVolume('w', volumeBytes);
  const w = pool.openVolume('w');
  await w.write(0, fill(seed, MiB));
  await w.close();
  await pool.close();
}

/** A pool built, its contents read once (an open of a copy: the open writes), and a way back to it. */
async function prepared(directory: string): Promise<{ expected: Map<string, Buffer>; restore: () => void }> {
  await buildPool(directory);
  const restore = snapshotFiles(directory);
  const expected = await contents(directory);
  restore();
  return { expected, restore };
}

test('a metadata page damaged in one copy, of each kind: fsck calls it repairable, fsck --repair rewrites that copy from the other, the pool reads back', { timeout: 60_000 }, async () => {
  await inScratch('paged-repair', async (directory) => {
    const { expected, restore } = await prepared(directory);
    const inUse = await pagesInUse(directory);
    const kinds = [...new Set(inUse.map((entry) => entry.kind))].sort((a, b) => a - b);
    // Map leaves and interior nodes, pages of counts, the tables, chains, the free pages' leaves: 0x01, 0x02, 0x30 to 0x33.
    assert.ok(kinds.includes(1) && kinds.includes(2) && kinds.includes(0x30) && kinds.includes(0x33), `kinds in use: ${kinds.join(', ')}`);
    for (const [i, kind] of kinds.entries()) {
      restore();
      const { page } = inUse.find((entry) => entry.kind === kind)!;
      const copy = `metadata.${i % 2}`;
      const other = `metadata.${1 - (i % 2)}`;
      flip(directory, copy, page * pageBytes + pageHeaderBytes + 9);
      const label = `page ${page} (kind ${kind}) in ${copy}`;
      const report = await fsckPool(directory);
      assert.ok(!report.clean && report.repairable, `${label}: fsck: ${report.errors.join('; ')}`);
      assert.ok(report.errors.some((line) => line.includes(`metadata page ${page} `) && line.includes(copy) && line.includes('checksum mismatch')), `${label}: ${report.errors.join('; ')}`);
      assert.notDeepEqual(pageOf(directory, copy, page), pageOf(directory, other, page), `${label}: fsck wrote nothing`);
      const repair = await repairPool(directory);
      assert.deepEqual(repair.unrepairable, []);
      assert.ok(repair.lossless && repair.actions.some((line) => line.startsWith(`rewrote from the good copy: metadata page ${page} `)), `${label}: ${repair.actions.join('; ')}`);
      assert.ok(typeof decodePage(pageOf(directory, copy, page), page) !== 'string', `${label}: the damaged copy is whole again on disk`);
      const after = await fsckPool(directory);
      assert.ok(after.clean, `${label}: fsck after the repair: ${after.errors.join('; ')}`);
      assertSame(await contents(directory), expected, label);
    }
  });
});

test('a journal commit damaged in one copy: fsck --repair replays it from the other and starts a generation whole in both', { timeout: 60_000 }, async () => {
  await inScratch('paged-repair', async (directory) => {
    const { expected } = await prepared(directory);
    const journal = fs.readdirSync(directory).find((name) => /^journal-\d+\.0$/.test(name))!;
    // The second commit's header is followed by its records: a byte inside them.
    const bytes = fs.readFileSync(path.join(directory, journal));
    const second = Math.ceil((24 + bytes.readUInt32LE(16)) / 8) * 8;
    flip(directory, journal, second + 30);
    const report = await fsckPool(directory);
    assert.ok(!report.clean && report.repairable, report.errors.join('; '));
    assert.ok(report.errors.some((line) => line.includes(`${journal} is damaged at byte`)), report.errors.join('; '));
    // Through the command: exit 0, and what it did, line by line.
    const { code, out } = await chunkd(['fsck', '--pool', directory, '--repair']);
    assert.equal(code, 0, out);
    assert.match(out, new RegExp(`: repaired, nothing lost\n[\\s\\S]*  did: replayed from the good copy: \\S*${journal.replace('.', '\\.')} is damaged at byte \\d+[\\s\\S]*  now: clean\n$`));
    assert.ok(!fs.existsSync(path.join(directory, journal)), 'the damaged journal is gone: a root covers it');
    const generation = Number(/started journal-(\d+), whole in both copies/.exec(out)![1]);
    assert.deepEqual(fs.readdirSync(directory).filter((name) => name.startsWith('journal-')).sort(), [`journal-${generation}.0`, `journal-${generation}.1`]);
    const after = await fsckPool(directory);
    assert.ok(after.clean, after.errors.join('; '));
    assert.equal(after.replayedRecords, 0, 'the new root covers every record');
    assertSame(await contents(directory), expected, 'after the repair');
  });
});

test('a journal commit damaged in both copies: a start refuses the pool; fsck --repair replays up to it, reports what is lost, sets the journals aside, and every byte that reads differently lies in a reported lost extent', { timeout: 60_000 }, async () => {
  await inScratch('paged-repair', async (directory) => {
    const { expected } = await prepared(directory);
    const journals = fs.readdirSync(directory).filter((name) => /^journal-\d+\.[01]$/.test(name));
    // In the first commit's first frame (as metadata-corruption.test.ts flips format 3's commits); and a byte of
    // data under block 10, which the volume, its snapshot and the clone share.
    for (const name of journals) flip(directory, name, 30);
    flipByteUnder(directory, fill(10));
    const report = await fsckPool(directory);
    assert.ok(!report.clean && !report.repairable && report.errors.some((line) => line.includes('damaged in both copies')), report.errors.join('; '));
    await assert.rejects(Pool.open({ directory }), (error: ChunkdError) => error.code === 'ECORRUPT');
    const repair = await repairPool(directory);
    assert.deepEqual(repair.unrepairable, []);
    assert.equal(repair.lossless, false);
    assert.ok(repair.setAside !== null && journals.every((name) => fs.existsSync(path.join(repair.setAside!, name))), 'the damaged journals are kept aside');
    assert.ok(repair.lostExtents.some((extent) => extent.export === 'v'), JSON.stringify(repair));
    assert.ok(repair.actions.some((line) => /: 1 bad chunk\(s\) unmapped$/.test(line)), repair.actions.join('; '));
    for (const name of exportsRead) assert.ok(repair.lostExtents.some((extent) => extent.export === name && extent.offsetBytes === 10 * 4096 && /does not match its checksum/.test(extent.why)), `${name}: the damaged block is reported`);
    const after = await fsckPool(directory);
    assert.ok(after.clean, after.errors.join('; '));
    const found = await contents(directory);
    let differing = 0;
    for (const [name, bytes] of expected) {
      const lost = repair.lostExtents.filter((extent) => extent.export === name);
      for (let at = 0; at < bytes.length; at += 4096) {
        if (found.get(name)!.subarray(at, at + 4096).equals(bytes.subarray(at, at + 4096))) continue;
        differing += 1;
        // A record too damaged to say what it wrote is reported as such (a lost change), as format 3's salvage does.
        const unknown = repair.lostChanges.some((line) => /what it did is unknown|what they held is unknown/.test(line));
        assert.ok(unknown || lost.some((extent) => extent.offsetBytes <= at && at < extent.offsetBytes + extent.lengthBytes), `${name} differs at byte ${at}, outside every lost extent: ${JSON.stringify(repair)}`);
      }
    }
    assert.ok(differing > 0, 'the writes of the lost commits are gone');
  });
});

test('reference counts that disagree with the maps (a page of counts rewritten, checksum valid): fsck --repair recounts them, and no chunk a map names is punched or reused after', { timeout: 60_000 }, async () => {
  await inScratch('paged-repair', async (directory) => {
    const { expected } = await prepared(directory);
    // What the maps name, and the page of chunk counts that holds the counts of chunks 0.. (the pool has fewer).
    const catalog = await PagedCatalog.open(realFiles, directory, { cacheBytes: MiB, readOnly: true });
    const walk = await walkMaps(catalog);
    await catalog.close();
    const named = (chunk: number): number => walk.chunkRefs.get(chunk);
    const highest = walk.chunkRefs.end() - 1;
    assert.ok(highest < countsPerPage);
    const inUse = await pagesInUse(directory);
    const countsPage = inUse.filter((entry) => entry.kind === 0x30).map((entry) => entry.page).find((page) => {
      const body = pageOf(directory, 'metadata.0', page).subarray(pageHeaderBytes);
      return Array.from({ length: highest + 1 }, (_, c) => body.readUInt16LE(c * 2) === named(c)).every(Boolean);
    });
    assert.ok(countsPage !== undefined, 'the page of chunk counts');
    const chunks = Array.from({ length: highest + 1 }, (_, chunk) => chunk);
    const shared = chunks.find((chunk) => named(chunk) === 2)!;
    const single = chunks.filter((chunk) => named(chunk) === 1);
    const [toZero, toThree] = [single[0]!, single[1]!];
    const decoded = decodePage(pageOf(directory, 'metadata.0', countsPage), countsPage);
    assert.ok(typeof decoded !== 'string');
    // A count two leaves need set to one, one set to zero (its page's summary of free counts not changed), one leaked.
    decoded.body.writeUInt16LE(1, shared * 2);
    decoded.body.writeUInt16LE(0, toZero * 2);
    decoded.body.writeUInt16LE(3, toThree * 2);
    const image = encodePage(decoded);
    for (const copy of ['metadata.0', 'metadata.1']) {
      const fd = fs.openSync(path.join(directory, copy), 'r+');
      fs.writeSync(fd, image, 0, pageBytes, countsPage * pageBytes);
      fs.closeSync(fd);
    }
    const report = await fsckPool(directory);
    assert.ok(!report.clean && report.repairable, report.errors.join('; '));
    assert.ok(report.errors.some((line) => /^space maps: 3 chunk reference count\(s\) differ/.test(line) && line.includes(`chunk ${toZero}: counted 0, named by 1`)), report.errors.join('; '));
    assert.ok(report.errors.some((line) => /summary of page 0 of chunk reference counts/.test(line)), report.errors.join('; '));
    const repair = await repairPool(directory);
    assert.ok(repair.actions.some((line) => line.startsWith('recounted 3 chunk reference count(s)')), repair.actions.join('; '));
    const after = await fsckPool(directory);
    assert.ok(after.clean, after.errors.join('; '));
    await punchAndWrite(directory, 5000);
    assertSame(await contents(directory), expected, 'after the repair, a punch and new writes');
  });
});

test('a map leaf or a page of counts damaged in both copies: fsck names the bytes of each volume, snapshot and clone the leaf held; fsck --repair refuses (exit 1) and changes nothing', { timeout: 60_000 }, async () => {
  await inScratch('paged-repair', async (directory) => {
    const { restore } = await prepared(directory);
    const inUse = await pagesInUse(directory);
    const counts = inUse.find((entry) => entry.kind === 0x30)!.page;
    for (const copy of ['metadata.0', 'metadata.1']) flip(directory, copy, counts * pageBytes + pageHeaderBytes + 9);
    const unchanged = fingerprint(directory);
    const countsReport = await fsckPool(directory);
    assert.ok(!countsReport.clean && !countsReport.repairable && countsReport.errors.some((line) => line.includes(`metadata page ${counts} `) && line.includes('damaged in both copies')), countsReport.errors.join('; '));
    assert.ok((await repairPool(directory)).unrepairable.length > 0);
    assert.deepEqual(fingerprint(directory), unchanged, 'a page of counts lost: nothing changed');
    restore();
    const leaf = inUse.find((entry) => entry.kind === 1)!.page;
    for (const copy of ['metadata.0', 'metadata.1']) flip(directory, copy, leaf * pageBytes + pageHeaderBytes + 9);
    const before = fingerprint(directory);
    const report = await fsckPool(directory);
    assert.ok(!report.clean && !report.repairable);
    assert.ok(report.errors.some((line) => line.includes(`metadata page ${leaf} `) && line.includes('damaged in both copies')), report.errors.join('; '));
    const lostLines = report.errors.filter((line) => line.includes(`their map page ${leaf} is damaged in both copies`));
    assert.ok(lostLines.length >= 1 && lostLines.every((line) => /^(volume|snapshot) \S+: bytes \d+-\d+ cannot be read/.test(line)), report.errors.join('; '));
    const repair = await repairPool(directory);
    assert.ok(repair.unrepairable.length > 0 && repair.actions.length === 0);
    assert.deepEqual(repair.unrepairable, report.errors.filter((line) => repair.unrepairable.includes(line)));
    const { code, out } = await chunkd(['fsck', '--pool', directory, '--repair']);
    assert.equal(code, 1);
    assert.match(out, /NOT repaired: .*nothing was changed\n {2}damage: metadata: metadata page \d+ .*damaged in both copies/);
    assert.deepEqual(fingerprint(directory), before, 'fsck and the refused repair changed nothing');
  });
});

/**
 * Runs a repair of the pool `damage` leaves, `cuts` times, the power cut at points spread over the changes a whole
 * repair makes; `check` looks at each pool after its cut (labelled).
 */
async function repairsCut(directory: string, damage: () => void, cuts: number, seed: number, check: (label: string) => Promise<void>): Promise<void> {
  damage();
  const counting = new TestFiles();
  await repairPool(directory, counting);
  const changes = counting.changeCount;
  assert.ok(changes > 10, `${changes} changes`);
  const random = makeRandom(seed);
  for (let i = 0; i < cuts; i++) {
    damage();
    const crashAtChange = 1 + Math.floor(((i + 0.5) * changes) / cuts);
    const files = new PowerLossFiles(directory, { crashAtChange });
    const repair = repairPool(directory, files);
    repair.catch(() => {});
    await Promise.race([files.inner.untilFrozen(), repair]);
    await files.cut(random);
    closeDescriptorsUnder(directory);
    await check(`cut at change ${crashAtChange} of ${changes}`);
  }
}

test('power cuts at points spread over a repair (a page and a journal commit damaged in one copy): the pool opens and reads back, and a repair after leaves it clean', { timeout: 120_000 }, async () => {
  await inScratch('paged-repair', async (directory) => {
    const { expected, restore } = await prepared(directory);
    const leaf = (await pagesInUse(directory)).find((entry) => entry.kind === 1)!.page;
    const journal = fs.readdirSync(directory).find((name) => /^journal-\d+\.1$/.test(name))!;
    const damage = (): void => {
      restore();
      flip(directory, 'metadata.0', leaf * pageBytes + pageHeaderBytes + 9);
      flip(directory, journal, 40);
    };
    await repairsCut(directory, damage, 4, 15, async (label) => {
      const report = await fsckPool(directory);
      assert.ok(report.clean || report.repairable, `${label}: fsck: ${report.errors.join('; ')}`);
      assertSame(await contents(directory), expected, label);
      await repairPool(directory);
      const after = await fsckPool(directory);
      assert.ok(after.clean, `${label}: fsck after a second repair: ${after.errors.join('; ')}`);
    });
  });
});

test('power cuts at points spread over a salvage (a journal commit damaged in both copies): the pool is as it was (refused) or salvaged, and a repair after leaves it clean with nothing else changed', { timeout: 120_000 }, async () => {
  await inScratch('paged-repair', async (directory) => {
    const { expected, restore } = await prepared(directory);
    const damage = (): void => {
      restore();
      for (const name of fs.readdirSync(directory).filter((entry) => /^journal-\d+\.[01]$/.test(entry))) flip(directory, name, 30);
    };
    // The blocks the lost commits wrote (buildPool's second life): all that may read differently after.
    const lostBlocks = new Set([...Array.from({ length: 12 }, (_, i) => 3 + 50 * i), 900, 901]);
    await repairsCut(directory, damage, 3, 16, async (label) => {
      const opened = await Pool.open({ directory }).then(
        (pool) => pool.close().then(() => true),
        (error: ChunkdError) => {
          assert.equal(error.code, 'ECORRUPT', `${label}: ${error.message}`);
          return false;
        },
      );
      if (!opened) assert.ok((await fsckPool(directory)).errors.some((line) => line.includes('damaged in both copies')), `${label}: refused as before`);
      const again = await repairPool(directory);
      assert.deepEqual(again.unrepairable, [], label);
      assert.ok((await fsckPool(directory)).clean, `${label}: fsck after a second repair`);
      const found = await contents(directory);
      for (const [name, bytes] of expected) {
        for (let block = 0; block < bytes.length / 4096; block++) {
          if (name === 'v' && lostBlocks.has(block)) continue;
          assert.ok(found.get(name)!.subarray(block * 4096, (block + 1) * 4096).equals(bytes.subarray(block * 4096, (block + 1) * 4096)), `${label}: ${name} block ${block}`);
        }
      }
    });
  });
});

/**
 * The real files, except that once the `armAtOpen`th open of metadata.0 has happened (the repair's writable pass:
 * its read-only check opened it before), every read of page `page` in either copy returns it with a byte flipped:
 * a page that reads whole to the check and not to the repair (a sector going bad between the two passes).
 */
class PageGoesBad implements FileLayer {
  readonly workerSpec = realFiles.workerSpec;
  #opens = 0;
  readonly #metadataFds = new Set<number>();
  readonly page: number;
  readonly armAtOpen: number;
  constructor(page: number, armAtOpen: number) {
    this.page = page;
    this.armAtOpen = armAtOpen;
  }
  async open(file: string, mode: OpenMode): Promise<number> {
    const fd = await realFiles.open(file, mode);
    if (/metadata\.[01]$/.test(file)) {
      this.#metadataFds.add(fd);
      if (file.endsWith('.0')) this.#opens += 1;
    }
    return fd;
  }
  openSync = realFiles.openSync;
  close(fd: number): void {
    this.#metadataFds.delete(fd);
    realFiles.close(fd);
  }
  async read(fd: number, target: Uint8Array, positionBytes: number): Promise<number> {
    const bytesRead = await realFiles.read(fd, target, positionBytes);
    const at = this.page * pageBytes + pageHeaderBytes + 9 - positionBytes;
    if (this.#opens >= this.armAtOpen && this.#metadataFds.has(fd) && at >= 0 && at < bytesRead) target[at]! ^= 0x5a;
    return bytesRead;
  }
  readCached(): number {
    return -1;
  }
  write = realFiles.write;
  writev = realFiles.writev;
  writeSync = realFiles.writeSync;
  fdatasync = realFiles.fdatasync;
  allocate = realFiles.allocate;
  rename = realFiles.rename;
  unlink = realFiles.unlink;
  syncDirectory = realFiles.syncDirectory;
}

test('a map page whole to the check but unreadable to the writable pass: fsck --repair commits nothing, and no chunk it names is freed or reused', { timeout: 60_000 }, async () => {
  await inScratch('paged-repair', async (directory) => {
    const pool = await Pool.open({ directory, metadata: 'paged', metadataCacheBytes: 64 * 1024 });
    for (const name of ['a', 'b']) {
      await pool.createVolume(name, volumeBytes);
      const volume = pool.openVolume(name);
      await volume.write(0, fill(name === 'a' ? 1 : 2, MiB));
      await volume.close();
    }
    await pool.close();
    const catalog = await PagedCatalog.open(realFiles, directory, { cacheBytes: MiB, readOnly: true });
    const root = catalog.tables.byName.get('b')!.map.rootPage;
    await catalog.close();
    const before = fingerprint(directory);
    const files = new PageGoesBad(root, 2);
    const outcome = await repairPool(directory, files).then(
      (report) => report,
      (error: ChunkdError) => error,
    );
    assert.ok(!('actions' in outcome), `the repair refused, it did not report: ${JSON.stringify(outcome)}`);
    assert.equal(outcome.code, 'ECORRUPT', outcome.message);
    assert.match(outcome.message, new RegExp(`metadata page ${root}\\b`));
    assert.deepEqual(fingerprint(directory), before, 'nothing was committed');
    // The page reads whole again: b reads back, after the open's punch of free chunks and new writes.
    await punchAndWrite(directory, 3);
    const reopened = await Pool.open({ directory, metadataCacheBytes: 64 * 1024 });
    for (const [name, seed] of [['a', 1], ['b', 2]] as const) {
      const volume = reopened.openVolume(name);
      const bytes = Buffer.alloc(MiB);
      await volume.read(0, bytes);
      await volume.close();
      assert.ok(bytes.equals(fill(seed, MiB)), `${name} reads back`);
    }
    await reopened.close();
  });
});

test('a metadata page whose sector cannot be read (EIO) in one copy: a node reads it from the other, fsck calls it repairable, fsck --repair rewrites it', { timeout: 60_000 }, async () => {
  await inScratch('paged-repair', async (directory) => {
    const pool = await Pool.open({ directory, metadata: 'paged', metadataCacheBytes: 64 * 1024 });
    await pool.createVolume('b', volumeBytes);
    const volume = pool.openVolume('b');
    await volume.write(0, fill(2, MiB));
    await volume.close();
    await pool.close();
    const catalog = await PagedCatalog.open(realFiles, directory, { cacheBytes: MiB, readOnly: true });
    const root = catalog.tables.byName.get('b')!.map.rootPage;
    await catalog.close();
    // A bad sector under b's map root in metadata.0: every read of it fails.
    const files = new TestFiles([{ op: 'read', path: 'metadata.0', nth: 1, sticky: true, code: 'EIO', atBytes: root * pageBytes + 100 }]);
    const report = await fsckPool(directory, files);
    assert.ok(!report.clean && report.repairable, report.errors.join('; '));
    assert.ok(report.errors.some((line) => line.includes(`metadata page ${root} `) && line.includes('metadata.0') && line.includes('cannot be read')), report.errors.join('; '));
    const repair = await repairPool(directory, files);
    assert.ok(repair.lossless && repair.unrepairable.length === 0, JSON.stringify(repair));
    assert.ok(repair.actions.some((line) => line.startsWith(`rewrote from the good copy: metadata page ${root} `)), repair.actions.join('; '));
    const reopened = await Pool.open({ directory, files, metadataCacheBytes: 64 * 1024 });
    try {
      const again = reopened.openVolume('b');
      const bytes = Buffer.alloc(MiB);
      await again.read(0, bytes);
      assert.ok(bytes.equals(fill(2, MiB)), 'b reads back from the other copy');
      await again.close();
    } finally {
      await reopened.close();
    }
    assert.ok(files.fired(0) > 0, 'the bad sector was met');
  });
});
