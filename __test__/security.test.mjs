// Security: API keys never appear in a log line (at the most verbose level), an error
// message, a status, a panic or a URL; ids stay inside their URL path segment ("." and ".."
// are refused, clearly); plain http:// to a host other than loopback is warned about once.
// Scenarios run in child processes, whose stderr (the log) and stdout are scanned whole.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AgentPoller, HeartbeatService, HttpTransport } from '@cleocode/runtime';
import { startSignalDock } from '../testing/signaldock-server.mjs';
import { runChild, waitFor } from './support/helpers.mjs';

// Distinctive keys, so a hit is never a coincidence.
const KEY = 'sk-live-Q7f3KEYalpha';
const ROTATED = 'sk-live-Z9r2KEYbravo';
const WRONG = 'sk-live-W4w4KEYwrong';
const BOB = 'sk-live-B0b0KEYbob';
const ALL_KEYS = [KEY, ROTATED, WRONG, BOB];

let sd;
beforeAll(async () => { sd = await startSignalDock({ agents: { alice: KEY, bob: BOB }, heartbeatMs: 200 }); });
afterAll(async () => { await sd.close(); });

/** Every occurrence of any key in `text`, with some context, for a readable failure. */
function keyHits(text, keys = ALL_KEYS) {
  const hits = [];
  for (const line of text.split('\n')) {
    for (const key of keys) {
      // Also a key cut in half by a formatter, or URL-encoded: its first 12 characters.
      if (line.includes(key.slice(0, 12))) hits.push(`${key}: ${line.slice(0, 300)}`);
    }
  }
  return hits;
}

function expectNoKeyInRequests() {
  for (const r of sd.requests) {
    const url = `${r.path}?${new URLSearchParams(r.query)}`;
    expect(keyHits(url)).toEqual([]);
    expect(keyHits(decodeURIComponent(url.replace(/%(?![0-9a-f]{2})/gi, '%25')))).toEqual([]);
    for (const p of ['token', 'api_key', 'apiKey', 'key', 'access_token']) expect(r.query).not.toHaveProperty(p);
  }
}

