// The transport under a resync (issue 17), alone: 512 MiB written in 1 MiB pieces over a TLS 1.3 loopback
// connection (as the peer port's), a plain TCP loopback connection, and a unix socket (as nbdcopy's path into a
// node), both ends in this one process and thread, so that its CPU is both ends' together. Each line: transport,
// seconds, MB/s, CPU seconds (user). A key and self-signed certificate are made with openssl in a temporary directory.
//   node bench/tls-loopback.mjs [ROUNDS]      (3: the three transports interleaved, ROUNDS times)
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';

const rounds = Number(process.argv[2] ?? 3);
const totalBytes = 512 * 1048576;
const piece = Buffer.alloc(1048576, 7);
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tls-loopback-'));
execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', path.join(dir, 'key.pem'), '-out', path.join(dir, 'cert.pem'), '-days', '1', '-subj', '/CN=loopback'], { stdio: 'ignore' });
const key = fs.readFileSync(path.join(dir, 'key.pem'));
const cert = fs.readFileSync(path.join(dir, 'cert.pem'));
const socketPath = path.join(dir, 'u.sock');

async function run(mode) {
  const cpu = process.cpuUsage();
  const started = performance.now();
  await new Promise((done) => {
    let got = 0;
    const accept = (socket) => socket.on('data', (data) => {
      got += data.length;
      if (got >= totalBytes) {
        socket.destroy();
        server.close();
        done();
      }
    });
    const server = mode === 'tls' ? tls.createServer({ key, cert, minVersion: 'TLSv1.3' }, accept) : net.createServer(accept);
    fs.rmSync(socketPath, { force: true });
    const onListening = () => {
      const address = server.address();
      const client = mode === 'tls' ? tls.connect({ host: '127.0.0.1', port: address.port, rejectUnauthorized: false, minVersion: 'TLSv1.3' })
        : mode === 'tcp' ? net.connect(address.port, '127.0.0.1') : net.connect(socketPath);
      let sent = 0;
      const pump = () => {
        while (sent < totalBytes) {
          sent += piece.length;
          if (!client.write(piece)) return void client.once('drain', pump);
        }
      };
      client.on(mode === 'tls' ? 'secureConnect' : 'connect', pump);
      client.on('error', () => {});
    };
    if (mode === 'unix') server.listen(socketPath, onListening);
    else server.listen(0, '127.0.0.1', onListening);
  });
  const seconds = (performance.now() - started) / 1000;
  const used = process.cpuUsage(cpu);
  console.log(mode, seconds.toFixed(2), 's', (totalBytes / 1e6 / seconds).toFixed(0), 'MB/s cpu', ((used.user + used.system) / 1e6).toFixed(2), 's (user', (used.user / 1e6).toFixed(2) + ')');
}

for (let round = 0; round < rounds; round++) for (const mode of ['tls', 'tcp', 'unix']) await run(mode);
console.log('load', os.loadavg().map((load) => load.toFixed(1)).join(' '));
fs.rmSync(dir, { recursive: true, force: true });
