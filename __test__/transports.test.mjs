// The native transports as Transport objects, through the package entry: HttpTransport
// (REST of WIRE.md, failover, errors), SseTransport's Transport surface, both used where a JS
// transport is accepted (AgentPoller, SseConnectionService, createRuntime), and the transport
// resolution inside createRuntime. LocalTransport has its own suite (local.test.mjs).
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  AgentPoller, HttpTransport, LocalTransport, SseConnectionService, SseTransport, createRuntime,
} from '@cleocode/runtime';
import { startSignalDock } from '../testing/signaldock-server.mjs';
import { FakeRegistry, credential, sleep, waitFor } from './support/helpers.mjs';

const HTTP_NOT_CONNECTED = 'HttpTransport is not connected: call connect() first';
const SSE_NOT_CONNECTED = 'SseTransport is not connected: call connect() first';
const LOCAL_NOT_CONNECTED = 'LocalTransport is not connected: call connect() first';

let sd;
const cleanup = [];
beforeEach(async () => { sd = await startSignalDock({ agents: { alice: 'key-a', bob: 'key-b' } }); });
afterEach(async () => {
  for (const stop of cleanup.splice(0).reverse()) {
    try { await stop(); } catch { /* best effort */ }
  }
  await sd.close();
});

const aliceConfig = (extra = {}) => ({ agentId: 'alice', apiKey: 'key-a', apiBaseUrl: sd.url, ...extra });

async function http(config = aliceConfig()) {
  const t = new HttpTransport();
  await t.connect(config);
  cleanup.push(() => t.disconnect());
  return t;
}

/** Another test server, closed after the test. */
async function secondServer() {
  const other = await startSignalDock({ agents: { alice: 'key-a', bob: 'key-b' } });
  cleanup.push(() => other.close());
  return other;
}

/** A loopback URL nobody listens on: a server's URL once it is closed. */
async function deadUrl() {
  const gone = await startSignalDock();
  const { url } = gone;
  await gone.close();
  return url;
}

const requestsTo = (server, method, path) => server.requests.filter((r) => r.method === method && r.path === path);

async function runtime(registry, config) {
  const handle = await createRuntime(registry, config);
  cleanup.push(() => handle.stop());
  return handle;
}

