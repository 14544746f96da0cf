// Edges found on the way to a daemon that never dies silently: an SSE line with an unknown
// field is ignored (the SSE standard) instead of costing the connection; an agent id that no
// HTTP header can carry (newline, CR, NUL, other control characters) is a TypeError naming
// the field at config time, without the raw id in the text; the base64 forms of the key
// (and of `Bearer <key>`) are scrubbed like the key itself; a 3xx on a REST call is reported
// as a configuration error naming the status and the Location host, never followed.
import http from 'node:http';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  AgentPoller, HeartbeatService, KeyRotationService, SseConnectionService, HttpTransport, SseTransport, LocalTransport,
  createRuntime,
} from '@cleocode/runtime';
import { startSignalDock } from '../testing/signaldock-server.mjs';
import { FakeRegistry, FakeTransport, credential, runChild, waitFor } from './support/helpers.mjs';

const KEY = 'sk-live-E6g3KEYedges';
let sd;
const cleanup = [];
beforeAll(async () => { sd = await startSignalDock({ agents: { alice: KEY, bob: 'key-b' } }); });
afterEach(async () => { for (const f of cleanup.splice(0)) await f(); sd.clearFaults(); });
afterAll(async () => { await sd.close(); });

describe('SSE: a line with an unknown field is ignored', () => {
  it.each([
    ['x-custom: 1', 'x-custom: 1\n\n'],
    ['an unknown field inside an event', 'x-trace: abc\ndata: {"type":"heartbeat"}\n\n'],
    ['a field name without a colon', 'justaname\n\n'],
  ])('%s: the stream stays up and the next event on it is delivered', async (_name, raw) => {
    const stream = new SseTransport();
    cleanup.push(() => stream.disconnect());
    await stream.connect({ agentId: 'alice', apiKey: KEY, apiBaseUrl: sd.url });
    await waitFor(() => stream.status().state === 'connected', { what: 'stream up' });
    const got = [];
    stream.subscribe((m) => { got.push(m.content); });
    expect(sd.sseSendRaw('alice', raw)).toBe(1);
    // Written straight into this connection, with no event id: only this connection can
    // deliver it (a reconnect's replay would not).
    sd.sseSendRaw('alice', `data: ${JSON.stringify({ message_id: `raw-${Math.random()}`, from_agent_id: 'bob', content: 'right after' })}\n\n`);
    await waitFor(() => got.includes('right after'), { what: 'the event after the unknown field', timeoutMs: 10_000 });
    expect(stream.status().reconnects).toBe(0);
    expect(stream.status().state).toBe('connected');
  });
});

describe('agent ids no HTTP header can carry', () => {
  const BAD = [['newline', 'ali\nce'], ['CR', 'ali\rce'], ['NUL', 'ali\0ce'], ['CRLF header injection', 'alice\r\nX-Evil: 1']];

  it.each(BAD)('%s: a TypeError naming agentId from every service, without the raw id', (_name, id) => {
    const attempts = [
      () => new AgentPoller({ agentId: id, apiKey: KEY, apiBaseUrl: sd.url }),
      () => new AgentPoller({ agentId: id, apiKey: KEY, apiBaseUrl: 'x', transport: new FakeTransport() }),
      () => new HeartbeatService({ agentId: id, apiKey: KEY, apiBaseUrl: sd.url }),
      () => new KeyRotationService({ agentId: id, registry: new FakeRegistry() }),
      () => new SseConnectionService({ agentId: id, apiKey: KEY, apiBaseUrl: sd.url, transport: new FakeTransport() }),
    ];
    for (const attempt of attempts) {
      let thrown;
      try { attempt(); } catch (e) { thrown = e; }
      expect(thrown, attempt.toString()).toBeInstanceOf(TypeError);
      expect(thrown.message).toMatch(/config\.agentId/);
      expect(thrown.message).not.toContain(id);
    }
  });

  it.each(BAD)('%s: the native transports\' connect() rejects with a TypeError naming agentId', async (_name, id) => {
    for (const transport of [new HttpTransport(), new SseTransport(), new LocalTransport({ dbPath: '/nonexistent/signaldock.db' })]) {
      const err = await transport.connect({ agentId: id, apiKey: KEY, apiBaseUrl: sd.url }).then(() => null, (e) => e);
      expect(err, transport.name).toBeInstanceOf(TypeError);
      expect(err.message).toMatch(/agentId/);
      expect(err.message).not.toContain(id);
    }
  });

  it.each(BAD)('%s: createRuntime rejects with a TypeError, for config.agentId and for the credential\'s agentId', async (_name, id) => {
    const fromConfig = await createRuntime(new FakeRegistry(credential('alice', KEY, sd.url)), { agentId: id }).then(() => null, (e) => e);
    expect(fromConfig).toBeInstanceOf(TypeError);
    expect(fromConfig.message).toMatch(/config\.agentId/);
    expect(fromConfig.message).not.toContain(id);
    const registry = { get: async () => credential(id, KEY, sd.url), getActive: async () => credential(id, KEY, sd.url), rotateKey: async () => ({}) };
    const fromCredential = await createRuntime(registry, { heartbeatIntervalMs: 0, maxKeyAgeMs: 0 }).then((h) => { h.stop(); return null; }, (e) => e);
    expect(fromCredential).toBeInstanceOf(TypeError);
    expect(fromCredential.message).toMatch(/credential.*agentId/);
    expect(fromCredential.message).not.toContain(id);
  });

  it('ids that headers do carry still work: a tab, unicode, spaces', () => {
    for (const id of ['a\tb', 'agent ünï', 'a b']) {
      const p = new AgentPoller({ agentId: id, apiKey: KEY, apiBaseUrl: sd.url });
      expect(p.status().running).toBe(false);
    }
  });
});

