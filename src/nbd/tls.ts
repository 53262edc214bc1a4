// NBD over TLS: the server's credentials and settings. The protocol side is in handshake.ts (NBD_OPT_STARTTLS and
// what each mode allows before it) and connection.ts (the `tls` state, where the socket is upgraded in place).
//
// Credentials come from one directory in the layout qemu, libnbd and nbdkit share for X.509, so that one directory
// serves every tool: ca-cert.pem, server-cert.pem, server-key.pem (and client-cert.pem, client-key.pem for the
// clients). They are read once, at start, on the main thread; an NBD protocol thread gets the PEM text and makes
// its own SecureContext (a context cannot cross threads). TLS 1.3 only.
//
// Modes (proto.md, "TLS support"): off is NOTLS (NBD_OPT_STARTTLS is unsupported); on is SELECTIVETLS with no
// export TLS-only (a client may upgrade, or not); require is FORCEDTLS (every option but STARTTLS and ABORT is
// answered NBD_REP_ERR_TLS_REQD until TLS is up, and NBD_OPT_EXPORT_NAME before it closes the connection).
import type crypto from 'node:crypto';
import path from 'node:path';
import tls from 'node:tls';
import { ChunkdError } from '../core/errors.ts';
import { caCertFile, parseCertificate, parsePrivateKey, readPem, serverCertFile, serverKeyFile, tlsServerSuites } from '../core/tls-files.ts';

export type TlsMode = 'off' | 'on' | 'require';

/** What a node serves TLS with: plain data, so that it can be posted to an NBD protocol thread. */
export interface TlsServerConfig {
  mode: 'on' | 'require';
  /** Ask each client for a certificate signed by the CA, and refuse it without one (qemu-nbd's verify-peer). */
  verifyPeer: boolean;
  /** PEM text. `ca` is null when the directory has none and peers are not verified. */
  ca: string | null;
  cert: string;
  key: string;
}

/** What a connection needs to upgrade its socket: made from a TlsServerConfig on the thread that serves. */
export interface TlsSettings {
  mode: 'on' | 'require';
  verifyPeer: boolean;
  secureContext: tls.SecureContext;
  /** The CA certificates a client's must be issued by, under verifyPeer. */
  authorities: crypto.X509Certificate[];
}

/**
 * Reads and checks the server's credentials in `directory`; a missing, unreadable or malformed file is a
 * ChunkdError that names it. The CA is needed to verify peers; without verify-peer it is read when present.
 */
export function loadTlsServerConfig(directory: string, mode: 'on' | 'require', verifyPeer: boolean): TlsServerConfig {
  const cert = readPem(directory, serverCertFile)!;
  const key = readPem(directory, serverKeyFile)!;
  const ca = readPem(directory, caCertFile, verifyPeer);
  parseCertificate(path.join(directory, serverCertFile), cert);
  if (ca !== null) parseCertificate(path.join(directory, caCertFile), ca);
  parsePrivateKey(path.join(directory, serverKeyFile), key);
  const config: TlsServerConfig = { mode, verifyPeer, ca, cert, key };
  try {
    tlsSettings(config);
  } catch (error) {
    throw ChunkdError.invalid(`${path.join(directory, serverKeyFile)} does not go with ${path.join(directory, serverCertFile)}: ${(error as Error).message}`);
  }
  return config;
}

/** The settings a connection upgrades with (one SecureContext per thread, shared by its connections). */
export function tlsSettings(config: TlsServerConfig): TlsSettings {
  const secureContext = tls.createSecureContext({
    cert: config.cert,
    key: config.key,
    ...(config.ca !== null ? { ca: config.ca } : {}),
    minVersion: 'TLSv1.3',
    ...tlsServerSuites,
  });
  return { mode: config.mode, verifyPeer: config.verifyPeer, secureContext, authorities: config.ca === null ? [] : certificatesIn(config.ca) };
}

/**
 * Why a client's certificate is refused under verify-peer, or null when it was issued and signed by one of the
 * CAs and is valid now. Node verifies a client certificate only for sockets a tls.Server accepted, not for one
 * upgraded in place (its `authorized` stays false), so the check is made here; OpenSSL has already checked, in the
 * handshake, that the client holds the certificate's key. One level: a certificate issued by an intermediate
 * CA that ca-cert.pem does not hold is refused.
 */
export function peerRefusal(peer: crypto.X509Certificate | undefined, authorities: crypto.X509Certificate[], now = new Date()): string | null {
  if (peer === undefined) return 'no client certificate';
  const issuer = authorities.find((authority) => peer.checkIssued(authority) && peer.verify(authority.publicKey));
  if (issuer === undefined) return `client certificate "${peer.subject.replaceAll('\n', ', ')}" is not signed by a CA in ${caCertFile}`;
  for (const certificate of [peer, issuer]) {
    if (now < certificate.validFromDate || now > certificate.validToDate) return `certificate "${certificate.subject.replaceAll('\n', ', ')}" is not valid now (${certificate.validFrom} to ${certificate.validTo})`;
  }
  return null;
}

/** The certificates of a PEM bundle. */
function certificatesIn(pem: string): crypto.X509Certificate[] {
  const blocks = pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
  return blocks.map((block) => parseCertificate(caCertFile, block));
}