describe('HttpTransport: the Transport surface', () => {
  it('is a class exported by the package, named http, with the Transport methods', () => {
    const t = new HttpTransport();
    expect(t.name).toBe('http');
    for (const m of ['connect', 'disconnect', 'push', 'poll', 'ack']) expect(typeof t[m]).toBe('function');
  });

  it('every call before connect() (and after disconnect()) rejects with a clear error', async () => {
    const t = new HttpTransport();
    await expect(t.push('bob', 'x')).rejects.toThrow(HTTP_NOT_CONNECTED);
    await expect(t.poll()).rejects.toThrow(HTTP_NOT_CONNECTED);
    await expect(t.ack(['m'])).rejects.toThrow(HTTP_NOT_CONNECTED);
    expect(sd.requests).toHaveLength(0);
    await t.connect(aliceConfig());
    await expect(t.poll()).resolves.toEqual([]);
    await t.disconnect();
    await expect(t.poll()).rejects.toThrow(HTTP_NOT_CONNECTED);
    await expect(t.disconnect()).resolves.toBeUndefined();
  });

  it('connect() refuses a base URL that is not http(s)', async () => {
    const t = new HttpTransport();
    for (const apiBaseUrl of ['local', 'ftp://example.org']) {
      const e = await t.connect(aliceConfig({ apiBaseUrl })).catch((err) => err);
      expect(e).toBeInstanceOf(TypeError);
      expect(e.message).toMatch(/config\.apiBaseUrl must be an http\(s\) URL/);
    }
    await expect(t.poll()).rejects.toThrow(HTTP_NOT_CONNECTED);
  });

  it('push(to, content) is POST /messages with the auth headers and returns the server id', async () => {
    const t = await http();
    const { messageId } = await t.push('bob', 'hello bob');
    const [row] = sd.pending('bob');
    expect(row).toMatchObject({ fromAgentId: 'alice', toAgentId: 'bob', content: 'hello bob' });
    expect(messageId).toBe(row.id);
    const [req] = requestsTo(sd, 'POST', '/messages');
    expect(req.body).toEqual({ toAgentId: 'bob', content: 'hello bob' });
    expect(req.headers.authorization).toBe('Bearer key-a');
    expect(req.headers['x-agent-id']).toBe('alice');
    expect(req.headers['content-type']).toBe('application/json');
    // The key travels in the Authorization header only.
    for (const r of sd.requests) expect(JSON.stringify({ path: r.path, query: r.query, body: r.body })).not.toContain('key-a');
  });

  it('push with conversationId and replyTo is POST /conversations/{id}/messages, id encoded', async () => {
    const t = await http();
    const first = await t.push('ignored', 'root', { conversationId: 'team/ops #1' });
    const reply = await t.push('ignored', 'a reply', { conversationId: 'team/ops #1', replyTo: first.messageId });
    const posts = sd.requests.filter((r) => r.method === 'POST' && r.path.startsWith('/conversations/'));
    expect(posts.map((r) => r.path)).toEqual([
      '/conversations/team%2Fops%20%231/messages', '/conversations/team%2Fops%20%231/messages',
    ]);
    expect(posts[0].body).toEqual({ content: 'root' });
    expect(posts[1].body).toEqual({ content: 'a reply', replyTo: first.messageId });
    expect(posts[1].headers.authorization).toBe('Bearer key-a');
    // The returned ids are the rows the server stored.
    const res = await fetch(`${sd.url}/conversations/${encodeURIComponent('team/ops #1')}/messages?sort=asc&limit=10`, {
      headers: { authorization: 'Bearer key-b', 'x-agent-id': 'bob' },
    });
    const { data } = await res.json();
    // Posted in one second: the listing gives them no order.
    expect(data.messages.map((m) => [m.id, m.content, m.replyTo]).sort((a, b) => a[1].localeCompare(b[1]))).toEqual([
      [reply.messageId, 'a reply', first.messageId], [first.messageId, 'root', undefined],
    ]);
  });

  it('push reads the legacy { id } answer of older servers, DM and conversation', async () => {
    sd.legacyIds = true;
    const t = await http();
    const dm = await t.push('bob', 'old server');
    expect(dm.messageId).toBe(sd.pending('bob')[0].id);
    const conv = await t.push('x', 'old conversation', { conversationId: 'general' });
    expect(typeof conv.messageId).toBe('string');
    expect(conv.messageId.length).toBeGreaterThan(0);
    expect(conv.messageId).not.toBe(dm.messageId);
  });

  it('poll() is a non-destructive GET /messages/peek mapped to ConduitMessage, oldest first', async () => {
    const rows = ['one', 'two', 'three'].map((c) => sd.sendDirect('bob', 'alice', c));
    sd.sendDirect('alice', 'bob', 'not mine');
    const t = await http();
    const got = await t.poll();
    expect(got).toEqual(rows.map((r) => ({
      id: r.id, from: 'bob', content: r.content, threadId: r.conversationId, timestamp: r.createdAt,
    })));
    const [peek] = requestsTo(sd, 'GET', '/messages/peek');
    expect(peek.query).toEqual({ limit: '50' });
    expect(peek.headers.authorization).toBe('Bearer key-a');
    expect(peek.headers['x-agent-id']).toBe('alice');
    // Non-destructive: still pending, offered again.
    expect(sd.pending('alice')).toHaveLength(3);
    expect((await t.poll()).map((m) => m.id)).toEqual(rows.map((r) => r.id));
  });

  it('poll({ limit, since }) passes both to the peek', async () => {
    // A second apart: the server's `since` counts whole seconds.
    const rows = ['a', 'b', 'c', 'd'].map((c, i) => sd.sendDirect('bob', 'alice', c, { createdAt: `2026-04-07T12:00:0${i}Z` }));
    const t = await http();
    expect((await t.poll({ limit: 2 })).map((m) => m.content)).toEqual(['a', 'b']);
    expect((await t.poll({ since: rows[1].createdAt })).map((m) => m.content)).toEqual(['c', 'd']);
    expect((await t.poll({ limit: 1, since: rows[1].createdAt })).map((m) => m.content)).toEqual(['c']);
    const peeks = requestsTo(sd, 'GET', '/messages/peek').map((r) => r.query);
    expect(peeks).toEqual([
      { limit: '2' }, { limit: '50', since: rows[1].createdAt }, { limit: '1', since: rows[1].createdAt },
    ]);
  });

  it('ack(ids) is POST /messages/ack { messageIds }, and acked messages are not offered again', async () => {
    const rows = ['x', 'y', 'z'].map((c) => sd.sendDirect('bob', 'alice', c));
    const t = await http();
    await t.ack([rows[0].id, rows[2].id]);
    const [req] = requestsTo(sd, 'POST', '/messages/ack');
    expect(req.body).toEqual({ messageIds: [rows[0].id, rows[2].id] });
    expect(req.headers.authorization).toBe('Bearer key-a');
    expect(sd.acked('alice')).toEqual([rows[0].id, rows[2].id]);
    expect((await t.poll()).map((m) => m.id)).toEqual([rows[1].id]);
    // Nothing to ack: no request at all.
    sd.clearRequests();
    await t.ack([]);
    expect(sd.requests).toHaveLength(0);
  });

  it('two transports exchange messages both ways', async () => {
    const alice = await http();
    const bob = await http({ agentId: 'bob', apiKey: 'key-b', apiBaseUrl: sd.url });
    const sent = await alice.push('bob', 'ping');
    const [got] = await bob.poll();
    expect(got).toMatchObject({ id: sent.messageId, from: 'alice', content: 'ping' });
    await bob.ack([got.id]);
    const back = await bob.push('alice', 'pong');
    const [reply] = await alice.poll();
    expect(reply).toMatchObject({ id: back.messageId, from: 'bob', content: 'pong', threadId: got.threadId });
    expect(await bob.poll()).toEqual([]);
  });
});

