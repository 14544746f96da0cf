// Bad input gets a clear answer, never a crash: invalid configs of every exported
// constructor, `connect()` config and createRuntime, and hostile data from the server (huge
// content, deep nesting, wrong types, lone surrogates and bytes that are not UTF-8, endless
// SSE lines, ids that repeat with different content). Each hostile row is skipped (or mapped,
// with U+FFFD for a broken character), counted once, and never takes the rows around it
// down with it; memory stays bounded.
import http from 'node:http';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  AgentPoller, HeartbeatService, HttpTransport, KeyRotationService, LocalTransport, SseConnectionService,
  SseTransport, createRuntime,
} from '@cleocode/runtime';
import { startSignalDock } from '../testing/signaldock-server.mjs';
import { FakeRegistry, credential, runChild, sleep, waitFor } from './support/helpers.mjs';

const SERVER_MODULE = new URL('../testing/signaldock-server.mjs', import.meta.url).href;
let sd;
const cleanup = [];
beforeEach(async () => { sd = await startSignalDock({ agents: { alice: 'key-a', bob: 'key-b' } }); });
afterEach(async () => {
  for (const stop of cleanup.splice(0).reverse()) {
    try { await stop(); } catch { /* best effort */ }
  }
  await sd.close();
});

function poller(config = {}) {
  const p = new AgentPoller({ agentId: 'alice', apiKey: 'key-a', apiBaseUrl: sd.url, pollIntervalMs: 100, ...config });
  cleanup.push(() => p.stop());
  return p;
}

/** Whatever `make` does (throw, or return a promise that rejects), the error it ends in. */
async function failure(make) {
  try {
    await make();
  } catch (e) {
    return e;
  }
  throw new Error('expected a failure');
}

const jsTransport = () => ({ name: 'js', async connect() {}, async disconnect() {}, async poll() { return []; }, async ack() {} });

