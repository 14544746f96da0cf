// Reliability under faults: nothing lost, nothing twice, in order per path.
//
// - chaos: thousands of messages over every path (SSE push, direct-message peek, group
//   @mentions) while the server fails a share of requests (5xx, resets, 429 + Retry-After,
//   a few hangs past the 10 s timeout), drops the stream mid-burst, and the key rotates with
//   the old key expiring mid-run;
// - restart continuity: a runtime stopped mid-stream and a new one for the same agent;
// - backpressure: a slow handler under a burst keeps memory bounded and drops nothing;
// - stop() during every phase returns at once and lets the process exit, without a panic.
//
// Order, per path (what the assertions check, and README.md "Guarantees" promises):
// - direct messages reach the handler in send order *per channel*: those the server pushed
//   over the stream in push order, those found by a peek in the server's order (oldest
//   first). A message the server queued while no stream was open can reach the handler
//   after a later one the stream pushed: they are one path (direct) but two channels;
// - group mentions: in post order, per conversation.
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import { createRuntime } from '@cleocode/runtime';
import { startSignalDock } from '../testing/signaldock-server.mjs';
import { FakeRegistry, credential, runChild, sleep, waitFor } from './support/helpers.mjs';

const SERVER_MODULE = new URL('../testing/signaldock-server.mjs', import.meta.url).href;
const ROOT = fileURLToPath(new URL('..', import.meta.url));
const KEY = 'sk-chaos-Alpha1';
const cleanup = [];
afterEach(async () => {
  for (const stop of cleanup.splice(0).reverse()) {
    try { await stop(); } catch { /* best effort */ }
  }
});

async function server(options = {}) {
  const sd = await startSignalDock({ agents: { alice: KEY, bob: 'key-b', carol: 'key-c' }, ...options });
  cleanup.push(() => sd.close());
  return sd;
}

/** A registry whose rotateKey tells the server about the new key, as SignalDock's does. */
function rotatingRegistry(sd, cred) {
  const registry = new FakeRegistry(cred);
  const rotate = registry.rotateKey.bind(registry);
  registry.rotateKey = async (id) => {
    const answer = await rotate(id);
    sd.addKey(id, (await registry.get(id)).apiKey); // the stored key: the answer is masked
    return answer;
  };
  return registry;
}

/** Positions of `ids` in `handled` must increase: `ids` were handled in this order. */
function expectInOrder(handled, ids, what) {
  const want = new Set(ids);
  const seen = handled.filter((id) => want.has(id));
  // Compare as a whole only when it differs, so a failure shows the first inversion.
  if (seen.join() !== ids.join()) {
    const at = seen.findIndex((id, i) => id !== ids[i]);
    throw new Error(`${what}: out of order at ${at}: got ${seen.slice(Math.max(0, at - 2), at + 3)}, want ${ids.slice(Math.max(0, at - 2), at + 3)}`);
  }
}

/**
 * Group rows: the listing orders by whole-second createdAt with no tiebreak, so the only
 * order a client can keep is by second. `stamps` maps id -> createdAt.
 */
function expectInOrderBySecond(handled, stamps, what) {
  const seconds = handled.filter((id) => stamps.has(id)).map((id) => Math.floor(Date.parse(stamps.get(id)) / 1000));
  const at = seconds.findIndex((s, i) => i > 0 && s < seconds[i - 1]);
  if (at >= 0) throw new Error(`${what}: a row of second ${seconds[at]} handled after one of second ${seconds[at - 1]} (at ${at})`);
}

function duplicates(ids) {
  const seen = new Set();
  const dups = [];
  for (const id of ids) {
    if (seen.has(id)) dups.push(id);
    seen.add(id);
  }
  return dups;
}