describe('API keys never leak', () => {
  it('a representative run at CLEO_RUNTIME_LOG=trace: no key in any log line, error, status or URL', async () => {
    sd.clearRequests();
    const run = await runChild(`
      import { createRuntime, AgentPoller, HeartbeatService, HttpTransport, SseTransport, SseConnectionService } from '@cleocode/runtime';
      const url = ${JSON.stringify(sd.url)};
      const KEY = ${JSON.stringify(KEY)}, ROTATED = ${JSON.stringify(ROTATED)}, WRONG = ${JSON.stringify(WRONG)};
      const control = (path, body) => fetch(url + '/_test/' + path, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) }).then((r) => r.json());
      const report = (what, value) => console.log('REPORT', what, JSON.stringify(value));
      const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
      const old = '2000-01-01T00:00:00.000Z';
      const cred = { agentId: 'alice', displayName: 'alice', apiKey: KEY, apiBaseUrl: url, isActive: true, createdAt: old, updatedAt: old,
        transportConfig: { sseEndpoint: url + '/messages/stream' } };
      let rotated = 0;
      const registry = {
        get: async () => cred, getActive: async () => cred,
        async rotateKey(id) {
          rotated += 1;
          await control('add-key', { id: 'alice', key: ROTATED });
          cred.apiKey = ROTATED; cred.updatedAt = new Date().toISOString();
          return { agentId: id, newApiKey: ROTATED };
        },
      };
      // Faults whose error texts would carry the key if anything quoted it.
      await control('inject', { rule: { path: '/messages/peek', status: 401, times: 2, message: 'key ' + KEY + ' expired' } });
      await control('inject', { rule: { path: '/messages/ack', status: 500, times: 1, message: 'ack failed for ' + KEY } });
      await control('inject', { rule: { path: '/agents/alice/heartbeat', reset: true, times: 1 } });
      await control('inject', { rule: { path: '/conversations/g1/messages', malformed: true, times: 1 } });
      await control('inject', { rule: { path: '/messages/stream', status: 503, retryAfter: 1, times: 1, message: 'no stream for ' + KEY } });

      const handle = await createRuntime(registry, { pollIntervalMs: 200, heartbeatIntervalMs: 300, groupConversationIds: ['g1'] });
      const got = [];
      handle.poller.onMessage(async (m) => { got.push(m.content); if (m.content.includes('throw')) throw new Error('handler saw ' + m.content); });
      for (let i = 0; i < 5; i++) await control('send', { from: 'bob', to: 'alice', content: 'dm ' + i });
      await control('post', { conversationId: 'g1', from: 'bob', content: '@alice group' });
      await control('send', { from: 'bob', to: 'alice', content: 'please throw' });
      // The rotation check is 5 s after start; the old key then expires on the server.
      const deadline = Date.now() + 15000;
      while (rotated === 0 && Date.now() < deadline) await sleep(50);
      await sleep(400);
      await control('expire-key', { key: KEY });
      await control('drop-streams', { agentId: 'alice' });
      await control('send', { from: 'bob', to: 'alice', content: 'after rotation' });
      while (!got.includes('after rotation') && Date.now() < deadline) await sleep(50);
      report('got', got);
      report('poller', handle.poller.status());
      report('heartbeat', handle.heartbeat.status());
      report('rotation', handle.keyRotation.status());
      report('sse', handle.sseConnection.status());
      report('transport', handle.transport.status());
      handle.stop();

      // Standalone pieces with refused keys, dead hosts and echoing servers.
      const errors = [];
      const t = new HttpTransport();
      await t.connect({ agentId: 'alice', apiKey: WRONG, apiBaseUrl: url });
      for (const call of [() => t.poll(), () => t.ack(['x']), () => t.push('bob', 'hi')]) {
        try { await call(); } catch (e) { errors.push(String(e.message)); errors.push(String(e.stack)); }
      }
      const dead = new HttpTransport();
      await dead.connect({ agentId: 'alice', apiKey: WRONG, apiBaseUrl: 'http://127.0.0.1:9', apiBaseUrlFallback: 'http://127.0.0.1:7' });
      try { await dead.poll(); } catch (e) { errors.push(String(e.message)); }
      await control('add-key', { id: 'alice', key: KEY });
      await control('inject', { rule: { path: '/messages', status: 400, times: 1, message: 'bad request with ' + KEY } });
      const echo = new HttpTransport();
      await echo.connect({ agentId: 'alice', apiKey: KEY, apiBaseUrl: url });
      try { await echo.push('bob', 'x'); } catch (e) { errors.push(String(e.message)); }
      const sse = new SseTransport();
      await sse.connect({ agentId: 'alice', apiKey: WRONG, apiBaseUrl: url });
      report('sse-wrong-key', sse.status());
      await sse.disconnect();
      const p = new AgentPoller({ agentId: 'alice', apiKey: WRONG, apiBaseUrl: url, pollIntervalMs: 50, groupConversationIds: ['g1'] });
      p.onMessage(() => {});
      p.start();
      const hb = new HeartbeatService({ agentId: 'alice', apiKey: WRONG, apiBaseUrl: url, intervalMs: 50 });
      hb.start();
      await sleep(300);
      report('poller-wrong-key', p.status());
      report('heartbeat-wrong-key', hb.status());
      p.stop(); hb.stop();
      // A JS transport and registry whose errors quote the key: scrubbed on the way out.
      try {
        await createRuntime(registry, { transport: { name: 'leaky', async connect(c) { throw new Error('cannot connect with ' + c.apiKey); }, async poll() { return []; } } });
      } catch (e) { errors.push(String(e.message)); }
      try {
        new AgentPoller({ agentId: 'alice', apiKey: KEY, apiBaseUrl: KEY });
      } catch (e) { errors.push(String(e.message)); }
      try {
        new SseConnectionService({ agentId: 'alice', apiKey: KEY, apiBaseUrl: url, sseEndpoint: KEY, transport: { connect() {}, disconnect() {} } });
      } catch (e) { errors.push(String(e.message)); }
      report('errors', errors);
    `, { timeoutMs: 40_000, env: { CLEO_RUNTIME_LOG: 'trace' } });
    expect(run.code, run.stderr.slice(-3000)).toBe(0);
    const reports = Object.fromEntries(run.stdout.split('\n').filter((l) => l.startsWith('REPORT ')).map((l) => {
      const [, what, ...json] = l.split(' ');
      return [what, JSON.parse(json.join(' '))];
    }));
    // The scenario really ran: messages flowed, the key rotated, errors were produced.
    expect(reports.got).toEqual(expect.arrayContaining(['dm 0', 'dm 4', '@alice group', 'please throw', 'after rotation']));
    expect(reports.rotation.rotations).toBe(1);
    expect(reports.poller.failed).toBe(1);
    expect(reports.errors.length).toBeGreaterThanOrEqual(8);
    expect(reports.errors.join('\n')).toMatch(/401/);
    expect(reports.errors.join('\n')).toMatch(/\[redacted\]/);
    expect(reports['sse-wrong-key'].lastError).toMatch(/401/);
    expect(reports['poller-wrong-key'].lastError).toMatch(/401/);
    // Trace level really is on, and covers requests and the stream.
    const lines = run.stderr.split('\n');
    expect(lines.filter((l) => l.includes('TRACE')).length).toBeGreaterThan(50);
    expect(run.stderr).toMatch(/SignalDock request/);
    // The scan: every line of the log and of the reports, every request URL.
    expect(keyHits(run.stderr)).toEqual([]);
    expect(keyHits(run.stdout)).toEqual([]);
    expect(run.stderr).not.toMatch(/panicked|RUST_BACKTRACE/);
    expectNoKeyInRequests();
    // Keys travelled where they belong, and only there.
    expect(sd.requests.some((r) => r.headers.authorization === `Bearer ${ROTATED}`)).toBe(true);
  }, 60_000);

  it('a panic-free run under RUST_BACKTRACE with the key in every string field of a config', async () => {
    const run = await runChild(`
      import { AgentPoller, HeartbeatService, KeyRotationService, createRuntime } from '@cleocode/runtime';
      const KEY = ${JSON.stringify(KEY)};
      const tries = [
        () => new AgentPoller({ agentId: KEY, apiKey: KEY, apiBaseUrl: 'http://' + KEY }),
        () => new AgentPoller({ agentId: 'a', apiKey: KEY, apiBaseUrl: 'x', groupConversationIds: [KEY, 5] }),
        () => new HeartbeatService({ agentId: 'a', apiKey: KEY, apiBaseUrl: KEY }),
        () => new HeartbeatService({ agentId: 'a', apiKey: KEY, apiBaseUrl: 'http://127.0.0.1:1', intervalMs: KEY }),
        () => new KeyRotationService({ agentId: 'a', registry: KEY }),
      ];
      for (const t of tries) { try { t(); console.log('NO ERROR'); } catch (e) { console.log('ERROR', e.message); } }
      const reg = { get: async () => ({ agentId: 'a', apiKey: KEY, apiBaseUrl: KEY }), getActive: async () => ({ agentId: 'a', apiKey: KEY, apiBaseUrl: 'ftp://' + KEY }), rotateKey: async () => ({}) };
      for (const cfg of [undefined, { agentId: 'a' }, { sseEndpoint: KEY }, { groupConversationIds: ['g'] }]) {
        try { const h = await createRuntime(reg, cfg); h.stop(); console.log('STARTED'); } catch (e) { console.log('ERROR', e.message); }
      }
    `, { env: { CLEO_RUNTIME_LOG: 'trace', RUST_BACKTRACE: '1' } });
    expect(run.code, run.stderr.slice(-2000)).toBe(0);
    expect(run.stdout).toMatch(/ERROR/);
    expect(keyHits(run.stdout)).toEqual([]);
    expect(keyHits(run.stderr)).toEqual([]);
    expect(run.stderr).not.toMatch(/panicked/);
  }, 30_000);
});