describe('the base64 forms of the key are scrubbed too', () => {
  it('a server quoting base64(key) and base64("Bearer " + key) back: not in lastError, rejections, or trace logs', async () => {
    const forms = [];
    for (const text of [KEY, `Bearer ${KEY}`]) {
      const b = Buffer.from(text);
      forms.push(b.toString('base64'), b.toString('base64').replace(/=+$/, ''), b.toString('base64url'));
    }
    const run = await runChild(`
      import { AgentPoller, HttpTransport, HeartbeatService } from '@cleocode/runtime';
      const url = ${JSON.stringify(sd.url)};
      const KEY = ${JSON.stringify(KEY)};
      const forms = ${JSON.stringify(forms)};
      const control = (path, body) => fetch(url + '/_test/' + path, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) }).then((r) => r.json());
      await control('inject', { rule: { pathRegex: '^/(messages|agents)/', status: 401, message: 'token not accepted: ' + forms.join(' / '), times: 'Infinity' } });
      const poller = new AgentPoller({ agentId: 'alice', apiKey: KEY, apiBaseUrl: url, pollIntervalMs: 50 });
      poller.onMessage(() => {});
      poller.start();
      const beat = new HeartbeatService({ agentId: 'alice', apiKey: KEY, apiBaseUrl: url, intervalMs: 50 });
      beat.start();
      const transport = new HttpTransport();
      await transport.connect({ agentId: 'alice', apiKey: KEY, apiBaseUrl: url });
      const rejected = await transport.poll({ limit: 5 }).then(() => 'resolved', (e) => e.message);
      await new Promise((r) => setTimeout(r, 500));
      console.log('REPORT ' + JSON.stringify({ poller: poller.status().lastError, beat: beat.status().lastError, rejected }));
      poller.stop(); beat.stop(); await transport.disconnect();
      await control('clear-faults', {});
    `, { env: { CLEO_RUNTIME_LOG: 'trace' } });
    expect(run.code, run.stderr).toBe(0);
    const report = JSON.parse(run.stdout.split('\n').find((l) => l.startsWith('REPORT ')).slice(7));
    // The errors are there, and say what happened...
    expect(report.poller).toMatch(/401/);
    expect(report.beat).toMatch(/401/);
    expect(report.rejected).toMatch(/401/);
    // ...without any form of the key.
    for (const text of [run.stdout, run.stderr]) {
      for (const form of [...forms, KEY]) expect(text).not.toContain(form);
    }
    expect(run.stderr.length).toBeGreaterThan(0);
  });
});

describe('REST calls do not follow redirects', () => {
  let redirector;
  let target;
  const hits = [];
  beforeAll(async () => {
    target = http.createServer((req, res) => { hits.push(`${req.method} ${req.url} ${req.headers['x-agent-id']}`); res.end('{"success":true,"data":{"messages":[]}}'); });
    await new Promise((r) => target.listen(0, '127.0.0.1', r));
    const where = `http://127.0.0.1:${target.address().port}`;
    redirector = http.createServer((req, res) => { res.writeHead(req.method === 'GET' ? 302 : 307, { location: `${where}${req.url}` }); res.end(); });
    await new Promise((r) => redirector.listen(0, '127.0.0.1', r));
  });
  afterAll(async () => {
    await new Promise((r) => redirector.close(r));
    await new Promise((r) => target.close(r));
  });

  it('a 3xx is a configuration error naming the status and the Location host; nothing reaches that host', async () => {
    const base = `http://127.0.0.1:${redirector.address().port}`;
    const host = `127.0.0.1:${target.address().port}`;
    const poller = new AgentPoller({ agentId: 'alice', apiKey: KEY, apiBaseUrl: base, pollIntervalMs: 50 });
    cleanup.push(() => poller.stop());
    poller.onMessage(() => {});
    poller.start();
    const beat = new HeartbeatService({ agentId: 'alice', apiKey: KEY, apiBaseUrl: base, intervalMs: 50 });
    cleanup.push(() => beat.stop());
    beat.start();
    await waitFor(() => poller.status().lastError && beat.status().lastError, { what: 'errors' });
    const transport = new HttpTransport();
    await transport.connect({ agentId: 'alice', apiKey: KEY, apiBaseUrl: base });
    cleanup.push(() => transport.disconnect());
    const pushed = await transport.push('bob', 'hi').then(() => 'resolved', (e) => e.message);
    for (const text of [poller.status().lastError, beat.status().lastError, pushed]) {
      expect(text).toMatch(/redirect/i);
      expect(text).toMatch(/30[27]/);
      expect(text).toContain(host);
      expect(text).not.toContain(KEY);
    }
    expect(hits).toEqual([]);
  });
});
