// The realtime path through the package entry: SseConnectionService over hand-written JS
// transports, the native SseTransport against the project's SignalDock test server, and
// createRuntime with SSE (native stream, and a caller's createSseTransport), with stream
// drops, silence, malformed frames, heartbeats, a key rotation mid-stream and a burst.
// The 60 s idle watchdog has its own file (sse-watchdog.test.mjs) so its wait runs in
// parallel with these.
// Correctness waits use waitFor; the few fixed sleeps only give a wrong extra call (a
// duplicate, a reconnect, a request) the time to happen, and the assertions that follow
// them are exact.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { SseConnectionService, SseTransport, createRuntime } from '@cleocode/runtime';
import { startSignalDock } from '../testing/signaldock-server.mjs';
import { FakeRegistry, credential, message, sleep, waitFor } from './support/helpers.mjs';

const KEY_PARAMS = ['token', 'api_key', 'apiKey', 'key', 'agent_id'];
let sd;
const cleanup = [];
beforeEach(async () => { sd = await startSignalDock({ agents: { alice: 'key-a', bob: 'key-b' } }); });
afterEach(async () => {
  for (const stop of cleanup.splice(0).reverse()) {
    try { await stop(); } catch { /* best effort */ }
  }
  await sd.close();
});

/** Replaces `sd` with a fresh server started with `options` (closed after the test). */
async function restartServer(options) {
  await sd.close();
  sd = await startSignalDock({ agents: { alice: 'key-a', bob: 'key-b' }, ...options });
  return sd;
}

async function runtime(registry, config) {
  const handle = await createRuntime(registry, config);
  cleanup.push(() => handle.stop());
  return handle;
}

async function nativeTransport(config = {}) {
  const t = new SseTransport();
  cleanup.push(() => t.disconnect());
  await t.connect({ agentId: 'alice', apiKey: 'key-a', apiBaseUrl: sd.url, ...config });
  return t;
}

const streamRequests = (server = sd) => server.requests.filter((r) => r.path === '/messages/stream');
const peeks = (server = sd) => server.requests.filter((r) => r.path === '/messages/peek');

/** No request carried a key (or any credential-looking parameter) in its URL. */
function expectNoKeyInUrls(keys, server = sd) {
  expect(server.requests.length).toBeGreaterThan(0);
  for (const r of server.requests) {
    for (const p of KEY_PARAMS) expect(r.query).not.toHaveProperty(p);
    const url = `${r.path}?${new URLSearchParams(r.query)}`;
    for (const key of keys) expect(url).not.toContain(key);
  }
}

/** A snake-shaped SSE delivery frame for a server row (as the server would push it). */
function snakeFrame(row, { id } = {}) {
  const payload = {
    message_id: row.id, conversation_id: row.conversationId, from_agent_id: row.fromAgentId,
    from_agent_name: row.fromAgentId, to_agent_id: row.toAgentId, content: row.content,
    content_type: 'text', created_at: row.createdAt, attachments: [],
  };
  return `${id !== undefined ? `id: ${id}\n` : ''}data: ${JSON.stringify(payload)}\n\n`;
}

/**
 * A JS SSE transport as a caller writes one: a class with private state (its methods only
 * work with `this` bound), whose subscription the test drives with `emit`.
 */
