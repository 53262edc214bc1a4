// chunkd tls init: a cluster CA and the certificates its nodes and clients need, in the directory layout that
// qemu (tls-creds-x509,dir=), libnbd (tls-certificates=), nbdkit (--tls-certificates) and chunkd all read:
//
//   DIR/ca-cert.pem  ca-key.pem                the CA (the key stays here: copy only the NAME/ directories out)
//   DIR/server-cert.pem server-key.pem         the first node's set, so that DIR itself serves a one-node setup
//   DIR/client-cert.pem client-key.pem
//   DIR/NODE/ca-cert.pem                       one directory per --node: the whole set for that node, which
//   DIR/NODE/server-cert.pem server-key.pem    serves (peer port, NBD) with the server pair and connects to
//   DIR/NODE/client-cert.pem client-key.pem    other nodes with the client pair
//   DIR/CLIENT/ca-cert.pem                     one directory per --client (an admin, a qemu host): client pair only
//   DIR/CLIENT/client-cert.pem client-key.pem
//
// Keys are ECDSA P-256 (fast to make, read by OpenSSL and GnuTLS alike) made with node:crypto and written 0600;
// the certificates are made by Debian's openssl command, because node:crypto can read X.509 but not issue it,
// and openssl is on every Debian machine already (ca-certificates depends on it), kept by the distribution, and
// the tool users check the result with. A certificate's subject CN is the node's or client's name, and so is its
// first SAN; server certificates add DNS:localhost, IP:127.0.0.1, IP:::1 and every --san. Both pairs carry
// keyUsage digitalSignature and keyEncipherment (qemu refuses a critical keyUsage without the latter) and the
// one extendedKeyUsage their role needs, which OpenSSL checks on each side of a TLS handshake.
import { execFile } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { ChunkdError } from '../core/errors.ts';
import { validateName } from '../core/names.ts';
import { caCertFile, clientCertFile, clientKeyFile, serverCertFile, serverKeyFile } from '../core/tls-files.ts';

export const caKeyFile = 'ca-key.pem';
const certificateFiles = [serverCertFile, serverKeyFile, clientCertFile, clientKeyFile];

/** Days a certificate is valid by default: ten years, since a cluster CA has no renewal machinery yet. */
export const defaultValidityDays = 3650;
const validityDaysMax = 36500;

export interface TlsInitOptions {
  directory: string;
  /** Node names: each gets DIR/NAME/ with server and client pairs; the first also fills DIR's top level. */
  nodes: string[];
  /** Client names: each gets DIR/NAME/ with a client pair only. */
  clients: string[];
  /** Extra subjectAltNames for every server certificate: "DNS:name", "IP:addr", or a bare name or address. */
  sans: string[];
  days: number;
  /** new: refuse a DIR that holds a CA; replace: a new CA, and every certificate set in DIR is replaced; add: issue from DIR's CA. */
  mode: 'new' | 'replace' | 'add';
  /** The openssl program (tests may point elsewhere). */
  openssl?: string;
}

export interface TlsInitReport {
  directory: string;
  caCreated: boolean;
  caSubject: string;
  issued: Array<{ name: string; kind: 'node' | 'client'; directory: string; notAfter: string }>;
  /** The node whose set fills DIR's top level, or null (an --add). */
  topLevelNode: string | null;
}

/** The default node name when none is given: this machine's short host name, if it is a valid name. */
export function defaultNodeName(): string | null {
  const short = os.hostname().split('.')[0] ?? '';
  return /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$/.test(short) ? short : null;
}

/** Turns one --san value into OpenSSL's spelling ("DNS:x" or "IP:x"); a bare address is an IP, anything else a DNS name. */
export function parseSan(text: string): string {
  const match = /^(DNS|IP):(.+)$/i.exec(text);
  const kind = match ? match[1]!.toUpperCase() : net.isIP(text) !== 0 ? 'IP' : 'DNS';
  const value = match ? match[2]! : text;
  if (kind === 'IP' && net.isIP(value) === 0) throw ChunkdError.invalid(`invalid --san "${text}": ${value} is not an IP address`);
  if (kind === 'DNS' && !/^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$/.test(value)) {
    throw ChunkdError.invalid(`invalid --san "${text}": use DNS:name, IP:address, or a bare host name or address`);
  }
  return `${kind}:${value}`;
}

