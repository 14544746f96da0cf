// Network fixtures for the TLS and proxy tests, all on loopback: a private CA and server
// certificates made with the `openssl` CLI (node:crypto cannot sign X.509), a TLS front
// that terminates TLS and pipes to the plain SignalDock test server, and a forward proxy
// (absolute-URI requests for http://, CONNECT for https://) that records what it carried.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import tls from 'node:tls';

/** The host name only the test proxy resolves (to 127.0.0.1): a request that reaches the
 *  server under it went through the proxy, since nothing else can resolve `.test`. */
export const PROXIED_HOST = 'signaldock.test';

function openssl(args, cwd) {
  try {
    return execFileSync('openssl', args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (e) {
    if (e.code === 'ENOENT') throw new Error('these tests need the openssl CLI on PATH (to make a private CA)');
    throw new Error(`openssl ${args[0]} failed: ${e.stderr}`);
  }
}

/**
 * A private CA and three server certificates it signed: `valid` (for 127.0.0.1, localhost
 * and PROXIED_HOST), `expired` (same names, validity in 2020) and `wrongName` (only for
 * other.test). Returns PEM strings and the CA file's path; `cleanup()` removes the files.
 */
export function makePki() {
  const dir = mkdtempSync(path.join(tmpdir(), 'cleo-pki-'));
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  openssl(['req', '-x509', ...ec, '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '2',
    '-subj', '/CN=cleo-runtime test CA',
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign'], dir);
  mkdirSync(path.join(dir, 'db'));
  writeFileSync(path.join(dir, 'db', 'index.txt'), '');
  writeFileSync(path.join(dir, 'db', 'serial'), '01\n');
  const sign = (name, sans, dates) => {
    writeFileSync(path.join(dir, `${name}.cnf`), [
      '[ca]', 'default_ca = c', '[c]', 'database = db/index.txt', 'new_certs_dir = db', 'serial = db/serial',
      'default_md = sha256', 'policy = p', 'unique_subject = no', 'x509_extensions = ext', '[p]', 'commonName = supplied',
      '[ext]', `subjectAltName = ${sans}`, 'basicConstraints = critical,CA:FALSE',
      'keyUsage = critical,digitalSignature', 'extendedKeyUsage = serverAuth', '',
    ].join('\n'));
    openssl(['req', ...ec, '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${name}`], dir);
    openssl(['ca', '-batch', '-config', `${name}.cnf`, '-cert', 'ca.pem', '-keyfile', 'ca.key',
      '-in', `${name}.csr`, '-out', `${name}.pem`, ...dates], dir);
    return { key: readFileSync(path.join(dir, `${name}.key`), 'utf8'), cert: readFileSync(path.join(dir, `${name}.pem`), 'utf8') };
  };
  const names = `IP:127.0.0.1,DNS:localhost,DNS:${PROXIED_HOST}`;
  return {
    caFile: path.join(dir, 'ca.pem'),
    valid: sign('valid', names, ['-days', '2']),
    expired: sign('expired', names, ['-startdate', '20200101000000Z', '-enddate', '20200102000000Z']),
    wrongName: sign('wrongname', 'DNS:other.test', ['-days', '2']),
    cleanup: () => rmSync(dir, { recursive: true, force: true }),
  };
}

/** Terminates TLS on 127.0.0.1 (port 0) with `{ key, cert }` and pipes each connection to
 *  `targetPort`: the plain test server, served over https. */
export async function startTlsFront(targetPort, { key, cert }) {
  const sockets = new Set();
  const track = (s) => { sockets.add(s); s.on('close', () => sockets.delete(s)); s.on('error', () => {}); };
  const server = tls.createServer({ key, cert }, (secure) => {
    const plain = net.connect(targetPort, '127.0.0.1');
    track(secure);
    track(plain);
    secure.pipe(plain).pipe(secure);
  });
  // The raw sockets too, so close() also ends connections still in (or failed at) the handshake.
  server.on('connection', track);
  // Handshakes the client refuses end here; they are what the failure tests are about.
  server.on('tlsClientError', () => {});
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: server.address().port,
    close: () => new Promise((resolve) => { for (const s of sockets) s.destroy(); server.close(() => resolve()); }),
  };
}

/**
 * A forward proxy on 127.0.0.1 (port 0). `requests` records `'GET http://host:port/path'`
 * for forwarded http:// requests and `'CONNECT host:port'` for tunnels; `auth` the
 * Proxy-Authorization headers seen. PROXIED_HOST resolves to 127.0.0.1, any other name is
 * refused (502), so nothing leaves the machine.
 */
export async function startProxy() {
  const requests = [];
  const auth = [];
  const sockets = new Set();
  const track = (s) => { sockets.add(s); s.on('close', () => sockets.delete(s)); s.on('error', () => {}); };
  const resolveHost = (host) => (host === PROXIED_HOST || host === '127.0.0.1' ? '127.0.0.1' : null);
  const server = http.createServer((req, res) => {
    requests.push(`${req.method} ${req.url}`);
    if (req.headers['proxy-authorization']) auth.push(req.headers['proxy-authorization']);
    let target;
    try { target = new URL(req.url); } catch { res.writeHead(400).end(); return; }
    const address = resolveHost(target.hostname);
    if (!address) { res.writeHead(502).end(); return; }
    const headers = { ...req.headers };
    delete headers['proxy-authorization'];
    delete headers['proxy-connection'];
    const upstream = http.request({
      host: address, port: target.port, method: req.method, path: target.pathname + target.search, headers,
    }, (answer) => { res.writeHead(answer.statusCode, answer.headers); answer.pipe(res); });
    upstream.on('error', () => res.destroy());
    req.pipe(upstream);
  });
  server.on('connection', track);
  server.on('connect', (req, client, head) => {
    requests.push(`CONNECT ${req.url}`);
    if (req.headers['proxy-authorization']) auth.push(req.headers['proxy-authorization']);
    const [host, port] = req.url.split(':');
    const address = resolveHost(host);
    if (!address) { client.end('HTTP/1.1 502 Bad Gateway\r\n\r\n'); return; }
    const upstream = net.connect(Number(port), address, () => {
      client.write('HTTP/1.1 200 Connection Established\r\n\r\n');
      upstream.write(head);
      upstream.pipe(client).pipe(upstream);
    });
    track(upstream);
    upstream.on('error', () => client.destroy());
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    requests,
    auth,
    close: () => new Promise((resolve) => { for (const s of sockets) s.destroy(); server.close(() => resolve()); }),
  };
}

/** The environment of a child that must see only the network settings a test gives it. */
export function cleanNetworkEnv(env = {}) {
  const cleared = {};
  for (const name of ['HTTP_PROXY', 'HTTPS_PROXY', 'ALL_PROXY', 'NO_PROXY', 'http_proxy', 'https_proxy', 'all_proxy',
    'no_proxy', 'NODE_EXTRA_CA_CERTS', 'NODE_TLS_REJECT_UNAUTHORIZED', 'SSL_CERT_FILE', 'SSL_CERT_DIR', 'CLEO_RUNTIME_LOG',
    'NODE_USE_ENV_PROXY']) {
    cleared[name] = undefined;
  }
  return { ...cleared, ...env };
}
