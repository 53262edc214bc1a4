// libc through koffi (a maintained FFI with prebuilt binaries, so nothing is compiled at install), loaded on first
// use rather than at import. Node aborts the whole process when a worker thread is terminated while an addon
// loads (napi_throw during termination is fatal: seen as `FATAL ERROR: Error::ThrowAsJavaScriptException`), and
// a node stopped right after it started terminates worker threads that are still importing their modules. A
// chunk I/O worker first calls into libc inside a task, which the pool lets finish before it terminates anything.
import { createRequire } from 'node:module';

type Koffi = typeof import('koffi');
type LibraryHandle = ReturnType<Koffi['load']>;
/** A declared C function: call it, or `.async(..., callback)` to run it on koffi's worker threads. */
export type CFunction = ReturnType<LibraryHandle['func']>;

const require = createRequire(import.meta.url);
let loaded: { koffi: Koffi; libc: LibraryHandle } | null = null;

function load(): { koffi: Koffi; libc: LibraryHandle } {
  if (loaded === null) {
    const koffi = require('koffi') as Koffi;
    loaded = { koffi, libc: koffi.load('libc.so.6') };
  }
  return loaded;
}

/** koffi itself (errno, addresses), loaded on first call. */
export function koffi(): Koffi {
  return load().koffi;
}

/** A getter for the libc function with this C signature, declared on its first call. */
export function libcFunction(signature: string): () => CFunction {
  let declared: CFunction | null = null;
  return () => (declared ??= load().libc.func(signature));
}

/** The name of an errno value (EAGAIN, ...), or E<number>. */
export function errnoName(errno: number): string {
  return Object.entries(koffi().os.errno as Record<string, number>).find(([, value]) => value === errno)?.[0] ?? `E${errno}`;
}

/** The errno value of a name (EAGAIN, ...). */
export function errnoValue(name: string): number | undefined {
  return (koffi().os.errno as Record<string, number>)[name];
}
