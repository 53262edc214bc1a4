// A TLS credentials directory in the layout qemu, libnbd and nbdkit share for X.509 (qemu's tls-creds-x509), so
// that one directory serves every tool: the file names, and reading and parsing them with errors that name the
// file. NBD's TLS (nbd/tls.ts) and the peer port and API (peer/credentials.ts) load their sets through here;
// `chunkd tls init` (peer/certificates.ts) writes them.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { ChunkdError } from './errors.ts';

export const caCertFile = 'ca-cert.pem';
export const serverCertFile = 'server-cert.pem';
export const serverKeyFile = 'server-key.pem';
export const clientCertFile = 'client-cert.pem';
export const clientKeyFile = 'client-key.pem';

/** The PEM text of `name` in `directory`; null when it is missing and not required; else a ChunkdError naming it. */
export function readPem(directory: string, name: string, required = true): string | null {
  const file = path.join(directory, name);
  try {
    return fs.readFileSync(file, 'utf8');
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' && !required) return null;
    if (code === 'ENOENT') throw ChunkdError.invalid(`TLS credentials: ${file} is missing (make a set with chunkd tls init; the directory holds ${caCertFile}, ${serverCertFile}, ${serverKeyFile})`);
    throw ChunkdError.invalid(`TLS credentials: ${file} is unreadable (${code ?? (error as Error).message})`);
  }
}

/** `pem` (read from `file`) as a certificate; a ChunkdError naming the file when it is not one. */
export function parseCertificate(file: string, pem: string): crypto.X509Certificate {
  try {
    return new crypto.X509Certificate(pem);
  } catch (error) {
    throw ChunkdError.invalid(`${file} is not an X.509 certificate in PEM: ${(error as Error).message}`);
  }
}

/** `pem` (read from `file`) as a private key; a ChunkdError naming the file when it is not one. */
export function parsePrivateKey(file: string, pem: string): crypto.KeyObject {
  try {
    return crypto.createPrivateKey(pem);
  } catch (error) {
    throw ChunkdError.invalid(`${file} is not a private key in PEM: ${(error as Error).message}`);
  }
}
