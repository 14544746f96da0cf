// AgentPoller through the package entry: against the project's SignalDock test server and
// against JS fake transports, as the cleo dispatch layer and callers' tests use it.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { AgentPoller } from '@cleocode/runtime';
import { startSignalDock } from '../testing/signaldock-server.mjs';
import { FakeTransport, message, sleep, waitFor } from './support/helpers.mjs';

let sd;
const pollers = [];
beforeEach(async () => { sd = await startSignalDock({ agents: { alice: 'key-a', bob: 'key-b', carol: 'key-c' } }); });
afterEach(async () => {
  for (const p of pollers.splice(0)) p.stop();
  await sd.close();
});

function poller(config) {
  const p = new AgentPoller({ agentId: 'alice', apiKey: 'key-a', apiBaseUrl: sd.url, pollIntervalMs: 100, ...config });
  pollers.push(p);
  return p;
}

describe('config validation', () => {
  const base = () => ({ agentId: 'alice', apiKey: 'k', apiBaseUrl: 'http://127.0.0.1:9' });
  it.each([
    ['agentId', { agentId: undefined }],
    ['agentId', { agentId: 42 }],
    ['apiBaseUrl', { apiBaseUrl: undefined }],
    ['apiBaseUrl', { apiBaseUrl: 'not a url' }],
    ['pollIntervalMs', { pollIntervalMs: 0 }],
    ['pollIntervalMs', { pollIntervalMs: -5 }],
    ['pollIntervalMs', { pollIntervalMs: 'fast' }],
    ['pollIntervalMs', { pollIntervalMs: Number.NaN }],
    ['groupConversationIds', { groupConversationIds: 'general' }],
    ['groupConversationIds[1]', { groupConversationIds: ['a', 3] }],
    ['groupPollLimit', { groupPollLimit: 0 }],
    ['transport', { transport: {} }],
    ['transport', { transport: { poll: 'nope' } }],
  ])('%s: a wrong value is a TypeError naming it', (field, patch) => {
    expect(() => new AgentPoller({ ...base(), ...patch })).toThrow(TypeError);
    expect(() => new AgentPoller({ ...base(), ...patch })).toThrow(field);
  });

  it('a missing or non-object config is a TypeError', () => {
    expect(() => new AgentPoller()).toThrow(TypeError);
    expect(() => new AgentPoller('alice')).toThrow(TypeError);
  });

  it('the key never appears in a validation error', () => {
    try {
      new AgentPoller({ agentId: 'alice', apiKey: 'sk-very-secret', apiBaseUrl: 'sk-very-secret' });
    } catch (e) {
      expect(String(e.message)).not.toContain('sk-very-secret');
      return;
    }
    throw new Error('expected a TypeError');
  });

  it('a transport makes a non-http apiBaseUrl acceptable (local agents)', () => {
    expect(() => new AgentPoller({ ...base(), apiBaseUrl: 'local', transport: new FakeTransport() })).not.toThrow();
  });

  it('onMessage wants a function', () => {
    expect(() => poller({}).onMessage('nope')).toThrow(TypeError);
  });
});