describe('HttpTransport: errors', () => {
  it('a 5xx answer rejects with the status and the operation, never the key', async () => {
    const t = await http(aliceConfig({ apiKey: 'key-a' }));
    sd.inject({ method: 'POST', path: '/messages', status: 500 });
    const e = await t.push('bob', 'x').catch((err) => err);
    expect(e).toBeInstanceOf(Error);
    expect(e.message).toMatch(/^push failed: HTTP 500/);
    expect(e.message).not.toContain('key-a');
    sd.inject({ method: 'GET', path: '/messages/peek', status: 503 });
    await expect(t.poll()).rejects.toThrow(/^poll failed: HTTP 503/);
    sd.inject({ method: 'POST', path: '/messages/ack', status: 502 });
    await expect(t.ack(['m1'])).rejects.toThrow(/^ack failed: HTTP 502/);
    // The fault was one-shot: the transport still works.
    await expect(t.push('bob', 'after')).resolves.toMatchObject({ messageId: expect.any(String) });
  });

  it('a refused key is a 401 error that does not quote the key', async () => {
    const t = await http(aliceConfig({ apiKey: 'sk-live-wrong-secret' }));
    for (const call of [() => t.push('bob', 'x'), () => t.poll(), () => t.ack(['m'])]) {
      const e = await call().catch((err) => err);
      expect(e.message).toMatch(/HTTP 401/);
      expect(e.message).not.toContain('sk-live-wrong-secret');
    }
    // The wrong key was sent, in the header only.
    expect(sd.requests.every((r) => r.headers.authorization === 'Bearer sk-live-wrong-secret')).toBe(true);
  });

  it('a server that echoes the key in its error body does not get it into the error', async () => {
    const t = await http(aliceConfig({ apiKey: 'key-a' }));
    sd.inject({ method: 'POST', path: '/messages', status: 401, message: 'key key-a is expired' });
    const e = await t.push('bob', 'x').catch((err) => err);
    expect(e.message).toMatch(/HTTP 401/);
    expect(e.message).not.toContain('key-a');
    sd.inject({ method: 'GET', path: '/messages/peek', status: 500, message: 'db error near Bearer key-a' });
    const p = await t.poll().catch((err) => err);
    expect(p.message).toMatch(/HTTP 500/);
    expect(p.message).not.toContain('key-a');
  });

  it('an unreachable server is a network error without the key', async () => {
    const t = await http(aliceConfig({ apiKey: 'sk-unreachable-secret', apiBaseUrl: await deadUrl() }));
    const e = await t.poll().catch((err) => err);
    expect(e.message).toMatch(/^poll failed: network error/);
    expect(e.message).not.toContain('sk-unreachable-secret');
  });
});

