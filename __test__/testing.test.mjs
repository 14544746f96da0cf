// What users test with: the `@cleocode/runtime/testing` subpath (the test server, the fake
// registry) and the clock-free hooks pollNow(), beatNow(), checkNow(), each with a one-hour
// interval so that nothing but the hook can make the runtime act.
import { createRequire } from 'node:module';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { AgentPoller, HeartbeatService, KeyRotationService, createRuntime } from '@cleocode/runtime';
import * as testing from '@cleocode/runtime/testing';
import { FakeRegistry, startSignalDock, testCredential } from '@cleocode/runtime/testing';
import { sleep, waitFor } from './support/helpers.mjs';

const HOUR = 3_600_000;
const cleanup = [];
afterEach(async () => {
  vi.useRealTimers();
  for (const stop of cleanup.splice(0).reverse()) {
    try { await stop(); } catch { /* best effort */ }
  }
});

async function server(options = {}) {
  const sd = await startSignalDock({ agents: { alice: 'key-alice-1', bob: 'key-bob-1' }, ...options });
  cleanup.push(() => sd.close());
  return sd;
}

async function runtimeFor(sd, config = {}, overrides = {}) {
  const registry = new FakeRegistry([testCredential('bob', 'key-bob-1', sd.url, overrides)]);
  const handle = await createRuntime(registry, { pollIntervalMs: HOUR, heartbeatIntervalMs: HOUR, maxKeyAgeMs: 0, ...config });
  cleanup.push(() => handle.stop());
  return { handle, registry };
}

const peeks = (sd) => sd.requests.filter((r) => r.path === '/messages/peek').length;

describe('@cleocode/runtime/testing', () => {
  it('ESM import and the CommonJS build export the same things', () => {
    const names = ['FakeRegistry', 'SignalDock', 'dmConversationId', 'startSignalDock', 'testCredential'];
    expect(Object.keys(testing).sort()).toEqual(names);
    const cjs = createRequire(import.meta.url)('@cleocode/runtime/testing');
    for (const name of names) expect(typeof cjs[name], name).toBe('function');
    expect(cjs.dmConversationId('bob', 'alice')).toBe(testing.dmConversationId('bob', 'alice'));
  });

  it('`every: n` faults the n-th, 2n-th, … matching request, whatever else happens', async () => {
    const sd = await server();
    const rule = sd.inject({ path: '/health', status: 503, every: 3, times: Infinity });
    sd.inject({ path: '/messages/peek', status: 500, probability: 0.5, times: Infinity });
    const statuses = [];
    for (let i = 0; i < 9; i++) {
      statuses.push((await fetch(`${sd.url}/health`)).status);
      await fetch(`${sd.url}/messages/peek`, { headers: { authorization: 'Bearer key-bob-1' } });
    }
    expect(statuses).toEqual([200, 200, 503, 200, 200, 503, 200, 200, 503]);
    expect(rule.hits).toBe(3);
    expect(() => sd.inject({ path: '/health', every: 0 })).toThrow(TypeError);
    expect(() => sd.inject({ path: '/health', every: 2, probability: 0.5 })).toThrow(/exclude/);
  });

  it('FakeRegistry rotates like the real registry: a masked answer, the real key from get()', async () => {
    const sd = await server();
    const registry = new FakeRegistry([testCredential('bob', 'key-bob-1', sd.url)]);
    const before = await registry.get('bob');
    before.apiKey = 'changed by the code under test';
    expect((await registry.get('bob')).apiKey).toBe('key-bob-1');

    const answer = await registry.rotateKey('bob');
    const stored = await registry.get('bob');
    expect(stored.apiKey).not.toBe('key-bob-1');
    expect(answer).toEqual({ agentId: 'bob', newApiKey: `${stored.apiKey.slice(0, 8)}...rotated` });
    expect(Date.parse(stored.updatedAt)).toBeGreaterThanOrEqual(Date.parse(before.updatedAt));
    // The server took the rotation with the old key, and accepts the new one.
    const rotation = sd.requests.find((r) => r.path === '/agents/bob/rotate-key');
    expect(rotation.headers.authorization).toBe('Bearer key-bob-1');
    const peek = await fetch(`${sd.url}/messages/peek`, { headers: { authorization: `Bearer ${stored.apiKey}`, 'x-agent-id': 'bob' } });
    expect(peek.status).toBe(200);
    expect(registry.calls).toEqual([['get', 'bob'], ['get', 'bob'], ['rotateKey', 'bob'], ['get', 'bob']]);

    // A refused rotation names the status, never a key.
    sd.inject({ path: '/agents/bob/rotate-key', status: 500 });
    const failed = await registry.rotateKey('bob').catch((e) => e);
    expect(failed.message).toMatch(/answered 500/);
    expect(failed.message).not.toContain(stored.apiKey);
    expect((await registry.get('bob')).apiKey).toBe(stored.apiKey);
  });

  it('FakeRegistry: the rest of AgentRegistryAPI, and TypeErrors naming the field', async () => {
    const registry = new FakeRegistry();
    expect(await registry.getActive()).toBeNull();
    const made = await registry.register(testCredential('carol', 'key-c', 'http://127.0.0.1:1', { isActive: false }));
    expect(made.createdAt).toBe(made.updatedAt);
    await expect(registry.register(made)).rejects.toThrow(/already registered/);
    expect(await registry.list({ active: true })).toEqual([]);
    const old = new Date(Date.now() - 40 * 24 * HOUR).toISOString();
    await registry.update('carol', { isActive: true, updatedAt: old, agentId: 'mallory' });
    expect(await registry.getActive()).toMatchObject({ agentId: 'carol', updatedAt: old });
    await registry.markUsed('carol');
    expect((await registry.get('carol')).lastUsedAt).toBeDefined();
    await registry.remove('carol');
    expect(await registry.list()).toEqual([]);
    await expect(registry.rotateKey('carol')).rejects.toThrow(/no agent carol/);
    const local = new FakeRegistry([testCredential('dave', 'key-d', 'local')]);
    await expect(local.rotateKey('dave')).rejects.toThrow(/not an http\(s\) URL/);

    expect(() => new FakeRegistry({})).toThrow(new TypeError('FakeRegistry: credentials must be an array (got object)'));
    expect(() => new FakeRegistry([{ agentId: 'x', apiBaseUrl: 'local' }])).toThrow(/credentials\[0\]\.apiKey must be a non-empty string/);
    expect(() => testCredential('bob', 42, 'local')).toThrow(TypeError);
    expect(() => testCredential('bob', 42, 'local')).toThrow(/apiKey/);
  });
});

