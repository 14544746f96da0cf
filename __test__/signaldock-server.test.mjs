/**
 * Self-test of the SignalDock test server (testing/signaldock-server.mjs).
 *
 * The runtime's own tests trust this server to behave like WIRE.md says, so every
 * behaviour they lean on is pinned here: auth, the peek/ack lifecycle, conversation
 * order and encoded ids, each fault kind, the SSE stream (connected, push, replay,
 * drop, heartbeats), the refusal of keys in URLs, and the CLI + control API.
 * Each test asserts a positive outcome as well as the absence of the wrong one,
 * so that a server doing nothing cannot pass.
 */
import { describe, it, expect, beforeEach, afterEach } from 'vitest';
import http from 'node:http';
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { startSignalDock, dmConversationId } from '../testing/signaldock-server.mjs';

const SERVER_PATH = fileURLToPath(new URL('../testing/signaldock-server.mjs', import.meta.url));
const AGENTS = { alice: 'key-a', bob: 'key-b' };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** fetch against the server with the agent headers of WIRE.md. */
function call(sd, method, path, { agent, key, body, headers = {}, signal } = {}) {
  const h = { ...headers };
  if (key !== undefined) h.authorization = `Bearer ${key}`;
  if (agent !== undefined) h['x-agent-id'] = agent;
  if (body !== undefined) h['content-type'] = 'application/json';
  const payload = body === undefined ? undefined : JSON.stringify(body);
  return fetch(`${sd.url}${path}`, { method, headers: h, body: payload, signal });
}
const asAlice = (sd, method, path, opts = {}) => call(sd, method, path, { agent: 'alice', key: 'key-a', ...opts });
const asBob = (sd, method, path, opts = {}) => call(sd, method, path, { agent: 'bob', key: 'key-b', ...opts });

function parseFrame(frame) {
  const ev = { event: 'message', data: undefined, id: undefined, retry: undefined };
  for (const line of frame.split('\n')) {
    if (line === '' || line.startsWith(':')) continue;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'data') ev.data = ev.data === undefined ? value : `${ev.data}\n${value}`;
    else if (field in ev) ev[field] = value;
  }
  return ev;
}

/** A minimal SSE client on node:http that keeps every frame for assertions. */
function openSse(url, headers = {}) {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { headers, agent: false }, (res) => {
      const client = { status: res.statusCode, headers: res.headers, events: [], raw: '', ended: false };
      const waiters = new Set();
      const wake = () => { for (const w of [...waiters]) w(); };
      let buf = '';
      res.setEncoding('utf8');
      res.on('data', (chunk) => {
        client.raw += chunk;
        buf += chunk;
        for (let i = buf.indexOf('\n\n'); i >= 0; i = buf.indexOf('\n\n')) {
          client.events.push(parseFrame(buf.slice(0, i)));
          buf = buf.slice(i + 2);
        }
        wake();
      });
      const end = () => { client.ended = true; wake(); };
      res.on('error', end);
      res.on('close', end);
      client.messages = () => client.events.filter((e) => e.event === 'message' && e.data && !e.data.includes('"heartbeat"'));
      client.waitFor = (pred, ms = 5000) => new Promise((ok, bad) => {
        const check = () => {
          const v = pred(client);
          if (v) { clearTimeout(t); waiters.delete(check); ok(v); }
        };
        const t = setTimeout(() => {
          waiters.delete(check);
          bad(new Error(`SSE waitFor timed out; raw so far:\n${client.raw}`));
        }, ms);
        waiters.add(check);
        check();
      });
      client.close = () => req.destroy();
      resolve(client);
    });
    req.on('error', reject);
  });
}

const aliceStreamHeaders = { authorization: 'Bearer key-a', 'x-agent-id': 'alice', accept: 'text/event-stream' };