describe('HttpTransport: failover to apiBaseUrlFallback', () => {
  it('connect probes /health on both and picks the fallback when the primary is dead', async () => {
    const t = await http(aliceConfig({ apiBaseUrl: await deadUrl(), apiBaseUrlFallback: sd.url }));
    expect(requestsTo(sd, 'GET', '/health')).toHaveLength(1);
    sd.clearRequests();
    const { messageId } = await t.push('bob', 'via fallback');
    expect(sd.pending('bob').map((r) => r.id)).toEqual([messageId]);
    await t.poll();
    // Straight to the fallback, one request each.
    expect(sd.requests.map((r) => `${r.method} ${r.path}`)).toEqual(['POST /messages', 'GET /messages/peek']);
  });

  it('keeps the primary when both are healthy', async () => {
    const primary = await secondServer();
    const t = await http(aliceConfig({ apiBaseUrl: primary.url, apiBaseUrlFallback: sd.url }));
    expect(requestsTo(primary, 'GET', '/health')).toHaveLength(1);
    expect(requestsTo(sd, 'GET', '/health')).toHaveLength(1);
    await t.push('bob', 'to primary');
    expect(primary.pending('bob')).toHaveLength(1);
    expect(sd.pending('bob')).toHaveLength(0);
  });

  it('a primary that dies after connect: the request is retried on the fallback, later ones go there', async () => {
    const primary = await secondServer();
    const t = await http(aliceConfig({ apiBaseUrl: primary.url, apiBaseUrlFallback: sd.url }));
    await t.push('bob', 'before');
    expect(primary.pending('bob')).toHaveLength(1);
    await primary.close();
    sd.clearRequests();
    const { messageId } = await t.push('bob', 'after the primary died');
    expect(sd.pending('bob').map((r) => [r.id, r.content])).toEqual([[messageId, 'after the primary died']]);
    sd.sendDirect('bob', 'alice', 'waiting on the fallback');
    const got = await t.poll();
    expect(got.map((m) => m.content)).toEqual(['waiting on the fallback']);
    await t.ack(got.map((m) => m.id));
    expect(sd.pending('alice')).toHaveLength(0);
    expect(sd.requests.map((r) => `${r.method} ${r.path}`)).toEqual(['POST /messages', 'GET /messages/peek', 'POST /messages/ack']);
  });

  it('after a network error the transport switches: the primary, back up, gets nothing more', async () => {
    const primary = await secondServer();
    const t = await http(aliceConfig({ apiBaseUrl: primary.url, apiBaseUrlFallback: sd.url }));
    primary.clearRequests();
    // One connection reset on the primary (a network error, not an HTTP status).
    primary.inject({ method: 'POST', path: '/messages', reset: true });
    const { messageId } = await t.push('bob', 'reset then retried');
    expect(requestsTo(primary, 'POST', '/messages')).toHaveLength(1);
    expect(primary.pending('bob')).toHaveLength(0);
    expect(sd.pending('bob').map((r) => r.id)).toEqual([messageId]);
    await t.poll();
    await t.push('bob', 'later');
    expect(primary.requests).toHaveLength(1);
    expect(requestsTo(sd, 'GET', '/messages/peek')).toHaveLength(1);
    expect(sd.pending('bob')).toHaveLength(2);
  });

  it('an HTTP error status is not failed over: the answer stands', async () => {
    const primary = await secondServer();
    const t = await http(aliceConfig({ apiBaseUrl: primary.url, apiBaseUrlFallback: sd.url }));
    sd.clearRequests();
    primary.inject({ method: 'POST', path: '/messages', status: 500 });
    await expect(t.push('bob', 'x')).rejects.toThrow(/HTTP 500/);
    expect(sd.requests).toHaveLength(0);
  });

  it('both unreachable: a network error, no key', async () => {
    const t = await http(aliceConfig({ apiKey: 'sk-both-dead', apiBaseUrl: await deadUrl(), apiBaseUrlFallback: await deadUrl() }));
    const e = await t.push('bob', 'x').catch((err) => err);
    expect(e.message).toMatch(/^push failed: network error/);
    expect(e.message).not.toContain('sk-both-dead');
  });
});

