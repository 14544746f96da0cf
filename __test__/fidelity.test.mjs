// The real SignalDock, as its public crates show it (WIRE.md), against the runtime: the test
// server's defaults model it (whole-second timestamps, ties, fan-out copies, the real SSE
// frame, the error envelope, masked rotated keys). Each test here names the defect it pins.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { AgentPoller, HttpTransport, createRuntime } from '@cleocode/runtime';
import { startSignalDock } from '../testing/signaldock-server.mjs';
import { FakeRegistry, credential, runChild, sleep, waitFor } from './support/helpers.mjs';

let sd;
const cleanup = [];
beforeEach(async () => {
  sd = await startSignalDock({ agents: { alice: 'key-a', bob: 'key-b', carol: 'key-c', dave: 'key-d' } });
});
afterEach(async () => {
  for (const stop of cleanup.splice(0)) await stop();
  await sd.close();
});

async function runtime(registry, config) {
  const handle = await createRuntime(registry, config);
  cleanup.push(() => handle.stop());
  return handle;
}

function collect(target) {
  const got = [];
  target.onMessage((m) => { got.push(m); });
  return got;
}

const peeks = () => sd.requests.filter((r) => r.path === '/messages/peek');

/**
 * Runs a runtime for alice (stream on) in a child process with CLEO_RUNTIME_LOG=warn, so
 * its log lines can be read: `body` runs with `handle` and `got` (contents handled) in
 * scope, and prints what the test reads.
 */
function childRuntime(config, body) {
  const source = `
    import { createRuntime } from '@cleocode/runtime';
    const cred = { agentId: 'alice', apiKey: 'key-a', apiBaseUrl: ${JSON.stringify(sd.url)}, transportConfig: { sseEndpoint: ${JSON.stringify(`${sd.url}/messages/stream`)} }, updatedAt: new Date().toISOString() };
    const registry = { get: async () => cred, getActive: async () => cred, rotateKey: async () => ({}) };
    const handle = await createRuntime(registry, ${JSON.stringify(config)});
    const got = [];
    handle.poller.onMessage((m) => { got.push(m.content); });
    while (got.length < 1) await new Promise((r) => setTimeout(r, 20));
    ${body}
    handle.stop();
  `;
  return runChild(source, { env: { CLEO_RUNTIME_LOG: 'warn' }, timeoutMs: 30_000 });
}

describe('direct messages: the inbox is X-Agent-Id, never mentioned=', () => {
  it('a bare AgentPoller delivers a DM without an @-mention, and never sends mentioned', async () => {
    sd.sendDirect('bob', 'alice', 'plain words, no mention');
    const p = new AgentPoller({ agentId: 'alice', apiKey: 'key-a', apiBaseUrl: sd.url, pollIntervalMs: 100 });
    cleanup.push(() => p.stop());
    const got = collect(p);
    p.start();
    await waitFor(() => got.length === 1 && sd.pending('alice').length === 0, { what: 'the DM handled and acked' });
    expect(got[0].content).toBe('plain words, no mention');
    expect(peeks().length).toBeGreaterThan(0);
    for (const peek of peeks()) expect(peek.query).not.toHaveProperty('mentioned');
  });

  it.each(['http', 'sse'])('createRuntime (%s) delivers a DM without an @-mention', async (kind) => {
    const transportConfig = kind === 'sse' ? { sseEndpoint: `${sd.url}/messages/stream` } : {};
    const registry = new FakeRegistry(credential('alice', 'key-a', sd.url, { transportConfig }));
    const handle = await runtime(registry, { pollIntervalMs: 100, heartbeatIntervalMs: 0, maxKeyAgeMs: 0 });
    const got = collect(handle.poller);
    if (kind === 'sse') await waitFor(() => sd.streams('alice') === 1, { what: 'the stream' });
    sd.sendDirect('bob', 'alice', 'no mention here');
    await waitFor(() => got.length === 1, { what: 'the DM' });
    expect(got[0].content).toBe('no mention here');
    for (const peek of peeks()) expect(peek.query).not.toHaveProperty('mentioned');
  });
});