// ==========================================================================================
describe('invalid configs: a TypeError naming the field', () => {
  const base = { agentId: 'alice', apiKey: 'k', apiBaseUrl: 'http://127.0.0.1:9' };

  it.each([
    ['config', undefined],
    ['config', 'alice'],
    ['config', 42],
    ['agentId', { ...base, agentId: undefined }],
    ['agentId', { ...base, agentId: '' }],
    ['agentId', { ...base, agentId: ['alice'] }],
    ['apiKey', { ...base, apiKey: undefined }],
    ['apiKey', { ...base, apiKey: 12345 }],
    ['apiBaseUrl', { ...base, apiBaseUrl: 42 }],
    ['apiBaseUrl', { ...base, apiBaseUrl: '' }],
    ['apiBaseUrl', { ...base, apiBaseUrl: 'ftp://127.0.0.1' }],
    ['apiBaseUrl', { ...base, apiBaseUrl: 'http://' }],
    ['apiBaseUrl', { ...base, apiBaseUrl: '://nope' }],
    ['pollIntervalMs', { ...base, pollIntervalMs: Infinity }],
    ['pollIntervalMs', { ...base, pollIntervalMs: '100' }],
    ['pollIntervalMs', { ...base, pollIntervalMs: 1e30 }],
    ['groupConversationIds', { ...base, groupConversationIds: { 0: 'a' } }],
    ['groupConversationIds[0]', { ...base, groupConversationIds: [''] }],
    ['groupConversationIds[0]', { ...base, groupConversationIds: ['..'] }],
    ['groupConversationIds[1]', { ...base, groupConversationIds: ['ok', '.'] }],
    ['groupPollLimit', { ...base, groupPollLimit: 1001 }],
    ['groupPollLimit', { ...base, groupPollLimit: '15' }],
    ['transport', { ...base, transport: 'http' }],
    ['transport', { ...base, transport: () => {} }],
  ])('AgentPoller: %s', (field, config) => {
    const e = (() => { try { new AgentPoller(config); } catch (err) { return err; } return null; })();
    expect(e).toBeInstanceOf(TypeError);
    expect(e.message).toContain(field);
    expect(e.message).toMatch(/^AgentPoller: /);
  });

  it.each([
    ['config', null],
    ['agentId', { ...base, agentId: 7 }],
    ['agentId', { ...base, agentId: '..' }],
    ['agentId', { ...base, agentId: '.' }],
    ['apiKey', { ...base, apiKey: null }],
    ['apiBaseUrl', { ...base, apiBaseUrl: undefined }],
    ['apiBaseUrl', { ...base, apiBaseUrl: 'localhost:3000' }],
    ['intervalMs', { ...base, intervalMs: -1 }],
    ['intervalMs', { ...base, intervalMs: NaN }],
  ])('HeartbeatService: %s', (field, config) => {
    const make = () => new HeartbeatService(config);
    expect(make).toThrow(TypeError);
    expect(make).toThrow(field);
  });

  it.each([
    ['config', 'x'],
    ['agentId', { registry: new FakeRegistry() }],
    ['registry', { agentId: 'a', registry: 'reg' }],
    ['registry', { agentId: 'a', registry: { get() {}, rotateKey: 1 } }],
    ['checkIntervalMs', { agentId: 'a', registry: new FakeRegistry(), checkIntervalMs: 0 }],
    ['maxKeyAgeMs', { agentId: 'a', registry: new FakeRegistry(), maxKeyAgeMs: -5 }],
  ])('KeyRotationService: %s', (field, config) => {
    const make = () => new KeyRotationService(config);
    expect(make).toThrow(TypeError);
    expect(make).toThrow(field);
  });

  it.each([
    ['config', undefined],
    ['config', 'sse'],
    ['agentId', { ...base, transport: jsTransport(), agentId: 3 }],
    ['apiKey', { ...base, transport: jsTransport(), apiKey: '' }],
    ['apiBaseUrl', { ...base, transport: jsTransport(), apiBaseUrl: false }],
    ['sseEndpoint', { ...base, transport: jsTransport(), sseEndpoint: 'stream' }],
    ['sseEndpoint', { ...base, transport: jsTransport(), sseEndpoint: 5 }],
    ['transport', { ...base }],
    ['transport', { ...base, transport: 5 }],
    ['transport', { ...base, transport: { connect() {} } }],
  ])('SseConnectionService: %s', (field, config) => {
    const make = () => new SseConnectionService(config);
    expect(make).toThrow(TypeError);
    expect(make).toThrow(field);
  });

  it.each([
    ['groupConversationIds[0]', { groupConversationIds: ['..'] }],
    ['groupPollLimit', { groupPollLimit: 0 }],
    ['pollIntervalMs', { pollIntervalMs: 'soon' }],
    ['heartbeatIntervalMs', { heartbeatIntervalMs: '30s' }],
    ['sseEndpoint', { sseEndpoint: 'not a url' }],
    ['transport', { transport: 'http' }],
    ['agentId', { agentId: '' }],
  ])('createRuntime: %s rejects (never throws) with a TypeError', async (field, config) => {
    const registry = new FakeRegistry(credential('alice', 'key-a', sd.url));
    let returned;
    expect(() => { returned = createRuntime(registry, config); }).not.toThrow();
    const e = await returned.catch((err) => err);
    expect(e).toBeInstanceOf(TypeError);
    expect(e.message).toContain(field);
  });

  it('createRuntime: a nonsense credential base URL or id is a clear rejection, not a crash', async () => {
    const nonsense = new FakeRegistry(credential('alice', 'key-a', 'http://'));
    await expect(createRuntime(nonsense, { groupConversationIds: ['g'] })).rejects.toThrow(/apiBaseUrl|http/);
    const dots = new FakeRegistry(credential('..', 'key-a', sd.url));
    await expect(createRuntime(dots, { maxKeyAgeMs: 0 })).rejects.toThrow(/"\.\."/);
  });

  it('onMessage and subscribe want functions', async () => {
    const svc = new SseConnectionService({ ...base, transport: jsTransport() });
    for (const bad of [undefined, null, 5, 'f', {}]) {
      expect(() => svc.onMessage(bad)).toThrow(TypeError);
      expect(() => poller().onMessage(bad)).toThrow(TypeError);
    }
    // The message names the method and the argument.
    expect(() => svc.onMessage(5)).toThrow('SseConnectionService.onMessage: handler must be a function');
    expect(() => poller().onMessage(5)).toThrow('AgentPoller.onMessage: handler must be a function');
    const t = new SseTransport();
    cleanup.push(() => t.disconnect());
    await t.connect({ agentId: 'alice', apiKey: 'key-a', apiBaseUrl: sd.url });
    expect(() => t.subscribe(42)).toThrow(TypeError);
    expect(() => t.subscribe(42)).toThrow('SseTransport.subscribe: handler must be a function');
    // Checked before the connection: a wrong argument is named even on a closed transport.
    expect(() => new LocalTransport().subscribe({})).toThrow(TypeError);
    expect(() => new LocalTransport().subscribe({})).toThrow('LocalTransport.subscribe: handler must be a function');
  });
});

