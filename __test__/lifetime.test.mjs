// Process lifetime, in child processes: a running runtime keeps Node alive like a timer;
// after stop() the process exits by itself, promptly, even with a handler or a registry call
// still pending; creating and stopping many runtimes leaks neither memory nor threads.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startSignalDock } from '../testing/signaldock-server.mjs';
import { runChild } from './support/helpers.mjs';

let sd;
beforeAll(async () => { sd = await startSignalDock({ agents: { alice: 'key-a', bob: 'key-b' } }); });
afterAll(async () => { await sd.close(); });

const prelude = (url) => `
  import { createRuntime, AgentPoller, HeartbeatService, KeyRotationService } from '@cleocode/runtime';
  const url = ${JSON.stringify(url)};
  const now = new Date().toISOString();
  const cred = { agentId: 'alice', apiKey: 'key-a', apiBaseUrl: url, transportConfig: {}, isActive: true, updatedAt: now, createdAt: now };
  const registry = { get: async () => cred, getActive: async () => cred, rotateKey: async () => ({ agentId: 'alice', newApiKey: 'n' }) };
  const mark = (what) => console.log(what, Date.now());
`;

function stoppedToExitMs(stdout) {
  const stopped = Number(/stopped (\d+)/.exec(stdout)?.[1]);
  const exited = Number(/exit (\d+)/.exec(stdout)?.[1]);
  return exited - stopped;
}

describe('process lifetime', () => {
  it('a running runtime keeps the process alive', async () => {
    const run = await runChild(`${prelude(sd.url)}
      const handle = await createRuntime(registry, { pollIntervalMs: 200 });
      handle.poller.onMessage(() => {});
      mark('started');
    `, { timeoutMs: 2500 });
    expect(run.stdout).toContain('started');
    expect(run.signal).toBe('SIGKILL');
  });

  it.each([
    ['a runtime', `const h = await createRuntime(registry, { pollIntervalMs: 100, heartbeatIntervalMs: 100 }); h.poller.onMessage(() => {}); await new Promise((r) => setTimeout(r, 300)); mark('stopped'); h.stop();`],
    ['a bare poller', `const p = new AgentPoller({ agentId: 'alice', apiKey: 'key-a', apiBaseUrl: url, pollIntervalMs: 100 }); p.onMessage(() => {}); p.start(); await new Promise((r) => setTimeout(r, 300)); mark('stopped'); p.stop();`],
    ['a heartbeat', `const s = new HeartbeatService({ agentId: 'alice', apiKey: 'key-a', apiBaseUrl: url, intervalMs: 100 }); s.start(); await new Promise((r) => setTimeout(r, 300)); mark('stopped'); s.stop();`],
    ['key rotation with its first check pending', `const s = new KeyRotationService({ agentId: 'alice', registry }); s.start(); await new Promise((r) => setTimeout(r, 300)); mark('stopped'); s.stop();`],
  ])('after stop() of %s the process exits by itself, promptly', async (_name, body) => {
    const run = await runChild(`${prelude(sd.url)}
      process.on('exit', () => mark('exit'));
      ${body}
    `);
    expect(run.code, run.stderr).toBe(0);
    expect(stoppedToExitMs(run.stdout)).toBeLessThan(1000);
  });

  it('exits promptly after stop() even with a handler that never settles', async () => {
    sd.sendDirect('bob', 'alice', 'hang on');
    const run = await runChild(`${prelude(sd.url)}
      process.on('exit', () => mark('exit'));
      const h = await createRuntime(registry, { pollIntervalMs: 100 });
      await new Promise((resolve) => h.poller.onMessage(() => { resolve(); return new Promise(() => {}); }));
      mark('stopped');
      h.stop();
    `);
    expect(run.code, run.stderr).toBe(0);
    expect(stoppedToExitMs(run.stdout)).toBeLessThan(1000);
  });

  it('exits promptly after stop() even with a registry call pending', async () => {
    const run = await runChild(`${prelude(sd.url)}
      process.on('exit', () => mark('exit'));
      const old = '2000-01-01T00:00:00Z';
      let checking;
      const checked = new Promise((r) => { checking = r; });
      const slowRegistry = { get: async () => ({ ...cred, updatedAt: old }), getActive: async () => cred,
        rotateKey: () => { checking(); return new Promise(() => {}); } };
      const h = await createRuntime(slowRegistry, { heartbeatIntervalMs: 0 });
      h.poller.onMessage(() => {});
      await checked;
      mark('stopped');
      h.stop();
    `, { timeoutMs: 20_000 });
    expect(run.code, run.stderr).toBe(0);
    expect(stoppedToExitMs(run.stdout)).toBeLessThan(1000);
  }, 30_000);

  it('a crash-free exit even when the handler throws on every message', async () => {
    for (let i = 0; i < 5; i++) sd.sendDirect('bob', 'alice', `t${i}`);
    const run = await runChild(`${prelude(sd.url)}
      const h = await createRuntime(registry, { pollIntervalMs: 50 });
      let n = 0;
      h.poller.onMessage(async () => { n++; throw new Error('handler bug'); });
      await new Promise((r) => setTimeout(r, 800));
      console.log('failed', h.poller.status().failed);
      h.stop();
    `);
    expect(run.code, run.stderr).toBe(0);
    expect(run.stdout).toMatch(/failed [1-9]/);
  });

  it('creating and stopping 1000 runtimes leaves memory and threads flat', async () => {
    const run = await runChild(`${prelude(sd.url)}
      import { readFileSync } from 'node:fs';
      const threads = () => Number(/Threads:\\s+(\\d+)/.exec(readFileSync('/proc/self/status', 'utf8'))[1]);
      const round = async (n) => {
        for (let i = 0; i < n; i++) {
          const h = await createRuntime(registry, { pollIntervalMs: 60000, heartbeatIntervalMs: 0 });
          h.poller.onMessage(() => {});
          h.stop();
        }
        await new Promise((r) => setTimeout(r, 200));
        global.gc?.();
        await new Promise((r) => setTimeout(r, 200));
      };
      await round(200);
      const rss0 = process.memoryUsage().rss;
      const t0 = threads();
      await round(1000);
      const rss1 = process.memoryUsage().rss;
      console.log(JSON.stringify({ rssGrowthMiB: (rss1 - rss0) / 2 ** 20, threads0: t0, threads1: threads() }));
    `, { timeoutMs: 60_000, env: { NODE_OPTIONS: '--expose-gc' } });
    expect(run.code, run.stderr).toBe(0);
    const figures = JSON.parse(run.stdout.trim().split('\n').at(-1));
    expect(figures.threads1).toBeLessThanOrEqual(figures.threads0 + 2);
    expect(figures.rssGrowthMiB).toBeLessThan(40);
  }, 90_000);
});