describe('poller.pollNow()', () => {
  it('delivers direct messages and mentions with a one-hour interval, resolving once handled and acked', async () => {
    const sd = await server();
    const { handle } = await runtimeFor(sd, { groupConversationIds: ['ops'] });
    const handled = [];
    handle.poller.onMessage(async (m) => {
      await sleep(20); // an async handler: pollNow waits for it
      handled.push(m.content);
    });
    for (let i = 1; i <= 60; i++) sd.sendDirect('alice', 'bob', `dm ${i}`);
    // Stored as a copy in bob's inbox and listed in the conversation: one handler call.
    sd.postToConversation('ops', 'alice', '@bob please look');

    const report = await handle.poller.pollNow();
    expect(report).toEqual({ handled: 61, failed: 0, errors: [] });
    expect(handled).toHaveLength(61);
    // Sixty messages of one second (the server keeps whole seconds): the last ten only
    // after the first fifty were acked, which pollNow waits for. In send order.
    expect(handled.filter((c) => c.startsWith('dm '))).toEqual(Array.from({ length: 60 }, (_, i) => `dm ${i + 1}`));
    expect(handled.filter((c) => !c.startsWith('dm '))).toEqual(['@bob please look']);
    expect(sd.pending('bob')).toEqual([]); // every DM and the post's inbox copy acked
    // Nothing new: resolves with nothing, and nothing is handled twice.
    expect(await handle.poller.pollNow()).toEqual({ handled: 0, failed: 0, errors: [] });
    expect(handled).toHaveLength(61);
  });

  it('reports failed handler calls and failed tracks', async () => {
    const sd = await server();
    const { handle } = await runtimeFor(sd);
    handle.poller.onMessage((m) => { if (m.content === 'bad') throw new Error('handler says no'); });
    sd.sendDirect('alice', 'bob', 'good');
    sd.sendDirect('alice', 'bob', 'bad');
    expect(await handle.poller.pollNow()).toEqual({ handled: 1, failed: 1, errors: [] });
    sd.inject({ path: '/messages/peek', status: 503 });
    const report = await handle.poller.pollNow();
    expect(report.handled).toBe(0);
    expect(report.errors).toHaveLength(1);
    expect(report.errors[0]).toMatch(/^direct: .*503/);
    expect(report.errors[0]).not.toContain('key-bob-1');
  });

  it('fake timers never reach the runtime: advancing them polls nothing, pollNow still works', async () => {
    const sd = await server();
    const { handle } = await runtimeFor(sd);
    const handled = [];
    handle.poller.onMessage((m) => { handled.push(m.content); });
    await handle.poller.pollNow(); // the start-up cycle is behind us
    const before = peeks(sd);
    vi.useFakeTimers();
    sd.sendDirect('alice', 'bob', 'hello');
    vi.advanceTimersByTime(10 * HOUR);
    await vi.advanceTimersByTimeAsync(10 * HOUR);
    expect(peeks(sd)).toBe(before);
    expect(handled).toEqual([]);
    expect(await handle.poller.pollNow()).toMatchObject({ handled: 1 });
    expect(handled).toEqual(['hello']);
  });

  it('rejects when not started, without a handler, and when stopped before it completes', async () => {
    const sd = await server();
    const poller = new AgentPoller({ agentId: 'bob', apiKey: 'key-bob-1', apiBaseUrl: sd.url, pollIntervalMs: HOUR });
    cleanup.push(() => poller.stop());
    await expect(poller.pollNow()).rejects.toThrow('AgentPoller.pollNow: not running (call start() first)');
    poller.start();
    await expect(poller.pollNow()).rejects.toThrow('AgentPoller.pollNow: no handler yet (call onMessage() first)');
    let entered;
    const inHandler = new Promise((resolve) => { entered = resolve; });
    poller.onMessage(() => { entered(); return new Promise(() => {}); }); // never settles
    sd.sendDirect('alice', 'bob', 'stuck');
    const pending = poller.pollNow();
    await inHandler;
    poller.stop();
    await expect(pending).rejects.toThrow('AgentPoller.pollNow: stopped before it completed');
  });
});