/** Makes the CA (unless adding) and the certificate sets; see the note at the top of the file for the layout. */
export async function initTls(options: TlsInitOptions): Promise<TlsInitReport> {
  const directory = path.resolve(options.directory);
  const openssl = options.openssl ?? 'openssl';
  const names = checkNames(options);
  if (!Number.isInteger(options.days) || options.days < 1 || options.days > validityDaysMax) {
    throw ChunkdError.invalid(`invalid --days ${options.days}: a whole number of days from 1 to ${validityDaysMax}`);
  }
  const sans = options.sans.map(parseSan);
  const caHere = fs.existsSync(path.join(directory, caCertFile)) || fs.existsSync(path.join(directory, caKeyFile));
  if (options.mode === 'new' && caHere) {
    throw ChunkdError.exists(`${directory} already holds a CA (${caCertFile}); pass --add to issue more certificates from it, or --force to replace it and every certificate set in ${directory} (certificates it issued stop working)`);
  }
  if (options.mode === 'add') {
    for (const file of [caCertFile, caKeyFile]) {
      if (!fs.existsSync(path.join(directory, file))) throw ChunkdError.notFound(`--add needs the CA in ${directory}, but ${path.join(directory, file)} is missing`);
    }
    for (const { name } of names) {
      if (fs.existsSync(path.join(directory, name))) throw ChunkdError.exists(`${path.join(directory, name)} exists already; remove it first to issue ${name} again`);
    }
  }
  await checkOpenssl(openssl);

  // Everything is made in a staging directory inside DIR and moved into place at the end, so that a failure
  // half-way leaves DIR as it was.
  fs.mkdirSync(directory, { recursive: true, mode: 0o700 });
  const staging = fs.mkdtempSync(path.join(directory, '.tls-init-'));
  try {
    const config = path.join(staging, 'openssl.cnf');
    fs.writeFileSync(config, opensslConfig(), { mode: 0o600 });
    const caCreated = options.mode !== 'add';
    const caDirectory = caCreated ? staging : directory;
    if (caCreated) {
      writeKey(path.join(staging, caKeyFile));
      const subject = `/O=chunkd/CN=chunkd cluster CA ${crypto.randomBytes(4).toString('hex')}`;
      await run(openssl, ['req', '-x509', '-new', '-config', config, '-extensions', 'ca', '-key', path.join(staging, caKeyFile), '-subj', subject,
        '-sha256', '-days', String(options.days), '-set_serial', serial(), '-out', path.join(staging, caCertFile)]);
    }
    const ca = { cert: path.join(caDirectory, caCertFile), key: path.join(caDirectory, caKeyFile) };
    const issued: TlsInitReport['issued'] = [];
    for (const { name, kind } of names) {
      const target = path.join(staging, name);
      fs.mkdirSync(target, { mode: 0o700 });
      fs.copyFileSync(ca.cert, path.join(target, caCertFile));
      if (kind === 'node') {
        const serverSans = [`DNS:${name}`, 'DNS:localhost', 'IP:127.0.0.1', 'IP:::1', ...sans];
        await issue(openssl, config, ca, name, 'server', [...new Set(serverSans)], options.days, target);
      }
      await issue(openssl, config, ca, name, 'client', [`DNS:${name}`], options.days, target);
      const notAfter = new crypto.X509Certificate(fs.readFileSync(path.join(target, kind === 'node' ? serverCertFile : clientCertFile))).validTo;
      issued.push({ name, kind, directory: path.join(directory, name), notAfter });
    }
    const topLevelNode = caCreated ? (names.find((entry) => entry.kind === 'node')?.name ?? null) : null;
    if (topLevelNode !== null) {
      for (const file of certificateFiles) copyKeepingMode(path.join(staging, topLevelNode, file), path.join(staging, file));
    }
    fs.rmSync(config);
    const caSubject = new crypto.X509Certificate(fs.readFileSync(ca.cert)).subject.replaceAll('\n', ', ');

    if (options.mode === 'replace') removeOldSets(directory);
    for (const entry of fs.readdirSync(staging)) fs.renameSync(path.join(staging, entry), path.join(directory, entry));
    return { directory, caCreated, caSubject, issued, topLevelNode };
  } finally {
    fs.rmSync(staging, { recursive: true, force: true });
  }
}

function checkNames(options: TlsInitOptions): Array<{ name: string; kind: 'node' | 'client' }> {
  const names = [
    ...options.nodes.map((name) => ({ name: validateName(name, 'node'), kind: 'node' as const })),
    ...options.clients.map((name) => ({ name: validateName(name, 'client'), kind: 'client' as const })),
  ];
  if (names.length === 0) throw ChunkdError.invalid('name at least one --node or --client');
  const seen = new Set<string>();
  for (const { name } of names) {
    // A name becomes a directory beside the top-level files: it must not be one of them.
    if (name.endsWith('.pem') || name.startsWith('.tls-init-')) throw ChunkdError.invalid(`invalid name ${JSON.stringify(name)}: it would clash with a file of the directory`);
    if (seen.has(name)) throw ChunkdError.invalid(`the name ${name} is given twice (node and client names share one directory each)`);
    seen.add(name);
  }
  return names;
}