describe('direct messages over the SignalDock peek', () => {
  it('delivers once, in order, then acks what was handled', async () => {
    for (let i = 0; i < 5; i++) sd.sendDirect('bob', 'alice', `dm ${i}`);
    const p = poller({});
    const got = [];
    p.onMessage((m) => { got.push(m.content); });
    p.start();
    await waitFor(() => sd.pending('alice').length === 0, { what: 'all acked' });
    expect(got).toEqual(['dm 0', 'dm 1', 'dm 2', 'dm 3', 'dm 4']);
    const peek = sd.requests.find((r) => r.path === '/messages/peek');
    expect(peek.query).toEqual({ limit: '50' }); // the inbox is X-Agent-Id: never mentioned=
    expect(peek.headers.authorization).toBe('Bearer key-a');
    expect(peek.headers['x-agent-id']).toBe('alice');
    await sleep(300);
    expect(got).toHaveLength(5);
  });

  it('maps rows with the documented fields', async () => {
    const row = sd.sendDirect('bob', 'alice', 'mapped');
    const p = poller({});
    let seen;
    p.onMessage((m) => { seen = m; });
    p.start();
    await waitFor(() => seen, { what: 'a message' });
    expect(seen).toMatchObject({ id: row.id, from: 'bob', content: 'mapped', threadId: row.conversationId, timestamp: row.createdAt });
  });

  it('drains more than one page (over 50 pending) without waiting an interval per page', async () => {
    for (let i = 0; i < 180; i++) sd.sendDirect('bob', 'alice', `n${i}`);
    const p = poller({ pollIntervalMs: 60_000 });
    const got = [];
    p.onMessage((m) => { got.push(m.content); });
    p.start();
    await waitFor(() => got.length === 180, { what: '180 messages' });
    expect(new Set(got).size).toBe(180);
    expect(got[0]).toBe('n0');
    expect(got[179]).toBe('n179');
    await waitFor(() => sd.pending('alice').length === 0, { what: 'all acked' });
  });

  it('a new poller after a restart does not redeliver what was handled', async () => {
    for (let i = 0; i < 3; i++) sd.sendDirect('bob', 'alice', `r${i}`);
    const first = poller({});
    const got = [];
    first.onMessage((m) => { got.push(m.content); });
    first.start();
    await waitFor(() => sd.pending('alice').length === 0, { what: 'acked' });
    first.stop();
    sd.sendDirect('bob', 'alice', 'after restart');
    const second = poller({});
    second.onMessage((m) => { got.push(m.content); });
    second.start();
    await waitFor(() => got.includes('after restart'), { what: 'new message' });
    await sleep(300);
    expect(got).toEqual(['r0', 'r1', 'r2', 'after restart']);
  });
});

describe('handlers', () => {
  it('nothing is consumed or marked seen before a handler exists', async () => {
    sd.sendDirect('bob', 'alice', 'early');
    const p = poller({});
    p.start();
    await sleep(400);
    expect(p.status().seenCount).toBe(0);
    expect(sd.pending('alice')).toHaveLength(1);
    const got = [];
    p.onMessage((m) => { got.push(m.content); });
    await waitFor(() => got.length === 1, { what: 'the early message' });
    expect(got).toEqual(['early']);
  });

  it('onMessage replaces the handler', async () => {
    const p = poller({});
    const first = [];
    const second = [];
    p.onMessage((m) => { first.push(m.id); });
    p.onMessage((m) => { second.push(m.id); });
    sd.sendDirect('bob', 'alice', 'x');
    p.start();
    await waitFor(() => second.length === 1, { what: 'delivery' });
    expect(first).toEqual([]);
  });

  it('awaits an async handler before the next call', async () => {
    for (let i = 0; i < 4; i++) sd.sendDirect('bob', 'alice', `a${i}`);
    const p = poller({});
    const events = [];
    let active = 0;
    let maxActive = 0;
    p.onMessage(async (m) => {
      active += 1; maxActive = Math.max(maxActive, active);
      events.push(`start ${m.content}`);
      await sleep(30);
      events.push(`end ${m.content}`);
      active -= 1;
    });
    p.start();
    await waitFor(() => events.length === 8, { what: 'four handled' });
    expect(maxActive).toBe(1);
    expect(events).toEqual(['start a0', 'end a0', 'start a1', 'end a1', 'start a2', 'end a2', 'start a3', 'end a3']);
  });

  it('a handler that throws or rejects is counted and the loop goes on', async () => {
    for (const c of ['throw', 'reject', 'ok', 'throw-string']) sd.sendDirect('bob', 'alice', c);
    const p = poller({});
    const got = [];
    p.onMessage(async (m) => {
      got.push(m.content);
      if (m.content === 'throw') throw new Error('sync-ish failure');
      if (m.content === 'throw-string') throw 'not an Error';
      if (m.content === 'reject') return Promise.reject(new Error('async failure'));
    });
    p.start();
    await waitFor(() => p.status().delivered + p.status().failed === 4, { what: 'four settled' });
    expect(p.status()).toMatchObject({ delivered: 1, failed: 3 });
    expect(p.status().lastError).toContain('handler');
    sd.sendDirect('bob', 'alice', 'still alive');
    await waitFor(() => got.includes('still alive'), { what: 'the loop going on' });
    // A failed message still settled: it is acked, not offered again for ever.
    await waitFor(() => sd.pending('alice').length === 0, { what: 'acks' });
  });

  it('a synchronously throwing plain function does not crash either', async () => {
    sd.sendDirect('bob', 'alice', 'x');
    const p = poller({});
    p.onMessage(() => { throw new TypeError('boom'); });
    p.start();
    await waitFor(() => p.status().failed === 1, { what: 'failure counted' });
  });
});

