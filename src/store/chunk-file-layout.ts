// Where a physical chunk lives on disk: chunk i at byte (i mod chunksPerFile) * chunkSize of chunk file
// floor(i / chunksPerFile), named <pool>/chunks/NNNNNNNN.chunk (the file index, eight decimal digits). Pure: the
// main thread's ChunkFiles (chunk-files.ts) and a worker's own descriptors (chunk-task.ts) both name files here.
import path from 'node:path';
import { chunkSizeBytes, chunksPerFile } from '../core/limits.ts';

/** Bytes one chunk file spans (its last chunk's end; a sparse file may be shorter). */
export const chunkFileBytes = chunksPerFile * chunkSizeBytes;

const chunkFileName = /^(\d{8})\.chunk$/;

/** Path of chunk file `fileIndex` in the chunk directory. */
export function chunkFilePath(directory: string, fileIndex: number): string {
  return path.join(directory, `${fileIndex.toString().padStart(8, '0')}.chunk`);
}

/** The file index a directory entry names, or null when it is not a chunk file. */
export function chunkFileIndexOf(name: string): number | null {
  const match = chunkFileName.exec(name);
  return match === null ? null : Number(match[1]);
}
