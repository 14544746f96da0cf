// Whatever JavaScript throws never crashes the process and never costs another message: a
// handler, registry method or transport method that throws (or rejects with) a Symbol,
// undefined, a Proxy whose traps throw, an object whose toString or message getter throws, or
// a revoked Proxy is a counted failure with a readable lastError. The other messages of the
// same page are still handed to the handler, and only what was handed over is acked.
// Scenarios run in child processes, so a crash is an exit code, not a dead test runner.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startSignalDock } from '../testing/signaldock-server.mjs';
import { runChild } from './support/helpers.mjs';

let sd;
beforeAll(async () => { sd = await startSignalDock({ agents: { alice: 'key-a' } }); });
afterAll(async () => { await sd.close(); });

// Source text that evaluates to a fresh hostile value each time it runs.
const HOSTILE = {
  symbol: `Symbol('sym-boom')`,
  undefined: `undefined`,
  proxy: `new Proxy({}, { get() { throw Symbol('trap'); }, getPrototypeOf() { throw Symbol('trap'); }, ownKeys() { throw Symbol('trap'); }, getOwnPropertyDescriptor() { throw Symbol('trap'); }, has() { throw Symbol('trap'); } })`,
  toStringThrows: `({ get toString() { throw Symbol('no toString'); }, get message() { throw Symbol('no message'); } })`,
  messageGetterThrows: `Object.defineProperty(new Error('hidden'), 'message', { get() { throw Symbol('no message'); } })`,
  revokedProxy: `(() => { const { proxy, revoke } = Proxy.revocable({}, {}); revoke(); return proxy; })()`,
};
const KINDS = Object.keys(HOSTILE);

const prelude = `
  import { createRuntime, AgentPoller, KeyRotationService, SseConnectionService } from '@cleocode/runtime';
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  let uncaught = 0;
  process.on('uncaughtException', (e) => { uncaught += 1; console.log('UNCAUGHT', typeof e === 'symbol' ? e.toString() : String(e?.message ?? typeof e)); });
  process.on('unhandledRejection', (e) => { uncaught += 1; console.log('UNHANDLED', typeof e === 'symbol' ? e.toString() : typeof e); });
  const messages = (n, tag) => Array.from({ length: n }, (_, i) => ({ id: tag + '-' + i, from: 'bob', content: 'c' + i, timestamp: new Date().toISOString() }));
  class PageTransport {
    name = 'page';
    acked = [];
    #pending;
    constructor(pending) { this.#pending = pending; }
    async connect() {}
    async disconnect() {}
    async poll() { return this.#pending.filter((m) => !this.acked.includes(m.id)); }
    async ack(ids) { this.acked.push(...ids); }
  }
  const report = (value) => console.log('REPORT ' + JSON.stringify(value));
  async function until(cond, ms = 10_000) { const end = Date.now() + ms; while (!cond() && Date.now() < end) await sleep(10); return cond(); }
`;

/** Runs a child; returns its REPORT objects. Asserts no crash and nothing uncaught. */
async function scenario(body) {
  const run = await runChild(`${prelude}\n${body}\nconsole.log('UNCAUGHT-COUNT', uncaught);`, { timeoutMs: 60_000 });
  expect(run.stderr).not.toMatch(/Cannot convert a Symbol|panicked|FATAL/);
  expect(run.code, `${run.stdout}\n${run.stderr}`).toBe(0);
  expect(run.stdout).toContain('UNCAUGHT-COUNT 0');
  return run.stdout.split('\n').filter((l) => l.startsWith('REPORT ')).map((l) => JSON.parse(l.slice(7)));
}