describe('start and stop', () => {
  it('start is idempotent and polls at once, then every interval', async () => {
    const p = poller({ pollIntervalMs: 300 });
    p.onMessage(() => {});
    p.start();
    p.start();
    await waitFor(() => sd.requests.length >= 1, { what: 'first poll', timeoutMs: 1000 });
    await sleep(1000);
    const peeks = sd.requests.filter((r) => r.path === '/messages/peek').length;
    expect(peeks).toBeGreaterThanOrEqual(3);
    expect(peeks).toBeLessThanOrEqual(6);
    expect(p.status().running).toBe(true);
  });

  it('after stop() returns, no handler call and no transport call', async () => {
    const transport = new FakeTransport(Array.from({ length: 20 }, () => message()));
    const p = poller({ apiBaseUrl: 'local', transport });
    let calls = 0;
    p.onMessage(async () => { calls += 1; await sleep(20); });
    p.start();
    await waitFor(() => calls >= 3, { what: 'some deliveries' });
    p.stop();
    p.stop();
    const frozenCalls = calls;
    const frozenTransport = transport.calls.length;
    await sleep(400);
    expect(calls).toBe(frozenCalls);
    expect(transport.calls.length).toBe(frozenTransport);
    expect(p.status().running).toBe(false);
  });

  it('stop() returns promptly while a handler never settles', async () => {
    sd.sendDirect('bob', 'alice', 'forever');
    const p = poller({});
    let called = false;
    p.onMessage(() => { called = true; return new Promise(() => {}); });
    p.start();
    await waitFor(() => called, { what: 'the handler call' });
    const t0 = performance.now();
    p.stop();
    expect(performance.now() - t0).toBeLessThan(100);
  });

  it('can be started again after stop', async () => {
    const p = poller({});
    const got = [];
    p.onMessage((m) => { got.push(m.content); });
    p.start();
    p.stop();
    sd.sendDirect('bob', 'alice', 'second life');
    p.start();
    await waitFor(() => got.includes('second life'), { what: 'delivery after restart' });
  });
});

describe('JS transports', () => {
  it('polls through the transport with this bound, limit 50, and acks through it', async () => {
    const transport = new FakeTransport([message({ id: 't1' }), message({ id: 't2' })]);
    const p = poller({ apiBaseUrl: 'local', transport });
    const got = [];
    p.onMessage((m) => { got.push(m.id); });
    p.start();
    await waitFor(() => transport.acked.length === 2, { what: 'acks' });
    expect(got).toEqual(['t1', 't2']);
    expect(transport.calls.find((c) => c[0] === 'poll')[1]).toMatchObject({ limit: 50 });
    expect(sd.requests.filter((r) => r.path === '/messages/peek')).toHaveLength(0);
  });

  it('a transport whose poll throws, rejects or returns junk never stops the loop', async () => {
    let n = 0;
    const transport = {
      name: 'flaky',
      poll() {
        n += 1;
        if (n === 1) throw new Error('sync throw');
        if (n === 2) return Promise.reject(new Error('rejected'));
        if (n === 3) return 42;
        if (n === 4) return [null, { nope: true }, { id: 'good', from: 'x', content: 'ok', timestamp: 't' }];
        return [];
      },
      async ack() {},
    };
    const p = poller({ apiBaseUrl: 'local', transport, pollIntervalMs: 50 });
    const got = [];
    p.onMessage((m) => { got.push(m.id); });
    p.start();
    await waitFor(() => got.includes('good'), { what: 'the good message' });
    expect(p.status().malformed).toBe(2);
    expect(p.status().lastError).toBeTruthy();
  });
});