describe('keys quoted back by JS', () => {
  it('a handler or transport error that quotes the key never reaches status().lastError or the log with it', async () => {
    const source = `
      import { AgentPoller } from '@cleocode/runtime';
      const KEY = ${JSON.stringify(KEY)};
      const transport = {
        name: 'quoting',
        n: 0,
        async poll() {
          this.n += 1;
          if (this.n === 1) throw new Error('transport refused key ' + KEY);
          return this.n === 2 ? [{ id: 'm1', from: 'bob', content: 'x', timestamp: new Date().toISOString() }] : [];
        },
        async ack() {},
      };
      const p = new AgentPoller({ agentId: 'alice', apiKey: KEY, apiBaseUrl: 'local', pollIntervalMs: 50, transport });
      const seen = [];
      p.onMessage(() => { throw new Error('handler saw ' + KEY); });
      p.start();
      while (p.status().failed < 1) { seen.push(p.status().lastError); await new Promise((r) => setTimeout(r, 10)); }
      seen.push(p.status().lastError);
      p.stop();
      console.log(JSON.stringify(seen.filter(Boolean)));
    `;
    const { code, stdout, stderr } = await runChild(source, { env: { CLEO_RUNTIME_LOG: 'trace' } });
    expect(code, stderr).toBe(0);
    const errors = JSON.parse(stdout.trim());
    expect(errors.some((e) => e.startsWith('handler:'))).toBe(true);
    expect(errors.some((e) => e.includes('transport refused key'))).toBe(true);
    expect(keyHits(stdout)).toEqual([]);
    expect(keyHits(stderr)).toEqual([]);
  });
});

