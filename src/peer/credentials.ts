// A TLS directory in the qemu/libnbd/nbdkit layout (certificates.ts makes them): ca-cert.pem, and a server pair
// (server-cert.pem, server-key.pem) or a client pair (client-cert.pem, client-key.pem). Loaded and checked once,
// at start, so that a missing file, a key that does not belong to its certificate, a certificate another CA
// issued or one that expired is one clear line naming the file, not a TLS failure on the first connection.
import path from 'node:path';
import { ChunkdError } from '../core/errors.ts';
import { checkName } from '../core/names.ts';
import { caCertFile, clientCertFile, clientKeyFile, parseCertificate, parsePrivateKey, readPem, serverCertFile, serverKeyFile } from '../core/tls-files.ts';

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
  const ca = readPem(resolved, caCertFile)!;
  const cert = readPem(resolved, certFile)!;
  const key = readPem(resolved, keyFile)!;
  const caCertificate = parseCertificate(path.join(resolved, caCertFile), ca);
  const certificate = parseCertificate(path.join(resolved, certFile), cert);
  const privateKey = parsePrivateKey(path.join(resolved, keyFile), key);
  if (!certificate.checkPrivateKey(privateKey)) throw ChunkdError.invalid(`${path.join(resolved, keyFile)} is not the key of ${path.join(resolved, certFile)}`);
  if (!certificate.checkIssued(caCertificate) || !certificate.verify(caCertificate.publicKey)) {
    throw ChunkdError.invalid(`${path.join(resolved, certFile)} was not issued by the CA in ${path.join(resolved, caCertFile)}`);
  }
  const validTo = new Date(certificate.validTo);
  if (validTo.getTime() <= now.getTime()) throw ChunkdError.invalid(`${path.join(resolved, certFile)} expired on ${validTo.toISOString()}`);
  if (new Date(certificate.validFrom).getTime() > now.getTime()) throw ChunkdError.invalid(`${path.join(resolved, certFile)} is not valid before ${new Date(certificate.validFrom).toISOString()}`);
  const name = certificateName(certificate.subject);
  if (name === null) throw ChunkdError.invalid(`${path.join(resolved, certFile)} has no subject CN that is a valid node name (1-64 characters of A-Za-z0-9_.-)`);
  return { directory: resolved, ca: Buffer.from(ca), cert: Buffer.from(cert), key: Buffer.from(key), name, validTo };
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