describe('JS transports with peek semantics', () => {
  // As the real peek and the cleo CLI's local transport answer: `since` is ignored, poll()
  // returns the oldest unacked messages, so a page polled before the last one is acked is
  // that page again.
  class PeekTransport {
    name = 'peek';
    #pending;
    #returned = new Set();
    repeats = 0;
    polls = 0;
    pollsDuringAck = 0;
    #acking = 0;
    constructor(count, ackMs) {
      const t0 = Date.UTC(2026, 0, 1);
      this.#pending = Array.from({ length: count }, (_, i) => ({
        id: `p${i}`, from: 'bob', content: `peek ${i}`, timestamp: new Date(t0 + i * 1000).toISOString(),
      }));
      this.ackMs = ackMs;
    }
    async poll({ limit }) {
      this.polls += 1;
      if (this.#acking > 0) this.pollsDuringAck += 1;
      const page = this.#pending.slice(0, limit);
      for (const m of page) {
        if (this.#returned.has(m.id)) this.repeats += 1;
        this.#returned.add(m.id);
      }
      return page;
    }
    async ack(ids) {
      this.#acking += 1;
      await sleep(this.ackMs);
      this.#acking -= 1;
      const done = new Set(ids);
      this.#pending = this.#pending.filter((m) => !done.has(m.id));
    }
    get pending() { return this.#pending.length; }
  }

  it('no poll while an ack is in flight, and no page comes back twice after the first read-ahead', async () => {
    const transport = new PeekTransport(160, 25);
    const p = poller({ apiBaseUrl: 'local', transport, pollIntervalMs: 5 });
    const got = [];
    p.onMessage((m) => { got.push(m.id); });
    p.start();
    await waitFor(() => transport.pending === 0, { what: 'everything acked', timeoutMs: 20_000 });
    expect(got).toEqual(Array.from({ length: 160 }, (_, i) => `p${i}`));
    expect(transport.pollsDuringAck).toBe(0);
    // One read-ahead (it shows that `since` is ignored) may bring back the page in hand.
    expect(transport.repeats).toBeLessThanOrEqual(50);
    const polls = transport.polls;
    await sleep(100);
    expect(transport.polls, 'the interval goes on once the inbox is empty').toBeGreaterThan(polls);
  });

  it('a synchronous handler that throws on some messages: each settles as its own, all acked', async () => {
    const transport = new PeekTransport(120, 0);
    const p = poller({ apiBaseUrl: 'local', transport, pollIntervalMs: 5 });
    const got = [];
    p.onMessage((m) => {
      got.push(m.id);
      if (Number(m.id.slice(1)) % 3 === 0) throw new Error(`boom ${m.id}`);
    });
    p.start();
    await waitFor(() => transport.pending === 0, { what: 'everything acked', timeoutMs: 20_000 });
    expect(got).toHaveLength(120);
    expect(p.status()).toMatchObject({ delivered: 80, failed: 40 });
    expect(p.status().lastError).toMatch(/boom p\d+/);
  });

  it('the handler gets plain objects with exactly the fields the message has', async () => {
    const full = {
      id: 'f1', from: 'bob', content: 'all fields', tags: ['a', 'b'], threadId: 't', groupId: 'g',
      timestamp: '2026-01-01T00:00:00.000Z', metadata: { n: 1, nested: { list: [1, 'x', null, true] } },
    };
    const bare = { id: 'b1', from: 'bob', content: 'bare', timestamp: '2026-01-01T00:00:01.000Z' };
    const transport = new FakeTransport([full, bare]);
    const p = poller({ apiBaseUrl: 'local', transport });
    const got = [];
    p.onMessage((m) => { got.push(m); });
    p.start();
    await waitFor(() => got.length === 2, { what: 'two messages' });
    expect(got[0]).toStrictEqual(full);
    expect(got[1]).toStrictEqual(bare);
    expect(Object.keys(got[1])).toEqual(['id', 'from', 'content', 'timestamp']);
    for (const m of got) expect(Object.getPrototypeOf(m)).toBe(Object.prototype);
  });
});