describe('HttpTransport where a JS transport is accepted', () => {
  it('new AgentPoller({ transport: httpTransport }) polls through it and acks through it', async () => {
    const t = await http();
    const rows = ['p1', 'p2', 'p3'].map((c) => sd.sendDirect('bob', 'alice', c));
    const poller = new AgentPoller({ agentId: 'alice', apiKey: 'key-a', apiBaseUrl: 'local', pollIntervalMs: 100, transport: t });
    cleanup.push(() => poller.stop());
    const got = [];
    poller.onMessage((m) => { got.push(m); });
    poller.start();
    await waitFor(() => sd.pending('alice').length === 0, { what: 'acked through the transport' });
    expect(got.map((m) => m.content)).toEqual(['p1', 'p2', 'p3']);
    expect(got[0]).toMatchObject({ id: rows[0].id, from: 'bob', threadId: rows[0].conversationId });
    // The transport's peek (no `mentioned`), not the poller's own REST peek.
    const peeks = requestsTo(sd, 'GET', '/messages/peek');
    expect(peeks.length).toBeGreaterThan(0);
    for (const p of peeks) expect(p.query.mentioned).toBeUndefined();
    expect(sd.acked('alice').sort()).toEqual(rows.map((r) => r.id).sort());
    await sleep(300);
    expect(got).toHaveLength(3);
  });

  it('createRuntime({ transport: new HttpTransport() }) connects it, uses it, and stop() disconnects it', async () => {
    const t = new HttpTransport();
    const registry = new FakeRegistry(credential('alice', 'key-a', sd.url));
    const handle = await runtime(registry, { transport: t, pollIntervalMs: 100, heartbeatIntervalMs: 0, maxKeyAgeMs: 0 });
    expect(handle.transport).toBe(t);
    expect(handle.transport.name).toBe('http');
    const got = [];
    handle.poller.onMessage((m) => { got.push(m.content); });
    sd.sendDirect('bob', 'alice', 'through the native transport');
    await waitFor(() => got.length === 1, { what: 'delivery' });
    await waitFor(() => sd.pending('alice').length === 0, { what: 'ack' });
    expect(got).toEqual(['through the native transport']);
    for (const p of requestsTo(sd, 'GET', '/messages/peek')) expect(p.query.mentioned).toBeUndefined();
    await expect(t.push('bob', 'from the handle')).resolves.toMatchObject({ messageId: expect.any(String) });
    handle.stop();
    await waitFor(async () => (await t.poll().then(() => null, (e) => e.message)) === HTTP_NOT_CONNECTED, { timeoutMs: 5000, what: 'disconnected' });
  });

  it('createRuntime with a credential fallback fails over (connect picks the live base)', async () => {
    const registry = new FakeRegistry(credential('alice', 'key-a', await deadUrl(), { transportConfig: { apiBaseUrlFallback: sd.url } }));
    const handle = await runtime(registry, { pollIntervalMs: 100, heartbeatIntervalMs: 0, maxKeyAgeMs: 0 });
    expect(handle.transport.name).toBe('http');
    const got = [];
    handle.poller.onMessage((m) => { got.push(m.content); });
    sd.sendDirect('bob', 'alice', 'via the fallback');
    await waitFor(() => got.length === 1, { what: 'delivery via the fallback' });
    await expect(handle.transport.push('bob', 'reply')).resolves.toMatchObject({ messageId: expect.any(String) });
    expect(sd.pending('bob').map((r) => r.content)).toEqual(['reply']);
  });
});