describe('heartbeat.beatNow() and keyRotation.checkNow()', () => {
  it('beatNow beats at once and resolves with the outcome', async () => {
    const sd = await server();
    const heartbeat = new HeartbeatService({ agentId: 'bob', apiKey: 'key-bob-1', apiBaseUrl: sd.url, intervalMs: HOUR });
    cleanup.push(() => heartbeat.stop());
    await expect(heartbeat.beatNow()).rejects.toThrow('HeartbeatService.beatNow: not running (call start() first)');
    heartbeat.start();
    // The beat at start first: a beatNow asked at the same instant may share it.
    await waitFor(() => heartbeat.status().beats === 1, { what: 'the beat at start' });
    expect(await heartbeat.beatNow()).toEqual({ ok: true, consecutiveFailures: 0 });
    expect(sd.heartbeats('bob')).toHaveLength(2);
    sd.inject({ path: '/agents/bob/heartbeat', status: 503 });
    const failed = await heartbeat.beatNow();
    expect(failed).toMatchObject({ ok: false, consecutiveFailures: 1 });
    expect(failed.error).toMatch(/503/);
    expect(heartbeat.status()).toMatchObject({ beats: 3, consecutiveFailures: 1 });
  });

  it('checkNow checks at once (before the 5 s first check) and says what it did', async () => {
    const sd = await server();
    const old = new Date(Date.now() - 40 * 24 * HOUR).toISOString();
    const registry = new FakeRegistry([testCredential('bob', 'key-bob-1', sd.url, { updatedAt: old })]);
    const rotation = new KeyRotationService({ agentId: 'bob', registry, checkIntervalMs: HOUR });
    cleanup.push(() => rotation.stop());
    await expect(rotation.checkNow()).rejects.toThrow('KeyRotationService.checkNow: not running (call start() first)');
    rotation.start();
    expect(await rotation.checkNow()).toEqual({ rotated: true, adopted: false });
    expect(rotation.status()).toMatchObject({ checks: 1, rotations: 1 });
    expect(sd.keysOf('bob')).toContain((await registry.get('bob')).apiKey);
    // The stored key is fresh now: nothing to do.
    expect(await rotation.checkNow()).toEqual({ rotated: false, adopted: false });
    registry.get = async () => { throw new Error('registry offline'); };
    const failed = await rotation.checkNow();
    expect(failed).toMatchObject({ rotated: false, adopted: false });
    expect(failed.error).toMatch(/registry offline/);
  });
});