describe('signaldock test server', () => {
  let sd;
  beforeEach(async () => { sd = await startSignalDock({ agents: { ...AGENTS } }); });
  afterEach(async () => { await sd?.close(); });

  describe('basics and auth', () => {
    it('binds to 127.0.0.1 on an ephemeral port and serves /health without auth', async () => {
      expect(sd.url).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
      expect(sd.url.endsWith(':0')).toBe(false);
      const res = await fetch(`${sd.url}/health`);
      expect(res.status).toBe(200);
      expect(await res.json()).toEqual({ success: true, data: { status: 'ok' } });
    });

    it('refuses missing, wrong, foreign and expired keys with 401', async () => {
      const unauthorized = { success: false, error: { code: 'E_UNAUTHORIZED', message: 'unauthorized', category: 'auth', retryable: false } };
      const cases = [
        await call(sd, 'GET', '/messages/peek'),
        await call(sd, 'GET', '/messages/peek', { agent: 'alice', key: 'nope' }),
        await call(sd, 'GET', '/messages/peek', { agent: 'alice', key: 'key-b' }), // bob's key
        await call(sd, 'GET', '/messages/peek', { agent: 'mallory', key: 'key-a' }),
      ];
      for (const res of cases) {
        expect(res.status).toBe(401);
        expect(await res.json()).toEqual(unauthorized);
      }
      expect((await asAlice(sd, 'GET', '/messages/peek')).status).toBe(200);
      // Without X-Agent-Id the key's owner is the caller.
      sd.sendDirect('bob', 'alice', 'for alice');
      const own = await call(sd, 'GET', '/messages/peek', { key: 'key-a' });
      expect((await own.json()).data.messages.map((m) => m.content)).toEqual(['for alice']);

      sd.expireKey('key-a');
      expect((await asAlice(sd, 'GET', '/messages/peek')).status).toBe(401);
      expect(sd.keysOf('alice')).toEqual([]);
    });

    it('supports several keys per agent, rotate-key overlap and expiry', async () => {
      sd.addKey('alice', 'key-a2');
      expect(sd.keysOf('alice').sort()).toEqual(['key-a', 'key-a2']);
      expect((await call(sd, 'GET', '/messages/peek', { agent: 'alice', key: 'key-a2' })).status).toBe(200);

      const rotated = await asAlice(sd, 'POST', '/agents/alice/rotate-key');
      expect(rotated.status).toBe(200);
      const { data } = await rotated.json();
      expect(data.agentId).toBe('alice');
      expect(typeof data.apiKey).toBe('string');
      expect(sd.keysOf('alice')).toContain(data.apiKey);
      // Overlap: old and new both work until the old one is expired.
      expect((await call(sd, 'GET', '/messages/peek', { agent: 'alice', key: data.apiKey })).status).toBe(200);
      expect((await asAlice(sd, 'GET', '/messages/peek')).status).toBe(200);
      sd.expireKey('key-a');
      expect((await asAlice(sd, 'GET', '/messages/peek')).status).toBe(401);
      expect((await call(sd, 'GET', '/messages/peek', { agent: 'alice', key: data.apiKey })).status).toBe(200);

      sd.addAgent('carol', 'key-c');
      expect((await call(sd, 'GET', '/messages/peek', { agent: 'carol', key: 'key-c' })).status).toBe(200);
    });

    it('answers 404 on unknown routes and records every request', async () => {
      const res = await asAlice(sd, 'GET', '/nope?x=1');
      expect(res.status).toBe(404);
      expect((await res.json()).success).toBe(false);
      expect((await asAlice(sd, 'DELETE', '/messages/peek')).status).toBe(404);
      await asAlice(sd, 'POST', '/messages/ack', { body: { messageIds: [] } });
      const [first, , third] = sd.requests;
      expect(first).toMatchObject({ method: 'GET', path: '/nope', query: { x: '1' }, agentId: 'alice', body: null });
      expect(first.headers.authorization).toBe('Bearer key-a');
      expect(typeof first.at).toBe('number');
      expect(third.body).toEqual({ messageIds: [] });
      sd.clearRequests();
      expect(sd.requests).toHaveLength(0);
    });

    it('records heartbeats and status changes', async () => {
      const hb = await asAlice(sd, 'POST', '/agents/alice/heartbeat', { body: { status: 'online' } });
      expect(hb.status).toBe(200);
      expect((await hb.json()).success).toBe(true);
      expect(sd.heartbeats('alice')).toHaveLength(1);
      expect(sd.heartbeats('alice')[0]).toMatchObject({ agentId: 'alice', status: 'online', body: { status: 'online' } });
      expect(sd.heartbeats('bob')).toHaveLength(0);
      expect((await asAlice(sd, 'PUT', '/agents/alice/status', { body: { status: 'busy' } })).status).toBe(200);
      expect(sd.statuses).toHaveLength(1);
      expect(sd.statuses[0]).toMatchObject({ agentId: 'alice', status: 'busy' });
    });
  });

  describe('direct messages', () => {
    it('peek is the X-Agent-Id inbox, non-destructive, oldest first, honours limit/since; mentioned filters content', async () => {
      const at = (s) => ({ createdAt: `2026-04-07T12:00:0${s}Z` });
      const m1 = sd.sendDirect('bob', 'alice', 'one', at(1));
      const m2 = sd.sendDirect('bob', 'alice', 'two @alice', { metadata: { k: 1 }, ...at(2) });
      const m3 = sd.sendDirect('bob', 'alice', 'three', at(2));
      sd.sendDirect('alice', 'bob', 'not for alice');
      expect(m1).toMatchObject({
        fromAgentId: 'bob', toAgentId: 'alice', content: 'one', contentType: 'text',
        conversationId: 'alice,bob',
      });
      expect(m1.id).toMatch(/^[0-9a-f-]{36}$/);
      // Whole seconds, as the real store keeps them.
      expect(sd.sendDirect('bob', 'carol', 'now').createdAt).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/);
      expect(dmConversationId('zed', 'amy')).toBe('amy,zed');

      const peek = async (qs = '') => (await (await asAlice(sd, 'GET', `/messages/peek${qs}`)).json()).data.messages;
      expect((await peek()).map((m) => m.id)).toEqual([m1.id, m2.id, m3.id]);
      expect((await peek()).map((m) => m.id)).toEqual([m1.id, m2.id, m3.id]); // still there
      expect((await peek('?limit=2')).map((m) => m.id)).toEqual([m1.id, m2.id]);
      expect((await peek(`?since=${encodeURIComponent(m1.createdAt)}`)).map((m) => m.id)).toEqual([m2.id, m3.id]);
      // Rows of the same second as `since` are not returned: seconds, strictly after.
      expect((await peek(`?since=${encodeURIComponent(m2.createdAt)}`)).map((m) => m.id)).toEqual([]);
      // mentioned= is an @-mention content filter, not the inbox owner.
      expect((await peek('?mentioned=alice&limit=50')).map((m) => m.id)).toEqual([m2.id]);
      expect((await peek('?mentioned=bob')).map((m) => m.id)).toEqual([]);
      expect((await peek())[1].metadata).toEqual({ k: 1 });

      const ack = await asAlice(sd, 'POST', '/messages/ack', { body: { messageIds: [m1.id, m3.id, 'unknown'] } });
      expect((await ack.json()).data).toEqual({ acked: 2 });
      expect((await peek()).map((m) => m.id)).toEqual([m2.id]);
      expect(sd.pending('alice').map((m) => m.id)).toEqual([m2.id]);
      expect(sd.delivered('alice').map((m) => m.id)).toEqual([m1.id, m3.id]);
      expect(sd.acked('alice')).toEqual([m1.id, m3.id, 'unknown']);
      expect(sd.pending('bob')).toHaveLength(1); // alice's ack touched only her own inbox
    });

    it('caps peek at 500 and defaults to 50', async () => {
      for (let i = 0; i < 520; i++) sd.sendDirect('bob', 'alice', `m${i}`);
      const count = async (qs) => (await (await asAlice(sd, 'GET', `/messages/peek${qs}`)).json()).data.messages.length;
      expect(await count('')).toBe(50);
      expect(await count('?limit=1000')).toBe(500);
      expect(await count('?limit=7')).toBe(7);
    });

    it('POST /messages sends as the caller; legacyIds answers { id }', async () => {
      const res = await asAlice(sd, 'POST', '/messages', { body: { toAgentId: 'bob', content: 'hi bob' } });
      expect(res.status).toBe(201);
      const { data } = await res.json();
      expect(data.message.id).toMatch(/^[0-9a-f-]{36}$/);
      expect(sd.pending('bob')).toEqual([expect.objectContaining({ id: data.message.id, fromAgentId: 'alice', content: 'hi bob' })]);

      sd.legacyIds = true;
      const legacy = await (await asAlice(sd, 'POST', '/messages', { body: { toAgentId: 'bob', content: 'again' } })).json();
      expect(legacy.data.message).toBeUndefined();
      expect(legacy.data.id).toBe(sd.pending('bob')[1].id);

      expect((await asAlice(sd, 'POST', '/messages', { body: { content: 'no recipient' } })).status).toBe(400);
    });
  });

  describe('conversations', () => {
    it('lists newest first by default and with sort=desc, oldest first with sort=asc', async () => {
      // Distinct seconds: rows of one second have no order (see the real-server tests).
      const ids = ['a', 'b', 'c', 'd'].map((c, i) => sd.postToConversation('team', 'bob', c, { createdAt: `2026-04-07T12:00:0${i}Z` }).id);
      const list = async (qs) => (await (await asAlice(sd, 'GET', `/conversations/team/messages${qs}`)).json()).data.messages.map((m) => m.id);
      expect(await list('?sort=desc&limit=3')).toEqual([ids[3], ids[2], ids[1]]);
      expect(await list('')).toEqual([...ids].reverse());
      expect(await list('?sort=asc&limit=2')).toEqual([ids[0], ids[1]]);
    });

    it('decodes encoded ids intact and keeps them apart from look-alikes', async () => {
      const id = 'team/α beta?x=1#frag%41 ü';
      sd.postToConversation('team', 'bob', 'decoy');
      const posted = await asAlice(sd, 'POST', `/conversations/${encodeURIComponent(id)}/messages`, {
        body: { content: 'hello @bob', replyTo: 'm-0' },
      });
      expect(posted.status).toBe(201);
      const postedId = (await posted.json()).data.message.id;
      sd.postToConversation(id, 'bob', 'reply');

      const res = await asBob(sd, 'GET', `/conversations/${encodeURIComponent(id)}/messages?sort=desc&limit=10`);
      const rows = (await res.json()).data.messages;
      expect(rows.map((r) => r.content)).toEqual(['reply', 'hello @bob']);
      expect(rows[1]).toMatchObject({ id: postedId, conversationId: id, fromAgentId: 'alice', replyTo: 'm-0' });
      // The recorded path is the raw one, so tests can assert the client encoded it.
      expect(sd.requests.at(-1).path).toBe(`/conversations/${encodeURIComponent(id)}/messages`);

      const unknown = await asBob(sd, 'GET', `/conversations/${encodeURIComponent('nobody here')}/messages`);
      expect(unknown.status).toBe(200);
      expect((await unknown.json()).data.messages).toEqual([]);
      expect((await asBob(sd, 'GET', '/conversations/%E0%A4%A/messages')).status).toBe(400);
    });

    it('DM rows also appear in their DM conversation', async () => {
      const m = sd.sendDirect('bob', 'alice', 'dm');
      const res = await asAlice(sd, 'GET', `/conversations/${encodeURIComponent('alice,bob')}/messages`);
      expect((await res.json()).data.messages.map((r) => r.id)).toEqual([m.id]);
    });

    it('groupDelayMs delays conversation reads only', async () => {
      sd.groupDelayMs = 200;
      let t = Date.now();
      expect((await asAlice(sd, 'GET', '/conversations/team/messages')).status).toBe(200);
      expect(Date.now() - t).toBeGreaterThanOrEqual(190);
      t = Date.now();
      await asAlice(sd, 'GET', '/messages/peek');
      expect(Date.now() - t).toBeLessThan(150);
    });
  });

  describe('fault injection', () => {
    it('status + Retry-After applies `times` times, then normal service resumes', async () => {
      const rule = sd.inject({ path: '/messages/peek', status: 429, retryAfter: 3, times: 2 });
      for (let i = 0; i < 2; i++) {
        const res = await asAlice(sd, 'GET', '/messages/peek?limit=5');
        expect(res.status).toBe(429);
        expect(res.headers.get('retry-after')).toBe('3');
        expect(await res.json()).toEqual({
          success: false,
          error: { code: 'E_RATE_LIMITED', message: 'injected 429', category: 'rate_limit', retryable: true, retry_after_ms: 3000 },
        });
      }
      expect(rule.hits).toBe(2);
      expect((await asAlice(sd, 'GET', '/messages/peek')).status).toBe(200);
      expect(sd.faults).toHaveLength(0);
    });

    it('matches before auth, by method, prefix, RegExp and agentId; Infinity lasts until cleared', async () => {
      sd.inject({ path: '/health', status: 503, times: Infinity });
      for (let i = 0; i < 3; i++) expect((await fetch(`${sd.url}/health`)).status).toBe(503);
      sd.clearFaults();
      expect((await fetch(`${sd.url}/health`)).status).toBe(200);

      sd.inject({ path: '/messages/*', status: 500 });
      expect((await call(sd, 'GET', '/messages/peek', { key: 'wrong' })).status).toBe(500); // before auth

      sd.inject({ method: 'post', path: /^\/conversations\/[^/]+\/messages$/, status: 502 });
      expect((await asAlice(sd, 'GET', '/conversations/g/messages')).status).toBe(200);
      expect((await asAlice(sd, 'POST', '/conversations/g/messages', { body: { content: 'x' } })).status).toBe(502);

      sd.inject({ agentId: 'bob', status: 500 });
      expect((await asAlice(sd, 'GET', '/messages/peek')).status).toBe(200);
      expect((await asBob(sd, 'GET', '/messages/peek')).status).toBe(500);
      expect((await asBob(sd, 'GET', '/messages/peek')).status).toBe(200);

      expect(() => sd.inject({ path: '/health', delay: 5 })).toThrow(/unknown fault rule key/);
    });

    it('malformed answers 200 with a body that is not JSON', async () => {
      sd.inject({ path: '/messages/peek', malformed: true });
      const res = await asAlice(sd, 'GET', '/messages/peek');
      expect(res.status).toBe(200);
      const text = await res.text();
      expect(text.length).toBeGreaterThan(0);
      expect(() => JSON.parse(text)).toThrow();
      expect((await (await asAlice(sd, 'GET', '/messages/peek')).json()).success).toBe(true);
    });

    it('delayMs delays then proceeds normally, or with the given status', async () => {
      sd.sendDirect('bob', 'alice', 'late');
      sd.inject({ path: '/messages/peek', delayMs: 250 });
      let t = Date.now();
      const res = await asAlice(sd, 'GET', '/messages/peek');
      expect(Date.now() - t).toBeGreaterThanOrEqual(240);
      expect((await res.json()).data.messages.map((m) => m.content)).toEqual(['late']);

      sd.inject({ path: '/health', delayMs: 150, status: 503 });
      t = Date.now();
      expect((await fetch(`${sd.url}/health`)).status).toBe(503);
      expect(Date.now() - t).toBeGreaterThanOrEqual(140);
    });

    it('hang never answers; the client times out via AbortSignal', async () => {
      const rule = sd.inject({ path: '/messages/peek', hang: true });
      const t = Date.now();
      const err = await asAlice(sd, 'GET', '/messages/peek', { signal: AbortSignal.timeout(300) }).catch((e) => e);
      expect(err).toBeInstanceOf(Error);
      expect(err.name).toBe('TimeoutError');
      expect(Date.now() - t).toBeGreaterThanOrEqual(290);
      expect(rule.hits).toBe(1);
      expect(sd.requests.filter((r) => r.path === '/messages/peek')).toHaveLength(1);
      expect((await asAlice(sd, 'GET', '/messages/peek')).status).toBe(200);
    });

    it('reset destroys the socket without an answer', async () => {
      const rule = sd.inject({ path: '/messages/peek', reset: true });
      const err = await asAlice(sd, 'GET', '/messages/peek').catch((e) => e);
      expect(err).toBeInstanceOf(TypeError); // undici: "fetch failed"
      expect(rule.hits).toBe(1);
      const raw = await new Promise((resolve) => {
        sd.inject({ path: '/health', reset: true });
        http.get(`${sd.url}/health`, { agent: false }, () => resolve('answered')).on('error', (e) => resolve(e.code));
      });
      expect(raw).toBe('ECONNRESET');
    });

    it('probability is deterministic for a seed', async () => {
      const pattern = async (server) => {
        server.inject({ path: '/health', probability: 0.5, status: 503, times: Infinity });
        const out = [];
        for (let i = 0; i < 40; i++) out.push((await fetch(`${server.url}/health`)).status);
        return out.join(',');
      };
      const other = await startSignalDock({ seed: 42 });
      try {
        sd.seed = 42;
        const a = await pattern(sd);
        const b = await pattern(other);
        expect(a).toBe(b);
        expect(a).toContain('503');
        expect(a).toContain('200');
        sd.clearFaults();
        sd.seed = 7;
        expect(await pattern(sd)).not.toBe(a);
      } finally {
        await other.close();
      }
    });
  });

  describe('SSE /messages/stream', () => {
    it('opens with a connected event, pushes DMs (snake shape, ids) and marks them delivered', async () => {
      sd.sseShape = 'snake';
      const s = await openSse(`${sd.url}/messages/stream`, aliceStreamHeaders);
      expect(s.status).toBe(200);
      expect(s.headers['content-type']).toMatch(/^text\/event-stream/);
      await s.waitFor((c) => c.events.length >= 1);
      expect(s.events[0]).toMatchObject({ event: 'connected' });
      expect(JSON.parse(s.events[0].data)).toEqual({ agentId: 'alice' });
      expect(sd.streams('alice')).toBe(1);
      expect(sd.streams()).toBe(1);

      const m1 = sd.sendDirect('bob', 'alice', 'pushed');
      const m2 = sd.sendDirect('bob', 'alice', 'pushed too');
      await s.waitFor((c) => c.messages().length >= 2);
      const [e1, e2] = s.messages();
      expect(JSON.parse(e1.data)).toEqual({
        message_id: m1.id, conversation_id: 'alice,bob', from_agent_id: 'bob', from_agent_name: 'bob',
        to_agent_id: 'alice', content: 'pushed', content_type: 'text', created_at: m1.createdAt, attachments: [],
      });
      expect([e1.id, e2.id]).toEqual(['1', '2']);
      expect(JSON.parse(e2.data).message_id).toBe(m2.id);
      expect(sd.pending('alice')).toEqual([]);
      expect(sd.delivered('alice').map((m) => m.id)).toEqual([m1.id, m2.id]);
      // bob has no stream: his message waits for peek.
      sd.sendDirect('alice', 'bob', 'waits');
      expect(sd.pending('bob')).toHaveLength(1);
      s.close();
    });

    it('replays events after Last-Event-ID on reconnect and records the header (numbered shapes)', async () => {
      sd.sseShape = 'snake';
      const s1 = await openSse(`${sd.url}/messages/stream`, aliceStreamHeaders);
      const ids = ['a', 'b', 'c'].map((c) => sd.sendDirect('bob', 'alice', c).id);
      await s1.waitFor((c) => c.messages().length === 3);
      expect(s1.messages().map((e) => e.id)).toEqual(['1', '2', '3']);
      s1.close();
      await s1.waitFor((c) => c.ended);

      const s2 = await openSse(`${sd.url}/messages/stream`, { ...aliceStreamHeaders, 'last-event-id': '1' });
      await s2.waitFor((c) => c.messages().length === 2);
      expect(s2.events[0].event).toBe('connected');
      expect(s2.messages().map((e) => [e.id, JSON.parse(e.data).message_id])).toEqual([['2', ids[1]], ['3', ids[2]]]);
      expect(sd.requests.at(-1).headers['last-event-id']).toBe('1');
      // New events continue the per-agent sequence.
      sd.sendDirect('bob', 'alice', 'd');
      await s2.waitFor((c) => c.messages().length === 3);
      expect(s2.messages()[2].id).toBe('4');
      s2.close();
    });

    it('dropStreams destroys the stream; later messages stay pending', async () => {
      const s = await openSse(`${sd.url}/messages/stream`, aliceStreamHeaders);
      await s.waitFor((c) => c.events.length >= 1);
      expect(sd.dropStreams('bob')).toBe(0);
      expect(sd.dropStreams('alice')).toBe(1);
      expect(sd.streams('alice')).toBe(0);
      await s.waitFor((c) => c.ended);
      sd.sendDirect('bob', 'alice', 'after drop');
      expect(sd.pending('alice').map((m) => m.content)).toEqual(['after drop']);
    });

    it('dropAfterMs opens the stream normally then drops it', async () => {
      sd.inject({ path: '/messages/stream', dropAfterMs: 200 });
      const t = Date.now();
      const s = await openSse(`${sd.url}/messages/stream`, aliceStreamHeaders);
      expect(s.status).toBe(200);
      await s.waitFor((c) => c.events.length >= 1);
      expect(s.events[0].event).toBe('connected');
      await s.waitFor((c) => c.ended);
      expect(Date.now() - t).toBeGreaterThanOrEqual(190);
      expect(sd.streams('alice')).toBe(0);
    });

    it('refuses ?token= in the URL with 401 even with valid headers, and records it', async () => {
      const s = await openSse(`${sd.url}/messages/stream?token=key-a&agent_id=alice`, aliceStreamHeaders);
      expect(s.status).toBe(401);
      await s.waitFor((c) => c.ended);
      expect(sd.streams()).toBe(0);
      expect(sd.requests.at(-1)).toMatchObject({ path: '/messages/stream', query: { token: 'key-a', agent_id: 'alice' } });
      const bad = await openSse(`${sd.url}/messages/stream`, { ...aliceStreamHeaders, authorization: 'Bearer key-b' });
      expect(bad.status).toBe(401);
    });

    it('sends heartbeats every heartbeatMs unless silenced; sseSendRaw writes raw text', async () => {
      await sd.close();
      sd = await startSignalDock({ agents: AGENTS, heartbeatMs: 80 });
      const s = await openSse(`${sd.url}/messages/stream`, aliceStreamHeaders);
      const beats = () => s.events.filter((e) => e.event === 'heartbeat').length;
      await s.waitFor(() => beats() >= 2);

      sd.silence = true;
      await sleep(100); // let any beat already in flight arrive
      const frozen = beats();
      await sleep(400);
      expect(beats()).toBe(frozen);
      sd.silence = false;
      await s.waitFor(() => beats() > frozen);

      expect(sd.sseSendRaw('alice', 'retry: 1500\n\nevent: custom\ndata: {not json\n\n')).toBe(1);
      await s.waitFor((c) => c.events.some((e) => e.event === 'custom'));
      expect(s.events.find((e) => e.retry !== undefined).retry).toBe('1500');
      expect(s.events.find((e) => e.event === 'custom').data).toBe('{not json');
      s.close();
    });

    it('camel shape, eventIds off, and pushToStreams off', async () => {
      await sd.close();
      sd = await startSignalDock({ agents: AGENTS, sseShape: 'camel', eventIds: false });
      const s = await openSse(`${sd.url}/messages/stream`, aliceStreamHeaders);
      await s.waitFor((c) => c.events.length >= 1);
      const m = sd.sendDirect('bob', 'alice', 'camel');
      await s.waitFor((c) => c.messages().length === 1);
      expect(JSON.parse(s.messages()[0].data)).toEqual({
        id: m.id, from: 'bob', content: 'camel', threadId: 'alice,bob', timestamp: m.createdAt,
      });
      expect(s.messages()[0].id).toBeUndefined();
      expect(s.raw).not.toMatch(/^id:/m);

      sd.pushToStreams = false;
      sd.sendDirect('bob', 'alice', 'held');
      await sleep(200);
      expect(s.messages()).toHaveLength(1);
      expect(sd.pending('alice').map((r) => r.content)).toEqual(['held']);
      sd.pushToStreams = true;
      sd.sendDirect('bob', 'alice', 'flows');
      await s.waitFor((c) => c.messages().length === 2);
      s.close();
    });
  });

  it('close() is prompt with an open stream, a hung request and a delayed request', async () => {
    const s = await openSse(`${sd.url}/messages/stream`, aliceStreamHeaders);
    await s.waitFor((c) => c.events.length >= 1);
    sd.inject({ path: '/messages/peek', hang: true });
    sd.inject({ path: '/health', delayMs: 30_000 });
    const outcome = (path, headers) => new Promise((resolve) => {
      http.get(`${sd.url}${path}`, { headers, agent: false }, (res) => resolve(`answered ${res.statusCode}`))
        .on('error', (e) => resolve(e.code));
    });
    const hung = outcome('/messages/peek', { authorization: 'Bearer key-a', 'x-agent-id': 'alice' });
    const delayed = outcome('/health', {});
    await sleep(150);
    expect(sd.requests.map((r) => r.path)).toEqual(['/messages/stream', '/messages/peek', '/health']);
    const t = Date.now();
    await sd.close();
    expect(Date.now() - t).toBeLessThan(1000);
    expect(await hung).toBe('ECONNRESET');
    expect(await delayed).toBe('ECONNRESET');
    await s.waitFor((c) => c.ended);
    sd = null;
  });
});

