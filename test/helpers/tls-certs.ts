// X.509 credentials for TLS tests, made with openssl in the layout qemu, libnbd and nbdkit read (and chunkd serve
// --tls-dir): ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem. EC P-256 keys, valid
// for two days; the server certificate names 127.0.0.1 and localhost.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

/** A certificate authority: its certificate and key, in a directory of their own. */
export interface TestCa {
  certPath: string;
  keyPath: string;
}

function openssl(args: string[], cwd: string): void {
  execFileSync('openssl', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
}

/** Makes a self-signed CA named `name` in `directory` (created). */
export function makeCa(directory: string, name: string): TestCa {
  fs.mkdirSync(directory, { recursive: true });
  openssl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem',
    '-days', '2', '-subj', `/CN=${name}`, '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign'], directory);
  return { certPath: path.join(directory, 'ca-cert.pem'), keyPath: path.join(directory, 'ca-key.pem') };
}

/** Issues a certificate from `ca` for a server (127.0.0.1, localhost) or a client, as `<prefix>-cert.pem` and `<prefix>-key.pem` in `directory`. */
export function issue(ca: TestCa, directory: string, prefix: 'server' | 'client', commonName = `chunkd test ${prefix}`): void {
  fs.mkdirSync(directory, { recursive: true });
  const extensions = path.join(directory, `${prefix}-ext.cnf`);
  fs.writeFileSync(extensions, [
    'basicConstraints=CA:FALSE',
    'keyUsage=critical,digitalSignature,keyEncipherment',
    prefix === 'server' ? 'extendedKeyUsage=serverAuth' : 'extendedKeyUsage=clientAuth',
    ...(prefix === 'server' ? ['subjectAltName=IP:127.0.0.1,DNS:localhost'] : []),
    '',
  ].join('\n'));
  openssl(['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', `${prefix}-key.pem`, '-out', `${prefix}.csr`, '-subj', `/CN=${commonName}`], directory);
  openssl(['x509', '-req', '-in', `${prefix}.csr`, '-CA', ca.certPath, '-CAkey', ca.keyPath, '-CAcreateserial', '-out', `${prefix}-cert.pem`, '-days', '2', '-extfile', extensions], directory);
  fs.rmSync(path.join(directory, `${prefix}.csr`));
  fs.rmSync(extensions);
}

/**
 * A credentials directory for `ca` (made here when not given): its certificate as ca-cert.pem, a server and a
 * client certificate issued by it. Returns the CA, to issue more from it.
 */
export function makeTlsDir(directory: string, ca: TestCa = makeCa(`${directory}-ca`, 'chunkd test CA')): TestCa {
  fs.mkdirSync(directory, { recursive: true });
  fs.copyFileSync(ca.certPath, path.join(directory, 'ca-cert.pem'));
  issue(ca, directory, 'server');
  issue(ca, directory, 'client');
  return ca;
}