// The native transports' constructors take no config (LocalTransport an optional dbPath), and
// their connect() reads a TransportConnectConfig. A wrong one is an Error naming the field, and
// the transport stays usable: a later good connect() works.
describe('native transports: constructors and connect() configs', () => {
  const good = () => ({ agentId: 'alice', apiKey: 'key-a', apiBaseUrl: sd.url });
  const makers = {
    HttpTransport: () => new HttpTransport(),
    SseTransport: () => new SseTransport(),
  };

  it.each(Object.keys(makers))('%s: every bad connect() config fails clearly; a good one then works', async (name) => {
    const t = makers[name]();
    cleanup.push(() => t.disconnect());
    const cases = [
      ['config', 5],
      ['agentId', {}],
      ['agentId', { ...good(), agentId: 5 }],
      ['apiKey', { ...good(), apiKey: null }],
      ['apiKey', { ...good(), apiKey: 123 }],
      ['apiBaseUrl', { agentId: 'alice', apiKey: 'key-a' }],
      ['apiBaseUrl', { ...good(), apiBaseUrl: [] }],
      ['apiBaseUrl', { ...good(), apiBaseUrl: 'nonsense' }],
      ['apiBaseUrl', { ...good(), apiBaseUrl: 'ftp://x' }],
      ['sseEndpoint', { ...good(), sseEndpoint: 5 }],
      ['pollIntervalMs', { ...good(), pollIntervalMs: 'x' }],
      ['apiBaseUrlFallback', { ...good(), apiBaseUrlFallback: 7 }],
    ];
    for (const [field, config] of cases) {
      const e = await failure(() => t.connect(config));
      expect(e, `${name} ${field}`).toBeInstanceOf(TypeError);
      expect(e.message, `${name} ${field}`).toContain(field);
    }
    expect(await failure(() => t.connect())).toBeInstanceOf(TypeError);
    await t.connect(good());
    sd.sendDirect('bob', 'alice', 'after the bad configs');
    await waitFor(async () => (await t.poll()).length === 1, { what: 'a poll that works' });
  });

  it('LocalTransport: a wrong dbPath type fails clearly, a missing file names the path', async () => {
    const e = await failure(() => new LocalTransport({ dbPath: 5 }));
    expect(e).toBeInstanceOf(TypeError);
    expect(e.message).toContain('dbPath');
    expect(await failure(() => new LocalTransport(5))).toBeInstanceOf(TypeError);
    const t = new LocalTransport({ dbPath: '/nonexistent/dir/signaldock.db' });
    const c = await failure(() => t.connect({ agentId: 'alice', apiKey: 'k', apiBaseUrl: 'local' }));
    expect(c.message).toContain('signaldock.db not found at /nonexistent/dir/signaldock.db');
    const a = await failure(() => t.connect({ apiKey: 'k', apiBaseUrl: 'local' }));
    expect(a).toBeInstanceOf(TypeError);
    expect(a.message).toContain('agentId');
  });

  it('calls with wrong argument types fail clearly instead of crashing', async () => {
    const t = new HttpTransport();
    cleanup.push(() => t.disconnect());
    await t.connect(good());
    for (const [call, field] of [[() => t.push(5, 'x'), 'String'], [() => t.push('bob', {}), 'String'], [() => t.ack('id'), 'Array'], [() => t.ack([1, 2]), 'String'], [() => t.poll({ limit: 'all' }), 'limit']]) {
      const e = await failure(call);
      expect(e).toBeInstanceOf(Error);
      expect(e.message).toContain(field);
    }
    // Still fine afterwards.
    sd.sendDirect('bob', 'alice', 'fine');
    expect((await t.poll()).map((m) => m.content)).toEqual(['fine']);
  });
});

