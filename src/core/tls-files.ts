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

/**
 * The TLS 1.3 suites chunkd's servers offer and its peer client asks for, in the order they prefer them (NBD's
 * server and both ends of the peer port). AES-128-GCM leads: a data path encrypts or decrypts every byte on each
 * end, and with AES instructions it is the cheapest of the three (10 AES rounds a block where AES-256-GCM does 14;
 * the GHASH half is the same). Clients otherwise get their own first choice (libnbd's GnuTLS and Node's OpenSSL ask
 * for AES-256-GCM first), and on a machine the client shares, its cipher work is throughput lost. A server decides
 * by its own order (SSL_OP_CIPHER_SERVER_PREFERENCE) but gives ChaCha20-Poly1305 to a client that lists it first
 * (SSL_OP_PRIORITIZE_CHACHA), as one without AES instructions does: AES in software costs it several times more.
 * All three are TLS 1.3's AEAD suites, none weaker than a 128-bit level.
 */
export const tlsCipherSuites = 'TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256';

/** A server's options for tlsCipherSuites: its own order decides, but a client asking for ChaCha20 first gets it. */
export const tlsServerSuites = {
  ciphers: tlsCipherSuites,
  secureOptions: crypto.constants.SSL_OP_CIPHER_SERVER_PREFERENCE | crypto.constants.SSL_OP_PRIORITIZE_CHACHA,
} as const;
