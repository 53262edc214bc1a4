import assert from 'node:assert/strict';
import { test } from 'vitest';
import { formatLogLine, makeLog, parseLogLevel } from '../../src/core/log.ts';

const now = new Date('2026-12-05T01:02:03.004Z');

test('text lines: a timestamp unless journald stamps them, the level named unless it is info', () => {
  const text = { level: 'info', format: 'text', stamped: true } as const;
  assert.equal(formatLogLine(text, 'created volume v', 'info', now), '2026-12-05T01:02:03.004Z chunkd: created volume v\n');
  assert.equal(formatLogLine(text, 'peer refused', 'warn', now), '2026-12-05T01:02:03.004Z chunkd: warn: peer refused\n');
  assert.equal(formatLogLine({ ...text, stamped: false }, 'x', 'error', now), 'chunkd: error: x\n');
});

test('json lines: one object each, time only where the line is stamped; levels below the setting dropped', () => {
  const json = { level: 'warn', format: 'json', stamped: true } as const;
  assert.deepEqual(JSON.parse(formatLogLine(json, 'say "hi"\nthere', 'error', now)!), { time: now.toISOString(), level: 'error', msg: 'say "hi"\nthere' });
  assert.equal(formatLogLine(json, 'x', 'info', now), null);
  assert.equal(formatLogLine(json, 'x', 'debug', now), null);
  assert.deepEqual(JSON.parse(formatLogLine({ ...json, stamped: false }, 'x', 'warn', now)!), { level: 'warn', msg: 'x' });
  const written: string[] = [];
  const log = makeLog({ level: 'info', format: 'text', stamped: false }, (text) => written.push(text));
  log('a');
  log('b', 'debug');
  log('c', 'warn');
  assert.deepEqual(written, ['chunkd: a\n', 'chunkd: warn: c\n']);
  assert.equal(parseLogLevel('warn'), 'warn');
  assert.equal(parseLogLevel('loud'), null);
});
