// TLS and proxies, as users' networks have them, in child processes (the environment is
// read once per process): a private CA generated here, the SignalDock test server behind a
// TLS front, and a loopback forward proxy. Each scenario is a whole runtime (REST peeks and
// the SSE stream) that must deliver a message queued before it started (found by a REST
// peek) and one pushed on its stream.
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { startSignalDock } from '../testing/signaldock-server.mjs';
import { runChild, waitFor } from './support/helpers.mjs';
import { PROXIED_HOST, cleanNetworkEnv, makePki, startProxy, startTlsFront } from './support/network.mjs';

let pki;
beforeAll(() => { pki = makePki(); });
afterAll(() => pki?.cleanup());

let sd;
const closers = [];
beforeEach(async () => {
  sd = await startSignalDock({ agents: { alice: 'key-a', bob: 'key-b' } });
  closers.push(() => sd.close());
});
afterEach(async () => { for (const close of closers.splice(0).reverse()) await close(); });

async function front(certificate) {
  const f = await startTlsFront(Number(new URL(sd.url).port), certificate);
  closers.push(() => f.close());
  return f;
}

async function proxy() {
  const p = await startProxy();
  closers.push(() => p.close());
  return p;
}

/** A runtime for alice at `base` (REST and stream) that prints what it gets, and its
 *  status when it has `want` messages or after `runMs`. Node's own fetch is tried too. */
const scenario = ({ base, want, runMs }) => `
  import { createRuntime } from '@cleocode/runtime';
  const base = ${JSON.stringify(base)};
  const now = new Date().toISOString();
  const cred = { agentId: 'alice', apiKey: 'key-a', apiBaseUrl: base, transportConfig: {}, isActive: true, createdAt: now, updatedAt: now };
  const registry = { get: async () => cred, getActive: async () => cred, rotateKey: async () => ({ agentId: 'alice', newApiKey: 'k2' }) };
  const fetched = await fetch(base + '/health').then((r) => 'status ' + r.status, (e) => 'failed ' + (e.cause?.code ?? e.message));
  console.log('FETCH ' + fetched);
  const h = await createRuntime(registry, { pollIntervalMs: 200, heartbeatIntervalMs: 0, maxKeyAgeMs: 0, sseEndpoint: base + '/messages/stream' });
  let got = 0;
  const done = (why) => {
    clearTimeout(timer);
    console.log('STATUS ' + JSON.stringify({ why, poller: h.poller.status(), sse: h.sseConnection.status() }));
    h.stop();
  };
  const timer = setTimeout(() => done('time'), ${runMs});
  h.poller.onMessage((m) => { console.log('GOT ' + m.content); if (++got === ${want}) done('all'); });
`;

const statusOf = (run) => JSON.parse(run.stdout.split('\n').find((l) => l.startsWith('STATUS ')).slice(7));
const got = (run) => run.stdout.split('\n').filter((l) => l.startsWith('GOT ')).map((l) => l.slice(4));
const lines = (text, pattern) => text.split('\n').filter((l) => pattern.test(l));

/** Runs the scenario against `base` and delivers one queued and one pushed message. */
async function deliversBoth(base, env) {
  sd.sendDirect('bob', 'alice', 'queued before start');
  const running = runChild(scenario({ base, want: 2, runMs: 25_000 }), { env: cleanNetworkEnv(env), timeoutMs: 40_000 });
  let exited = false;
  running.then(() => { exited = true; });
  await waitFor(() => sd.streams('alice') > 0 || exited, { timeoutMs: 30_000, what: 'the stream to connect' });
  sd.sendDirect('bob', 'alice', 'pushed on the stream');
  const run = await running;
  expect(run.code, run.stderr).toBe(0);
  // The stream and the peeks are two channels, not ordered against each other.
  expect(got(run).sort(), run.stderr).toEqual(['pushed on the stream', 'queued before start']);
  const status = statusOf(run);
  expect(status.why).toBe('all');
  expect(status.poller.lastError ?? null).toBeNull();
  expect(status.sse.state).toBe('connected');
  expect(sd.requests.some((r) => r.path.startsWith('/messages/peek'))).toBe(true);
  return run;
}

