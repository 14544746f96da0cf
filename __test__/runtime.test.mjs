// createRuntime, HeartbeatService and KeyRotationService through the package entry, with
// JS fake registries and transports and the project's SignalDock test server.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { HeartbeatService, KeyRotationService, SseTransport, createRuntime } from '@cleocode/runtime';
import { startSignalDock } from '../testing/signaldock-server.mjs';
import { FakeRegistry, FakeTransport, credential, message, sleep, waitFor } from './support/helpers.mjs';

const NO_CRED = 'No agent credential found. Run: cleo agent register --id <id> --api-key <key>';
let sd;
const cleanup = [];
beforeEach(async () => { sd = await startSignalDock({ agents: { alice: 'key-a', bob: 'key-b' } }); });
afterEach(async () => {
  for (const stop of cleanup.splice(0)) stop();
  await sd.close();
});
async function runtime(registry, config) {
  const handle = await createRuntime(registry, config);
  cleanup.push(() => handle.stop());
  return handle;
}

describe('createRuntime', () => {
  it('resolves the active credential and returns the documented handle', async () => {
    const registry = new FakeRegistry(credential('alice', 'key-a', sd.url));
    const handle = await runtime(registry, { pollIntervalMs: 100 });
    expect(Object.keys(handle).sort()).toEqual(['agentId', 'heartbeat', 'keyRotation', 'poller', 'sseConnection', 'stop', 'transport']);
    expect(handle.agentId).toBe('alice');
    expect(typeof handle.stop).toBe('function');
    expect(handle.transport.name).toBe('http');
    expect(handle.heartbeat).not.toBeNull();
    expect(handle.keyRotation).not.toBeNull();
    expect(handle.sseConnection).toBeNull();
    expect(registry.calls[0]).toEqual(['getActive']);
    const { stop } = handle;
    expect(() => stop()).not.toThrow();
  });

  it('uses registry.get(agentId) when config.agentId is given, with this bound', async () => {
    class ClassRegistry {
      #cred = credential('bob', 'key-b', sd.url);
      async get(id) { return id === this.#cred.agentId ? this.#cred : null; }
      async getActive() { return null; }
      async rotateKey() { throw new Error('unused'); }
    }
    const handle = await runtime(new ClassRegistry(), { agentId: 'bob' });
    expect(handle.agentId).toBe('bob');
  });

  it('rejects with the exact message when there is no credential', async () => {
    const registry = new FakeRegistry();
    await expect(createRuntime(registry)).rejects.toThrow(NO_CRED);
    await expect(createRuntime(registry, { agentId: 'ghost' })).rejects.toThrow(NO_CRED);
    const e = await createRuntime(registry).catch((err) => err);
    expect(e.message).toBe(NO_CRED);
  });

  it('a registry that rejects, throws or returns junk rejects createRuntime with the cause', async () => {
    const rejecting = { get: async () => { throw new Error('disk on fire'); }, getActive: async () => { throw new Error('disk on fire'); }, rotateKey: async () => ({}) };
    await expect(createRuntime(rejecting)).rejects.toThrow(/disk on fire/);
    const throwing = { get() { throw new Error('sync boom'); }, getActive() { throw new Error('sync boom'); }, rotateKey() {} };
    await expect(createRuntime(throwing)).rejects.toThrow(/sync boom/);
    const junk = { get: async () => 42, getActive: async () => 42, rotateKey: async () => ({}) };
    await expect(createRuntime(junk)).rejects.toThrow(/credential/);
    const noKey = { get: async () => ({ agentId: 'a' }), getActive: async () => ({ agentId: 'a' }), rotateKey: async () => ({}) };
    await expect(createRuntime(noKey)).rejects.toThrow(/apiKey/);
  });

  it.each([
    ['registry', null, {}],
    ['registry', {}, {}],
    ['agentId', 'registry', { agentId: 7 }],
    ['pollIntervalMs', 'registry', { pollIntervalMs: -1 }],
    ['groupConversationIds', 'registry', { groupConversationIds: 'x' }],
    ['groupPollLimit', 'registry', { groupPollLimit: 1.5 }],
    ['heartbeatIntervalMs', 'registry', { heartbeatIntervalMs: -1 }],
    ['maxKeyAgeMs', 'registry', { maxKeyAgeMs: 'old' }],
    ['sseEndpoint', 'registry', { sseEndpoint: 5 }],
    ['createSseTransport', 'registry', { createSseTransport: {} }],
    ['transport', 'registry', { transport: { poll() {} } }],
    ['config', 'registry', 'fast'],
  ])('%s: a wrong type rejects with a TypeError naming it', async (field, registry, config) => {
    const reg = registry === 'registry' ? new FakeRegistry(credential('alice', 'key-a', sd.url)) : registry;
    const e = await createRuntime(reg, config).catch((err) => err);
    expect(e).toBeInstanceOf(TypeError);
    expect(e.message).toContain(field);
  });

  it('connects the caller transport with { agentId, apiKey, apiBaseUrl, ...transportConfig } and hands it back', async () => {
    const transport = new FakeTransport();
    const registry = new FakeRegistry(credential('alice', 'key-a', 'local', { transportConfig: { pollIntervalMs: 250, apiBaseUrlFallback: 'http://fallback' } }));
    const handle = await runtime(registry, { transport, heartbeatIntervalMs: 0 });
    expect(handle.transport).toBe(transport);
    expect(transport.calls[0]).toEqual(['connect', { agentId: 'alice', apiKey: 'key-a', apiBaseUrl: 'local', pollIntervalMs: 250, apiBaseUrlFallback: 'http://fallback' }]);
    handle.stop();
    expect(transport.calls.at(-1)).toEqual(['disconnect']);
  });

  it('a connect failure rejects createRuntime with the cause and without the key', async () => {
    const transport = new FakeTransport();
    transport.connect = async (config) => { throw new Error(`cannot reach it with ${config.apiKey}`); };
    const registry = new FakeRegistry(credential('alice', 'sk-live-secret', 'local'));
    const e = await createRuntime(registry, { transport }).catch((err) => err);
    expect(e.message).toMatch(/connect\(\) failed: cannot reach it/);
    expect(e.message).not.toContain('sk-live-secret');
  });

  it('pollIntervalMs: config, else the credential transportConfig, else 5000', async () => {
    const registry = new FakeRegistry(credential('alice', 'key-a', sd.url, { transportConfig: { pollIntervalMs: 150 } }));
    const handle = await runtime(registry, { heartbeatIntervalMs: 0, maxKeyAgeMs: 0 });
    handle.poller.onMessage(() => {});
    await sleep(1000);
    const peeks = sd.requests.filter((r) => r.path === '/messages/peek').length;
    expect(peeks).toBeGreaterThanOrEqual(4);
    handle.stop();
    sd.clearRequests();
    const slow = await runtime(new FakeRegistry(credential('alice', 'key-a', sd.url)), { heartbeatIntervalMs: 0, maxKeyAgeMs: 0 });
    slow.poller.onMessage(() => {});
    await sleep(1000);
    expect(sd.requests.filter((r) => r.path === '/messages/peek').length).toBe(1);
  });

  it("with createSseTransport and an SSE endpoint the transport is 'sse', as the old package's was; the factory's transport delivers", async () => {
    /** A caller's SSE transport: records its subscriber, pushes what the test hands it. */
    class CallerSse {
      name = 'caller-sse';
      handler = null;
      async connect() {}
      async disconnect() {}
      async push() { return { messageId: 'unused' }; }
      async poll() { return []; }
      async ack() {}
      subscribe(handler) { this.handler = handler; return () => { this.handler = null; }; }
    }
    const endpoint = `${sd.url}/messages/stream`;
    const quiet = { pollIntervalMs: 60_000, heartbeatIntervalMs: 0, maxKeyAgeMs: 0 };
    for (const [where, cred, config] of [
      ['the credential', credential('alice', 'key-a', sd.url, { transportConfig: { sseEndpoint: endpoint } }), {}],
      ['config.sseEndpoint', credential('alice', 'key-a', sd.url), { sseEndpoint: endpoint }],
    ]) {
      const caller = new CallerSse();
      const handle = await runtime(new FakeRegistry(cred), { ...quiet, ...config, createSseTransport: () => caller });
      // `cleo agent start` prints handle.transport.name.
      expect(handle.transport.name, where).toBe('sse');
      expect(handle.transport).toBeInstanceOf(SseTransport);
      expect(handle.sseConnection.status()).toMatchObject({ running: true, transportName: 'caller-sse' });
      await waitFor(() => caller.handler !== null, { what: `the factory's transport subscribed (${where})` });
      const got = [];
      handle.poller.onMessage((m) => { got.push(m.id); });
      caller.handler(message({ id: `pushed-${where}` }));
      await waitFor(() => got.length === 1, { what: `delivery through the factory's transport (${where})` });
      expect(got).toEqual([`pushed-${where}`]);
      // The stream is the factory's: the runtime's own transport opened none.
      expect(sd.streams()).toBe(0);
      expect(handle.transport.status().state).toBe('closed');
      // handle.transport sends over REST.
      const { messageId } = await handle.transport.push('bob', `hello from ${where}`);
      expect(sd.pending('bob').map((r) => [r.id, r.content])).toContainEqual([messageId, `hello from ${where}`]);
      handle.stop();
    }
  });

  it('heartbeat and key rotation are null when set to 0', async () => {
    const registry = new FakeRegistry(credential('alice', 'key-a', sd.url));
    const handle = await runtime(registry, { heartbeatIntervalMs: 0, maxKeyAgeMs: 0 });
    expect(handle.heartbeat).toBeNull();
    expect(handle.keyRotation).toBeNull();
  });

  it('a message that arrives before the handler is registered is delivered once, after', async () => {
    sd.sendDirect('bob', 'alice', 'early bird');
    const registry = new FakeRegistry(credential('alice', 'key-a', sd.url));
    const handle = await runtime(registry, { pollIntervalMs: 100, heartbeatIntervalMs: 0 });
    await sleep(300);
    expect(sd.pending('alice')).toHaveLength(1);
    const got = [];
    handle.poller.onMessage(async (m) => { got.push(m.content); });
    handle.poller.start();
    handle.poller.start();
    await waitFor(() => got.length === 1, { what: 'delivery' });
    await sleep(300);
    expect(got).toEqual(['early bird']);
  });

  it('stop() is idempotent, never throws, and stops every service', async () => {
    const registry = new FakeRegistry(credential('alice', 'key-a', sd.url));
    const handle = await runtime(registry, { pollIntervalMs: 100, heartbeatIntervalMs: 100 });
    handle.poller.onMessage(() => {});
    await waitFor(() => sd.heartbeats('alice').length >= 1, { what: 'a beat' });
    handle.stop();
    handle.stop();
    const count = sd.requests.length;
    await sleep(400);
    expect(sd.requests.length).toBe(count);
    expect(handle.poller.status().running).toBe(false);
    expect(handle.heartbeat.status().running).toBe(false);
    expect(handle.keyRotation.status().running).toBe(false);
  });
});

describe('HeartbeatService', () => {
  it.each([
    ['agentId', { agentId: '' }],
    ['apiKey', { apiKey: 3 }],
    ['apiBaseUrl', { apiBaseUrl: 'nowhere' }],
    ['intervalMs', { intervalMs: 0 }],
  ])('%s: invalid is a TypeError naming it', (field, patch) => {
    const make = () => new HeartbeatService({ agentId: 'alice', apiKey: 'k', apiBaseUrl: 'http://127.0.0.1:1', ...patch });
    expect(make).toThrow(TypeError);
    expect(make).toThrow(field);
  });

  it('beats at once and on the interval with the documented request', async () => {
    const hb = new HeartbeatService({ agentId: 'alice', apiKey: 'key-a', apiBaseUrl: sd.url, intervalMs: 200 });
    cleanup.push(() => hb.stop());
    hb.start();
    hb.start();
    await waitFor(() => sd.heartbeats('alice').length >= 1, { what: 'first beat', timeoutMs: 1000 });
    await sleep(700);
    hb.stop();
    const beats = sd.requests.filter((r) => r.path === '/agents/alice/heartbeat');
    expect(beats.length).toBeGreaterThanOrEqual(3);
    expect(beats.length).toBeLessThanOrEqual(6);
    expect(beats[0]).toMatchObject({ method: 'POST', body: { status: 'online' } });
    expect(beats[0].headers).toMatchObject({ authorization: 'Bearer key-a', 'x-agent-id': 'alice', 'content-type': 'application/json' });
    expect(hb.status()).toMatchObject({ running: false, consecutiveFailures: 0 });
  });

  it('counts consecutive failures and resets on success', async () => {
    sd.inject({ path: '/agents/alice/heartbeat', status: 500, times: 2 });
    const hb = new HeartbeatService({ agentId: 'alice', apiKey: 'key-a', apiBaseUrl: sd.url, intervalMs: 150 });
    cleanup.push(() => hb.stop());
    hb.start();
    await waitFor(() => hb.status().consecutiveFailures === 2, { what: 'two failures' });
    await waitFor(() => hb.status().consecutiveFailures === 0 && hb.status().beats >= 3, { what: 'reset' });
    sd.inject({ path: '/agents/alice/heartbeat', status: 401, times: 1 });
    await waitFor(() => hb.status().consecutiveFailures === 1, { what: 'a 401 counted' });
  });

  it('encodes the agent id in the path', async () => {
    sd.addAgent('a/b c', 'key-x');
    const hb = new HeartbeatService({ agentId: 'a/b c', apiKey: 'key-x', apiBaseUrl: sd.url, intervalMs: 10_000 });
    cleanup.push(() => hb.stop());
    hb.start();
    await waitFor(() => sd.requests.some((r) => r.path === '/agents/a%2Fb%20c/heartbeat'), { what: 'encoded path' });
  });
});

describe('KeyRotationService', () => {
  it.each([
    ['agentId', { agentId: undefined }],
    ['registry', { registry: undefined }],
    ['registry', { registry: { get() {} } }],
    ['checkIntervalMs', { checkIntervalMs: -1 }],
    ['maxKeyAgeMs', { maxKeyAgeMs: 'x' }],
  ])('%s: invalid is a TypeError naming it', (field, patch) => {
    const make = () => new KeyRotationService({ agentId: 'alice', registry: new FakeRegistry(), ...patch });
    expect(make).toThrow(TypeError);
    expect(make).toThrow(field);
  });

  it('checks 5 s after start, rotates an old key and records lastRotationAt', async () => {
    const old = new Date(Date.now() - 40 * 24 * 3600 * 1000).toISOString();
    const registry = new FakeRegistry(credential('alice', 'key-a', sd.url, { updatedAt: old }));
    const kr = new KeyRotationService({ agentId: 'alice', registry, maxKeyAgeMs: 30 * 24 * 3600 * 1000 });
    cleanup.push(() => kr.stop());
    expect(kr.status()).toEqual(expect.objectContaining({ running: false, lastRotationAt: null }));
    const t0 = Date.now();
    kr.start();
    kr.start();
    await sleep(4000);
    expect(registry.calls).toHaveLength(0);
    await waitFor(() => registry.rotations === 1, { what: 'rotation', timeoutMs: 5000 });
    expect(Date.now() - t0).toBeGreaterThanOrEqual(4900);
    // rotations counts the call; lastRotationAt is set once rotateKey has resolved.
    await waitFor(() => kr.status().lastRotationAt, { what: 'lastRotationAt' });
    expect(Date.parse(kr.status().lastRotationAt)).toBeGreaterThan(t0);
  }, 20_000);

  it('stop() cancels the pending first check', async () => {
    const registry = new FakeRegistry(credential('alice', 'key-a', sd.url, { updatedAt: '2000-01-01T00:00:00Z' }));
    const kr = new KeyRotationService({ agentId: 'alice', registry });
    kr.start();
    await sleep(500);
    kr.stop();
    await sleep(5500);
    expect(registry.calls).toHaveLength(0);
    expect(kr.status().running).toBe(false);
  }, 20_000);

  it('a failing registry is not fatal', async () => {
    const registry = { get: async () => { throw new Error('locked'); }, rotateKey: async () => ({}) };
    const kr = new KeyRotationService({ agentId: 'alice', registry, checkIntervalMs: 200 });
    cleanup.push(() => kr.stop());
    kr.start();
    await waitFor(() => kr.status().checks >= 2, { what: 'two checks', timeoutMs: 10_000 });
    expect(kr.status().lastError).toMatch(/locked/);
    expect(kr.status().running).toBe(true);
  }, 20_000);
});

describe('key hand-over inside a runtime', () => {
  it('after rotation every service uses the new key; the old key is never sent after the overlap', async () => {
    const old = new Date(Date.now() - 40 * 24 * 3600 * 1000).toISOString();
    const registry = new FakeRegistry(credential('alice', 'key-a', sd.url, { updatedAt: old }));
    // The server learns the new key when the registry rotates it.
    const rotate = registry.rotateKey.bind(registry);
    registry.rotateKey = async (id) => { const r = await rotate(id); sd.addKey('alice', (await registry.get(id)).apiKey); return r; };
    const handle = await runtime(registry, { pollIntervalMs: 200, heartbeatIntervalMs: 200, groupConversationIds: ['g'] });
    const got = [];
    handle.poller.onMessage((m) => { got.push(m.content); });
    await waitFor(() => registry.rotations === 1, { what: 'rotation', timeoutMs: 10_000 });
    // The old key expires: anything still using it would now get 401.
    sd.expireKey('key-a');
    const expiredAt = Date.now();
    sd.sendDirect('bob', 'alice', 'after rotation');
    sd.postToConversation('g', 'bob', '@alice group after rotation');
    await waitFor(() => got.length === 2, { what: 'both messages', timeoutMs: 10_000 });
    await sleep(600);
    const late = sd.requests.filter((r) => r.at > expiredAt + 250 && r.path !== '/health');
    expect(late.length).toBeGreaterThan(0);
    for (const r of late) expect(r.headers.authorization).toBe('Bearer alice-rotated-1');
    expect(handle.heartbeat.status().consecutiveFailures).toBe(0);
    expect(handle.keyRotation.status().lastRotationAt).not.toBeNull();
  }, 30_000);

  it("handle.transport connected again by the caller keeps the runtime's key store: a rotated key reaches it", async () => {
    const old = new Date(Date.now() - 40 * 24 * 3600 * 1000).toISOString();
    const endpoint = `${sd.url}/messages/stream`;
    for (const [name, extra] of [['http', {}], ['sse', { sseEndpoint: endpoint }]]) {
      sd.addKey('alice', 'key-a');
      const registry = new FakeRegistry(credential('alice', 'key-a', sd.url, { updatedAt: old }));
      const rotate = registry.rotateKey.bind(registry);
      registry.rotateKey = async (id) => { const r = await rotate(id); sd.addKey('alice', (await registry.get(id)).apiKey); return r; };
      const handle = await runtime(registry, { pollIntervalMs: 200, heartbeatIntervalMs: 0, ...extra });
      expect(handle.transport.name).toBe(name);
      // The caller reconnects the handed-out transport with the key it was given.
      await handle.transport.disconnect();
      await handle.transport.connect({ agentId: 'alice', apiKey: 'key-a', apiBaseUrl: sd.url, ...extra });
      await waitFor(() => registry.rotations === 1, { what: `rotation (${name})`, timeoutMs: 10_000 });
      const rotated = (await registry.get('alice')).apiKey;
      sd.expireKey('key-a');
      const { messageId } = await handle.transport.push('bob', `after rotation (${name})`);
      const sent = sd.requests.filter((r) => r.method === 'POST' && r.path.startsWith('/messages') && r.path !== '/messages/ack').at(-1);
      expect(sent.headers.authorization, name).toBe(`Bearer ${rotated}`);
      expect(sd.pending('bob').map((r) => r.id)).toContain(messageId);
      handle.stop();
    }
  }, 40_000);

  it('a 401 during the overlap is retried once with the other key: nothing is lost', async () => {
    const old = new Date(Date.now() - 40 * 24 * 3600 * 1000).toISOString();
    const registry = new FakeRegistry(credential('alice', 'key-a', sd.url, { updatedAt: old }));
    // The registry issues the new key before the server knows it: requests with the new key
    // get 401 until the server catches up, and must fall back to the old key meanwhile.
    const handle = await runtime(registry, { pollIntervalMs: 3000, heartbeatIntervalMs: 0 });
    const got = [];
    handle.poller.onMessage((m) => { got.push(m.content); });
    await waitFor(() => registry.rotations === 1, { what: 'rotation', timeoutMs: 10_000 });
    sd.sendDirect('bob', 'alice', 'during overlap');
    await waitFor(() => got.length === 1, { what: 'delivery during the overlap', timeoutMs: 10_000 });
    const retried = sd.requests.filter((r) => r.path === '/messages/peek' && r.headers.authorization === 'Bearer key-a');
    expect(retried.length).toBeGreaterThan(0);
  }, 30_000);
});