describe('a handler that throws anything', () => {
  it.each(KINDS)('throws %s synchronously: counted, readable, the rest of the page handled, only handled ids acked', async (kind) => {
    const [r] = await scenario(`
      const page = messages(5, 'sync');
      const transport = new PageTransport(page);
      const poller = new AgentPoller({ agentId: 'alice', apiKey: 'k', apiBaseUrl: 'x', transport, pollIntervalMs: 60_000 });
      const called = [];
      poller.onMessage((m) => { called.push(m.id); if (m.id === 'sync-1') throw ${HOSTILE[kind]}; });
      poller.start();
      await until(() => called.length >= 5 && transport.acked.length >= 5);
      await sleep(100);
      const s = poller.status();
      report({ called, acked: transport.acked, failed: s.failed, delivered: s.delivered, lastError: s.lastError });
      poller.stop();
    `);
    expect(r.called).toEqual(['sync-0', 'sync-1', 'sync-2', 'sync-3', 'sync-4']);
    expect(r.failed).toBe(1);
    expect(r.delivered).toBe(4);
    expect([...r.acked].sort()).toEqual(r.called);
    expect(typeof r.lastError).toBe('string');
    expect(r.lastError).toMatch(/^handler: \S/);
  }, 60_000);

  it.each(KINDS)('rejects with %s: counted, readable, the rest handled', async (kind) => {
    const [r] = await scenario(`
      const page = messages(4, 'async');
      const transport = new PageTransport(page);
      const poller = new AgentPoller({ agentId: 'alice', apiKey: 'k', apiBaseUrl: 'x', transport, pollIntervalMs: 60_000 });
      const called = [];
      poller.onMessage(async (m) => { called.push(m.id); if (m.id === 'async-0') throw ${HOSTILE[kind]}; });
      poller.start();
      await until(() => called.length >= 4 && transport.acked.length >= 4);
      const s = poller.status();
      report({ called, acked: transport.acked, failed: s.failed, lastError: s.lastError });
      poller.stop();
    `);
    expect(r.called).toHaveLength(4);
    expect(r.failed).toBe(1);
    expect([...r.acked].sort()).toEqual([...r.called].sort());
    expect(r.lastError).toMatch(/^handler: \S/);
  }, 60_000);

  it('a Symbol thrown names the symbol in lastError', async () => {
    const [r] = await scenario(`
      const transport = new PageTransport(messages(1, 'named'));
      const poller = new AgentPoller({ agentId: 'alice', apiKey: 'k', apiBaseUrl: 'x', transport, pollIntervalMs: 60_000 });
      poller.onMessage(() => { throw Symbol('sym-boom'); });
      poller.start();
      await until(() => poller.status().failed >= 1);
      report({ lastError: poller.status().lastError });
      poller.stop();
    `);
    expect(r.lastError).toContain('Symbol(sym-boom)');
  });

  it('an SseConnectionService handler and a subscriber that throw anything: counted, no crash', async () => {
    const [r] = await scenario(`
      const values = [${KINDS.map((k) => `() => ${HOSTILE[k]}`).join(', ')}];
      class Relay { name = 'relay'; fns = []; async connect() {} async disconnect() {} subscribe(fn) { this.fns.push(fn); return () => {}; } }
      const relay = new Relay();
      const service = new SseConnectionService({ agentId: 'alice', apiKey: 'k', apiBaseUrl: 'http://127.0.0.1:9', transport: relay });
      let i = 0;
      service.onMessage(() => { throw values[i++](); });
      await service.start();
      for (const [n] of values.entries()) relay.fns[0]({ id: 'sse-' + n, from: 'bob', content: 'x', timestamp: new Date().toISOString() });
      await sleep(200);
      report({ calls: i, failed: service.status().failed });
      await service.stop();
    `);
    expect(r.calls).toBe(KINDS.length);
    expect(r.failed).toBe(KINDS.length);
  });
});