describe('the real server, as the public SignalDock crates show it (defaults)', () => {
  let sd;
  beforeEach(async () => { sd = await startSignalDock({ agents: { alice: 'key-a', bob: 'key-b', carol: 'key-c' } }); });
  afterEach(async () => { await sd?.close(); });
  const listing = async (conv, limit = 50) => (await (await asAlice(sd, 'GET', `/conversations/${conv}/messages?sort=desc&limit=${limit}`)).json()).data.messages;

  it('a post fans out one copy per member but the sender: own ids, one groupId, each in its inbox', async () => {
    sd.createConversation('ops', ['alice', 'bob', 'carol']);
    const post = sd.postToConversation('ops', 'bob', '@carol hello');
    expect(post.copies.map((c) => c.toAgentId).sort()).toEqual(['alice', 'carol']);
    expect(new Set(post.copies.map((c) => c.id)).size).toBe(2);
    expect(new Set(post.copies.map((c) => c.groupId))).toEqual(new Set([post.groupId]));
    expect(sd.pending('alice').map((m) => m.groupId)).toEqual([post.groupId]);
    expect(sd.pending('carol').map((m) => m.groupId)).toEqual([post.groupId]);
    expect(sd.pending('bob')).toEqual([]);
    // Not a member: nothing in the inbox, the listing only.
    sd.createConversation('other', ['bob', 'carol']);
    sd.postToConversation('other', 'bob', '@alice hi');
    expect(sd.pending('alice')).toHaveLength(1);
  });

  it('the listing shows one row per groupId (the smallest copy id) and shuffles rows of one second', async () => {
    sd.createConversation('ops', ['alice', 'bob', 'carol']);
    const post = sd.postToConversation('ops', 'bob', 'one post', { createdAt: '2026-04-07T12:00:00Z' });
    let rows = await listing('ops');
    expect(rows).toHaveLength(1);
    expect(rows[0].id).toBe(post.copies.map((c) => c.id).sort()[0]);
    expect(rows[0].groupId).toBe(post.groupId);
    for (let i = 0; i < 6; i++) sd.postToConversation('ops', 'carol', `tie ${i}`, { createdAt: '2026-04-07T12:00:05Z' });
    sd.postToConversation('ops', 'carol', 'newest', { createdAt: '2026-04-07T12:00:09Z' });
    const orders = new Set();
    for (let i = 0; i < 20; i++) {
      rows = await listing('ops');
      expect(rows[0].content).toBe('newest');
      expect(rows.at(-1).content).toBe('one post');
      orders.add(rows.slice(1, 7).map((r) => r.content).join());
    }
    expect(orders.size).toBeGreaterThan(1); // no tiebreak: the order of a tie is not stable
  });

  it('pushes the real frame (id = message id, event: message, camelCase, no groupId) and heartbeats as events', async () => {
    await sd.close();
    sd = await startSignalDock({ agents: { alice: 'key-a', bob: 'key-b' }, heartbeatMs: 50 });
    const s = await openSse(`${sd.url}/messages/stream`, aliceStreamHeaders);
    const m = sd.sendDirect('bob', 'alice', 'pushed');
    await s.waitFor((c) => c.events.some((e) => e.event === 'message'));
    const frame = s.events.find((e) => e.event === 'message');
    expect(frame.id).toBe(m.id);
    const data = JSON.parse(frame.data);
    expect(data).toEqual({
      messageId: m.id, conversationId: 'alice,bob', from: 'bob', content: 'pushed', contentType: 'text',
      createdAt: m.createdAt.replace('Z', '+00:00'), attachments: [],
    });
    await s.waitFor((c) => c.events.some((e) => e.event === 'heartbeat'));
    expect(JSON.parse(s.events.find((e) => e.event === 'heartbeat').data)).toHaveProperty('timestamp');
    expect(sd.delivered('alice').map((r) => r.id)).toEqual([m.id]);
    s.close();
  });

  it('Last-Event-ID replays the messages after that one (up to 100), marking them delivered', async () => {
    const first = sd.sendDirect('bob', 'alice', 'first');
    const later = [sd.sendDirect('bob', 'alice', 'second'), sd.sendDirect('bob', 'alice', 'third')];
    const s = await openSse(`${sd.url}/messages/stream`, { ...aliceStreamHeaders, 'last-event-id': first.id });
    await s.waitFor((c) => c.messages().length >= 2);
    expect(s.messages().map((e) => e.id)).toEqual(later.map((m) => m.id));
    expect(sd.pending('alice').map((m) => m.id)).toEqual([first.id]);
    s.close();
  });

  it('errors are the structured envelope; a 429 carries retry_after_ms, with a header only when asked', async () => {
    sd.inject({ path: '/messages/peek', status: 429, retryAfterMs: 1500 });
    let res = await asAlice(sd, 'GET', '/messages/peek');
    expect(res.status).toBe(429);
    expect(res.headers.get('retry-after')).toBeNull();
    expect((await res.json()).error).toEqual({
      code: 'E_RATE_LIMITED', message: 'injected 429', category: 'rate_limit', retryable: true, retry_after_ms: 1500,
    });
    sd.inject({ path: '/messages/peek', status: 429 });
    expect((await (await asAlice(sd, 'GET', '/messages/peek')).json()).error.retry_after_ms).toBe(60_000);
    res = await call(sd, 'GET', '/messages/peek', { agent: 'alice', key: 'wrong' });
    expect((await res.json()).error).toMatchObject({ code: 'E_UNAUTHORIZED', category: 'auth', retryable: false });
  });

  it('peekSince: refuse answers a since with 400, and a fault rule can match on the query', async () => {
    sd.peekSince = 'refuse';
    expect((await asAlice(sd, 'GET', '/messages/peek?since=2026-01-01T00:00:00Z')).status).toBe(400);
    expect((await asAlice(sd, 'GET', '/messages/peek')).status).toBe(200);
    sd.peekSince = 'timestamp';
    sd.inject({ path: '/messages/peek', query: { limit: '7' }, status: 503 });
    expect((await asAlice(sd, 'GET', '/messages/peek?limit=8')).status).toBe(200);
    expect((await asAlice(sd, 'GET', '/messages/peek?limit=7')).status).toBe(503);
  });
});