describe('ids stay inside their path segment', () => {
  const nasty = ['a/b', '..x', 'x..', 'q?x=1', 'h#frag', '100%', '%2F', 'with space', 'zoë', '日本', 'a/../b', '?#%/ ü'];

  it('conversation ids, as group polls and pushes, reach the server as one segment each', async () => {
    sd.clearRequests();
    for (const id of nasty) sd.postToConversation(id, 'bob', `@alice in ${id}`);
    const p = new AgentPoller({ agentId: 'alice', apiKey: KEY, apiBaseUrl: sd.url, pollIntervalMs: 100, groupConversationIds: nasty });
    const got = [];
    p.onMessage((m) => { got.push(m.threadId); });
    p.start();
    try {
      await waitFor(() => got.length === nasty.length, { what: 'one mention per conversation' });
    } finally { p.stop(); }
    expect([...got].sort()).toEqual([...nasty].sort());
    const t = new HttpTransport();
    await t.connect({ agentId: 'alice', apiKey: KEY, apiBaseUrl: sd.url });
    for (const id of nasty) await t.push('bob', `to ${id}`, { conversationId: id });
    await t.disconnect();
    const segments = sd.requests.filter((r) => r.path.startsWith('/conversations/')).map((r) => r.path.split('/'));
    for (const id of nasty) {
      const hits = segments.filter((s) => s.length === 4 && s[3] === 'messages' && decodeURIComponent(s[2]) === id);
      // Polled at least once, and pushed once.
      expect(hits.length, id).toBeGreaterThanOrEqual(2);
    }
    expect(segments.every((s) => s.length === 4)).toBe(true);
  });

  it('agent ids: the heartbeat path is one segment, the peek carries the id as an encoded query value', async () => {
    sd.clearRequests();
    const agents = ['we/ird ?#%id', 'a..b', 'zoë/x'];
    for (const agentId of agents) {
      const hb = new HeartbeatService({ agentId, apiKey: KEY, apiBaseUrl: sd.url, intervalMs: 60_000 });
      hb.start();
      const p = new AgentPoller({ agentId, apiKey: KEY, apiBaseUrl: sd.url, pollIntervalMs: 60_000 });
      p.onMessage(() => {});
      p.start();
      try {
        await waitFor(() => hb.status().beats + hb.status().consecutiveFailures >= 1 && p.status().polls >= 1
          // Node reads header bytes as latin1: decode the UTF-8 the runtime sent.
          && sd.requests.some((r) => r.path === '/messages/peek' && Buffer.from(r.headers['x-agent-id'] ?? '', 'latin1').toString('utf8') === agentId), { what: `requests for ${agentId}` });
      } finally { hb.stop(); p.stop(); }
      const beat = sd.requests.find((r) => r.method === 'POST' && r.path.endsWith('/heartbeat') && decodeURIComponent(r.path.split('/')[2]) === agentId);
      expect(beat, agentId).toBeTruthy();
      expect(beat.path.split('/')).toHaveLength(4);
    }
  });

  it('"." and ".." cannot be an id in a path: refused with a clear error, nothing sent', async () => {
    sd.clearRequests();
    for (const id of ['.', '..']) {
      expect(() => new HeartbeatService({ agentId: id, apiKey: KEY, apiBaseUrl: sd.url })).toThrow(TypeError);
      expect(() => new HeartbeatService({ agentId: id, apiKey: KEY, apiBaseUrl: sd.url })).toThrow(/agentId.*"\.{1,2}"|cannot be used as an id/);
      expect(() => new AgentPoller({ agentId: 'alice', apiKey: KEY, apiBaseUrl: sd.url, groupConversationIds: ['ok', id] }))
        .toThrow(/groupConversationIds\[1\]/);
    }
    const t = new HttpTransport();
    await t.connect({ agentId: 'alice', apiKey: KEY, apiBaseUrl: sd.url });
    await expect(t.push('bob', 'x', { conversationId: '..' })).rejects.toThrow(/"\.\." cannot be used as an id in a URL path/);
    await expect(t.push('bob', 'x', { conversationId: '.' })).rejects.toThrow(/"\." cannot be used as an id in a URL path/);
    await t.disconnect();
    expect(sd.requests.filter((r) => r.path.startsWith('/conversations') || r.path.startsWith('/agents'))).toEqual([]);
  });
});

