// The storage-faults issue's report, replayed against a real node: three volumes, 12 MiB written and flushed, a
// crash (kill -9), then one byte of the metadata journal flipped on disk (media damage, not a crash). Before, fsck
// called that pool clean and the next start dropped the flushed records and punched their data out. Now: a byte
// flipped in one journal copy (at 30% of its commits, and near its start) is damage fsck reports as repairable,
// and the start repairs it with every volume reading back; the same byte flipped in both copies makes fsck say
// so and the node refuse to start, with every file of the pool left as it was.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'vitest';
import { chunkdBin, makeTempDir, nodeBinary, runTool, startNode } from '../helpers/node-process.ts';
import { TestNbdClient } from '../helpers/nbd-client.ts';

const MiB = 1024 * 1024;
const volumes = ['alpha', 'beta', 'gamma'];

/** Where the journal's commits end: each header's frame length says where the next one starts. */
function commitsEnd(journal: Buffer): number {
  let at = 0;
  while (at + 24 <= journal.length && journal.readUInt32LE(at) === 0x334a4b43) at += Math.ceil((24 + journal.readUInt32LE(at + 16)) / 8) * 8;
  return at;
}

function hashFiles(directory: string): string {
  const hash = crypto.createHash('sha1');
  for (const name of fs.readdirSync(directory, { recursive: true }).map(String).sort()) {
    const file = path.join(directory, name);
    if (fs.statSync(file).isFile() && name !== 'lock') hash.update(name).update(fs.readFileSync(file));
  }
  return hash.digest('hex');
}

test('a flipped journal byte after a crash: repaired from the other copy with nothing lost; in both copies, refused and untouched', { timeout: 300_000 }, async () => {
  const scratch = makeTempDir('metadata-damage');
  const pool = path.join(scratch, 'pool');
  try {
    // Write and flush 12 MiB over three volumes in many small commits, then crash.
    let node = await startNode(pool);
    const written = new Map<string, Buffer>();
    for (const name of volumes) {
      assert.equal((await node.cli('volume', 'create', name, '--size', '16MiB')).code, 0);
      const client = await TestNbdClient.connect(node.nbdSocket, name);
      const data = crypto.randomBytes(4 * MiB);
      for (let offset = 0; offset < data.length; offset += 256 * 1024) {
        await client.write(offset, data.subarray(offset, offset + 256 * 1024));
        if ((offset / (256 * 1024)) % 2 === 1) await client.flush();
      }
      await client.flush();
      await client.disconnect();
      written.set(name, data);
    }
    await node.kill();
    // Each case starts from this crashed pool.
    const pristine = path.join(scratch, 'pristine');
    fs.cpSync(pool, pristine, { recursive: true });
    const reset = (): void => {
      fs.rmSync(pool, { recursive: true, force: true });
      fs.cpSync(pristine, pool, { recursive: true });
    };
    const journalNames = fs.readdirSync(pool).filter((name) => /^journal-\d+\.[01]$/.test(name)).sort();
    assert.equal(journalNames.length, 2, 'two journal copies');
    const used = commitsEnd(fs.readFileSync(path.join(pool, journalNames[0]!)));
    assert.ok(used > 1000, `the journal holds commits (${used} bytes)`);
    const flip = (names: string[], offset: number): void => {
      for (const name of names) {
        const bytes = fs.readFileSync(path.join(pool, name));
        bytes[offset]! ^= 0x20;
        fs.writeFileSync(path.join(pool, name), bytes);
      }
    };
    const readBack = async (): Promise<void> => {
      for (const [name, data] of written) {
        const client = await TestNbdClient.connect(node.nbdSocket, name);
        const read = await client.read(0, data.length);
        await client.disconnect();
        assert.ok(read.equals(data), `volume ${name} reads back what was flushed`);
      }
    };

    for (const fraction of [0.3, 0.02]) {
      reset();
      const offset = Math.floor(used * fraction);
      flip([journalNames[0]!], offset);
      const fsck = await runTool(nodeBinary, [chunkdBin, 'fsck', '--pool', pool]);
      assert.equal(fsck.code, 1, `a flip at byte ${offset}: fsck finds damage\n${fsck.stdout}`);
      assert.match(fsck.stdout, new RegExp(`DAMAGED \\(repairable, nothing lost\\)[\\s\\S]*${journalNames[0]!.replace('.', '\\.')} is damaged at byte \\d+`));
      node = await startNode(pool);
      assert.match(node.stderr(), /metadata repaired: .*journal-\d+\.0 is damaged at byte \d+/);
      await readBack();
      assert.equal(await node.stop(), 0);
      const after = await runTool(nodeBinary, [chunkdBin, 'fsck', '--pool', pool]);
      assert.equal(after.code, 0, `after the repair: ${after.stdout}`);
    }

    // The same byte in both copies: fsck says so, the node refuses to start, and nothing on disk changes.
    reset();
    flip(journalNames, Math.floor(used * 0.3));
    const before = hashFiles(pool);
    const fsck = await runTool(nodeBinary, [chunkdBin, 'fsck', '--pool', pool]);
    assert.equal(fsck.code, 1);
    assert.match(fsck.stdout, /damaged in both copies/);
    const refused = await runTool(nodeBinary, [chunkdBin, 'serve', '--pool', pool, '--listen', 'none', '--api', path.join(scratch, 'api.sock')]);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /^chunkd: .*journal-\d+\.0 and .*journal-\d+\.1: commit \d+ at byte \d+ is damaged in both copies.*the pool is left untouched/m);
    assert.equal(hashFiles(pool), before, 'the refused start and fsck changed nothing');
  } finally {
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});
