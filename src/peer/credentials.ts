// A TLS directory in the qemu/libnbd/nbdkit layout (certificates.ts makes them): ca-cert.pem, and a server pair
// (server-cert.pem, server-key.pem) or a client pair (client-cert.pem, client-key.pem). Loaded and checked once,
// at start, so that a missing file, a key that does not belong to its certificate, a certificate another CA
// issued or one that expired is one clear line naming the file, not a TLS failure on the first connection.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { ChunkdError } from '../core/errors.ts';
import { checkName } from '../core/names.ts';
import { caCertFile, clientCertFile, clientKeyFile, serverCertFile, serverKeyFile } from './certificates.ts';

export interface TlsCredentials {
  directory: string;
  ca: Buffer;
  cert: Buffer;
  key: Buffer;
  /** The name this certificate gives its holder: its subject CN. */
  name: string;
  /** When the certificate stops being valid. */
  validTo: Date;
}

/** Loads the server or the client pair of `directory` with the CA; throws a ChunkdError naming the file at fault. */
export function loadCredentials(directory: string, role: 'server' | 'client', now: Date = new Date()): TlsCredentials {
  const resolved = path.resolve(directory);
  const [certFile, keyFile] = role === 'server' ? [serverCertFile, serverKeyFile] : [clientCertFile, clientKeyFile];
  const ca = readPem(resolved, caCertFile);
  const cert = readPem(resolved, certFile);
  const key = readPem(resolved, keyFile);
  const caCertificate = parseCertificate(ca, path.join(resolved, caCertFile));
  const certificate = parseCertificate(cert, path.join(resolved, certFile));
  let privateKey: crypto.KeyObject;
  try {
    privateKey = crypto.createPrivateKey(key);
  } catch (error) {
    throw ChunkdError.invalid(`${path.join(resolved, keyFile)} is not a readable private key (${(error as Error).message})`);
  }
  if (!certificate.checkPrivateKey(privateKey)) throw ChunkdError.invalid(`${path.join(resolved, keyFile)} is not the key of ${path.join(resolved, certFile)}`);
  if (!certificate.checkIssued(caCertificate) || !certificate.verify(caCertificate.publicKey)) {
    throw ChunkdError.invalid(`${path.join(resolved, certFile)} was not issued by the CA in ${path.join(resolved, caCertFile)}`);
  }
  const validTo = new Date(certificate.validTo);
  if (validTo.getTime() <= now.getTime()) throw ChunkdError.invalid(`${path.join(resolved, certFile)} expired on ${validTo.toISOString()}`);
  if (new Date(certificate.validFrom).getTime() > now.getTime()) throw ChunkdError.invalid(`${path.join(resolved, certFile)} is not valid before ${new Date(certificate.validFrom).toISOString()}`);
  const name = certificateName(certificate.subject);
  if (name === null) throw ChunkdError.invalid(`${path.join(resolved, certFile)} has no subject CN that is a valid node name (1-64 characters of A-Za-z0-9_.-)`);
  return { directory: resolved, ca, cert, key, name, validTo };
}

/** The holder's name in a certificate's subject (Node's "KEY=value" lines): its CN when that is a valid name, else null. */
export function certificateName(subject: string | Record<string, unknown> | undefined): string | null {
  let cn: unknown;
  if (typeof subject === 'string') cn = /^CN=(.*)$/m.exec(subject)?.[1];
  else cn = subject?.CN;
  // Several CNs come as an array: ambiguous, so no name.
  if (typeof cn !== 'string' || checkName(cn, 'node') !== null) return null;
  return cn;
}

function readPem(directory: string, file: string): Buffer {
  const where = path.join(directory, file);
  try {
    return fs.readFileSync(where);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw ChunkdError.notFound(`TLS credentials: ${where} is missing (make a set with chunkd tls init)`);
    if (code === 'EACCES') throw new ChunkdError('EPERM', `TLS credentials: permission denied reading ${where}`);
    throw ChunkdError.io(`TLS credentials: reading ${where} failed: ${code ?? (error as Error).message}`, error);
  }
}

function parseCertificate(pem: Buffer, where: string): crypto.X509Certificate {
  try {
    return new crypto.X509Certificate(pem);
  } catch (error) {
    throw ChunkdError.invalid(`${where} is not a readable X.509 certificate (${(error as Error).message})`);
  }
}