describe('SSE: the real frame', () => {
  it('every message pushed over the real stream reaches the handler once (they are never peekable)', async () => {
    const registry = new FakeRegistry(credential('alice', 'key-a', sd.url, { transportConfig: { sseEndpoint: `${sd.url}/messages/stream` } }));
    // A poll interval far longer than the test: only the stream can deliver.
    const handle = await runtime(registry, { pollIntervalMs: 600_000, heartbeatIntervalMs: 0, maxKeyAgeMs: 0 });
    const got = collect(handle.poller);
    await waitFor(() => sd.streams('alice') === 1, { what: 'the stream' });
    await sleep(200); // the first (immediate) poll is over
    const sent = [];
    for (let i = 0; i < 20; i++) sent.push(sd.sendDirect('bob', 'alice', `pushed ${i}`).id);
    expect(sd.delivered('alice').length).toBe(20); // marked delivered by the push itself
    await waitFor(() => got.length === 20, { what: 'all 20 pushed messages' });
    expect(got.map((m) => m.id)).toEqual(sent);
    expect(got[0]).toMatchObject({ from: 'bob', content: 'pushed 0', threadId: 'alice,bob' });
    expect(Number.isNaN(Date.parse(got[0].timestamp))).toBe(false);
    await sleep(300);
    expect(got.length).toBe(20);
  });

  it('an unreadable frame is counted and logged with its event id, and the stream goes on', async () => {
    const child = childRuntime(
      { pollIntervalMs: 600000, heartbeatIntervalMs: 0, maxKeyAgeMs: 0 },
      'console.log(JSON.stringify({ got, status: handle.sseConnection.status() }));',
    );
    await waitFor(() => sd.streams('alice') === 1, { what: 'the child stream' });
    sd.sseSendRaw('alice', 'id: broken-7\nevent: message\ndata: {"messageId": 12.5e999, "from": "bob"\n\n');
    sd.sendDirect('bob', 'alice', 'after the broken one');
    const { code, stdout, stderr } = await child;
    expect(code, stderr).toBe(0);
    const report = JSON.parse(stdout.trim().split('\n').pop());
    expect(report.got).toEqual(['after the broken one']);
    expect(stderr).toMatch(/could not be read/);
    expect(stderr).toContain('broken-7');
  });
});

describe('groups: whole-second ties and fan-out copies', () => {
  it('a group message is one handler call though it comes as a peek copy and as the listing row', async () => {
    sd.createConversation('ops', ['alice', 'bob', 'carol', 'dave']);
    const p = new AgentPoller({ agentId: 'alice', apiKey: 'key-a', apiBaseUrl: sd.url, pollIntervalMs: 100, groupConversationIds: ['ops'] });
    cleanup.push(() => p.stop());
    const got = collect(p);
    p.start();
    await sleep(300);
    const posts = [];
    for (let i = 0; i < 6; i++) posts.push(sd.postToConversation('ops', i % 2 ? 'bob' : 'carol', `@alice task ${i}`));
    await waitFor(() => got.length >= 6 && sd.pending('alice').length === 0, { what: 'six posts handled, copies acked' });
    await sleep(500);
    expect(got.map((m) => m.content).sort()).toEqual(posts.map((m) => m.content).sort());
    expect(new Set(got.map((m) => m.groupId))).toEqual(new Set(posts.map((m) => m.groupId)));
  });

  it('a mention listed below rows already read (same second, no tiebreak) is still delivered', async () => {
    // alice watches a channel she is no member of: only the listing brings its mentions.
    sd.createConversation('ops', ['bob', 'carol']);
    const p = new AgentPoller({ agentId: 'alice', apiKey: 'key-a', apiBaseUrl: sd.url, pollIntervalMs: 50, groupConversationIds: ['ops'], groupPollLimit: 5 });
    cleanup.push(() => p.stop());
    const got = collect(p);
    p.start();
    await sleep(200);
    // Bursts inside one second: every listing shuffles their order.
    const want = [];
    for (let round = 0; round < 4; round++) {
      for (let i = 0; i < 3; i++) want.push(sd.postToConversation('ops', 'bob', `@alice r${round} m${i}`).content);
      await sleep(120);
    }
    await waitFor(() => got.length >= want.length, { what: `all ${want.length} mentions (got ${got.length})`, timeoutMs: 20_000 });
    await sleep(500);
    expect(got.map((m) => m.content).sort()).toEqual(want.sort());
  });

  it('over the stream too: a pushed copy (no groupId) and the listing row are one call', async () => {
    sd.createConversation('ops', ['alice', 'bob', 'carol']);
    const registry = new FakeRegistry(credential('alice', 'key-a', sd.url, { transportConfig: { sseEndpoint: `${sd.url}/messages/stream` } }));
    const handle = await runtime(registry, { pollIntervalMs: 100, groupConversationIds: ['ops'], heartbeatIntervalMs: 0, maxKeyAgeMs: 0 });
    const got = collect(handle.poller);
    await waitFor(() => sd.streams('alice') === 1, { what: 'the stream' });
    await sleep(300);
    for (let i = 0; i < 5; i++) sd.postToConversation('ops', 'bob', `@alice streamed ${i}`);
    await waitFor(() => got.length >= 5, { what: 'five posts' });
    // Several listing cycles later, still five.
    const listings = () => sd.requests.filter((r) => r.path === '/conversations/ops/messages').length;
    const before = listings();
    await waitFor(() => listings() >= before + 5, { what: 'more listings' });
    expect(got.map((m) => m.content)).toEqual([0, 1, 2, 3, 4].map((i) => `@alice streamed ${i}`));
  });
});

