// A runtime never outlives the Node environment that created it: terminating a worker_threads
// Worker stops the runtimes it started (their SSE streams close, their pollers stop peeking,
// nothing more is pushed into a stream nobody reads), without a crash and without touching
// the runtimes of other threads. Real Workers, in a child process, against the test server.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { fileURLToPath } from 'node:url';
import { startSignalDock } from '../testing/signaldock-server.mjs';
import { runChild } from './support/helpers.mjs';

const entry = fileURLToPath(new URL('../index.js', import.meta.url));

let sd;
beforeAll(async () => { sd = await startSignalDock({ agents: { main: 'key-m' } }); });
afterAll(async () => { await sd.close(); });

describe('worker threads', () => {
  it('terminated workers mid-delivery: their streams close, their peeks stop, the main runtime delivers everything', async () => {
    const run = await runChild(`
      import { Worker } from 'node:worker_threads';
      import { createRuntime } from '@cleocode/runtime';
      const url = ${JSON.stringify(sd.url)};
      const entry = ${JSON.stringify(entry)};
      const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
      const control = (path, body) => fetch(url + '/_test/' + path, body === undefined ? {} : { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) }).then((r) => r.json());
      const credential = (agentId, apiKey) => ({ agentId, apiKey, apiBaseUrl: url, isActive: true,
        createdAt: new Date().toISOString(), updatedAt: new Date().toISOString(),
        transportConfig: { sseEndpoint: url + '/messages/stream' } });
      const WORKERS = 3;

      // The main thread's runtime: it must deliver everything, before, during and after.
      const mainCred = credential('main', 'key-m');
      const mainRegistry = { get: async () => mainCred, getActive: async () => mainCred, rotateKey: async () => ({}) };
      const mainGot = new Set();
      const handle = await createRuntime(mainRegistry, { pollIntervalMs: 200, heartbeatIntervalMs: 0, maxKeyAgeMs: 0 });
      handle.poller.onMessage((m) => { mainGot.add(m.content); });
      let mainSent = 0;
      const sendMain = () => control('send', { from: 'x', to: 'main', content: 'main-' + (mainSent++) });

      const workerSource = \`
        const { parentPort, workerData } = require('node:worker_threads');
        const { createRuntime } = require(workerData.entry);
        const cred = workerData.cred;
        const registry = { get: async () => cred, getActive: async () => cred, rotateKey: async () => ({}) };
        createRuntime(registry, { pollIntervalMs: 100, heartbeatIntervalMs: 100, maxKeyAgeMs: 0 }).then((h) => {
          // Slow on purpose: terminate() lands while messages are being handled.
          h.poller.onMessage(async (m) => { parentPort.postMessage(m.content); await new Promise((r) => setTimeout(r, 20)); });
          parentPort.postMessage('ready');
        });
      \`;
      const workers = [];
      for (let i = 0; i < WORKERS; i++) {
        const id = 'worker-' + i;
        await control('add-agent', { id, key: 'key-' + id });
        const got = [];
        const worker = new Worker(workerSource, { eval: true, execArgv: [], workerData: { entry, cred: credential(id, 'key-' + id) } });
        const ready = new Promise((resolve) => worker.on('message', (m) => { if (m === 'ready') resolve(); else got.push(m); }));
        worker.on('error', (e) => console.log('WORKER-ERROR', String(e)));
        workers.push({ id, worker, got, ready });
      }
      await Promise.all(workers.map((w) => w.ready));
      // Every stream open (one per worker, one for main) before the traffic starts.
      for (let t = 0; (await control('stats')).streams < WORKERS + 1; t++) {
        if (t > 500) { console.log('STREAMS-NEVER-OPENED'); process.exit(2); }
        await sleep(20);
      }
      // Mid-delivery: a stream of messages to every worker, terminated while they are handled.
      for (let n = 0; n < 10; n++) {
        for (const w of workers) await control('send', { from: 'x', to: w.id, content: w.id + '-' + n });
        await sendMain();
      }
      for (let t = 0; workers.some((w) => w.got.length === 0); t++) {
        if (t > 500) { console.log('WORKERS-NEVER-GOT'); process.exit(2); }
        await sleep(10);
      }
      await Promise.all(workers.map((w) => w.worker.terminate()));
      const terminatedAt = Date.now();
      console.log('TERMINATED', JSON.stringify(workers.map((w) => w.got.length)));

      // The main runtime goes on delivering while the workers are gone.
      for (let n = 0; n < 10; n++) { await sendMain(); await sleep(50); }
      // Whatever a dead worker's stream would have taken is pushed now: it must stay pending.
      const before = await control('stats');
      for (const w of workers) for (let n = 0; n < 5; n++) await control('send', { from: 'x', to: w.id, content: 'late-' + n });
      await sleep(1500);
      const after = await control('stats');
      const { requests } = await control('requests');
      const grace = terminatedAt + 500;
      const latePeeks = requests.filter((r) => r.agentId && r.agentId.startsWith('worker-') && r.at > grace).map((r) => r.agentId + ' ' + r.method + ' ' + r.path);
      for (let t = 0; mainGot.size < mainSent; t++) {
        if (t > 1000) break;
        await sleep(10);
      }
      console.log('RESULT', JSON.stringify({
        streamsAfter: after.streams,
        latePushedToDeadStreams: workers.map((w) => after.delivered[w.id] - before.delivered[w.id]),
        latePending: workers.map((w) => after.pending[w.id]),
        latePeeks: latePeeks.slice(0, 10),
        latePeekCount: latePeeks.length,
        mainSent, mainGot: mainGot.size,
      }));
      handle.stop();
    `, { timeoutMs: 90_000 });
    const line = run.stdout.split('\n').find((l) => l.startsWith('RESULT '));
    expect(line, run.stdout + run.stderr).toBeDefined();
    const r = JSON.parse(line.slice('RESULT '.length));
    // Only the main runtime's stream is left open.
    expect(r.streamsAfter).toBe(1);
    // Nothing was pushed into a dead worker's stream: the late messages wait for a reader.
    expect(r.latePushedToDeadStreams).toEqual([0, 0, 0]);
    expect(r.latePending.every((n) => n >= 5)).toBe(true);
    // No request from a worker's runtime after it was terminated (half a second of grace
    // for requests already on the wire).
    expect(r.latePeeks).toEqual([]);
    expect(r.mainGot).toBe(r.mainSent);
    expect(run.stdout).not.toContain('WORKER-ERROR');
    expect(run.code, run.stderr).toBe(0);
  }, 120_000);

  it('a worker that ends by itself after stop(), and one that is terminated with services left running: no crash, no leak into the process', async () => {
    const run = await runChild(`
      import { Worker } from 'node:worker_threads';
      const url = ${JSON.stringify(sd.url)};
      const entry = ${JSON.stringify(entry)};
      const source = (stop) => \`
        const { parentPort, workerData } = require('node:worker_threads');
        const { AgentPoller, HeartbeatService, KeyRotationService, SseTransport } = require(workerData.entry);
        const url = workerData.url;
        const poller = new AgentPoller({ agentId: 'main', apiKey: 'key-m', apiBaseUrl: url, pollIntervalMs: 50 });
        poller.onMessage(() => {});
        poller.start();
        const beat = new HeartbeatService({ agentId: 'main', apiKey: 'key-m', apiBaseUrl: url, intervalMs: 50 });
        beat.start();
        const registry = { get: async () => null, rotateKey: async () => ({}) };
        const rotation = new KeyRotationService({ agentId: 'main', registry, checkIntervalMs: 50 });
        rotation.start();
        const stream = new SseTransport();
        stream.connect({ agentId: 'main', apiKey: 'key-m', apiBaseUrl: url }).then(() => {
          stream.subscribe(() => {});
          if (\${stop}) { poller.stop(); beat.stop(); rotation.stop(); stream.disconnect(); }
          parentPort.postMessage('ready');
        });
      \`;
      for (let round = 0; round < 5; round++) {
        const stopping = new Worker(source(true), { eval: true, execArgv: [], workerData: { entry, url } });
        const exited = new Promise((r) => stopping.on('exit', r));
        await new Promise((r) => stopping.on('message', r));
        // All stopped: the worker's event loop empties and it exits by itself.
        const code = await Promise.race([exited, new Promise((r) => setTimeout(() => r('still running'), 10_000))]);
        if (code !== 0) { console.log('STOPPED-WORKER-DID-NOT-EXIT', code); process.exit(2); }
        const running = new Worker(source(false), { eval: true, execArgv: [], workerData: { entry, url } });
        await new Promise((r) => running.on('message', r));
        await running.terminate();
      }
      console.log('DONE');
    `, { timeoutMs: 90_000 });
    expect(run.stdout, run.stderr).toContain('DONE');
    expect(run.code, run.stderr).toBe(0);
  }, 120_000);
});