class ScriptedSseTransport {
  name = 'scripted-sse';
  calls = [];
  #handlers = new Set();
  connectError = null;
  async connect(config) {
    this.calls.push(['connect', config]);
    if (this.connectError) throw this.connectError;
  }
  async disconnect() { this.calls.push(['disconnect']); }
  async push(to, content) { this.calls.push(['push', to, content]); return { messageId: 'p-1' }; }
  async poll() { this.calls.push(['poll']); return []; }
  async ack(ids) { this.calls.push(['ack', ids]); }
  subscribe(handler) {
    this.calls.push(['subscribe']);
    this.#handlers.add(handler);
    return () => {
      this.calls.push(['unsubscribe']);
      this.#handlers.delete(handler);
    };
  }
  emit(m) { for (const h of this.#handlers) h(m); }
  get subscribers() { return this.#handlers.size; }
  names() { return this.calls.map((c) => c[0]); }
}

// ==========================================================================================
describe('SseConnectionService over a JS transport', () => {
  const config = (transport, extra = {}) => ({
    agentId: 'alice', apiKey: 'key-a', apiBaseUrl: 'http://127.0.0.1:9', transport, ...extra,
  });

  it('start() connects with { agentId, apiKey, apiBaseUrl, sseEndpoint }, then subscribes; idempotent', async () => {
    const t = new ScriptedSseTransport();
    const svc = new SseConnectionService(config(t, { sseEndpoint: 'http://127.0.0.1:9/messages/stream' }));
    cleanup.push(() => svc.stop());
    expect(svc.status()).toMatchObject({ running: false, transportName: 'scripted-sse' });
    await svc.start();
    await svc.start();
    expect(t.names()).toEqual(['connect', 'subscribe']);
    expect(t.calls[0][1]).toEqual({
      agentId: 'alice', apiKey: 'key-a', apiBaseUrl: 'http://127.0.0.1:9', sseEndpoint: 'http://127.0.0.1:9/messages/stream',
    });
    expect(t.subscribers).toBe(1);
    expect(svc.status()).toMatchObject({ running: true, transportName: 'scripted-sse' });
    // A JS transport has no native stream state.
    expect(svc.status().state).toBeUndefined();
  });

  it('a handler registered after start() receives messages; a second onMessage replaces it', async () => {
    const t = new ScriptedSseTransport();
    const svc = new SseConnectionService(config(t));
    cleanup.push(() => svc.stop());
    await svc.start();
    t.emit(message({ id: 'before-handler' })); // nobody to give it to: dropped, no crash
    const first = [];
    svc.onMessage((m) => { first.push(m.id); });
    t.emit(message({ id: 's-1', content: 'one', threadId: 'th', from: 'bob' }));
    t.emit(message({ id: 's-2' }));
    await waitFor(() => first.length === 2, { what: 'two messages' });
    expect(first).toEqual(['s-1', 's-2']);
    const second = [];
    svc.onMessage((m) => { second.push(m); });
    t.emit(message({ id: 's-3', content: 'three', from: 'carol', threadId: 'th-3' }));
    await waitFor(() => second.length === 1, { what: 'the new handler' });
    expect(second[0]).toMatchObject({ id: 's-3', content: 'three', from: 'carol', threadId: 'th-3' });
    expect(typeof second[0].timestamp).toBe('string');
    await sleep(100);
    expect(first).toEqual(['s-1', 's-2']);
    // The message before any handler was not a handler call.
    expect(svc.status()).toMatchObject({ delivered: 3, failed: 0 });
  });

  it('a handler set before start() works too', async () => {
    const t = new ScriptedSseTransport();
    const svc = new SseConnectionService(config(t));
    cleanup.push(() => svc.stop());
    const got = [];
    svc.onMessage((m) => got.push(m.id));
    await svc.start();
    t.emit(message({ id: 'early' }));
    await waitFor(() => got.length === 1, { what: 'delivery' });
    expect(got).toEqual(['early']);
  });

  it('an async handler that rejects does not crash anything; later messages still arrive', async () => {
    const t = new ScriptedSseTransport();
    const svc = new SseConnectionService(config(t));
    cleanup.push(() => svc.stop());
    const got = [];
    svc.onMessage(async (m) => {
      got.push(m.id);
      if (m.id === 'boom') throw new Error('handler rejected at once');
      if (m.id === 'late-boom') { await sleep(5); throw new Error('handler rejected later'); }
    });
    await svc.start();
    t.emit(message({ id: 'boom' }));
    t.emit(message({ id: 'late-boom' }));
    t.emit(message({ id: 'fine' }));
    await waitFor(() => got.length === 3, { what: 'three calls' });
    expect(got).toEqual(['boom', 'late-boom', 'fine']);
    // Reported and counted (an unhandled rejection would fail the run).
    await waitFor(() => svc.status().failed === 2 && svc.status().delivered === 1, { what: 'counted' });
    expect(svc.status().running).toBe(true);
  });

  it('a synchronously throwing handler is contained', async () => {
    const t = new ScriptedSseTransport();
    const svc = new SseConnectionService(config(t));
    cleanup.push(() => svc.stop());
    let calls = 0;
    svc.onMessage(() => { calls += 1; throw new Error('sync throw'); });
    await svc.start();
    expect(() => t.emit(message({ id: 'x-1' }))).not.toThrow();
    expect(() => t.emit(message({ id: 'x-2' }))).not.toThrow();
    await waitFor(() => calls === 2, { what: 'two calls' });
    expect(svc.status()).toMatchObject({ running: true, delivered: 0, failed: 2 });
  });

  it('malformed messages from the transport are skipped, the next one arrives', async () => {
    const t = new ScriptedSseTransport();
    const svc = new SseConnectionService(config(t));
    cleanup.push(() => svc.stop());
    const got = [];
    svc.onMessage((m) => got.push(m.id));
    await svc.start();
    expect(() => t.emit(null)).not.toThrow();
    expect(() => t.emit({ content: 'no id' })).not.toThrow();
    expect(() => t.emit('text')).not.toThrow();
    t.emit(message({ id: 'good' }));
    await waitFor(() => got.length === 1, { what: 'the good one' });
    await sleep(50);
    expect(got).toEqual(['good']);
  });

  it('stop() unsubscribes, then disconnects; nothing reaches the handler after it', async () => {
    const t = new ScriptedSseTransport();
    const svc = new SseConnectionService(config(t));
    const got = [];
    svc.onMessage((m) => got.push(m.id));
    await svc.start();
    t.emit(message({ id: 'live' }));
    await waitFor(() => got.length === 1, { what: 'live message' });
    await svc.stop();
    expect(t.names()).toEqual(['connect', 'subscribe', 'unsubscribe', 'disconnect']);
    expect(t.subscribers).toBe(0);
    expect(svc.status()).toMatchObject({ running: false, transportName: 'scripted-sse' });
    t.emit(message({ id: 'late' }));
    await sleep(100);
    expect(got).toEqual(['live']);
    await svc.stop();
    expect(t.names().filter((n) => n === 'unsubscribe')).toHaveLength(1);
  });

  it('a transport without subscribe is connected and disconnected only', async () => {
    const calls = [];
    const plain = {
      name: 'plain',
      async connect() { calls.push('connect'); },
      async disconnect() { calls.push('disconnect'); },
    };
    const svc = new SseConnectionService(config(plain));
    await svc.start();
    expect(svc.status()).toMatchObject({ running: true, transportName: 'plain' });
    await svc.stop();
    expect(calls).toEqual(['connect', 'disconnect']);
  });

  it('a connect() failure rejects start() with the cause and subscribes nothing', async () => {
    const t = new ScriptedSseTransport();
    t.connectError = new Error('stream host unreachable');
    const svc = new SseConnectionService(config(t));
    cleanup.push(() => svc.stop());
    await expect(svc.start()).rejects.toThrow(/stream host unreachable/);
    expect(t.names()).toEqual(['connect']);
  });

  it('validates its config', () => {
    expect(() => new SseConnectionService()).toThrow(TypeError);
    expect(() => new SseConnectionService(config(undefined))).toThrow(/transport/);
    expect(() => new SseConnectionService(config({ name: 'x' }))).toThrow(/transport/);
    expect(() => new SseConnectionService({ ...config(new ScriptedSseTransport()), agentId: undefined })).toThrow(/agentId/);
    const svc = new SseConnectionService(config(new ScriptedSseTransport()));
    expect(() => svc.onMessage('nope')).toThrow(TypeError);
  });
});

// ==========================================================================================
describe('SseTransport (native) against the test server', () => {
  it('is named sse; methods before connect() reject', async () => {
    const t = new SseTransport();
    expect(t.name).toBe('sse');
    expect(t.status()).toMatchObject({ state: 'closed', reconnects: 0, delivered: 0, malformed: 0, buffered: 0 });
    await expect(t.poll()).rejects.toThrow(/not connected/);
    expect(() => t.subscribe(() => {})).toThrow(/not connected/);
  });

  it('connects with auth headers, never a key in the URL', async () => {
    const t = await nativeTransport();
    expect(t.status().state).toBe('connected');
    expect(sd.streams('alice')).toBe(1);
    const [req] = streamRequests();
    expect(req.method).toBe('GET');
    expect(req.headers).toMatchObject({ authorization: 'Bearer key-a', 'x-agent-id': 'alice' });
    expect(req.headers.accept).toMatch(/text\/event-stream/);
    expect(req.query).toEqual({});
    expect(req.headers['last-event-id']).toBeUndefined();
    await t.poll();
    expectNoKeyInUrls(['key-a']);
  });

  it('uses an explicit sseEndpoint', async () => {
    const t = await nativeTransport({ sseEndpoint: `${sd.url}/messages/stream?region=eu` });
    expect(t.status().state).toBe('connected');
    expect(streamRequests()).toHaveLength(1);
    expect(streamRequests()[0].query).toEqual({ region: 'eu' });
  });

  // The real frame's createdAt is chrono's to_rfc3339 (`+00:00`); snake_case servers echo the row's.
  it.each(['real', 'snake'])('subscribe() gets pushed messages in the %s shape, mapped', async (shape) => {
    if (shape !== 'real') await restartServer({ sseShape: shape });
    const t = await nativeTransport();
    const got = [];
    t.subscribe((m) => { got.push(m); });
    const rows = ['one', 'two', 'three'].map((c) => sd.sendDirect('bob', 'alice', c));
    await waitFor(() => got.length === 3, { what: 'three pushed messages' });
    expect(got.map((m) => m.id)).toEqual(rows.map((r) => r.id));
    expect(got[0]).toMatchObject({ id: rows[0].id, from: 'bob', content: 'one', threadId: 'alice,bob' });
    expect(Date.parse(got[0].timestamp)).toBe(Date.parse(rows[0].createdAt));
    expect(sd.pending('alice')).toEqual([]);
    expect(t.status()).toMatchObject({ delivered: 3, malformed: 0, buffered: 0 });
  });

  it('subscribe() gets pushed messages in the camel shape, mapped', async () => {
    await restartServer({ sseShape: 'camel', eventIds: false });
    const t = await nativeTransport();
    const got = [];
    t.subscribe((m) => { got.push(m); });
    const row = sd.sendDirect('bob', 'alice', 'camel');
    await waitFor(() => got.length === 1, { what: 'a camel message' });
    expect(got[0]).toMatchObject({ id: row.id, from: 'bob', content: 'camel', threadId: 'alice,bob', timestamp: row.createdAt });
  });

  it('two subscribers both get each message; unsubscribe stops one', async () => {
    const t = await nativeTransport();
    const a = [];
    const b = [];
    const unA = t.subscribe((m) => a.push(m.content));
    t.subscribe((m) => b.push(m.content));
    sd.sendDirect('bob', 'alice', 'both');
    await waitFor(() => a.length === 1 && b.length === 1, { what: 'both subscribers' });
    unA();
    unA();
    sd.sendDirect('bob', 'alice', 'only b');
    await waitFor(() => b.length === 2, { what: 'b' });
    await sleep(100);
    expect(a).toEqual(['both']);
    expect(b).toEqual(['both', 'only b']);
  });

  it('a subscriber that throws does not stop the stream', async () => {
    const t = await nativeTransport();
    const got = [];
    t.subscribe((m) => { got.push(m.content); throw new Error('subscriber exploded'); });
    t.subscribe(async (m) => { if (m.content === 'x') throw new Error('async subscriber rejected'); });
    sd.sendDirect('bob', 'alice', 'x');
    sd.sendDirect('bob', 'alice', 'y');
    await waitFor(() => got.length === 2, { what: 'both messages' });
    expect(got).toEqual(['x', 'y']);
    // `delivered` counts once the JS call is back on the stream's task, a moment after the
    // subscriber ran.
    await waitFor(() => t.status().delivered === 2, { what: 'delivered counted' });
    expect(t.status()).toMatchObject({ state: 'connected', reconnects: 0, delivered: 2 });
  });

  it('poll() returns what the stream buffered (nobody subscribed) plus what the server queued', async () => {
    sd.sendDirect('bob', 'alice', 'queued before connect');
    const t = await nativeTransport();
    const streamed = ['s1', 's2'].map((c) => sd.sendDirect('bob', 'alice', c));
    await waitFor(() => t.status().buffered === 2, { what: 'two buffered' });
    expect(t.status().delivered).toBe(2);
    const got = await t.poll();
    expect(got.map((m) => m.content)).toEqual(['s1', 's2', 'queued before connect']);
    expect(got[0].id).toBe(streamed[0].id);
    expect(t.status().buffered).toBe(0);
    const peek = peeks().at(-1);
    expect(peek.headers).toMatchObject({ authorization: 'Bearer key-a', 'x-agent-id': 'alice' });
    // The buffer was drained; the queued one stays until acked.
    expect((await t.poll()).map((m) => m.content)).toEqual(['queued before connect']);
    await t.ack([got[2].id]);
    expect(await t.poll()).toEqual([]);
    expect(sd.acked('alice')).toEqual([got[2].id]);
  });

  it('poll({ limit }) returns at most limit messages and loses none', async () => {
    const t = await nativeTransport();
    for (let i = 0; i < 3; i++) sd.sendDirect('bob', 'alice', `s${i}`);
    await waitFor(() => t.status().buffered === 3, { what: 'three buffered' });
    sd.pushToStreams = false;
    for (let i = 0; i < 3; i++) sd.sendDirect('bob', 'alice', `q${i}`);
    const seen = [];
    for (let round = 0; round < 6 && seen.length < 6; round++) {
      const page = await t.poll({ limit: 2 });
      expect(page.length).toBeLessThanOrEqual(2);
      for (const m of page) {
        if (!seen.includes(m.content)) seen.push(m.content);
      }
      await t.ack(page.map((m) => m.id));
    }
    expect(seen).toEqual(['s0', 's1', 's2', 'q0', 'q1', 'q2']);
  });

  it('a failing peek does not lose what the stream buffered', async () => {
    const t = await nativeTransport();
    sd.sendDirect('bob', 'alice', 'kept 1');
    sd.sendDirect('bob', 'alice', 'kept 2');
    await waitFor(() => t.status().buffered === 2, { what: 'buffered' });
    sd.inject({ path: '/messages/peek', status: 500, times: 2 });
    expect((await t.poll()).map((m) => m.content)).toEqual(['kept 1', 'kept 2']);
    // Nothing buffered and the peek failing: that is an error.
    await expect(t.poll()).rejects.toThrow(/poll failed.*500/);
    expect(await t.poll()).toEqual([]);
  });

  it('a subscriber gets what was buffered before it subscribed; after unsubscribe the buffer fills again', async () => {
    const t = await nativeTransport();
    sd.sendDirect('bob', 'alice', 'b1');
    sd.sendDirect('bob', 'alice', 'b2');
    await waitFor(() => t.status().buffered === 2, { what: 'buffered' });
    const got = [];
    const un = t.subscribe((m) => got.push(m.content));
    await waitFor(() => got.length === 2, { what: 'backlog' });
    expect(got).toEqual(['b1', 'b2']);
    expect(t.status().buffered).toBe(0);
    un();
    sd.sendDirect('bob', 'alice', 'b3');
    await waitFor(() => t.status().buffered === 1, { what: 'buffered again' });
    expect(got).toEqual(['b1', 'b2']);
    expect((await t.poll()).map((m) => m.content)).toEqual(['b3']);
  });

  it('skips heartbeats (data, named events, comments) but counts them as life', async () => {
    await restartServer({ heartbeatMs: 100 });
    const t = await nativeTransport();
    const got = [];
    t.subscribe((m) => got.push(m.content));
    // Connected means the answer arrived; the first event (`connected`) may follow it.
    const first = Date.parse(await waitFor(() => t.status().lastEventAt, { what: 'a first event' }));
    await sleep(350);
    sd.sseSendRaw('alice', 'event: heartbeat\ndata: {}\n\n');
    sd.sseSendRaw('alice', 'event: ping\ndata:\n\n');
    sd.sseSendRaw('alice', 'data: {"type":"ping","ts":1}\n\n');
    sd.sseSendRaw('alice', ': keep-alive comment\n\n');
    sd.sseSendRaw('alice', 'event: typing\ndata: {"id":"not-a-delivery"}\n\n');
    sd.sendDirect('bob', 'alice', 'after the beats');
    await waitFor(() => got.length === 1, { what: 'the message' });
    expect(got).toEqual(['after the beats']);
    expect(t.status()).toMatchObject({ state: 'connected', reconnects: 0, delivered: 1, malformed: 0 });
    expect(Date.parse(t.status().lastEventAt)).toBeGreaterThan(first);
  });

  it('malformed frames are counted and skipped; the stream stays up', async () => {
    const t = await nativeTransport();
    const got = [];
    t.subscribe((m) => got.push(m.content));
    sd.sseSendRaw('alice', 'data: {not json\n\n');
    sd.sseSendRaw('alice', 'data: {"type":"notice"}\n\n');
    sd.sseSendRaw('alice', 'data: ["message_id","m1"]\n\n');
    sd.sseSendRaw('alice', 'data: {"content":"no id","from_agent_id":"bob"}\n\n');
    sd.sendDirect('bob', 'alice', 'good');
    await waitFor(() => got.length === 1, { what: 'the good message' });
    expect(got).toEqual(['good']);
    expect(t.status()).toMatchObject({ state: 'connected', reconnects: 0, delivered: 1, malformed: 4 });
    expect(streamRequests()).toHaveLength(1);
  });

  it("skips this agent's own messages", async () => {
    const t = await nativeTransport();
    const got = [];
    t.subscribe((m) => got.push(m.content));
    sd.sendDirect('alice', 'alice', 'note to self');
    sd.sseSendRaw('alice', 'data: {"id":"own-2","from":"alice","content":"mine"}\n\n');
    sd.sendDirect('bob', 'alice', 'from bob');
    await waitFor(() => got.length === 1, { what: "bob's message" });
    await sleep(100);
    expect(got).toEqual(['from bob']);
    expect(t.status()).toMatchObject({ delivered: 1, malformed: 0 });
  });

  it('reconnects after a drop (state reconnecting → connected) and sends Last-Event-ID', async () => {
    const t = await nativeTransport();
    const got = [];
    t.subscribe((m) => got.push(m.content));
    const sent = ['e1', 'e2', 'e3'].map((c) => sd.sendDirect('bob', 'alice', c));
    await waitFor(() => got.length === 3, { what: 'three events' });
    const before = t.status().lastEventAt;
    const droppedAt = Date.now();
    expect(sd.dropStreams('alice')).toBe(1);
    await waitFor(() => t.status().state === 'reconnecting', { what: 'reconnecting', timeoutMs: 2000 });
    await waitFor(() => t.status().state === 'connected', { what: 'reconnected', timeoutMs: 5000 });
    // First reconnect: the 1 s base, jittered to 0.5–1 s.
    expect(Date.now() - droppedAt).toBeLessThan(2500);
    expect(sd.streams('alice')).toBe(1);
    const s = t.status();
    expect(s.reconnects).toBe(1);
    expect(Date.parse(s.lastEventAt)).toBeGreaterThanOrEqual(Date.parse(before));
    const reqs = streamRequests();
    expect(reqs).toHaveLength(2);
    // The real server's event id is the message id.
    expect(reqs[1].headers['last-event-id']).toBe(sent[2].id);
    expect(reqs[1].headers.authorization).toBe('Bearer key-a');
    sd.sendDirect('bob', 'alice', 'e4');
    await waitFor(() => got.length === 4, { what: 'after reconnect' });
    expect(got).toEqual(['e1', 'e2', 'e3', 'e4']);
    expectNoKeyInUrls(['key-a']);
  });

  it('no Last-Event-ID when the server gives no event ids', async () => {
    await restartServer({ eventIds: false });
    const t = await nativeTransport();
    const got = [];
    t.subscribe((m) => got.push(m.content));
    sd.sendDirect('bob', 'alice', 'no id');
    await waitFor(() => got.length === 1, { what: 'message' });
    sd.dropStreams('alice');
    await waitFor(() => streamRequests().length === 2 && t.status().state === 'connected', { what: 'reconnect', timeoutMs: 5000 });
    expect(streamRequests()[1].headers['last-event-id']).toBeUndefined();
  });

  it('honours the server retry: as the reconnect base', async () => {
    const t = await nativeTransport();
    sd.sseSendRaw('alice', 'retry: 5000\n\n');
    await sleep(100);
    const droppedAt = Date.now();
    sd.dropStreams('alice');
    // The default base would reconnect within 1 s; retry: 5000 makes it 2.5–5 s.
    await sleep(2000);
    expect(streamRequests()).toHaveLength(1);
    await waitFor(() => t.status().state === 'connected' && streamRequests().length === 2, { what: 'reconnect', timeoutMs: 8000 });
    const gap = streamRequests()[1].at - droppedAt;
    expect(gap).toBeGreaterThanOrEqual(2400);
    expect(gap).toBeLessThan(6000);
  }, 20_000);

  it('keeps trying with a doubling, jittered backoff; connect() resolves after 3 s meanwhile', async () => {
    const rule = sd.inject({ path: '/messages/stream', status: 503, times: 3 });
    const t = new SseTransport();
    cleanup.push(() => t.disconnect());
    const started = Date.now();
    await t.connect({ agentId: 'alice', apiKey: 'key-a', apiBaseUrl: sd.url });
    const waited = Date.now() - started;
    expect(waited).toBeGreaterThanOrEqual(2900);
    expect(waited).toBeLessThan(4500);
    expect(['connecting', 'reconnecting']).toContain(t.status().state);
    expect(t.status().lastError).toMatch(/503/);
    await waitFor(() => t.status().state === 'connected', { what: 'connected at last', timeoutMs: 12_000 });
    expect(rule.hits).toBe(3);
    const at = streamRequests().map((r) => r.at);
    expect(at).toHaveLength(4);
    const gaps = [at[1] - at[0], at[2] - at[1], at[3] - at[2]];
    // 1 s, 2 s, 4 s ceilings, each jittered down to between half and all of it.
    expect(gaps[0]).toBeGreaterThanOrEqual(450);
    expect(gaps[0]).toBeLessThan(1400);
    expect(gaps[1]).toBeGreaterThanOrEqual(950);
    expect(gaps[1]).toBeLessThan(2400);
    expect(gaps[2]).toBeGreaterThanOrEqual(1950);
    expect(gaps[2]).toBeLessThan(4400);
    expect(t.status().reconnects).toBe(3);
    const got = [];
    t.subscribe((m) => got.push(m.content));
    sd.sendDirect('bob', 'alice', 'finally');
    await waitFor(() => got.length === 1, { what: 'delivery' });
  }, 25_000);

  it('a refused key (401) is not retried in a tight loop, and the key stays out of the error', async () => {
    const t = new SseTransport();
    cleanup.push(() => t.disconnect());
    await t.connect({ agentId: 'alice', apiKey: 'sk-wrong-secret', apiBaseUrl: sd.url });
    await sleep(1500);
    const s = t.status();
    expect(s.state).toBe('reconnecting');
    expect(s.lastError).toMatch(/401/);
    expect(s.lastError).not.toContain('sk-wrong-secret');
    // One attempt in ~4.5 s: the loop waits for a rotation (or 30 s) after a 401.
    expect(streamRequests()).toHaveLength(1);
    expect(sd.streams()).toBe(0);
  }, 15_000);

  it('silence alone (under the 60 s watchdog) neither drops the stream nor delays messages', async () => {
    await restartServer({ silence: true, heartbeatMs: 100 });
    const t = await nativeTransport();
    const got = [];
    t.subscribe((m) => got.push(m.content));
    await sleep(3000);
    expect(t.status()).toMatchObject({ state: 'connected', reconnects: 0 });
    sd.sendDirect('bob', 'alice', 'through the silence');
    await waitFor(() => got.length === 1, { what: 'message on a silent stream' });
    expect(streamRequests()).toHaveLength(1);
  });

  it('disconnect() closes the stream and nothing reconnects', async () => {
    const t = await nativeTransport();
    expect(sd.streams('alice')).toBe(1);
    await t.disconnect();
    await waitFor(() => sd.streams('alice') === 0, { what: 'stream closed', timeoutMs: 3000 });
    expect(t.status().state).toBe('closed');
    await sleep(1500);
    expect(streamRequests()).toHaveLength(1);
    expect(sd.streams()).toBe(0);
    await expect(t.poll()).rejects.toThrow(/not connected/);
  });
});

// ==========================================================================================
describe('createRuntime with SSE', () => {
  const sseCredential = (extra = {}) => credential('alice', 'key-a', sd.url, {
    transportConfig: { sseEndpoint: `${sd.url}/messages/stream` }, ...extra,
  });
  const quiet = { heartbeatIntervalMs: 0, maxKeyAgeMs: 0 };

  it('an sseEndpoint in the credential gives the native SSE transport; the stream uses headers', async () => {
    const handle = await runtime(new FakeRegistry(sseCredential()), { ...quiet, pollIntervalMs: 1000 });
    expect(handle.transport.name).toBe('sse');
    expect(handle.transport).toBeInstanceOf(SseTransport);
    expect(handle.sseConnection).toBeInstanceOf(SseConnectionService);
    await waitFor(() => handle.sseConnection.status().state === 'connected', { what: 'stream connected' });
    expect(handle.sseConnection.status()).toMatchObject({ running: true, transportName: 'sse', state: 'connected', reconnects: 0 });
    // Its messages go to the poller's handler, which counts them.
    expect(handle.sseConnection.status().failed).toBeUndefined();
    // The first event (the server's `connected`) may be read a moment after the state turns.
    await waitFor(() => typeof handle.sseConnection.status().lastEventAt === 'string', { what: 'the first event' });
    await waitFor(() => handle.poller.status().realtime === true, { what: 'realtime flag' });
    expect(sd.streams('alice')).toBe(1);
    const [req] = streamRequests();
    expect(req.headers).toMatchObject({ authorization: 'Bearer key-a', 'x-agent-id': 'alice' });
    expect(req.query).toEqual({});
    handle.poller.onMessage(() => {});
    await waitFor(() => peeks().length >= 1, { what: 'a peek' });
    expectNoKeyInUrls(['key-a']);
  });

  it('config.sseEndpoint wins over the credential one', async () => {
    const cred = credential('alice', 'key-a', sd.url, { transportConfig: { sseEndpoint: 'http://127.0.0.1:9/messages/stream' } });
    const handle = await runtime(new FakeRegistry(cred), { ...quiet, sseEndpoint: `${sd.url}/messages/stream?via=config` });
    await waitFor(() => sd.streams('alice') === 1, { what: 'stream on the configured endpoint' });
    expect(streamRequests()[0].query).toEqual({ via: 'config' });
    expect(handle.transport.name).toBe('sse');
  });

  it('without any sseEndpoint there is no SSE', async () => {
    const handle = await runtime(new FakeRegistry(credential('alice', 'key-a', sd.url)), quiet);
    expect(handle.sseConnection).toBeNull();
    expect(handle.transport.name).toBe('http');
    await sleep(300);
    expect(streamRequests()).toHaveLength(0);
    expect(handle.poller.status().realtime).toBe(false);
  });

  it('SSE messages reach the poller handler at once, once each, in order', async () => {
    // A 10 s interval (60 s while connected): only the stream can be this quick.
    const handle = await runtime(new FakeRegistry(sseCredential()), { ...quiet, pollIntervalMs: 10_000 });
    const got = [];
    handle.poller.onMessage(async (m) => { got.push(m); });
    await waitFor(() => handle.poller.status().realtime, { what: 'realtime' });
    // The first cycle and the poll after the stream connected.
    await waitFor(() => peeks().length >= 1, { what: 'the first poll' });
    await sleep(300);
    const polled = peeks().length;
    expect(polled).toBeLessThanOrEqual(2);
    const sentAt = Date.now();
    const rows = Array.from({ length: 5 }, (_, i) => sd.sendDirect('bob', 'alice', `rt${i}`));
    await waitFor(() => got.length === 5, { what: 'five messages', timeoutMs: 3000 });
    expect(Date.now() - sentAt).toBeLessThan(1500);
    expect(got.map((m) => m.id)).toEqual(rows.map((r) => r.id));
    expect(got[0]).toMatchObject({ from: 'bob', content: 'rt0', threadId: 'alice,bob' });
    expect(Date.parse(got[0].timestamp)).toBe(Date.parse(rows[0].createdAt));
    expect(sd.pending('alice')).toEqual([]);
    await sleep(300);
    expect(got).toHaveLength(5);
    expect(peeks()).toHaveLength(polled);
    expect(handle.poller.status()).toMatchObject({ delivered: 5, failed: 0, realtime: true });
  });

  it('a message pushed before the handler is registered is delivered once, after', async () => {
    const handle = await runtime(new FakeRegistry(sseCredential()), { ...quiet, pollIntervalMs: 10_000 });
    await waitFor(() => handle.poller.status().realtime, { what: 'realtime' });
    const row = sd.sendDirect('bob', 'alice', 'pushed early');
    expect(sd.pending('alice')).toEqual([]); // it went down the stream
    await sleep(300);
    const got = [];
    handle.poller.onMessage((m) => { got.push(m.id); });
    await waitFor(() => got.length === 1, { what: 'the early message' });
    await sleep(200);
    expect(got).toEqual([row.id]);
  });

  it('while connected, direct polling slows (but goes on) and groups keep their interval', async () => {
    const handle = await runtime(new FakeRegistry(sseCredential()), { ...quiet, pollIntervalMs: 100, groupConversationIds: ['g1'] });
    handle.poller.onMessage(() => {});
    await waitFor(() => handle.poller.status().realtime, { what: 'realtime' });
    await sleep(300);
    sd.clearRequests();
    await sleep(3000);
    const groupsPath = '/conversations/g1/messages';
    const connectedPeeks = peeks().length;
    const connectedGroups = sd.requests.filter((r) => r.path === groupsPath).length;
    // 100 ms interval: groups ~30 in 3 s; direct slowed 6x to ~5.
    expect(connectedPeeks).toBeGreaterThanOrEqual(3);
    expect(connectedPeeks).toBeLessThanOrEqual(7);
    expect(connectedGroups).toBeGreaterThanOrEqual(20);

    // The stream goes away for good (refused): direct polling returns to the interval.
    sd.inject({ path: '/messages/stream', status: 503, times: Infinity });
    sd.dropStreams('alice');
    await waitFor(() => !handle.poller.status().realtime, { what: 'realtime off' });
    await sleep(200);
    sd.clearRequests();
    await sleep(2000);
    expect(peeks().length).toBeGreaterThanOrEqual(14);
    expect(sd.requests.filter((r) => r.path === groupsPath).length).toBeGreaterThanOrEqual(14);
    expect(handle.sseConnection.status().state).toBe('reconnecting');
  }, 20_000);

  it('when the stream drops a poll runs at once; messages of the gap are delivered promptly, none twice', async () => {
    // 4 s interval, 24 s while connected: a gap message waiting for either would time out.
    const handle = await runtime(new FakeRegistry(sseCredential()), { ...quiet, pollIntervalMs: 4000 });
    const got = [];
    handle.poller.onMessage((m) => { got.push(m.content); });
    await waitFor(() => handle.poller.status().realtime, { what: 'realtime' });
    await waitFor(() => peeks().length >= 1, { what: 'first poll' });
    sd.sendDirect('bob', 'alice', 'streamed');
    await waitFor(() => got.length === 1, { what: 'streamed' });

    const droppedAt = Date.now();
    sd.dropStreams('alice');
    sd.sendDirect('bob', 'alice', 'sent as it dropped');
    await waitFor(() => peeks().some((r) => r.at >= droppedAt), { what: 'a poll at once', timeoutMs: 1000 });
    expect(peeks().find((r) => r.at >= droppedAt).at - droppedAt).toBeLessThan(500);
    await waitFor(() => got.includes('sent as it dropped'), { what: 'message of the drop', timeoutMs: 2000 });

    // Sent after that poll and before the stream is back: only a peek can find it.
    sd.sendDirect('bob', 'alice', 'in the gap');
    await waitFor(() => handle.poller.status().realtime, { what: 'stream back', timeoutMs: 5000 });
    const backAt = Date.now();
    expect(handle.sseConnection.status()).toMatchObject({ state: 'connected', reconnects: 1 });
    await waitFor(() => got.includes('in the gap'), { what: 'the gap message', timeoutMs: 6000 });
    expect(Date.now() - backAt).toBeLessThan(3000);

    sd.sendDirect('bob', 'alice', 'streamed again');
    await waitFor(() => got.length === 4, { what: 'after the reconnect', timeoutMs: 2000 });
    await sleep(500);
    expect(got).toEqual(['streamed', 'sent as it dropped', 'in the gap', 'streamed again']);
    await waitFor(() => sd.pending('alice').length === 0, { what: 'peeked ones acked' });
  }, 30_000);

  it('a message on both paths (stream and peek) reaches the handler once', async () => {
    const handle = await runtime(new FakeRegistry(sseCredential()), { ...quiet, pollIntervalMs: 200 });
    const got = [];
    handle.poller.onMessage((m) => { got.push(m.id); });
    await waitFor(() => handle.poller.status().realtime, { what: 'realtime' });
    sd.pushToStreams = false;
    // Stream first, then the peek (the row stays pending until acked).
    const a = sd.sendDirect('bob', 'alice', 'stream first');
    sd.sseSendRaw('alice', snakeFrame(a, { id: 900 }));
    await waitFor(() => got.length === 1, { what: 'a via the stream' });
    const afterA = peeks().length;
    await waitFor(() => peeks().length >= afterA + 2, { what: 'two more polls', timeoutMs: 5000 });
    // Peek first, then the stream.
    const b = sd.sendDirect('bob', 'alice', 'peek first');
    await waitFor(() => got.length === 2, { what: 'b via the peek', timeoutMs: 5000 });
    sd.sseSendRaw('alice', snakeFrame(b, { id: 901 }));
    sd.sseSendRaw('alice', snakeFrame(b, { id: 902 }));
    await sleep(1500);
    expect(got).toEqual([a.id, b.id]);
    expect(handle.poller.status().delivered).toBe(2);
  }, 20_000);

  it('a burst of 500, mixed between stream and peek: each exactly once, in order per path', async () => {
    const handle = await runtime(new FakeRegistry(sseCredential()), { ...quiet, pollIntervalMs: 100 });
    const got = [];
    handle.poller.onMessage((m) => { got.push(m.id); });
    await waitFor(() => handle.poller.status().realtime, { what: 'realtime' });
    const viaStream = [];
    const viaPeek = [];
    for (let chunk = 0; chunk < 10; chunk++) {
      sd.pushToStreams = chunk % 2 === 0;
      for (let i = 0; i < 50; i++) {
        const row = sd.sendDirect('bob', 'alice', `burst ${chunk}.${i}`);
        (sd.pushToStreams ? viaStream : viaPeek).push(row.id);
      }
      await sleep(20);
    }
    sd.pushToStreams = true;
    expect(sd.pending('alice')).toHaveLength(250);
    await waitFor(() => got.length >= 500, { what: '500 messages', timeoutMs: 20_000 });
    await sleep(1000);
    expect(got).toHaveLength(500);
    expect(new Set(got).size).toBe(500);
    const streamSet = new Set(viaStream);
    expect(got.filter((id) => streamSet.has(id))).toEqual(viaStream);
    expect(got.filter((id) => !streamSet.has(id))).toEqual(viaPeek);
    await waitFor(() => sd.pending('alice').length === 0, { what: 'peeked ones acked' });
    expect(handle.poller.status()).toMatchObject({ delivered: 500, failed: 0 });
  }, 40_000);

  it('a key rotation mid-stream: the stream reconnects with the new key, nothing lost or doubled', async () => {
    const old = new Date(Date.now() - 40 * 24 * 3600 * 1000).toISOString();
    const registry = new FakeRegistry(sseCredential({ updatedAt: old }));
    const rotate = registry.rotateKey.bind(registry);
    // The server learns the new key when the registry rotates it.
    registry.rotateKey = async (id) => { const r = await rotate(id); sd.addKey('alice', (await registry.get(id)).apiKey); return r; };
    const handle = await runtime(registry, { pollIntervalMs: 500, heartbeatIntervalMs: 0 });
    const got = [];
    handle.poller.onMessage((m) => { got.push(m.id); });
    await waitFor(() => handle.poller.status().realtime, { what: 'realtime' });

    // Messages flow (alternately pushed and queued) from before the rotation (at ~5 s) to after.
    const sent = [];
    let n = 0;
    const sender = setInterval(() => {
      sd.pushToStreams = n % 3 !== 2;
      sent.push(sd.sendDirect('bob', 'alice', `r${n++}`).id);
    }, 25);
    try {
      await waitFor(() => registry.rotations === 1, { what: 'rotation', timeoutMs: 10_000 });
      await waitFor(() => streamRequests().some((r) => r.headers.authorization === 'Bearer alice-rotated-1'), {
        what: 'a stream with the new key', timeoutMs: 3000,
      });
      sd.expireKey('key-a');
      await sleep(1500);
    } finally {
      clearInterval(sender);
      sd.pushToStreams = true;
    }
    await waitFor(() => got.length >= sent.length, { what: 'every message', timeoutMs: 15_000 });
    await sleep(1000);
    expect(got).toHaveLength(sent.length);
    expect(new Set(got)).toEqual(new Set(sent));

    const streams = streamRequests();
    expect(streams.at(-1).headers.authorization).toBe('Bearer alice-rotated-1');
    expect(streams[0].headers.authorization).toBe('Bearer key-a');
    expect(sd.streams('alice')).toBe(1);
    expect(handle.sseConnection.status().state).toBe('connected');
    // No request was refused for the new key, and no stream attempt looped on 401.
    expect(streams.length).toBeLessThanOrEqual(3);
    expectNoKeyInUrls(['key-a', 'alice-rotated-1']);
    await waitFor(() => sd.pending('alice').length === 0, { what: 'all acked' });
  }, 40_000);

  it('drops, malformed frames, heartbeats and a burst together: none lost, none twice, no key in a URL', async () => {
    await restartServer({ heartbeatMs: 150 });
    const handle = await runtime(new FakeRegistry(sseCredential()), { ...quiet, pollIntervalMs: 300 });
    const got = [];
    handle.poller.onMessage((m) => { got.push(m.id); });
    await waitFor(() => handle.poller.status().realtime, { what: 'realtime' });
    const sent = [];
    for (let i = 0; i < 300; i++) {
      if (i === 100) {
        // The next stream opens normally, then breaks after 300 ms.
        sd.inject({ path: '/messages/stream', dropAfterMs: 300 });
        expect(sd.dropStreams('alice')).toBe(1);
      }
      if (i === 200) {
        // After the short-lived stream broke too, and the next one is up.
        await waitFor(() => handle.sseConnection.status().reconnects === 2 && sd.streams('alice') === 1
          && handle.poller.status().realtime, { what: 'stream back twice', timeoutMs: 8000 });
        expect(sd.dropStreams('alice')).toBe(1);
      }
      sent.push(sd.sendDirect('bob', 'alice', `chaos ${i}`).id);
      if (i % 25 === 7) sd.sseSendRaw('alice', 'data: {broken\n\n');
      if (i % 10 === 0) await sleep(15);
    }
    await waitFor(() => got.length >= 300, { what: '300 messages', timeoutMs: 20_000 });
    await sleep(1000);
    expect(got).toHaveLength(300);
    expect(new Set(got)).toEqual(new Set(sent));
    expect(handle.transport.status().malformed).toBeGreaterThan(0);
    // The third drop's reconnect waits 2–4 s (the stream never stayed up 30 s meanwhile).
    await waitFor(() => handle.sseConnection.status().state === 'connected', { what: 'stream back', timeoutMs: 8000 });
    expect(handle.sseConnection.status().reconnects).toBe(3);
    expect(handle.poller.status()).toMatchObject({ delivered: 300, failed: 0 });
    await waitFor(() => sd.pending('alice').length === 0, { what: 'all acked' });
    expectNoKeyInUrls(['key-a']);
  }, 40_000);

  it('stop() closes the stream; nothing reconnects afterwards', async () => {
    const handle = await runtime(new FakeRegistry(sseCredential()), { ...quiet, pollIntervalMs: 200 });
    handle.poller.onMessage(() => {});
    await waitFor(() => sd.streams('alice') === 1 && handle.poller.status().realtime, { what: 'connected' });
    handle.stop();
    await waitFor(() => sd.streams() === 0, { what: 'stream closed', timeoutMs: 3000 });
    expect(handle.sseConnection.status()).toMatchObject({ running: false, state: 'closed' });
    const count = sd.requests.length;
    await sleep(2000);
    expect(sd.requests.length).toBe(count);
    expect(sd.streams()).toBe(0);
  });

  describe('with createSseTransport (a JS SSE transport)', () => {
    it('uses the factory, connects and subscribes it, and its messages reach the poller handler deduplicated', async () => {
      const sse = new ScriptedSseTransport();
      let made = 0;
      const cred = credential('alice', 'key-a', sd.url);
      const handle = await runtime(new FakeRegistry(cred), {
        ...quiet, pollIntervalMs: 300, sseEndpoint: `${sd.url}/messages/stream`, createSseTransport: () => { made += 1; return sse; },
      });
      expect(made).toBe(1);
      // The runtime's own SSE transport, as in the old package (the CLI prints the name).
      expect(handle.transport.name).toBe('sse');
      expect(handle.sseConnection).toBeInstanceOf(SseConnectionService);
      await waitFor(() => sse.subscribers === 1, { what: 'subscribed' });
      expect(sse.names()).toEqual(['connect', 'subscribe']);
      expect(sse.calls[0][1]).toEqual({ agentId: 'alice', apiKey: 'key-a', apiBaseUrl: sd.url, sseEndpoint: `${sd.url}/messages/stream` });
      expect(handle.sseConnection.status()).toMatchObject({ running: true, transportName: 'scripted-sse' });
      // The native stream is not opened when the caller brings its own.
      expect(sd.streams()).toBe(0);

      // Before any handler: kept, not lost.
      sse.emit(message({ id: 'js-early', content: 'early' }));
      await sleep(100);
      const got = [];
      handle.poller.onMessage((m) => { got.push(m.id); });
      await waitFor(() => got.length === 1, { what: 'the early one' });

      sse.emit(message({ id: 'js-1' }));
      sse.emit(message({ id: 'js-1' }));
      // A message the server queued comes by peek and by the JS stream: one call.
      const row = sd.sendDirect('bob', 'alice', 'both paths');
      sse.emit({ id: row.id, from: 'bob', content: 'both paths', timestamp: row.createdAt });
      await waitFor(() => got.length === 3, { what: 'three' });
      const polled = peeks().length;
      await waitFor(() => peeks().length >= polled + 2, { what: 'two more polls' });
      expect(got).toEqual(['js-early', 'js-1', row.id]);
      // Malformed and throwing-handler cases do not break the bridge.
      sse.emit({ nope: true });
      sse.emit(message({ id: 'js-2' }));
      await waitFor(() => got.length === 4, { what: 'js-2' });
      expect(got[3]).toBe('js-2');
    });

    it('stop() unsubscribes and disconnects the JS SSE transport', async () => {
      const sse = new ScriptedSseTransport();
      const handle = await runtime(new FakeRegistry(credential('alice', 'key-a', sd.url)), {
        ...quiet, sseEndpoint: `${sd.url}/messages/stream`, createSseTransport: () => sse,
      });
      const got = [];
      handle.poller.onMessage((m) => { got.push(m.id); });
      await waitFor(() => sse.subscribers === 1, { what: 'subscribed' });
      handle.stop();
      await waitFor(() => sse.names().includes('disconnect'), { what: 'disconnect' });
      expect(sse.names()).toEqual(['connect', 'subscribe', 'unsubscribe', 'disconnect']);
      expect(sse.subscribers).toBe(0);
      expect(handle.sseConnection.status().running).toBe(false);
    });

    it('a factory transport whose connect() fails leaves polling to deliver', async () => {
      const sse = new ScriptedSseTransport();
      sse.connectError = new Error('no stream today');
      const handle = await runtime(new FakeRegistry(credential('alice', 'key-a', sd.url)), {
        ...quiet, pollIntervalMs: 200, sseEndpoint: `${sd.url}/messages/stream`, createSseTransport: () => sse,
      });
      const got = [];
      handle.poller.onMessage((m) => { got.push(m.content); });
      sd.sendDirect('bob', 'alice', 'by peek');
      await waitFor(() => got.length === 1, { what: 'delivery by polling' });
      expect(sse.names()).toEqual(['connect']);
    });
  });
});