describe('group conversations', () => {
  // alice watches channels she is not a member of, so only the listing brings their mentions
  // (a member also gets every post as her own fan-out copy: see fidelity.test.mjs).
  const channel = (...ids) => { for (const id of ids) sd.createConversation(id, ['bob', 'carol']); };

  it('delivers @mentions and @all (whole word, case-insensitive, not from self), after DMs', async () => {
    channel('general');
    sd.postToConversation('general', 'bob', 'hey @alice can you look');
    sd.postToConversation('general', 'bob', 'hey @alicex not you');
    sd.postToConversation('general', 'carol', '@ALL standup');
    sd.postToConversation('general', 'alice', '@alice talking to myself');
    sd.postToConversation('general', 'bob', 'no mention');
    sd.sendDirect('bob', 'alice', 'a direct one');
    const p = poller({ groupConversationIds: ['general'] });
    const got = [];
    p.onMessage((m) => { got.push([m.content, m.threadId]); });
    p.start();
    await waitFor(() => got.length === 3, { what: 'three messages' });
    await sleep(300);
    expect(got[0]).toEqual(['a direct one', expect.any(String)]);
    // Posted in one second: the listing gives them no order.
    expect(got.slice(1).sort()).toEqual([
      ['@ALL standup', 'general'],
      ['hey @alice can you look', 'general'],
    ]);
  });

  it('matches an agent id with regex characters literally', async () => {
    sd.addAgent('a.b+c', 'key-x');
    channel('g');
    sd.postToConversation('g', 'bob', 'ping @a.b+c please');
    sd.postToConversation('g', 'bob', 'ping @aXb+c please');
    const p = poller({ agentId: 'a.b+c', apiKey: 'key-x', groupConversationIds: ['g'] });
    const got = [];
    p.onMessage((m) => { got.push(m.content); });
    p.start();
    await waitFor(() => got.length === 1, { what: 'the literal mention' });
    await sleep(300);
    expect(got).toEqual(['ping @a.b+c please']);
  });

  it('keeps hostile conversation ids inside their path segment', async () => {
    const ids = ['a/b', 'q?x=1', 'h#x', '100%', 'with space', 'zoë', '..x'];
    channel(...ids);
    for (const id of ids) sd.postToConversation(id, 'bob', `@alice in ${id}`);
    const p = poller({ groupConversationIds: ids });
    const got = [];
    p.onMessage((m) => { got.push(m.threadId); });
    p.start();
    await waitFor(() => got.length === ids.length, { what: 'one per conversation' });
    expect(got.sort()).toEqual([...ids].sort());
    const paths = sd.requests.filter((r) => r.path.startsWith('/conversations/')).map((r) => r.path);
    expect(paths).toContain('/conversations/a%2Fb/messages');
    expect(paths).toContain('/conversations/q%3Fx=1/messages');
  });

  it('polls groups concurrently: a cycle over 10 slow groups takes about one round trip', async () => {
    sd.groupDelayMs = 300;
    const groups = Array.from({ length: 10 }, (_, i) => `g${i}`);
    channel(...groups);
    for (const g of groups) sd.postToConversation(g, 'bob', `@alice from ${g}`);
    const p = poller({ groupConversationIds: groups, pollIntervalMs: 60_000 });
    const got = [];
    p.onMessage((m) => { got.push(m.threadId); });
    const t0 = Date.now();
    p.start();
    await waitFor(() => got.length === 10, { what: 'ten groups' });
    // Sequential polling would take 10 × 300 ms.
    expect(Date.now() - t0).toBeLessThan(2500);
  });

  it('a burst bigger than one page is read in full, not lost', async () => {
    channel('busy');
    sd.postToConversation('busy', 'bob', 'before');
    const p = poller({ groupConversationIds: ['busy'], groupPollLimit: 5, pollIntervalMs: 300 });
    const got = [];
    p.onMessage((m) => { got.push(m.content); });
    p.start();
    await waitFor(() => sd.requests.some((r) => r.path === '/conversations/busy/messages'), { what: 'first group poll' });
    await sleep(100);
    for (let i = 0; i < 23; i++) sd.postToConversation('busy', 'bob', `@alice burst ${i}`);
    await waitFor(() => got.length === 23, { what: 'the whole burst' });
    await sleep(700);
    // Once each; a burst inside one second has no order on the wire.
    expect([...got].sort()).toEqual(Array.from({ length: 23 }, (_, i) => `@alice burst ${i}`).sort());
  });

  it('the first cycle does not replay deep history', async () => {
    channel('old');
    // History from the last minutes, a second apart: older than anything the first page shows.
    const base = Math.floor(Date.now() / 1000) - 100;
    for (let i = 0; i < 40; i++) {
      sd.postToConversation('old', 'bob', `@alice old ${i}`, { createdAt: new Date((base + i) * 1000).toISOString() });
    }
    const p = poller({ groupConversationIds: ['old'], groupPollLimit: 5 });
    const got = [];
    p.onMessage((m) => { got.push(m.content); });
    p.start();
    await waitFor(() => got.length >= 5, { what: 'the first page' });
    await sleep(400);
    expect(got).toEqual([35, 36, 37, 38, 39].map((i) => `@alice old ${i}`));
  });
});