describe('TLS with a private CA', () => {
  it('without the CA: refused, and the cause (unknown issuer) logged once at the default level', async () => {
    const f = await front(pki.valid);
    const run = await runChild(scenario({ base: `https://127.0.0.1:${f.port}`, want: 1, runMs: 2500 }), { env: cleanNetworkEnv(), timeoutMs: 30_000 });
    expect(run.code, run.stderr).toBe(0);
    expect(statusOf(run).poller.lastError).toMatch(/UnknownIssuer|certificate/i);
    // REST and the stream both failed, many times, against one host: one warning.
    const warnings = lines(run.stderr, /TLS connection to/);
    expect(warnings, run.stderr).toHaveLength(1);
    expect(warnings[0]).toMatch(/WARN/);
    expect(warnings[0]).toContain(`127.0.0.1:${f.port}`);
    expect(warnings[0]).toMatch(/unknown issuer/);
    expect(warnings[0]).toMatch(/NODE_EXTRA_CA_CERTS/);
    expect(sd.requests).toHaveLength(0);
  });

  it.each([
    ['expired', 'expired', /has expired/],
    ['wrongName', 'name mismatch', /not valid for this host name/],
  ])('with the CA but a %s certificate: the cause is named (%s)', async (which, label, text) => {
    const f = await front(pki[which]);
    const run = await runChild(scenario({ base: `https://127.0.0.1:${f.port}`, want: 1, runMs: 2500 }), {
      env: cleanNetworkEnv({ NODE_EXTRA_CA_CERTS: pki.caFile }), timeoutMs: 30_000,
    });
    expect(run.code, run.stderr).toBe(0);
    const warnings = lines(run.stderr, /TLS connection to/);
    expect(warnings, run.stderr).toHaveLength(1);
    expect(warnings[0]).toContain(label);
    expect(warnings[0]).toMatch(text);
    expect(got(run)).toEqual([]);
  });

  it('NODE_EXTRA_CA_CERTS: messages arrive over REST and SSE, nothing is logged', async () => {
    const f = await front(pki.valid);
    const run = await deliversBoth(`https://127.0.0.1:${f.port}`, { NODE_EXTRA_CA_CERTS: pki.caFile });
    expect(run.stderr.trim()).toBe('');
  });

  it('NODE_TLS_REJECT_UNAUTHORIZED=0: works without the CA, and warns once', async () => {
    const f = await front(pki.valid);
    const run = await deliversBoth(`https://127.0.0.1:${f.port}`, { NODE_TLS_REJECT_UNAUTHORIZED: '0' });
    const ours = lines(run.stderr, /cleo_runtime/);
    expect(ours, run.stderr).toHaveLength(1);
    expect(ours[0]).toMatch(/WARN.*NODE_TLS_REJECT_UNAUTHORIZED is '0'.*not verified/);
  });

  it('an unreadable NODE_EXTRA_CA_CERTS is one warning naming the file; the system roots stay', async () => {
    const f = await front(pki.valid);
    const run = await runChild(scenario({ base: `https://127.0.0.1:${f.port}`, want: 1, runMs: 1500 }), {
      env: cleanNetworkEnv({ NODE_EXTRA_CA_CERTS: '/nonexistent/ca.pem' }), timeoutMs: 30_000,
    });
    expect(run.code, run.stderr).toBe(0);
    expect(lines(run.stderr, /nonexistent\/ca\.pem/).filter((l) => /cleo_runtime/.test(l))).toHaveLength(1);
    expect(lines(run.stderr, /TLS connection to .*unknown issuer/)).toHaveLength(1);
  });

  it('no system CA certificates at all: no crash; http works, https names the cause', async () => {
    const f = await front(pki.valid);
    // rustls-native-certs reads only these when they are set: an empty file, no directory.
    const empty = { SSL_CERT_FILE: '/dev/null', SSL_CERT_DIR: '/nonexistent' };
    const tls = await runChild(scenario({ base: `https://127.0.0.1:${f.port}`, want: 1, runMs: 1500 }), { env: cleanNetworkEnv(empty), timeoutMs: 30_000 });
    expect(tls.code, tls.stderr).toBe(0);
    expect(tls.stderr).not.toMatch(/panicked/);
    expect(lines(tls.stderr, /no system CA certificates/)).toHaveLength(1);
    expect(lines(tls.stderr, /TLS connection to .*unknown issuer/)).toHaveLength(1);
    await deliversBoth(sd.url, empty);
  });
});

describe('proxies from the environment (Node\'s own fetch ignores them)', () => {
  it('HTTP_PROXY carries REST and the stream to a host only the proxy can resolve', async () => {
    const p = await proxy();
    const port = new URL(sd.url).port;
    const base = `http://${PROXIED_HOST}:${port}`;
    const run = await deliversBoth(base, { HTTP_PROXY: p.url.replace('://', '://user:secret@') });
    expect(p.requests).toContain(`GET ${base}/messages/stream`);
    expect(p.requests.some((r) => r.startsWith(`GET ${base}/messages/peek?`))).toBe(true);
    // Credentials in the proxy URL become Proxy-Authorization (basic), as curl does.
    expect(p.auth[0]).toBe(`Basic ${Buffer.from('user:secret').toString('base64')}`);
    // Node's fetch in the same process went direct and could not resolve the name.
    expect(run.stdout).toMatch(/FETCH failed ENOTFOUND/);
  });

  it('HTTPS_PROXY tunnels (CONNECT) to a private-CA server, REST and the stream', async () => {
    const p = await proxy();
    const f = await front(pki.valid);
    const base = `https://${PROXIED_HOST}:${f.port}`;
    await deliversBoth(base, { HTTPS_PROXY: p.url, NODE_EXTRA_CA_CERTS: pki.caFile });
    expect(p.requests.length).toBeGreaterThanOrEqual(2);
    expect(new Set(p.requests)).toEqual(new Set([`CONNECT ${PROXIED_HOST}:${f.port}`]));
  });

  it('ALL_PROXY is used when no scheme-specific proxy is set', async () => {
    const p = await proxy();
    const base = `http://${PROXIED_HOST}:${new URL(sd.url).port}`;
    await deliversBoth(base, { ALL_PROXY: p.url });
    expect(p.requests).toContain(`GET ${base}/messages/stream`);
  });

  it('NO_PROXY hosts go direct; loopback is proxied unless listed', async () => {
    const p = await proxy();
    await deliversBoth(sd.url, { HTTP_PROXY: p.url, NO_PROXY: 'localhost,127.0.0.1' });
    expect(p.requests).toEqual([]);
    // Without NO_PROXY even 127.0.0.1 goes through the proxy: no implicit loopback bypass.
    const again = await runChild(scenario({ base: sd.url, want: 1, runMs: 1500 }), { env: cleanNetworkEnv({ HTTP_PROXY: p.url }), timeoutMs: 30_000 });
    expect(again.code, again.stderr).toBe(0);
    expect(p.requests.some((r) => r.startsWith(`GET ${sd.url}/messages/peek?`))).toBe(true);
  });
});
