// The version of chunkd, read once from package.json (the one place it is written), for hello and logs.
import fs from 'node:fs';
import path from 'node:path';
import { packageRoot } from './source-files.ts';

export const softwareVersion: string = (JSON.parse(fs.readFileSync(path.join(packageRoot, 'package.json'), 'utf8')) as { version: string }).version;
