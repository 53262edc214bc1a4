// The order of writes and syncs behind a FLUSH, seen at the file system calls: data reaches the chunk files and is
// fdatasynced before the journal record that maps it is written, and the flush resolves only after the journal's
// fdatasync. A kill -9 cannot catch a wrong order here (the kernel keeps its page cache), so this test watches it.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, test } from 'vitest';
import { realFiles, type FileLayer } from '../../src/store/file-layer.ts';
import { Pool } from '../../src/store/pool.ts';

interface Event {
  kind: 'write' | 'sync' | 'flushed';
  file: string;
}

const events: Event[] = [];
const paths = new Map<number, string>();
const original = { open: fs.open, openSync: fs.openSync, write: fs.write, fdatasync: fs.fdatasync };
const name = (fd: number): string => path.basename(paths.get(fd) ?? `fd${fd}`);

beforeAll(() => {
  // Record every open (to name descriptors), write and fdatasync that the store makes.
  (fs as any).open = (file: string, flags: unknown, mode: unknown, callback: (error: Error | null, fd: number) => void) =>
    original.open(file, flags as never, mode as never, (error, fd) => {
      if (!error) paths.set(fd, file);
      callback(error, fd);
    });
  (fs as any).openSync = (file: string, ...rest: unknown[]) => {
    const fd = (original.openSync as any)(file, ...rest);
    paths.set(fd, String(file));
    return fd;
  };
  (fs as any).write = (fd: number, ...rest: unknown[]) => {
    events.push({ kind: 'write', file: name(fd) });
    return (original.write as any)(fd, ...rest);
  };
  (fs as any).fdatasync = (fd: number, callback: (error: Error | null) => void) =>
    original.fdatasync(fd, (error) => {
      if (!error) events.push({ kind: 'sync', file: name(fd) });
      callback(error);
    });
});

afterAll(() => Object.assign(fs, original));

test('FLUSH: chunk data written and synced, then the journal written and synced, then the reply', async () => {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-order-'));
  // Punches seen at the file layer: one fallocate per stretch of a chunk file given back.
  const punches: number[] = [];
  const files: FileLayer = {
    ...realFiles,
    allocate: (fd, mode, offsetBytes, lengthBytes) => {
      if (mode === 'punch' && recordPunches) punches.push(events.length);
      return realFiles.allocate(fd, mode, offsetBytes, lengthBytes);
    },
  };
  let recordPunches = false;
  const pool = await Pool.open({ directory, files });
  await pool.createVolume('v', 64 * 1024 * 1024);
  const volume = pool.openVolume('v');
  events.length = 0;
  await volume.write(8 * 1024 * 1024, Buffer.alloc(256 * 1024, 7)); // into a hole: allocates, so a map record follows
  await volume.flush();
  events.push({ kind: 'flushed', file: '' });

  const index = (kind: Event['kind'], file: RegExp): number => events.findIndex((event) => event.kind === kind && file.test(event.file));
  const lastIndex = (kind: Event['kind'], file: RegExp): number => events.findLastIndex((event) => event.kind === kind && file.test(event.file));
  const order = events.map((event) => `${event.kind} ${event.file}`).join(', ');
  const dataWrite = index('write', /\.chunk$/);
  const dataSync = index('sync', /\.chunk$/);
  const journalWrite = index('write', /^journal-/);
  const journalSync = lastIndex('sync', /^journal-/);
  assert.ok(dataWrite >= 0 && dataSync > dataWrite, `chunk data is synced after it is written: ${order}`);
  assert.ok(journalWrite > dataSync, `the journal record comes after the data it maps is synced: ${order}`);
  assert.ok(journalSync > journalWrite, `the journal is synced after it is written: ${order}`);
  assert.equal(events[events.length - 1]!.kind, 'flushed');
  assert.ok(journalSync < events.length - 1, 'the flush resolves after the journal sync');

  // An overwrite goes to a fresh chunk (redirect-on-write), so it too is data, sync, then a journal record.
  events.length = 0;
  recordPunches = true;
  await volume.write(8 * 1024 * 1024, Buffer.alloc(4096, 9));
  await volume.flush();
  const overwriteOrder = events.map((e) => `${e.kind} ${e.file}`).join(', ');
  assert.ok(index('sync', /\.chunk$/) > index('write', /\.chunk$/), `overwrite synced: ${overwriteOrder}`);
  assert.ok(index('write', /^journal-/) > index('sync', /\.chunk$/), `then its map record: ${overwriteOrder}`);
  assert.equal(punches.length, 0, 'the replaced chunk is kept for reuse, not punched out');
  const readBack = Buffer.alloc(8192);
  await volume.read(8 * 1024 * 1024, readBack);
  assert.ok(readBack.subarray(0, 4096).every((b) => b === 9) && readBack.subarray(4096).every((b) => b === 7));

  // A trim gives the space back to the file system, only after the journal sync that records it.
  events.length = 0;
  await volume.trim(8 * 1024 * 1024, 256 * 1024);
  await volume.flush();
  assert.equal(punches.length, 1, 'the trimmed run is punched out in one call');
  assert.ok(punches[0]! > lastIndex('sync', /^journal-/), `after the journal sync: ${events.map((e) => `${e.kind} ${e.file}`).join(', ')}`);
  await volume.close();
  await pool.close();
  fs.rmSync(directory, { recursive: true, force: true });
});