// ==========================================================================================
describe('chaos', () => {
  it('thousands of messages over every path under faults: each handled exactly once, in order per path', async () => {
    const sd = await server({ seed: 20261120, heartbeatMs: 1000 });
    const old = new Date(Date.now() - 40 * 24 * 3600e3).toISOString();
    const registry = rotatingRegistry(sd, credential('alice', KEY, sd.url, {
      updatedAt: old, transportConfig: { sseEndpoint: `${sd.url}/messages/stream` },
    }));
    const groups = ['ops', 'dev/team', 'zoë #1'];
    // Channels alice watches without being a member: their mentions come by the listing only
    // (members get every post as a fan-out copy: fidelity.test.mjs covers that).
    for (const g of groups) sd.createConversation(g, ['bob', 'carol']);
    const handle = await createRuntime(registry, { pollIntervalMs: 250, heartbeatIntervalMs: 500, groupConversationIds: groups });
    cleanup.push(() => handle.stop());
    const handled = [];
    let calls = 0;
    handle.poller.onMessage(async (m) => {
      calls += 1;
      handled.push(m.id);
      // Mostly synchronous, now and then a real await: both kinds of handler at once.
      if (calls % 40 === 0) await sleep(2);
    });
    await waitFor(() => handle.poller.status().realtime, { what: 'stream up' });

    // Background faults for the whole run. The ones asserted below to have happened fail
    // every n-th matching request: a seeded probability still depends on how requests from
    // the tracks interleave, and on a busy machine a rule once drew no hit at all. The rest
    // are seeded random noise on top.
    const rules = [
      sd.inject({ path: '/messages/peek', status: 503, every: 7, times: Infinity }),
      sd.inject({ path: '/messages/peek', reset: true, probability: 0.04, times: Infinity }),
      sd.inject({ path: '/messages/ack', status: 500, every: 7, times: Infinity }),
      sd.inject({ path: '/messages/ack', reset: true, probability: 0.04, times: Infinity }),
      sd.inject({ path: /^\/conversations\//, status: 502, every: 8, times: Infinity }),
      sd.inject({ path: /^\/conversations\//, reset: true, probability: 0.04, times: Infinity }),
      sd.inject({ path: /^\/conversations\//, status: 429, retryAfter: 1, probability: 0.03, times: 4 }),
      sd.inject({ path: '/messages/peek', status: 429, retryAfter: 1, probability: 0.05, times: 3 }),
      sd.inject({ path: /\/heartbeat$/, status: 500, every: 3, times: Infinity }),
    ];

    const dmStream = []; // pushed to an open stream at send time
    const dmPeek = []; // queued: only a peek finds them
    const mentions = Object.fromEntries(groups.map((g) => [g, []]));
    const others = []; // group rows that must not reach the handler
    const stamps = new Map(); // group row id -> createdAt
    let n = 0;
    const sentOrder = new Map();
    const sendDm = (content) => {
      const streamed = sd.pushToStreams && sd.streams('alice') > 0;
      const row = sd.sendDirect(n % 7 === 0 ? 'carol' : 'bob', 'alice', content);
      (streamed ? dmStream : dmPeek).push(row.id);
      sentOrder.set(row.id, sentOrder.size);
    };
    const post = (i) => {
      const g = groups[i % groups.length];
      const kind = i % 6;
      const from = kind === 5 ? 'alice' : 'bob';
      const content = [`@alice task ${i}`, `hey @ALICE, ${i}`, `@all standup ${i}`, `no mention ${i}`, `mail bob@alice.dev ${i}`, `@alice from myself ${i}`][kind];
      const row = sd.postToConversation(g, from, content);
      (kind <= 2 ? mentions[g] : others).push(row.id);
      stamps.set(row.id, row.createdAt);
    };

    const t0 = Date.now();
    let rotatedAt = null;
    let expiredAt = null;
    const events = [];
    // ~32 s of traffic: 2 DMs and 1 group post every 20 ms, with bursts and scheduled faults.
    for (let tick = 0; tick < 1600; tick++) {
      const at = Date.now() - t0;
      for (let k = 0; k < 2; k++) sendDm(`dm ${n++}`);
      post(tick);
      // Few hangs, both at once: a hung request holds up the whole poll cycle (every track;
      // the stream goes on) until the 10 s timeout, so together they cost one such wait.
      if (tick === 650) {
        sd.inject({ path: '/messages/peek', hang: true, times: 1 });
        sd.inject({ path: '/conversations/ops/messages', hang: true, times: 1 });
        events.push(`hangs at ${at}`);
      }
      if (tick % 250 === 100) {
        // A burst, with the stream dropped in the middle of it. What was pushed into the
        // dropped socket comes back only by Last-Event-ID, and the real server replays at
        // most 100 messages after it: a larger burst around a drop is lost on the server's
        // side whatever a client does, so the half before the drop stays under that.
        for (let k = 0; k < 90; k++) sendDm(`burst ${tick}.${k} ${n++}`);
        sd.dropStreams('alice');
        for (let k = 0; k < 150; k++) sendDm(`burst ${tick}.${90 + k} ${n++}`);
        events.push(`burst+drop at ${at}`);
      }
      if (tick === 700) { sd.inject({ path: '/messages/stream', dropAfterMs: 400, times: 1 }); sd.dropStreams('alice'); }
      if (tick === 1000) { sd.inject({ path: '/messages/stream', status: 503, retryAfter: 1, times: 1 }); sd.dropStreams('alice'); }
      if (rotatedAt === null && registry.rotations === 1) rotatedAt = Date.now();
      if (rotatedAt !== null && expiredAt === null && Date.now() - rotatedAt > 3000) {
        sd.expireKey(KEY);
        expiredAt = Date.now();
      }
      await sleep(tick % 5 === 0 ? 20 : 10);
    }
    const sentDms = dmStream.length + dmPeek.length;
    const sentMentions = Object.values(mentions).flat().length;
    expect(sentDms + sentMentions).toBeGreaterThan(4000);
    expect(rotatedAt, 'the key rotated mid-run').not.toBeNull();
    expect(expiredAt, 'the old key expired mid-run').not.toBeNull();

    // Faults off; everything must arrive (a hung request may still be waiting out its 10 s).
    sd.clearFaults();
    const expected = new Set([...dmStream, ...dmPeek, ...Object.values(mentions).flat()]);
    await waitFor(() => [...expected].every((id) => handled.includes(id)) || null, {
      what: `all ${expected.size} messages (have ${handled.length})`, timeoutMs: 30_000, everyMs: 200,
    }).catch((e) => {
      const missing = [...expected].filter((id) => !handled.includes(id));
      throw new Error(`${e.message}; missing ${missing.length}: ${missing.slice(0, 5)} (stream ${missing.filter((id) => dmStream.includes(id)).length}, peek ${missing.filter((id) => dmPeek.includes(id)).length}); events ${events}`);
    });
    await waitFor(() => sd.pending('alice').length === 0, { what: 'every peeked message acked', timeoutMs: 15_000 });
    await sleep(1500);

    // Exactly once: nothing missing (above), nothing twice, nothing that was not for alice.
    expect(duplicates(handled)).toEqual([]);
    const unexpected = handled.filter((id) => !expected.has(id));
    expect(unexpected).toEqual([]);
    expect(handled).toHaveLength(expected.size);
    // In order per path (see the top of this file).
    // By the path that really carried each one: a message queued while the stream was down
    // can still come by the stream, when a reconnect's Last-Event-ID replay finds it.
    const via = new Map(sd.deliveries('alice').map((d) => [d.id, d.via]));
    const dms = [...dmStream, ...dmPeek].sort((a, b) => sentOrder.get(a) - sentOrder.get(b));
    expectInOrder(handled, dms.filter((id) => via.get(id) === 'sse'), 'direct messages the stream pushed');
    expectInOrder(handled, dms.filter((id) => via.get(id) === 'ack'), 'direct messages found by a peek');
    for (const g of groups) expectInOrderBySecond(handled, new Map(mentions[g].map((id) => [id, stamps.get(id)])), `mentions in ${g}`);

    // The faults really happened, and none of them cost a handler call or crashed a loop.
    // Deterministic: the run makes well over `every` requests of each kind (>20 peeks at the
    // slowed 1.5 s interval, an ack per peeked page of the >500 peeked messages, hundreds of
    // group reads and heartbeats).
    for (const rule of rules.filter((r) => r.every)) {
      const sent = sd.requests.filter((r) => (rule.path instanceof RegExp ? rule.path.test(r.path) : r.path === rule.path)).length;
      expect(rule.hits, `${rule.path}: ${sent} requests`).toBeGreaterThan(0);
    }
    expect(rules.reduce((sum, r) => sum + r.hits, 0)).toBeGreaterThan(30);
    const status = handle.poller.status();
    expect(status).toMatchObject({ running: true, failed: 0, malformed: 0, pendingAcks: 0 });
    expect(status.delivered).toBe(expected.size);
    // Drops every few seconds keep the stream's backoff growing (it resets only after 30 s up),
    // so later drops often find it down: polling carried those messages.
    expect(handle.sseConnection.status().reconnects).toBeGreaterThanOrEqual(3);
    expect(handle.sseConnection.status().running).toBe(true);
    expect(dmStream.length).toBeGreaterThan(500);
    expect(dmPeek.length).toBeGreaterThan(500);
    expect(handle.heartbeat.status().running).toBe(true);
    // After the old key expired (and the overlap), it was never sent again.
    const late = sd.requests.filter((r) => r.at > expiredAt + 200 && r.headers.authorization === `Bearer ${KEY}`);
    expect(late).toEqual([]);
    for (const r of sd.requests) expect(`${r.path}?${new URLSearchParams(r.query)}`).not.toContain('sk-');
  }, 120_000);
});

// ==========================================================================================
describe('restart continuity', () => {
  it('a runtime stopped mid-stream and a new one: handled never again, nothing lost (peek path and groups)', async () => {
    const sd = await server();
    sd.createConversation('room', ['bob', 'carol']); // watched, not joined: the listing path
    const registry = new FakeRegistry(credential('alice', KEY, sd.url));
    const config = { pollIntervalMs: 100, heartbeatIntervalMs: 0, maxKeyAgeMs: 0, groupConversationIds: ['room'], groupPollLimit: 15 };
    const record = () => ({ started: [], settled: [] });
    const a = record();
    const b = record();
    const handler = (rec) => async (m) => {
      rec.started.push(m.id);
      await sleep(3);
      rec.settled.push(m.id);
    };
    const first = await createRuntime(registry, config);
    cleanup.push(() => first.stop());
    first.poller.onMessage(handler(a));

    const dms = [];
    const posts = [];
    const postStamps = new Map();
    let second = null;
    let settledAtStop = null;
    let inFlight = null;
    let postsAtRestart = 0;
    for (let tick = 0; tick < 400; tick++) {
      dms.push(sd.sendDirect('bob', 'alice', `dm ${tick}`).id);
      if (tick % 3 === 0) {
        const row = sd.postToConversation('room', 'bob', `@alice ${tick}`);
        posts.push(row.id);
        postStamps.set(row.id, row.createdAt);
      }
      if (tick === 200) {
        // Mid-stream: wait until a handler call is in flight, then stop and start again.
        await waitFor(() => a.started.length > a.settled.length, { what: 'a handler call in flight', everyMs: 1 });
        // What the runtime saw settle (in order, one call at a time) at the moment of stop().
        const s = first.poller.status();
        settledAtStop = a.started.slice(0, s.delivered + s.failed);
        inFlight = a.started.slice(s.delivered + s.failed);
        first.stop();
        postsAtRestart = posts.length;
        second = await createRuntime(registry, config);
        cleanup.push(() => second.stop());
        second.poller.onMessage(handler(b));
      }
      await sleep(5);
    }
    expect(inFlight.length).toBeGreaterThanOrEqual(1);
    const all = [...dms, ...posts];
    await waitFor(() => all.every((id) => a.settled.includes(id) || b.settled.includes(id)), { what: 'everything handled', timeoutMs: 20_000 });
    await waitFor(() => sd.pending('alice').length === 0, { what: 'all acked' });
    await sleep(500);

    // Neither runtime handled anything twice; after stop() returned, A made no call.
    expect(duplicates(a.started)).toEqual([]);
    expect(duplicates(b.started)).toEqual([]);
    // After stop() returned, A started no handler call.
    expect(a.started.length).toBe(settledAtStop.length + inFlight.length);
    // Direct messages: what A settled is never handed to B; the call in flight at stop
    // (started, never settled as far as the runtime knew) is offered again: at-least-once.
    const settledByA = new Set(settledAtStop.filter((id) => dms.includes(id)));
    expect(b.started.filter((id) => settledByA.has(id))).toEqual([]);
    for (const id of inFlight.filter((x) => dms.includes(x))) expect(b.settled).toContain(id);
    // Nothing lost: every DM and every mention handled by one of them.
    expect(dms.filter((id) => !a.settled.includes(id) && !b.settled.includes(id))).toEqual([]);
    expect(posts.filter((id) => !a.settled.includes(id) && !b.settled.includes(id))).toEqual([]);
    // Groups carry no delivery state on the server: a new runtime's first read takes one
    // page (groupPollLimit rows) and delivers its mentions again, nothing older.
    // (Rows of the page's oldest second that did not fit on it count as that page: the
    // listing has no order inside a second.)
    const groupAgain = b.started.filter((id) => posts.includes(id) && settledAtStop.includes(id));
    const pageFloor = Math.floor(Date.parse(postStamps.get(posts[postsAtRestart - 15])) / 1000);
    for (const id of groupAgain) expect(Math.floor(Date.parse(postStamps.get(id)) / 1000)).toBeGreaterThanOrEqual(pageFloor);
    expect(groupAgain.length).toBeLessThanOrEqual(15 + posts.filter((id) => Math.floor(Date.parse(postStamps.get(id)) / 1000) === pageFloor).length);
    // In order within each runtime.
    expectInOrder(a.started, dms.filter((id) => a.started.includes(id)), 'A direct');
    expectInOrder(b.started, dms.filter((id) => b.started.includes(id)), 'B direct');
    // Rows of the first page's oldest second that did not fit on it come in a later read
    // (the listing cannot say whether they predate the runtime): they are not ordered
    // against that page.
    const secondOf = (id) => Math.floor(Date.parse(postStamps.get(id)) / 1000);
    const firstPage = b.started.filter((id) => postStamps.has(id)).slice(0, 15);
    const bFloor = Math.min(...firstPage.map(secondOf));
    const afterFloor = new Map([...postStamps].filter(([id]) => secondOf(id) > bFloor));
    expectInOrderBySecond(b.started, afterFloor, 'B group');
  }, 60_000);

  it('over the stream: what the handler settled is never delivered again; what the server pushed and the handler had not settled at stop() is not offered again (at-most-once)', async () => {
    const sd = await server();
    const registry = new FakeRegistry(credential('alice', KEY, sd.url, { transportConfig: { sseEndpoint: `${sd.url}/messages/stream` } }));
    const config = { pollIntervalMs: 200, heartbeatIntervalMs: 0, maxKeyAgeMs: 0 };
    const a = { started: [], settled: [] };
    const b = { started: [], settled: [] };
    const handler = (rec, ms) => async (m) => { rec.started.push(m.id); await sleep(ms); rec.settled.push(m.id); };
    const first = await createRuntime(registry, config);
    cleanup.push(() => first.stop());
    first.poller.onMessage(handler(a, 20));
    await waitFor(() => first.poller.status().realtime, { what: 'stream up' });
    const pushed = [];
    for (let i = 0; i < 40; i++) pushed.push(sd.sendDirect('bob', 'alice', `s${i}`).id);
    await waitFor(() => a.settled.length >= 10, { what: 'some handled' });
    first.stop();
    await waitFor(() => sd.streams('alice') === 0, { what: 'stream closed' });
    const second = await createRuntime(registry, config);
    cleanup.push(() => second.stop());
    second.poller.onMessage(handler(b, 0));
    const later = [];
    await waitFor(() => second.poller.status().realtime, { what: 'stream up again' });
    for (let i = 0; i < 10; i++) later.push(sd.sendDirect('bob', 'alice', `later ${i}`).id);
    await waitFor(() => later.every((id) => b.settled.includes(id)), { what: 'the later messages' });
    await sleep(500);
    // Never twice, and nothing A settled reaches B.
    expect(b.started.filter((id) => a.settled.includes(id))).toEqual([]);
    expect(duplicates([...a.settled, ...b.started])).toEqual([]);
    // The server marked every pushed message delivered when it pushed it: those A had not
    // settled are not offered again to B (documented: the stream is at-most-once across a stop).
    const unsettled = pushed.filter((id) => !a.settled.includes(id));
    expect(unsettled.length).toBeGreaterThan(0);
    expect(b.started.filter((id) => unsettled.includes(id))).toEqual([]);
    expect(sd.pending('alice')).toHaveLength(0);
  }, 30_000);
});

// ==========================================================================================
/** A child Node process whose stdout lines arrive as they are printed. */
function childLines(source, env = {}) {
  const child = spawn(process.execPath, ['--input-type=module', '-e', source], {
    cwd: ROOT, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'],
  });
  const lines = [];
  let stderr = '';
  let buffer = '';
  child.stdout.on('data', (d) => {
    buffer += d;
    const parts = buffer.split('\n');
    buffer = parts.pop();
    lines.push(...parts);
  });
  child.stderr.on('data', (d) => { stderr += d; });
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  cleanup.push(() => child.kill('SIGKILL'));
  return { child, lines, exited, stderr: () => stderr };
}

describe('backpressure', () => {
  it('a slow handler under a burst: memory stays bounded, nothing is dropped, nothing twice', async () => {
    const sd = await server();
    const child = childLines(`
      import { createRuntime } from '@cleocode/runtime';
      const url = ${JSON.stringify(sd.url)};
      const cred = { agentId: 'alice', apiKey: ${JSON.stringify(KEY)}, apiBaseUrl: url, isActive: true, updatedAt: new Date().toISOString(),
        transportConfig: { sseEndpoint: url + '/messages/stream' } };
      const registry = { get: async () => cred, getActive: async () => cred, rotateKey: async () => ({}) };
      const h = await createRuntime(registry, { pollIntervalMs: 200, heartbeatIntervalMs: 0, maxKeyAgeMs: 0 });
      const ids = new Set();
      let calls = 0;
      let slowUntil = Infinity;
      h.poller.onMessage(async (m) => {
        calls += 1;
        ids.add(m.id);
        if (m.content === 'go') { slowUntil = Date.now() + 8000; return; }
        if (Date.now() < slowUntil) await new Promise((r) => setTimeout(r, 300));
      });
      while (!h.poller.status().realtime) await new Promise((r) => setTimeout(r, 20));
      global.gc?.();
      console.log('ready', process.memoryUsage().rss);
      const timer = setInterval(() => {
        global.gc?.();
        console.log('rss', process.memoryUsage().rss, calls, ids.size);
        if (ids.size >= 3001) { console.log('done', calls, ids.size); clearInterval(timer); h.stop(); }
      }, 250);
    `, { NODE_OPTIONS: '--expose-gc' });
    await waitFor(() => child.lines.some((l) => l.startsWith('ready')), { what: 'child ready' });
    const baseline = Number(child.lines.find((l) => l.startsWith('ready')).split(' ')[1]);
    sd.sendDirect('bob', 'alice', 'go');
    await waitFor(() => child.lines.some((l) => l.startsWith('rss') && Number(l.split(' ')[2]) >= 1), { what: 'the go message' });
    // 3000 messages of 16 KiB (48 MiB) at once: 2000 pushed over the stream, 1000 queued for
    // a peek while the stream is down, all while the handler takes 300 ms a message.
    const content = 'p'.repeat(16 * 1024);
    const sent = [];
    for (let i = 0; i < 2000; i++) sent.push(sd.sendDirect('bob', 'alice', `${i} ${content}`).id);
    sd.pushToStreams = false;
    for (let i = 2000; i < 3000; i++) sent.push(sd.sendDirect('bob', 'alice', `${i} ${content}`).id);
    sd.pushToStreams = true;
    const exit = await Promise.race([child.exited, sleep(60_000).then(() => ({ code: 'timeout' }))]);
    expect(exit.code, child.stderr()).toBe(0);
    const samples = child.lines.filter((l) => l.startsWith('rss')).map((l) => l.split(' ').map(Number));
    // While slow (the first 8 s), 48 MiB were waiting: little of it may sit in the process.
    const slowPhase = samples.filter(([, , calls]) => calls > 1 && calls < 20);
    expect(slowPhase.length).toBeGreaterThan(10);
    const peakMiB = (Math.max(...slowPhase.map(([, rss]) => rss)) - baseline) / 2 ** 20;
    expect(peakMiB).toBeLessThan(24);
    const done = child.lines.find((l) => l.startsWith('done')).split(' ').map(Number);
    // Every message exactly once (3000 and the 'go').
    expect(done[1]).toBe(3001);
    expect(done[2]).toBe(3001);
    expect(sd.pending('alice')).toHaveLength(0);
    expect(child.stderr()).not.toMatch(/panicked/);
  }, 90_000);
});

// ==========================================================================================
describe('stop() during every phase', () => {
  const prelude = (url, extra = '') => `
    import { createRuntime, SseTransport, AgentPoller } from '@cleocode/runtime';
    const url = ${JSON.stringify(url)};
    const cred = { agentId: 'alice', apiKey: ${JSON.stringify(KEY)}, apiBaseUrl: url, isActive: true, updatedAt: new Date().toISOString(),
      transportConfig: { ${extra} } };
    const registry = { get: async () => cred, getActive: async () => cred, rotateKey: async () => ({}) };
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    const until = async (f) => { const end = Date.now() + 15000; while (!f()) { if (Date.now() > end) throw new Error('phase never reached'); await sleep(5); } };
    const mark = (what) => console.log(what, Date.now());
    process.on('exit', () => mark('exit'));
  `;
  const stream = (url) => `sseEndpoint: ${JSON.stringify(`${url}/messages/stream`)}`;
  const phases = [
    ['connecting (the stream request hangs)', (sd) => { sd.inject({ path: '/messages/stream', hang: true, times: Infinity }); }, true, `
      const h = await createRuntime(registry, { heartbeatIntervalMs: 0 });
      h.poller.onMessage(() => {});
      await until(() => h.sseConnection.status().state === 'connecting');
      await sleep(200);
      mark('stopped'); h.stop(); mark('returned');`],
    ['mid-request (peek, group read and heartbeat all hang)', (sd) => {
      sd.inject({ path: '/messages/peek', hang: true, times: Infinity });
      sd.inject({ path: '/conversations/g/messages', hang: true, times: Infinity });
      sd.inject({ path: /heartbeat$/, hang: true, times: Infinity });
    }, false, `
      const h = await createRuntime(registry, { groupConversationIds: ['g'], heartbeatIntervalMs: 100 });
      h.poller.onMessage(() => {});
      await until(() => h.poller.status().polls >= 1);
      await sleep(300);
      mark('stopped'); h.stop(); mark('returned');`],
    ['mid-handler (an async handler, a message queued behind it)', (sd) => { for (let i = 0; i < 5; i++) sd.sendDirect('bob', 'alice', `m${i}`); }, false, `
      const h = await createRuntime(registry, { heartbeatIntervalMs: 0, pollIntervalMs: 50 });
      let inside = false;
      // The handler's own timer must not hold the process: only the runtime is under test.
      h.poller.onMessage(async () => { inside = true; await new Promise((r) => setTimeout(r, 10000).unref()); });
      await until(() => inside);
      mark('stopped'); h.stop(); mark('returned');`],
    ['mid-ack (the ack hangs, a final ack is owed)', (sd) => {
      sd.inject({ path: '/messages/ack', hang: true, times: Infinity });
      for (let i = 0; i < 3; i++) sd.sendDirect('bob', 'alice', `a${i}`);
    }, false, `
      const h = await createRuntime(registry, { heartbeatIntervalMs: 0, pollIntervalMs: 50 });
      h.poller.onMessage(() => {});
      await until(() => h.poller.status().pendingAcks >= 1);
      await sleep(100);
      mark('stopped'); h.stop(); mark('returned');`],
    ['mid-reconnect (the stream dropped, waiting out the backoff)', (sd) => {
      sd.inject({ path: '/messages/stream', dropAfterMs: 300, times: 1 });
    }, true, `
      const h = await createRuntime(registry, { heartbeatIntervalMs: 0 });
      h.poller.onMessage(() => {});
      await until(() => h.sseConnection.status().state === 'reconnecting');
      await sleep(100);
      mark('stopped'); h.stop(); mark('returned');`],
    ['a native SseTransport whose connect() is still waiting', (sd) => { sd.inject({ path: '/messages/stream', hang: true, times: Infinity }); }, false, `
      const t = new SseTransport();
      const connecting = t.connect({ agentId: 'alice', apiKey: cred.apiKey, apiBaseUrl: url });
      await sleep(300);
      mark('stopped'); await t.disconnect(); mark('returned');
      connecting.then(() => console.log('connect settled'));`],
    ['a bare poller in the middle of a burst', (sd) => { for (let i = 0; i < 500; i++) sd.sendDirect('bob', 'alice', `b${i}`); }, false, `
      const p = new AgentPoller({ agentId: 'alice', apiKey: cred.apiKey, apiBaseUrl: url, pollIntervalMs: 50 });
      let n = 0;
      p.onMessage(() => { n += 1; });
      p.start();
      await until(() => n >= 100);
      mark('stopped'); p.stop(); mark('returned');
      const at = n;
      await sleep(50);
      if (n !== at) console.log('a handler call after stop');`],
  ];

  it.each(phases)('%s: stop() returns at once and the process exits by itself, promptly', async (_name, arrange, sse, body) => {
    const sd = await server();
    arrange(sd);
    const run = await runChild(`${prelude(sd.url, sse ? stream(sd.url) : '')}${body}`, { timeoutMs: 20_000 });
    expect(run.signal, run.stderr).toBeNull();
    expect(run.code, run.stderr).toBe(0);
    const stopped = Number(/stopped (\d+)/.exec(run.stdout)?.[1]);
    const returned = Number(/returned (\d+)/.exec(run.stdout)?.[1]);
    const exited = Number(/exit (\d+)/.exec(run.stdout)?.[1]);
    expect(returned - stopped).toBeLessThan(100);
    expect(exited - stopped).toBeLessThan(1000);
    expect(run.stdout).not.toContain('a handler call after stop');
    expect(run.stderr).not.toMatch(/panicked|RUST_BACKTRACE|Unhandled|uncaught/i);
  }, 30_000);
});