describe('key rotation with a registry like the real one', () => {
  it('reads the stored key back instead of adopting the masked newApiKey', async () => {
    const old = new Date(Date.now() - 40 * 24 * 3600e3).toISOString();
    const registry = new FakeRegistry(credential('alice', 'key-a', sd.url, { updatedAt: old }));
    registry.server = sd; // rotateKey goes through the server, like the real registry
    const handle = await runtime(registry, { pollIntervalMs: 100, heartbeatIntervalMs: 100 });
    const got = collect(handle.poller);
    await waitFor(() => registry.answered.length === 1, { what: 'the rotation (first check at 5 s)', timeoutMs: 20_000 });
    const masked = registry.answered[0].newApiKey;
    expect(masked).toMatch(/\.\.\.rotated$/);
    const fresh = (await registry.get('alice')).apiKey;
    await waitFor(() => sd.requests.some((r) => r.headers.authorization === `Bearer ${fresh}`), { what: 'the new key in use' });
    sd.expireKey('key-a');
    sd.sendDirect('bob', 'alice', 'after the old key expired');
    await waitFor(() => got.some((m) => m.content === 'after the old key expired'), { what: 'delivery on the new key' });
    const beatsAfter = sd.heartbeats('alice').length;
    await waitFor(() => sd.heartbeats('alice').length > beatsAfter, { what: 'a heartbeat on the new key' });
    expect(sd.requests.filter((r) => r.headers.authorization === `Bearer ${masked}`)).toEqual([]);
  }, 30_000);
});

describe('errors: the structured envelope', () => {
  it('a 429 whose wait is only in the body (retry_after_ms) is honoured', async () => {
    const p = new AgentPoller({ agentId: 'alice', apiKey: 'key-a', apiBaseUrl: sd.url, pollIntervalMs: 50 });
    cleanup.push(() => p.stop());
    p.onMessage(() => {});
    sd.inject({ path: '/messages/peek', status: 429, retryAfterMs: 1500, times: 1 });
    p.start();
    await waitFor(() => peeks().length >= 2, { what: 'the peek after the wait', timeoutMs: 10_000 });
    const [first, second] = peeks();
    expect(second.at - first.at).toBeGreaterThanOrEqual(1400);
    expect(p.status().lastError).toMatch(/injected 429/);
  });

  it('a peek whose since is refused (4xx) is asked again without it', async () => {
    sd.peekSince = 'refuse';
    sd.sendDirect('bob', 'alice', 'waiting');
    const t = new HttpTransport();
    await t.connect({ agentId: 'alice', apiKey: 'key-a', apiBaseUrl: sd.url });
    cleanup.push(() => t.disconnect());
    const got = await t.poll({ since: new Date(0).toISOString() });
    expect(got.map((m) => m.content)).toEqual(['waiting']);
    // From then on, since is not sent: one request per poll.
    const before = peeks().length;
    await t.poll({ since: new Date(0).toISOString() });
    expect(peeks().length).toBe(before + 1);
    expect(peeks().at(-1).query).not.toHaveProperty('since');
  });
});

describe('one REST client per runtime, one failover for every service', () => {
  it('heartbeat and group reads fail over to apiBaseUrlFallback like the direct track', async () => {
    sd.createConversation('ops', ['bob', 'carol']);
    const dead = 'http://127.0.0.1:9'; // discard port: nothing listens
    const registry = new FakeRegistry(credential('alice', 'key-a', dead, { transportConfig: { apiBaseUrlFallback: sd.url } }));
    const handle = await runtime(registry, { pollIntervalMs: 100, groupConversationIds: ['ops'], heartbeatIntervalMs: 100, maxKeyAgeMs: 0 });
    const got = collect(handle.poller);
    sd.postToConversation('ops', 'bob', '@alice over the fallback');
    await waitFor(() => got.length === 1, { what: 'the group mention via the fallback' });
    await waitFor(() => sd.heartbeats('alice').length >= 2, { what: 'heartbeats via the fallback' });
    expect(handle.heartbeat.status().consecutiveFailures).toBe(0);
  });
});

describe('stream auth', () => {
  it('a stream that answers 401 while REST calls succeed is said once, and polling delivers', async () => {
    sd.inject({ path: '/messages/stream', status: 401, times: Infinity });
    const child = childRuntime(
      { pollIntervalMs: 100, heartbeatIntervalMs: 100, maxKeyAgeMs: 0 },
      'await new Promise((r) => setTimeout(r, 1500)); console.log(JSON.stringify(got));',
    );
    await waitFor(() => sd.requests.filter((r) => r.path === '/messages/stream').length >= 1, { what: 'a stream attempt' });
    sd.sendDirect('bob', 'alice', 'by polling');
    const { code, stdout, stderr } = await child;
    expect(code, stderr).toBe(0);
    expect(JSON.parse(stdout.trim())).toEqual(['by polling']);
    expect(stderr.match(/answers 401 to the key that REST calls succeed with/g)).toHaveLength(1);
    expect(stderr).not.toContain('key-a');
  });
});