describe('SseTransport as a Transport', () => {
  it('before connect every call rejects clearly; status() is closed', async () => {
    const t = new SseTransport();
    expect(t.name).toBe('sse');
    expect(t.status().state).toBe('closed');
    await expect(t.push('bob', 'x')).rejects.toThrow(SSE_NOT_CONNECTED);
    await expect(t.poll()).rejects.toThrow(SSE_NOT_CONNECTED);
    await expect(t.ack(['m'])).rejects.toThrow(SSE_NOT_CONNECTED);
    expect(() => t.subscribe(() => {})).toThrow(SSE_NOT_CONNECTED);
  });

  it('connect opens the stream with headers (no key in the URL); subscribe gets pushed messages', async () => {
    const t = new SseTransport();
    cleanup.push(() => t.disconnect());
    await t.connect(aliceConfig({ apiKey: 'key-a' }));
    await waitFor(() => sd.streams('alice') === 1, { what: 'stream open' });
    expect(t.status().state).toBe('connected');
    const [stream] = requestsTo(sd, 'GET', '/messages/stream');
    expect(stream.headers.authorization).toBe('Bearer key-a');
    expect(stream.headers['x-agent-id']).toBe('alice');
    expect(stream.query).toEqual({});
    const got = [];
    const unsubscribe = t.subscribe((m) => { got.push(m); });
    const row = sd.sendDirect('bob', 'alice', 'live');
    await waitFor(() => got.length === 1, { what: 'pushed message' });
    expect(got[0]).toMatchObject({ id: row.id, from: 'bob', content: 'live', threadId: row.conversationId });
    unsubscribe();
    await t.disconnect();
    await waitFor(() => sd.streams('alice') === 0, { what: 'stream closed' });
    await expect(t.poll()).rejects.toThrow(SSE_NOT_CONNECTED);
  });

  it('push, poll (stream buffer plus peek) and ack over REST', async () => {
    const t = new SseTransport();
    cleanup.push(() => t.disconnect());
    const queued = sd.sendDirect('bob', 'alice', 'queued before connect');
    await t.connect(aliceConfig());
    await waitFor(() => sd.streams('alice') === 1, { what: 'stream open' });
    const live = sd.sendDirect('bob', 'alice', 'pushed while nobody subscribed');
    let got = [];
    await waitFor(async () => {
      got = got.concat(await t.poll());
      return got.some((m) => m.id === live.id) && got.some((m) => m.id === queued.id);
    }, { what: 'both messages through poll', everyMs: 50 });
    const { messageId } = await t.push('bob', 'sse push');
    expect(sd.pending('bob').map((r) => r.id)).toEqual([messageId]);
    const conv = await t.push('x', 'to a conversation', { conversationId: 'general', replyTo: messageId });
    expect(typeof conv.messageId).toBe('string');
    expect(requestsTo(sd, 'POST', '/conversations/general/messages')[0].body).toEqual({ content: 'to a conversation', replyTo: messageId });
    await t.ack([queued.id]);
    expect(sd.acked('alice')).toEqual([queued.id]);
    expect(requestsTo(sd, 'POST', '/messages/ack')[0].headers.authorization).toBe('Bearer key-a');
  });

  it('an SseTransport works inside SseConnectionService and AgentPoller', async () => {
    const t = new SseTransport();
    const service = new SseConnectionService({ agentId: 'alice', apiKey: 'key-a', apiBaseUrl: sd.url, transport: t });
    cleanup.push(() => service.stop());
    const got = [];
    service.onMessage((m) => { got.push(m.content); });
    await service.start();
    expect(service.status()).toMatchObject({ running: true, transportName: 'sse' });
    await waitFor(() => sd.streams('alice') === 1, { what: 'stream open' });
    sd.sendDirect('bob', 'alice', 'over the service');
    await waitFor(() => got.length === 1, { what: 'service delivery' });
    await service.stop();
    await waitFor(() => sd.streams('alice') === 0, { what: 'stream closed by stop()' });

    const polled = new SseTransport();
    cleanup.push(() => polled.disconnect());
    await polled.connect(aliceConfig());
    const poller = new AgentPoller({ agentId: 'alice', apiKey: 'key-a', apiBaseUrl: sd.url, pollIntervalMs: 100, transport: polled });
    cleanup.push(() => poller.stop());
    const viaPoller = [];
    poller.onMessage((m) => { viaPoller.push(m.content); });
    poller.start();
    sd.sendDirect('bob', 'alice', 'via the poller');
    await waitFor(() => viaPoller.length === 1, { what: 'poller delivery' });
    expect(viaPoller).toEqual(['via the poller']);
  });
});