describe('a transport or registry method that throws anything', () => {
  it.each(KINDS)('poll() and ack() throw %s: lastError readable, the poller goes on, nothing acked unhandled', async (kind) => {
    const [r] = await scenario(`
      const page = messages(3, 'tp');
      let polls = 0;
      let acks = 0;
      const transport = {
        name: 'hostile', acked: [],
        async connect() {}, async disconnect() {},
        poll() { polls += 1; if (polls === 1) throw ${HOSTILE[kind]}; return page.filter((m) => !this.acked.includes(m.id)); },
        ack(ids) { acks += 1; if (acks === 1) throw ${HOSTILE[kind]}; this.acked.push(...ids); },
      };
      const poller = new AgentPoller({ agentId: 'alice', apiKey: 'k', apiBaseUrl: 'x', transport, pollIntervalMs: 50 });
      const called = [];
      poller.onMessage((m) => { called.push(m.id); });
      poller.start();
      let firstError = null;
      await until(() => { firstError ??= poller.status().lastError; return transport.acked.length >= 3; });
      report({ called, acked: transport.acked, firstError, polls });
      poller.stop();
    `);
    expect(r.called).toEqual(['tp-0', 'tp-1', 'tp-2']);
    expect([...r.acked].sort()).toEqual(r.called);
    expect(r.firstError).toMatch(/hostile.*poll\(\) failed: \S|hostile.*ack\(\) failed: \S/);
  }, 60_000);

  it.each(KINDS)('poll() resolves to / returns %s as a page: an error for that poll, no crash', async (kind) => {
    const [r] = await scenario(`
      let polls = 0;
      const transport = { name: 'junk', async connect() {}, async disconnect() {}, async ack() {},
        poll() { polls += 1; return polls % 2 ? ${HOSTILE[kind]} : Promise.resolve(${HOSTILE[kind]}); } };
      const poller = new AgentPoller({ agentId: 'alice', apiKey: 'k', apiBaseUrl: 'x', transport, pollIntervalMs: 20 });
      poller.onMessage(() => {});
      poller.start();
      await until(() => polls >= 6);
      report({ polls, lastError: poller.status().lastError ?? null });
      poller.stop();
    `);
    expect(r.polls).toBeGreaterThanOrEqual(6);
  }, 60_000);

  it.each(KINDS)('registry.get() and transport.connect() throw %s: createRuntime rejects readably', async (kind) => {
    const [r] = await scenario(`
      const cred = { agentId: 'alice', apiKey: 'k', apiBaseUrl: 'http://127.0.0.1:9', transportConfig: {} };
      const results = [];
      const registry = { get() { throw ${HOSTILE[kind]}; }, getActive() { throw ${HOSTILE[kind]}; }, rotateKey() {} };
      try { await createRuntime(registry, { agentId: 'alice' }); results.push('resolved'); } catch (e) { results.push(String(e.message)); }
      const fine = { get: async () => cred, getActive: async () => cred, rotateKey: async () => ({}) };
      const transport = { name: 't', connect() { throw ${HOSTILE[kind]}; }, async disconnect() {}, async poll() { return []; }, async ack() {} };
      try { await createRuntime(fine, { transport }); results.push('resolved'); } catch (e) { results.push(String(e.message)); }
      const rejecting = { name: 't', connect: async () => { throw ${HOSTILE[kind]}; }, async disconnect() {}, async poll() { return []; }, async ack() {} };
      try { await createRuntime(fine, { transport: rejecting }); results.push('resolved'); } catch (e) { results.push(String(e.message)); }
      report({ results });
    `);
    expect(r.results[0]).toMatch(/registry\.get\(\) failed: \S/);
    expect(r.results[1]).toMatch(/transport\.connect\(\) failed.*: \S/);
    expect(r.results[2]).toMatch(/transport\.connect\(\) failed.*: \S/);
  }, 60_000);

  it.each(KINDS)('registry.rotateKey() throws %s: a counted failure, the service goes on', async (kind) => {
    const [r] = await scenario(`
      const old = '2000-01-01T00:00:00Z';
      let rotations = 0;
      const registry = { get: async () => ({ agentId: 'alice', apiKey: 'k', updatedAt: old }), rotateKey() { rotations += 1; throw ${HOSTILE[kind]}; } };
      const s = new KeyRotationService({ agentId: 'alice', registry, checkIntervalMs: 50, maxKeyAgeMs: 1000 });
      s.start();
      await until(() => rotations >= 2, 20_000);
      report({ rotations, lastError: s.status().lastError });
      s.stop();
    `);
    expect(r.rotations).toBeGreaterThanOrEqual(2);
    expect(r.lastError).toMatch(/rotateKey\(\) failed: \S/);
  }, 60_000);
});