describe('faults are per track and never stop the loop', () => {
  it('5xx, malformed JSON and resets on one track leave the others working', async () => {
    sd.inject({ path: '/conversations/bad/messages', status: 500, times: Infinity });
    sd.inject({ path: '/conversations/junk/messages', malformed: true, times: Infinity });
    sd.inject({ path: '/conversations/gone/messages', reset: true, times: Infinity });
    sd.createConversation('good', ['bob', 'carol']); // watched, not joined
    sd.postToConversation('good', 'bob', '@alice works');
    sd.sendDirect('bob', 'alice', 'dm works');
    const p = poller({ groupConversationIds: ['bad', 'junk', 'gone', 'good'] });
    const got = [];
    p.onMessage((m) => { got.push(m.content); });
    p.start();
    await waitFor(() => got.length === 2, { what: 'the healthy tracks' });
    expect(got).toEqual(['dm works', '@alice works']);
    await sleep(300);
    expect(p.status().running).toBe(true);
    expect(p.status().lastError).toBeTruthy();
  });

  it('a 5xx or malformed peek counts as no messages; the next cycle delivers', async () => {
    sd.inject({ path: '/messages/peek', status: 503, times: 2 });
    sd.inject({ path: '/messages/peek', malformed: true, times: 1 });
    sd.sendDirect('bob', 'alice', 'eventually');
    const p = poller({});
    const got = [];
    p.onMessage((m) => { got.push(m.content); });
    p.start();
    await waitFor(() => got.length === 1, { what: 'delivery after faults' });
    expect(got).toEqual(['eventually']);
  });

  it('429 with Retry-After pauses that track for the wait', async () => {
    sd.inject({ path: '/messages/peek', status: 429, retryAfter: 1 });
    const p = poller({ pollIntervalMs: 100 });
    p.onMessage(() => {});
    p.start();
    await waitFor(() => sd.requests.some((r) => r.path === '/messages/peek'), { what: 'first peek' });
    const first = sd.requests.find((r) => r.path === '/messages/peek').at;
    await waitFor(() => sd.requests.filter((r) => r.path === '/messages/peek').length >= 2, { what: 'peek after the wait' });
    const second = sd.requests.filter((r) => r.path === '/messages/peek')[1].at;
    expect(second - first).toBeGreaterThanOrEqual(900);
  });

  it('a hung request times out (10 s) and the loop goes on', async () => {
    sd.inject({ path: '/messages/peek', hang: true, times: 1 });
    sd.sendDirect('bob', 'alice', 'after the hang');
    const p = poller({});
    const got = [];
    p.onMessage((m) => { got.push(m.content); });
    p.start();
    await waitFor(() => got.length === 1, { what: 'delivery after the timeout', timeoutMs: 25_000 });
    expect(p.status().lastError).toMatch(/timed out/);
  }, 40_000);
});