describe('transport resolution in createRuntime', () => {
  let dir;
  let savedCleoDir;
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'cleo-resolve-'));
    savedCleoDir = process.env.CLEO_DIR;
    // An empty project: no signaldock.db unless a test makes one.
    process.env.CLEO_DIR = join(dir, '.cleo');
  });
  afterEach(() => {
    if (savedCleoDir === undefined) delete process.env.CLEO_DIR;
    else process.env.CLEO_DIR = savedCleoDir;
    rmSync(dir, { recursive: true, force: true });
  });

  it('http base URL + sseEndpoint → sse (a native SseTransport), messages reach the handler', async () => {
    const registry = new FakeRegistry(credential('alice', 'key-a', sd.url, { transportConfig: { sseEndpoint: `${sd.url}/messages/stream` } }));
    const handle = await runtime(registry, { pollIntervalMs: 60_000, heartbeatIntervalMs: 0, maxKeyAgeMs: 0 });
    expect(handle.transport.name).toBe('sse');
    expect(handle.transport).toBeInstanceOf(SseTransport);
    expect(handle.sseConnection).not.toBeNull();
    await waitFor(() => sd.streams('alice') === 1, { what: 'stream open' });
    const got = [];
    handle.poller.onMessage((m) => { got.push(m.content); });
    sd.sendDirect('bob', 'alice', 'over sse');
    await waitFor(() => got.length === 1, { what: 'sse delivery' });
    await expect(handle.transport.push('bob', 'answer')).resolves.toMatchObject({ messageId: expect.any(String) });
    handle.stop();
    await waitFor(() => sd.streams('alice') === 0, { what: 'stream closed by stop()' });
    await waitFor(() => handle.transport.status().state === 'closed', { what: 'transport closed', timeoutMs: 5000 });
  });

  it('config.sseEndpoint also selects sse', async () => {
    const registry = new FakeRegistry(credential('alice', 'key-a', sd.url));
    const handle = await runtime(registry, { sseEndpoint: `${sd.url}/messages/stream`, heartbeatIntervalMs: 0, maxKeyAgeMs: 0 });
    expect(handle.transport.name).toBe('sse');
  });

  it('http base URL without sseEndpoint → http (a native HttpTransport); stop() disconnects it', async () => {
    const registry = new FakeRegistry(credential('alice', 'key-a', sd.url));
    const handle = await runtime(registry, { pollIntervalMs: 100, heartbeatIntervalMs: 0, maxKeyAgeMs: 0 });
    expect(handle.transport.name).toBe('http');
    expect(handle.transport).toBeInstanceOf(HttpTransport);
    expect(handle.sseConnection).toBeNull();
    const { messageId } = await handle.transport.push('bob', 'with the runtime credentials');
    const [req] = requestsTo(sd, 'POST', '/messages');
    expect(req.headers.authorization).toBe('Bearer key-a');
    expect(sd.pending('bob')[0].id).toBe(messageId);
    handle.stop();
    await expect(handle.transport.poll()).rejects.toThrow(HTTP_NOT_CONNECTED);
  });

  it('http base URL wins even when a signaldock.db exists', async () => {
    await LocalTransport.ensureSchema();
    const registry = new FakeRegistry(credential('alice', 'key-a', sd.url));
    const handle = await runtime(registry, { heartbeatIntervalMs: 0, maxKeyAgeMs: 0 });
    expect(handle.transport.name).toBe('http');
  });

  it('non-http base URL + signaldock.db present → local (a native LocalTransport on that file)', async () => {
    const path = await LocalTransport.ensureSchema();
    expect(path).toBe(join(dir, '.cleo', 'signaldock.db'));
    const registry = new FakeRegistry(credential('alice', '', 'local'));
    const handle = await runtime(registry, { maxKeyAgeMs: 0 });
    expect(handle.transport.name).toBe('local');
    expect(handle.transport).toBeInstanceOf(LocalTransport);
    expect(handle.transport.dbPath).toBe(path);
    // A heartbeat as for any runtime, beating into signaldock.db (local.test.mjs has the rest).
    expect(handle.heartbeat).not.toBeNull();
    expect(handle.heartbeat.status().running).toBe(true);
    handle.stop();
    await waitFor(async () => (await handle.transport.poll().then(() => null, (e) => e.message)) === LOCAL_NOT_CONNECTED, { timeoutMs: 5000, what: 'disconnected' });
  });

  it('non-http base URL and no signaldock.db → createRuntime rejects with a clear error', async () => {
    const registry = new FakeRegistry(credential('alice', 'sk-no-db-secret', 'local'));
    const e = await createRuntime(registry, { heartbeatIntervalMs: 0, maxKeyAgeMs: 0 }).catch((err) => err);
    expect(e).toBeInstanceOf(Error);
    expect(e.message).toMatch(/^createRuntime: /);
    expect(e.message).toContain('"local" is not a URL');
    expect(e.message).not.toContain('sk-no-db-secret');
  });
});