// ==========================================================================================
// Hostile data from the server, on the peek path: each bad row is skipped (or mapped) and
// counted once; it never blocks the rows around it, and a skipped row with a usable id is
// acked so the server stops offering it.
describe('hostile rows from the peek', () => {
  async function deliverAll(p, expected) {
    const got = [];
    p.onMessage((m) => { got.push(m); });
    p.start();
    await waitFor(() => got.length >= expected, { what: `${expected} good messages`, timeoutMs: 10_000 });
    // Several more polls: a skipped row must not be counted (or delivered) again.
    const polls = p.status().polls;
    await waitFor(() => p.status().polls >= polls + 4, { what: 'more polls' });
    return got;
  }

  it('content over the 1 MiB cap is skipped, counted once and acked; the rest are delivered', async () => {
    sd.sendDirect('bob', 'alice', 'before');
    const huge = sd.sendDirect('bob', 'alice', 'x'.repeat(1024 * 1024 + 1));
    sd.sendDirect('bob', 'alice', 'y'.repeat(1024 * 1024)); // exactly at the cap: delivered
    sd.sendDirect('bob', 'alice', 'after');
    const p = poller();
    const got = await deliverAll(p, 3);
    expect(got.map((m) => m.content.slice(0, 6))).toEqual(['before', 'yyyyyy', 'after']);
    expect(p.status().malformed).toBe(1);
    await waitFor(() => sd.pending('alice').length === 0, { what: 'the huge one acked too' });
    expect(sd.acked('alice')).toContain(huge.id);
  });

  it('a deeply nested row does not poison the page', async () => {
    let deep = 'leaf';
    for (let i = 0; i < 1000; i++) deep = { d: deep };
    sd.sendDirect('bob', 'alice', 'one');
    const bad = sd.sendDirect('bob', 'alice', 'nested', { metadata: deep });
    sd.sendDirect('bob', 'alice', 'two');
    const p = poller();
    const got = await deliverAll(p, 2);
    expect(got.map((m) => m.content)).toEqual(['one', 'two']);
    expect(p.status().malformed).toBe(1);
    await waitFor(() => sd.acked('alice').includes(bad.id), { what: 'the nested row acked' });
  });

  it('nesting just inside the limits is mapped, metadata and all', async () => {
    let deep = { leaf: true };
    for (let i = 0; i < 100; i++) deep = { d: deep };
    sd.sendDirect('bob', 'alice', 'nested ok', { metadata: deep });
    const p = poller();
    const got = await deliverAll(p, 1);
    expect(got[0].content).toBe('nested ok');
    let depth = 0;
    for (let m = got[0].metadata; m && m.d; m = m.d) depth += 1;
    expect(depth).toBeGreaterThan(50);
  });

  it('a lone surrogate (a JSON \\ud800 escape) is mapped to U+FFFD instead of poisoning the page', async () => {
    sd.sendDirect('bob', 'alice', 'first');
    sd.sendDirect('bob', 'alice', 'half an emoji: \ud83d!');
    sd.sendDirect('bob', 'alice', 'low alone \udc00 and a pair 😀');
    sd.sendDirect('bob', 'alice', 'last');
    const p = poller();
    const got = await deliverAll(p, 4);
    expect(got.map((m) => m.content)).toEqual(['first', 'half an emoji: \ufffd!', 'low alone \ufffd and a pair 😀', 'last']);
    expect(p.status().malformed).toBe(0);
  });

  it('wrong types per field: the row is skipped and counted once; numbers where strings go are read', async () => {
    const bad = [
      sd.sendDirect('bob', 'alice', 'c', { content: 5 }),
      sd.sendDirect('bob', 'alice', 'c', { content: ['x'] }),
      sd.sendDirect('bob', 'alice', 'c', { fromAgentId: { id: 'bob' } }),
      sd.sendDirect('bob', 'alice', 'c', { createdAt: [2026] }),
      sd.sendDirect('bob', 'alice', 'c', { conversationId: true }),
      sd.sendDirect('bob', 'alice', 'c', { metadata: 7 }),
    ];
    sd.sendDirect('bob', 'alice', 'numbers', { fromAgentId: 42, conversationId: 7 });
    sd.sendDirect('bob', 'alice', 'string metadata', { metadata: '{"k":1}' });
    sd.sendDirect('bob', 'alice', 'opaque metadata', { metadata: 'not json' });
    const p = poller();
    const got = await deliverAll(p, 3);
    expect(got.map((m) => [m.content, m.from, m.threadId ?? null, m.metadata ?? null])).toEqual([
      ['numbers', '42', '7', null],
      ['string metadata', 'bob', expect.any(String), { k: 1 }],
      ['opaque metadata', 'bob', expect.any(String), null],
    ]);
    expect(p.status().malformed).toBe(bad.length);
    await waitFor(() => sd.pending('alice').length === 0, { what: 'every skipped row acked' });
  });

  it('more than a page of bad rows does not block the inbox', async () => {
    for (let i = 0; i < 60; i++) sd.sendDirect('bob', 'alice', `bad ${i}`, { content: i });
    sd.sendDirect('bob', 'alice', 'behind the bad ones');
    const p = poller();
    const got = await deliverAll(p, 1);
    expect(got.map((m) => m.content)).toEqual(['behind the bad ones']);
    expect(p.status().malformed).toBe(60);
  });

  it('rows without a usable id are skipped and counted once', async () => {
    sd.sendDirect('bob', 'alice', 'no id', { id: null });
    sd.sendDirect('bob', 'alice', 'empty id', { id: '' });
    sd.sendDirect('bob', 'alice', 'object id', { id: { x: 1 } });
    sd.sendDirect('bob', 'alice', 'huge id', { id: 'i'.repeat(10_000) });
    sd.sendDirect('bob', 'alice', 'fine');
    const p = poller();
    const got = await deliverAll(p, 1);
    expect(got.map((m) => m.content)).toEqual(['fine']);
    expect(p.status().malformed).toBe(4);
  });

  it('an id that repeats with different content is delivered once (the first), and acked', async () => {
    const first = sd.sendDirect('bob', 'alice', 'original');
    sd.sendDirect('bob', 'alice', 'impostor', { id: first.id });
    sd.sendDirect('bob', 'alice', 'next');
    const p = poller();
    const got = await deliverAll(p, 2);
    expect(got.map((m) => m.content)).toEqual(['original', 'next']);
    await waitFor(() => sd.pending('alice').length === 0, { what: 'acked' });
    // Later, the same id again with other content: still not delivered twice.
    sd.sendDirect('bob', 'alice', 'replayed impostor', { id: first.id });
    await sleep(500);
    expect(got.map((m) => m.content)).toEqual(['original', 'next']);
    expect(p.status().running).toBe(true);
  });
});