describe('plain http to a host other than loopback', () => {
  it('warns exactly once per process, at the default level, without any network I/O', async () => {
    const run = await runChild(`
      import { AgentPoller, HeartbeatService, SseConnectionService } from '@cleocode/runtime';
      // Constructed, never started: nothing leaves this machine.
      new HeartbeatService({ agentId: 'a', apiKey: 'k', apiBaseUrl: 'http://127.0.0.1:1' });
      new HeartbeatService({ agentId: 'a', apiKey: 'k', apiBaseUrl: 'http://localhost:1' });
      new HeartbeatService({ agentId: 'a', apiKey: 'k', apiBaseUrl: 'http://[::1]:1' });
      new HeartbeatService({ agentId: 'a', apiKey: 'k', apiBaseUrl: 'https://example.invalid' });
      console.log('before');
      new HeartbeatService({ agentId: 'a', apiKey: 'k', apiBaseUrl: 'http://example.invalid' });
      new HeartbeatService({ agentId: 'a', apiKey: 'k', apiBaseUrl: 'http://example.invalid:8080/api' });
      new AgentPoller({ agentId: 'a', apiKey: 'k', apiBaseUrl: 'http://10.0.0.1' });
      new SseConnectionService({ agentId: 'a', apiKey: 'k', apiBaseUrl: 'http://example.invalid', sseEndpoint: 'http://example.invalid/stream', transport: { connect() {}, disconnect() {} } });
      console.log('after');
    `, { env: { CLEO_RUNTIME_LOG: undefined } });
    expect(run.code, run.stderr).toBe(0);
    const warnings = run.stderr.split('\n').filter((l) => /plain http/.test(l));
    expect(warnings).toHaveLength(1);
    expect(warnings[0]).toMatch(/WARN/);
    expect(warnings[0]).toMatch(/example\.invalid/);
    expect(warnings[0]).not.toMatch(/\bk\b.*\bk\b/);
    // Nothing else at the default level.
    expect(run.stderr.split('\n').filter((l) => l.trim() !== '')).toHaveLength(1);
  });

  it('no warning at all for https and loopback', async () => {
    const run = await runChild(`
      import { HeartbeatService } from '@cleocode/runtime';
      for (const u of ['http://127.0.0.1:1', 'http://127.8.9.1:1', 'http://localhost:1', 'http://LOCALHOST:1', 'http://[::1]:1', 'https://example.invalid']) {
        new HeartbeatService({ agentId: 'a', apiKey: 'k', apiBaseUrl: u });
      }
    `, { env: { CLEO_RUNTIME_LOG: undefined } });
    expect(run.code, run.stderr).toBe(0);
    expect(run.stderr).toBe('');
  });
});