/** With --force: the old CA, the top-level set and every subdirectory holding a set from it go (they stop working anyway). */
function removeOldSets(directory: string): void {
  for (const entry of fs.readdirSync(directory, { withFileTypes: true })) {
    const full = path.join(directory, entry.name);
    if (entry.isFile() && (entry.name === caCertFile || entry.name === caKeyFile || certificateFiles.includes(entry.name))) fs.rmSync(full);
    else if (entry.isDirectory() && !entry.name.startsWith('.tls-init-') && fs.existsSync(path.join(full, caCertFile))) fs.rmSync(full, { recursive: true });
  }
}

async function issue(openssl: string, config: string, ca: { cert: string; key: string }, name: string, role: 'server' | 'client', sans: string[], days: number, target: string): Promise<void> {
  const key = path.join(target, role === 'server' ? serverKeyFile : clientKeyFile);
  const cert = path.join(target, role === 'server' ? serverCertFile : clientCertFile);
  const request = path.join(target, `${role}.csr`);
  const extensions = path.join(target, `${role}.ext`);
  writeKey(key);
  fs.writeFileSync(extensions, `${leafExtensions(role)}subjectAltName = ${sans.join(', ')}\n`);
  await run(openssl, ['req', '-new', '-config', config, '-key', key, '-subj', `/O=chunkd/CN=${name}`, '-out', request]);
  await run(openssl, ['x509', '-req', '-in', request, '-CA', ca.cert, '-CAkey', ca.key, '-set_serial', serial(), '-sha256', '-days', String(days),
    '-extfile', extensions, '-out', cert]);
  fs.rmSync(request);
  fs.rmSync(extensions);
  fs.chmodSync(cert, 0o644);
}

function leafExtensions(role: 'server' | 'client'): string {
  return [
    'basicConstraints = critical, CA:FALSE',
    'keyUsage = critical, digitalSignature, keyEncipherment',
    `extendedKeyUsage = ${role === 'server' ? 'serverAuth' : 'clientAuth'}`,
    'subjectKeyIdentifier = hash',
    'authorityKeyIdentifier = keyid',
    '',
  ].join('\n');
}

/** Our own configuration, so that the machine's openssl.cnf (its defaults and extensions) plays no part. */
function opensslConfig(): string {
  return [
    '[req]',
    'distinguished_name = dn',
    'prompt = no',
    '[dn]',
    '[ca]',
    'basicConstraints = critical, CA:TRUE, pathlen:0',
    'keyUsage = critical, keyCertSign, cRLSign',
    'subjectKeyIdentifier = hash',
    '',
  ].join('\n');
}

/** A new ECDSA P-256 private key, PKCS#8 PEM, created with mode 0600 (never readable by others, not for a moment). */
function writeKey(file: string): void {
  const { privateKey } = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
  fs.writeFileSync(file, privateKey.export({ type: 'pkcs8', format: 'pem' }), { mode: 0o600, flag: 'wx' });
}

function copyKeepingMode(from: string, to: string): void {
  fs.copyFileSync(from, to, fs.constants.COPYFILE_EXCL);
  fs.chmodSync(to, fs.statSync(from).mode & 0o777);
}

/** A random positive 128-bit serial number, as RFC 5280 asks (unique per CA without a serial file). */
function serial(): string {
  const bytes = crypto.randomBytes(16);
  bytes[0] = bytes[0]! & 0x7f;
  return `0x${bytes.toString('hex')}`;
}

/** Fails early, with the package to install, when there is no openssl command. */
async function checkOpenssl(openssl: string): Promise<void> {
  await run(openssl, ['version']);
}

function run(program: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(program, args, { timeout: 60_000 }, (error, stdout, stderr) => {
      if (error === null) return resolve(stdout);
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') {
        return reject(ChunkdError.notFound(`${program} is not installed: chunkd tls init needs the openssl command (apt-get install openssl)`));
      }
      const why = stderr.toString().trim().split('\n').slice(-2).join('; ');
      reject(ChunkdError.io(`${program} ${args[0]} failed: ${why || error.message}`));
    });
  });
}