// A server that answers with exactly the bytes a test gives it, for what the SignalDock test
// server cannot produce (bytes that are not UTF-8, broken envelopes).
async function rawServer(answer) {
  const seen = [];
  const server = http.createServer((req, res) => {
    let body = '';
    req.on('data', (d) => { body += d; });
    req.on('end', () => {
      seen.push({ method: req.method, url: req.url, body });
      const { status = 200, bytes } = answer(req, body);
      res.writeHead(status, { 'content-type': 'application/json', 'content-length': bytes.length });
      res.end(bytes);
    });
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const url = `http://127.0.0.1:${server.address().port}`;
  cleanup.push(() => new Promise((resolve) => { server.closeAllConnections(); server.close(resolve); }));
  return { url, seen };
}

describe('hostile bytes from a raw server', () => {
  const row = (id, content) => `{"id":"${id}","fromAgentId":"bob","content":"${content}","createdAt":"2026-01-01T00:00:0${id.at(-1)}.000Z"}`;

  it('bytes that are not UTF-8 in one row: mapped with U+FFFD, the others intact', async () => {
    const acked = new Set();
    const body = Buffer.concat([
      Buffer.from(`{"success":true,"data":{"messages":[${row('r1', 'ok')},`),
      Buffer.from('{"id":"r2","fromAgentId":"bob","content":"bad '), Buffer.from([0xff, 0xfe, 0xc3]), Buffer.from(' bytes"},'),
      Buffer.from(`${row('r3', 'also ok')}]}}`),
    ]);
    const server = await rawServer((req, text) => {
      if (req.url.startsWith('/messages/ack')) {
        for (const id of JSON.parse(text).messageIds) acked.add(id);
        return { bytes: Buffer.from('{"success":true,"data":{}}') };
      }
      return { bytes: acked.size ? Buffer.from('{"success":true,"data":{"messages":[]}}') : body };
    });
    const p = new AgentPoller({ agentId: 'alice', apiKey: 'key-a', apiBaseUrl: server.url, pollIntervalMs: 100 });
    cleanup.push(() => p.stop());
    const got = [];
    p.onMessage((m) => { got.push(m.content); });
    p.start();
    await waitFor(() => got.length === 3, { what: 'three messages' });
    expect(got).toEqual(['ok', 'bad \ufffd\ufffd\ufffd bytes', 'also ok']);
    await waitFor(() => acked.size === 3, { what: 'all acked' });
    expect(p.status().malformed).toBe(0);
  });

  it('a truncated or non-JSON answer is an error for that poll only; the loop goes on', async () => {
    let n = 0;
    const server = await rawServer(() => {
      n += 1;
      if (n === 1) return { bytes: Buffer.from('{"success":true,"data":{"messages":[{"id":"t1","content":"x"},{"id":') };
      if (n === 2) return { bytes: Buffer.from('<html>502 Bad Gateway</html>') };
      if (n === 3) return { bytes: Buffer.from('{"success":true,"data":{"messages":"nope"}}') };
      if (n === 4) return { bytes: Buffer.from([0xff, 0xff, 0xff]) };
      if (n === 5) return { bytes: Buffer.from('{"success":true,"data":{"messages":[{"id":"t1","content":"x"}]}}') };
      return { bytes: Buffer.from('{"success":true,"data":{}}') };
    });
    const p = new AgentPoller({ agentId: 'alice', apiKey: 'key-a', apiBaseUrl: server.url, pollIntervalMs: 50 });
    cleanup.push(() => p.stop());
    const got = [];
    p.onMessage((m) => { got.push(m.id); });
    p.start();
    await waitFor(() => got.length === 1, { what: 't1 once the server behaves' });
    await sleep(300);
    expect(got).toEqual(['t1']);
    expect(p.status().running).toBe(true);
  });
});

// ==========================================================================================
describe('hostile SSE data', () => {
  const sseCredential = () => credential('alice', 'key-a', sd.url, {
    transportConfig: { sseEndpoint: `${sd.url}/messages/stream` },
  });

  it('bad frames (huge content, nesting, wrong types, bytes that are not UTF-8) are counted; the stream goes on', async () => {
    const handle = await createRuntime(new FakeRegistry(sseCredential()), { heartbeatIntervalMs: 0, maxKeyAgeMs: 0, pollIntervalMs: 1000 });
    cleanup.push(() => handle.stop());
    const got = [];
    handle.poller.onMessage((m) => { got.push(m.content); });
    await waitFor(() => handle.poller.status().realtime, { what: 'stream up' });
    const frame = (payload) => `data: ${JSON.stringify(payload)}\n\n`;
    let deep = 'x';
    for (let i = 0; i < 1000; i++) deep = [deep];
    sd.sseSendRaw('alice', frame({ message_id: 's1', from_agent_id: 'bob', content: 'z'.repeat(1024 * 1024 + 1) }));
    sd.sseSendRaw('alice', frame({ message_id: 's2', from_agent_id: 'bob', content: 'deep', attachments: deep }));
    sd.sseSendRaw('alice', frame({ message_id: 's3', from_agent_id: 'bob', content: { not: 'text' } }));
    sd.sseSendRaw('alice', frame({ message_id: ['s4'], content: 'array id' }));
    sd.sendDirect('bob', 'alice', 'good one');
    await waitFor(() => got.includes('good one'), { what: 'the good message' });
    expect(got).toEqual(['good one']);
    expect(handle.transport.status().malformed).toBe(4);
    // Bytes that are not UTF-8 cost the connection (the parser cannot take them): it reconnects.
    sd.sseSendRaw('alice', Buffer.concat([Buffer.from('data: {"message_id":"s5","content":"'), Buffer.from([0xff, 0xfe]), Buffer.from('"}\n\n')]));
    await waitFor(() => handle.sseConnection.status().reconnects >= 1 && handle.sseConnection.status().state === 'connected', { what: 'reconnected', timeoutMs: 10_000 });
    sd.sendDirect('bob', 'alice', 'after the bytes');
    await waitFor(() => got.includes('after the bytes'), { what: 'delivery after the reconnect', timeoutMs: 10_000 });
    expect(handle.poller.status().failed).toBe(0);
  }, 30_000);

  it('an endless line without a newline is cut at the 8 MiB cap: bounded memory, the stream comes back', async () => {
    // In a child process, so its RSS is the client's alone.
    const run = await runChild(`
      import { SseTransport } from '@cleocode/runtime';
      import { startSignalDock } from ${JSON.stringify(SERVER_MODULE)};
      const sd = await startSignalDock({ agents: { alice: 'key-a' } });
      const t = new SseTransport();
      await t.connect({ agentId: 'alice', apiKey: 'key-a', apiBaseUrl: sd.url });
      const got = [];
      t.subscribe((m) => got.push(m.content));
      const rss0 = process.memoryUsage().rss;
      let peak = rss0;
      const chunk = 'a'.repeat(1024 * 1024);
      sd.sseSendRaw('alice', 'data: ');
      // 48 MiB of one line; the client must drop the stream at 8 MiB instead of buffering it.
      for (let i = 0; i < 48 && t.status().reconnects === 0; i++) {
        sd.sseSendRaw('alice', chunk);
        await new Promise((r) => setTimeout(r, 10));
        peak = Math.max(peak, process.memoryUsage().rss);
      }
      const deadline = Date.now() + 10000;
      while (!(t.status().reconnects >= 1 && t.status().state === 'connected') && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      sd.sendDirect('bob', 'alice', 'after the flood');
      while (!got.includes('after the flood') && Date.now() < deadline + 5000) await new Promise((r) => setTimeout(r, 20));
      console.log(JSON.stringify({ growthMiB: (peak - rss0) / 2 ** 20, reconnects: t.status().reconnects, got, lastError: t.status().lastError }));
      await t.disconnect();
      await sd.close();
    `, { timeoutMs: 40_000 });
    expect(run.code, run.stderr).toBe(0);
    const r = JSON.parse(run.stdout.trim().split('\n').at(-1));
    expect(r.reconnects).toBeGreaterThanOrEqual(1);
    expect(r.got).toEqual(['after the flood']);
    expect(r.lastError).toMatch(/larger than/);
    // The cap is 8 MiB; the server's own buffers live in the same process, so allow for them.
    expect(r.growthMiB).toBeLessThan(40);
    expect(run.stderr).not.toMatch(/panick/);
  }, 60_000);
});

// ==========================================================================================
// A JS registry or transport that returns the wrong shape is an error reported to the caller
// (a rejection, a lastError, a counter), never a crash or an unhandled rejection.
describe('JS objects returning the wrong shape', () => {
  const shapes = {
    null: () => null,
    number: () => 42,
    string: () => 'credential',
    array: () => [],
    'rejected promise': () => Promise.reject(new Error('registry down')),
    'rejected with a non-Error': () => Promise.reject('just a string'),
    'a synchronous throw': () => { throw new Error('sync registry bug'); },
    'a throw of undefined': () => { throw undefined; },
  };

  it.each(Object.entries(shapes))('registry.getActive() returning %s: createRuntime rejects clearly', async (name, f) => {
    const registry = { get: f, getActive: f, rotateKey: async () => ({}) };
    const e = await createRuntime(registry, { heartbeatIntervalMs: 0 }).catch((err) => err);
    expect(e).toBeInstanceOf(Error);
    if (name === 'null') expect(e.message).toBe('No agent credential found. Run: cleo agent register --id <id> --api-key <key>');
    else expect(e.message).toMatch(/registry\.getActive\(\)|credential/);
  });

  it('registry.rotateKey() returning junk, rejecting or throwing: counted in lastError, the service goes on', async () => {
    const old = '2000-01-01T00:00:00.000Z';
    const answers = [() => null, () => 42, () => Promise.reject(new Error('rotate down')), () => 'x'];
    let n = 0;
    const registry = {
      get: async () => ({ ...credential('alice', 'key-a', sd.url), updatedAt: old }),
      rotateKey() {
        n += 1;
        if (n === 1) throw new Error('sync rotate bug');
        return answers[(n - 2) % answers.length]();
      },
    };
    const kr = new KeyRotationService({ agentId: 'alice', registry, checkIntervalMs: 50 });
    cleanup.push(() => kr.stop());
    kr.start();
    await waitFor(() => n >= 5, { what: 'five rotations tried', timeoutMs: 15_000 });
    expect(kr.status().running).toBe(true);
    expect(kr.status().checks).toBeGreaterThanOrEqual(5);
  }, 20_000);

  it('transport.connect() returning junk is fine, rejecting rejects createRuntime, ack() failing is retried', async () => {
    const registry = new FakeRegistry(credential('alice', 'key-a', 'local'));
    const junk = { ...jsTransport(), connect: () => 42 };
    const h = await createRuntime(registry, { transport: junk, heartbeatIntervalMs: 0, maxKeyAgeMs: 0 });
    h.stop();
    const rejecting = { ...jsTransport(), connect: () => Promise.reject(undefined) };
    await expect(createRuntime(registry, { transport: rejecting, heartbeatIntervalMs: 0 })).rejects.toThrow(/connect\(\) failed/);
    const throwing = { ...jsTransport(), connect() { throw new RangeError('bad connect'); } };
    await expect(createRuntime(registry, { transport: throwing, heartbeatIntervalMs: 0 })).rejects.toThrow(/bad connect/);

    // ack() failing in every way: the poller retries; nothing is delivered twice meanwhile.
    let acks = 0;
    const pending = [{ id: 'a1', from: 'bob', content: 'one', timestamp: 't' }];
    const flaky = {
      name: 'flaky',
      async poll() { return pending; },
      ack(ids) {
        acks += 1;
        if (acks === 1) throw new Error('sync ack bug');
        if (acks === 2) return Promise.reject(new Error('ack down'));
        if (acks === 3) return 17;
        pending.splice(0, pending.length, ...pending.filter((m) => !ids.includes(m.id)));
        return undefined;
      },
    };
    const p = poller({ apiBaseUrl: 'local', transport: flaky, pollIntervalMs: 50 });
    const got = [];
    p.onMessage((m) => { got.push(m.id); });
    p.start();
    await waitFor(() => pending.length === 0, { what: 'acked in the end' });
    await sleep(200);
    expect(got).toEqual(['a1']);
    expect(p.status().pendingAcks).toBe(0);
  });

  it('transport.poll() returning objects of the wrong shape: each skipped and counted once', async () => {
    const rows = [null, 7, 'text', [], { id: 'w1', content: 5 }, { id: 'w2', tags: 'x' }, { id: 'ok', content: 'fine' }];
    const acked = [];
    const transport = { name: 'shapes', poll: async () => rows.filter((r) => !(r && acked.includes(r.id))), async ack(ids) { acked.push(...ids); } };
    const p = poller({ apiBaseUrl: 'local', transport, pollIntervalMs: 50 });
    const got = [];
    p.onMessage((m) => { got.push(m.id); });
    p.start();
    await waitFor(() => got.length === 1 && p.status().polls >= 6, { what: 'several polls' });
    expect(got).toEqual(['ok']);
    // The four without a usable id are counted once each; the two with one are skipped and acked.
    expect(p.status().malformed).toBe(6);
    expect(acked.sort()).toEqual(['ok', 'w1', 'w2']);
  });
});
