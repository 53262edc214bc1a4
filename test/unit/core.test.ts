import assert from 'node:assert/strict';
import { test } from 'vitest';
import { checkName } from '../../src/core/names.ts';
import { formatSize, parseSize } from '../../src/core/units.ts';
import { parseDefaultVolume, parseListen } from '../../src/cli/serve.ts';

test('sizes take binary units', () => {
  assert.equal(parseSize('512'), 512);
  assert.equal(parseSize('4KiB'), 4096);
  assert.equal(parseSize('64MiB'), 64 * 2 ** 20);
  assert.equal(parseSize('10G'), 10 * 2 ** 30);
  assert.equal(parseSize('1TiB'), 2 ** 40);
  assert.equal(parseSize('1.5KiB'), 1536);
  for (const bad of ['', 'ten', '1XB', '-4K', '0.3', '1e3']) assert.throws(() => parseSize(bad), /invalid size/);
  assert.equal(formatSize(10 * 2 ** 30), '10 GiB');
});

test('names: DESIGN.md rule', () => {
  for (const good of ['a', 'default', 'vol_1.x-y', 'A'.repeat(64), '0abc']) assert.equal(checkName(good), null, good);
  for (const bad of ['', '.hidden', '-x', 'a/b', '../x', 'a b', 'a@b', 'A'.repeat(65), 'é', 'a\0b', 42]) {
    assert.equal(checkName(bad)?.code, 'EBADNAME', String(bad));
  }
});

test('serve options: --listen and --default-volume', () => {
  assert.deepEqual(parseListen('127.0.0.1:10809'), { host: '127.0.0.1', port: 10809 });
  assert.deepEqual(parseListen('[::1]:0'), { host: '::1', port: 0 });
  assert.equal(parseListen('none'), null);
  assert.throws(() => parseListen('localhost'), /invalid --listen/);
  assert.deepEqual(parseDefaultVolume('default:10GiB'), { name: 'default', sizeBytes: 10 * 2 ** 30 });
  assert.throws(() => parseDefaultVolume('../x:1G'), /invalid volume name/);
});