describe('CLI mode and control API', () => {
  /** Spawn the server as a separate process and read its one JSON line. */
  async function spawnServer(args = [], stdin = 'pipe') {
    const child = spawn(process.execPath, [SERVER_PATH, ...args], { stdio: [stdin, 'pipe', 'pipe'] });
    const lines = [];
    const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
    const first = new Promise((resolve, reject) => {
      createInterface({ input: child.stdout }).on('line', (line) => { lines.push(line); if (lines.length === 1) resolve(line); });
      child.on('exit', () => reject(new Error('server exited before printing its address')));
    });
    first.catch(() => {});
    const info = JSON.parse(await first);
    return { child, info, lines, exited };
  }
  const control = async (info, method, route, body) => {
    const res = await fetch(`${info.control}/${route}`, {
      method, headers: body ? { 'content-type': 'application/json' } : {}, body: body ? JSON.stringify(body) : undefined,
    });
    return { status: res.status, body: await res.json() };
  };

  it('prints one JSON line, serves the API, is driven by /_test/, exits on SIGTERM', async () => {
    const { child, info, lines, exited } = await spawnServer(['--agents', 'alice:key-a,bob:key-b', '--heartbeat-ms', '5000']);
    try {
      expect(info).toEqual({ url: expect.stringMatching(/^http:\/\/127\.0\.0\.1:\d+$/), control: `${info.url}/_test` });
      const sd = { url: info.url };
      expect((await fetch(`${info.url}/health`)).status).toBe(200);

      const sent = await control(info, 'POST', 'send', { from: 'alice', to: 'bob', content: 'via control' });
      expect(sent.body.message).toMatchObject({ fromAgentId: 'alice', toAgentId: 'bob', content: 'via control' });
      const peeked = await (await asBob(sd, 'GET', '/messages/peek')).json();
      expect(peeked.data.messages.map((m) => m.id)).toEqual([sent.body.message.id]);
      await asBob(sd, 'POST', '/messages/ack', { body: { messageIds: [sent.body.message.id] } });

      await control(info, 'POST', 'post', { conversationId: 'g/1', from: 'alice', content: '@bob hi' });
      const group = await (await asBob(sd, 'GET', `/conversations/${encodeURIComponent('g/1')}/messages`)).json();
      expect(group.data.messages.map((m) => m.content)).toEqual(['@bob hi']);

      expect((await control(info, 'POST', 'inject', { rule: { pathRegex: '^/conversations/', status: 503, times: 'Infinity' } })).status).toBe(200);
      expect((await asBob(sd, 'GET', '/conversations/x/messages')).status).toBe(503);
      expect((await asBob(sd, 'GET', '/conversations/x/messages')).status).toBe(503);
      await control(info, 'POST', 'clear-faults');
      expect((await asBob(sd, 'GET', '/conversations/x/messages')).status).toBe(200);
      expect((await control(info, 'POST', 'inject', { rule: { path: '/health', delay: 1 } })).status).toBe(400);

      const set = await control(info, 'POST', 'set', { legacyIds: true, groupDelayMs: 120 });
      expect(set.body).toMatchObject({ legacyIds: true, groupDelayMs: 120 });
      const legacy = await (await asAlice(sd, 'POST', '/messages', { body: { toAgentId: 'bob', content: 'x' } })).json();
      expect(typeof legacy.data.id).toBe('string');
      const t = Date.now();
      await asBob(sd, 'GET', '/conversations/x/messages');
      expect(Date.now() - t).toBeGreaterThanOrEqual(110);

      await control(info, 'POST', 'add-agent', { id: 'carol', key: 'key-c' });
      expect((await call(sd, 'GET', '/messages/peek', { agent: 'carol', key: 'key-c' })).status).toBe(200);
      await control(info, 'POST', 'expire-key', { key: 'key-c' });
      expect((await call(sd, 'GET', '/messages/peek', { agent: 'carol', key: 'key-c' })).status).toBe(401);

      const stream = await openSse(`${info.url}/messages/stream`, aliceStreamHeaders);
      await stream.waitFor((c) => c.events.length >= 1);
      let stats = (await control(info, 'GET', 'stats')).body;
      expect(stats.streams).toBe(1);
      expect((await control(info, 'POST', 'drop-streams', { agentId: 'alice' })).body).toEqual({ dropped: 1 });
      await stream.waitFor((c) => c.ended);

      stats = (await control(info, 'GET', 'stats')).body;
      // Only the agent-facing requests are recorded, never the control calls.
      const recorded = (await control(info, 'GET', 'requests')).body.requests;
      expect(recorded.map((r) => `${r.method} ${r.path}`)).toEqual([
        'GET /health', 'GET /messages/peek', 'POST /messages/ack', 'GET /conversations/g%2F1/messages',
        'GET /conversations/x/messages', 'GET /conversations/x/messages', 'GET /conversations/x/messages',
        'POST /messages', 'GET /conversations/x/messages', 'GET /messages/peek', 'GET /messages/peek',
        'GET /messages/stream',
      ]);
      expect(stats.requests).toBe(12);
      expect(stats.streams).toBe(0);
      // bob: the legacy-ids DM, and his copy of alice's post to g/1.
      expect(stats.pending).toEqual({ alice: 0, bob: 2, carol: 0 });
      expect(stats.acked).toEqual({ alice: 0, bob: 1, carol: 0 });
    } finally {
      child.kill('SIGTERM');
    }
    expect(await exited).toEqual({ code: 0, signal: null });
    expect(lines).toHaveLength(1);
  }, 20_000);

  it('exits when its stdin pipe closes, but not when stdin is /dev/null', async () => {
    const piped = await spawnServer(['--agents', 'alice:key-a']);
    piped.child.stdin.end();
    expect(await piped.exited).toEqual({ code: 0, signal: null });

    const ignored = await spawnServer([], 'ignore');
    try {
      await sleep(300);
      expect(ignored.child.exitCode).toBeNull();
      expect((await fetch(`${ignored.info.url}/health`)).status).toBe(200);
    } finally {
      ignored.child.kill('SIGINT');
    }
    expect(await ignored.exited).toEqual({ code: 0, signal: null });
  }, 20_000);
});
