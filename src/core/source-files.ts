// Where chunkd's own modules are, in both of the layouts it runs from: a checkout runs the TypeScript sources
// with Node's type stripping (`src/…/*.ts`); a packed install runs the JavaScript that `npm pack` compiled
// (`dist/src/…/*.js`, see tsconfig.build.json), because Node strips no types under node_modules. A module that
// starts a worker thread or a child process by file name asks here, so that the same code finds
// `workers/chunk-io.ts` in a checkout and `dist/workers/chunk-io.js` in a package.

import path from 'node:path';

/** `.ts` when running from the sources, `.js` when running compiled. */
export const moduleExtension = import.meta.url.endsWith('.ts') ? '.ts' : '.js';

/** The root the sources hang from: the checkout, or the package's dist/. */
const root = path.resolve(import.meta.dirname, '..', '..');

/** The package's own directory (where package.json is): the checkout, or the one above dist/. */
export const packageRoot = moduleExtension === '.ts' ? root : path.dirname(root);

/** The path of one of chunkd's modules, named from that root without its extension: `ownModule('workers', 'chunk-io')`. */
export function ownModule(...parts: string[]): string {
  const last = parts.length - 1;
  return path.join(root, ...parts.slice(0, last), `${parts[last]}${moduleExtension}`);
}
