// Log records into the application's logger: setLogger (per process) and
// RuntimeConfig.logger (per runtime), with a console-like object, a pino-like class whose
// methods need `this`, and a function; keys redacted; a logger that throws or rejects, and
// one that cannot keep up, never hurt the process or the messages.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { AgentPoller, createRuntime, setLogger } from '@cleocode/runtime';
import { startSignalDock } from '../testing/signaldock-server.mjs';
import { FakeRegistry, credential, runChild, waitFor } from './support/helpers.mjs';

const KEY_A = 'sk-live-alice-0123456789abcdef';
let sd;
const cleanup = [];
beforeEach(async () => { sd = await startSignalDock({ agents: { alice: KEY_A, bob: 'key-b' } }); });
afterEach(async () => {
  for (const stop of cleanup.splice(0)) stop();
  setLogger(null);
  await sd.close();
});

/** A runtime whose handler throws `why` for every message: one warning per message. */
async function failingRuntime(agentId, key, config = {}, why = (m) => `cannot handle ${m.content}`) {
  const handle = await createRuntime(new FakeRegistry(credential(agentId, key, sd.url)),
    { pollIntervalMs: 50, heartbeatIntervalMs: 0, maxKeyAgeMs: 0, ...config });
  cleanup.push(() => handle.stop());
  handle.poller.onMessage((m) => { throw new Error(why(m)); });
  return handle;
}

/** An object logger like `console`: plain functions, no `this`. */
function consoleLike() {
  const calls = [];
  const logger = {};
  for (const level of ['debug', 'info', 'warn', 'error']) logger[level] = (...args) => { calls.push([level, ...args]); };
  return { logger, calls };
}

/** A logger like pino: a class, private state (so its methods only work with `this`
 *  bound), (fields, message) order, and `bindings()`. */
class PinoLike {
  #lines = [];
  bindings() { return {}; }
  #write(level, fields, msg) { this.#lines.push({ level, msg, ...fields }); }
  trace(fields, msg) { this.#write('trace', fields, msg); }
  debug(fields, msg) { this.#write('debug', fields, msg); }
  info(fields, msg) { this.#write('info', fields, msg); }
  warn(fields, msg) { this.#write('warn', fields, msg); }
  error(fields, msg) { this.#write('error', fields, msg); }
  get lines() { return [...this.#lines]; }
}

describe('setLogger: the process logger', () => {
  it('a console-like object gets (message, fields) at the record\'s level', async () => {
    const { logger, calls } = consoleLike();
    setLogger(logger);
    await failingRuntime('alice', KEY_A);
    sd.sendDirect('bob', 'alice', 'one');
    // Other warnings may come first on a busy machine (a slow answer): look for this one.
    const [level, message, fields] = await waitFor(() => calls.find((c) => c[1] === 'message handler failed'), { what: 'the log call' });
    expect(level).toBe('warn');
    expect(message).toBe('message handler failed');
    expect(fields).toMatchObject({ target: 'cleo_runtime::core::poller', agentId: 'alice', error: expect.stringContaining('cannot handle one') });
    expect(typeof fields.message_id).toBe('string');
  });

  it('a pino-like logger is called with this bound, (fields, message)', async () => {
    const pino = new PinoLike();
    setLogger(pino);
    await failingRuntime('alice', KEY_A);
    sd.sendDirect('bob', 'alice', 'two');
    const line = await waitFor(() => pino.lines.find((l) => l.msg === 'message handler failed'), { what: 'the log line' });
    expect(line).toMatchObject({ level: 'warn', msg: 'message handler failed', agentId: 'alice', target: 'cleo_runtime::core::poller' });
  });

  it('a function gets the structured record { level, target, message, fields }', async () => {
    const records = [];
    setLogger((record) => { records.push(record); });
    await failingRuntime('alice', KEY_A);
    sd.sendDirect('bob', 'alice', 'three');
    const record = await waitFor(() => records.find((r) => r.message === 'message handler failed'), { what: 'the record' });
    expect(Object.keys(record).sort()).toEqual(['fields', 'level', 'message', 'target']);
    expect(record).toMatchObject({ level: 'warn', target: 'cleo_runtime::core::poller' });
    expect(record.fields.error).toMatch(/cannot handle three/);
  });

  it('standalone services log to it too', async () => {
    const records = [];
    setLogger((record) => { records.push(record); });
    const poller = new AgentPoller({ agentId: 'alice', apiKey: KEY_A, apiBaseUrl: sd.url, pollIntervalMs: 50 });
    cleanup.push(() => poller.stop());
    poller.onMessage(() => { throw new Error('standalone failure'); });
    poller.start();
    sd.sendDirect('bob', 'alice', 'four');
    await waitFor(() => records.some((r) => /standalone failure/.test(r.fields.error ?? '')), { what: 'the record' });
  });

  it('refuses what is not a logger with a TypeError naming it', () => {
    expect(() => setLogger(5)).toThrow(TypeError);
    expect(() => setLogger(5)).toThrow(/setLogger: logger must be a function or an object with debug\(\), info\(\), warn\(\) and error\(\) methods \(got number\)/);
    expect(() => setLogger({ debug() {}, info() {}, error() {} })).toThrow(/setLogger: logger\.warn is not a function|logger\.warn/);
    expect(() => setLogger('console')).toThrow(TypeError);
    expect(() => setLogger(null)).not.toThrow();
    expect(() => setLogger(undefined)).not.toThrow();
  });
});

describe('RuntimeConfig.logger: one runtime\'s records', () => {
  it('goes to the runtime\'s logger; other runtimes and standalone services to the process logger', async () => {
    const own = [];
    const processWide = [];
    setLogger((r) => { processWide.push(r); });
    await failingRuntime('alice', KEY_A, { logger: (r) => { own.push(r); } }, () => 'alice failed');
    await failingRuntime('bob', 'key-b', {}, () => 'bob failed');
    sd.sendDirect('alice', 'bob', 'to bob');
    sd.sendDirect('bob', 'alice', 'to alice');
    const failure = (records) => records.find((r) => r.message === 'message handler failed');
    await waitFor(() => failure(own) && failure(processWide), { what: 'both loggers' });
    expect(new Set(own.map((r) => r.fields.agentId))).toEqual(new Set(['alice']));
    expect(failure(own).fields.error).toMatch(/alice failed/);
    // Records of no runtime (process-wide ones, such as a once-per-process TLS or CA-file
    // warning emitted by whichever call builds the first HTTP client) belong to the process
    // logger too; every runtime-scoped record there is bob's, never alice's.
    const scoped = processWide.filter((r) => r.fields.agentId !== undefined);
    expect(new Set(scoped.map((r) => r.fields.agentId))).toEqual(new Set(['bob']));
    expect(processWide.filter((r) => JSON.stringify(r).includes('alice failed'))).toEqual([]);
    expect(failure(processWide).fields.error).toMatch(/bob failed/);
  });

  it('the API key is redacted before a record reaches JS, wherever it came from', async () => {
    const records = [];
    // The handler's error quotes the key, and so does the server's answer to a heartbeat.
    sd.inject({ method: 'POST', path: '/agents/alice/heartbeat', status: 500, message: `key ${KEY_A} is not allowed`, times: 1 });
    await failingRuntime('alice', KEY_A, { logger: (r) => { records.push(r); }, heartbeatIntervalMs: 60_000 }, () => `handler saw ${KEY_A}`);
    sd.sendDirect('bob', 'alice', 'leak?');
    await waitFor(() => records.some((r) => r.message === 'message handler failed') && records.some((r) => r.message === 'heartbeat failed'),
      { what: 'both warnings' });
    const text = JSON.stringify(records);
    expect(text).not.toContain(KEY_A);
    expect(records.find((r) => r.message === 'message handler failed').fields.error).toMatch(/handler saw \[redacted\]/);
    expect(records.find((r) => r.message === 'heartbeat failed').fields.error).toMatch(/\[redacted\]/);
  });

  it('a logger that is not one rejects createRuntime with a TypeError naming config.logger', async () => {
    const registry = new FakeRegistry(credential('alice', KEY_A, sd.url));
    const e = await createRuntime(registry, { logger: 42 }).catch((err) => err);
    expect(e).toBeInstanceOf(TypeError);
    expect(e.message).toMatch(/createRuntime: config\.logger must be a function or an object/);
    const e2 = await createRuntime(registry, { logger: { warn() {} } }).catch((err) => err);
    expect(e2).toBeInstanceOf(TypeError);
    expect(e2.message).toMatch(/config\.logger\.debug is not a function/);
  });
});

describe('a logger that misbehaves (child processes: a crash would end the process)', () => {
  const prelude = (url) => `
    import { createRuntime, setLogger } from '@cleocode/runtime';
    const now = new Date().toISOString();
    const cred = { agentId: 'alice', apiKey: ${JSON.stringify(KEY_A)}, apiBaseUrl: ${JSON.stringify(url)}, transportConfig: {}, isActive: true, createdAt: now, updatedAt: now };
    const registry = { get: async () => cred, getActive: async () => cred, rotateKey: async () => ({}) };
  `;

  it('throwing and rejecting loggers: no crash, records go to stderr, said once per logger', async () => {
    for (let i = 0; i < 4; i++) sd.sendDirect('bob', 'alice', `m${i}`);
    const run = await runChild(`${prelude(sd.url)}
      let calls = 0;
      let rejected = 0;
      setLogger({ debug() {}, info() {}, error() {}, warn() { calls++; throw new Error('logger is down'); } });
      const h = await createRuntime(registry, { pollIntervalMs: 50, heartbeatIntervalMs: 0, maxKeyAgeMs: 0 });
      let handled = 0;
      h.poller.onMessage((m) => {
        handled++;
        // From the third message on, an async logger that rejects.
        if (m.content === 'm2') setLogger(async () => { rejected++; throw new Error('async logger is down'); });
        throw new Error('handler failed on ' + m.content);
      });
      while (handled < 4 || calls < 2 || rejected < 2) await new Promise((r) => setTimeout(r, 20));
      await new Promise((r) => setTimeout(r, 200));
      console.log('ALIVE', calls, rejected);
      h.stop();
    `, { env: { CLEO_RUNTIME_LOG: undefined } });
    expect(run.code, run.stderr).toBe(0);
    expect(run.stdout).toMatch(/ALIVE 2 2/);
    const notices = run.stderr.split('\n').filter((l) => /application's logger threw or rejected/.test(l));
    expect(notices, run.stderr).toHaveLength(2);
    expect(notices[0]).toMatch(/logger is down/);
    expect(notices[1]).toMatch(/async logger is down/);
    // The records the throwing logger threw on were not lost: they are on stderr. The
    // async logger took its records (then rejected): they are not repeated.
    const records = run.stderr.split('\n').filter((l) => /message handler failed/.test(l));
    expect(records).toHaveLength(2);
    expect(records.join('\n')).toMatch(/handler failed on m0[\s\S]*handler failed on m1/);
  }, 60_000);

  it('setLogger(null) sends records back to stderr; a logger never keeps the process alive', async () => {
    for (let i = 0; i < 2; i++) sd.sendDirect('bob', 'alice', `n${i}`);
    const run = await runChild(`${prelude(sd.url)}
      const seen = [];
      setLogger((r) => { seen.push(r.fields.error); });
      const h = await createRuntime(registry, { pollIntervalMs: 50, heartbeatIntervalMs: 0, maxKeyAgeMs: 0, logger: undefined });
      let handled = 0;
      h.poller.onMessage((m) => {
        handled++;
        if (m.content === 'n1') setLogger(null);
        throw new Error('failed on ' + m.content);
      });
      while (handled < 2 || seen.length < 1) await new Promise((r) => setTimeout(r, 20));
      console.log('LOGGER ' + JSON.stringify(seen));
      // A logger is set again and the runtime stops: nothing else holds the process.
      setLogger(() => {});
      h.stop();
    `, { env: { CLEO_RUNTIME_LOG: undefined }, timeoutMs: 20_000 });
    expect(run.code, run.stderr).toBe(0);
    expect(run.signal).toBeNull();
    expect(JSON.parse(run.stdout.split('\n').find((l) => l.startsWith('LOGGER ')).slice(7))).toEqual(['Error: failed on n0']);
    const onStderr = run.stderr.split('\n').filter((l) => /message handler failed/.test(l));
    expect(onStderr).toHaveLength(1);
    expect(onStderr[0]).toMatch(/failed on n1/);
  }, 60_000);

  it('a logger set in a worker that has ended: records go to stderr', async () => {
    const run = await runChild(`
      import { Worker } from 'node:worker_threads';
      import { AgentPoller } from '@cleocode/runtime';
      // The worker's code runs as a module, as this one does (--input-type is inherited).
      const worker = new Worker("const { setLogger } = await import('@cleocode/runtime'); setLogger(() => {});", { eval: true });
      await new Promise((resolve) => worker.on('exit', resolve));
      // A record with no I/O: plain http to a host other than loopback warns once.
      new AgentPoller({ agentId: 'a', apiKey: 'k', apiBaseUrl: 'http://example.invalid', pollIntervalMs: 1000 });
      console.log('DONE');
    `, { env: { CLEO_RUNTIME_LOG: undefined } });
    expect(run.code, run.stderr).toBe(0);
    expect(run.stdout).toContain('DONE');
    expect(run.stderr.split('\n').filter((l) => /plain http/.test(l))).toHaveLength(1);
  });

  it('a slow JS thread: records are dropped and counted, never messages; the loops never wait', async () => {
    const groups = Array.from({ length: 8 }, (_, i) => `g${i}`);
    // Handled only once the JS thread is free again.
    sd.sendDirect('bob', 'alice', 'sent before the block');
    const run = await runChild(`${prelude(sd.url)}
      const records = [];
      setLogger((r) => { records.push(r); });
      const h = await createRuntime(registry, { pollIntervalMs: 1, heartbeatIntervalMs: 0, maxKeyAgeMs: 0, groupConversationIds: ${JSON.stringify(groups)} });
      const got = [];
      h.poller.onMessage((m) => { got.push(m.content); });
      const before = h.poller.status().polls;
      // Block the JS thread until the loops have logged far more than the queue holds.
      const deadline = Date.now() + 40_000;
      while (h.poller.status().polls < before + 400 && Date.now() < deadline) {}
      const during = h.poller.status().polls - before;
      console.log('UNBLOCKED ' + during);
      while (got.length < 1) await new Promise((r) => setTimeout(r, 20));
      await new Promise((r) => setTimeout(r, 200));
      h.stop();
      const notice = records.find((r) => /log records dropped/.test(r.message));
      console.log('RESULT ' + JSON.stringify({ during, got, notice, total: records.length }));
    `, { env: { CLEO_RUNTIME_LOG: 'cleo_runtime=trace' }, timeoutMs: 60_000 });
    expect(run.code, run.stderr.slice(-2000)).toBe(0);
    const result = JSON.parse(run.stdout.split('\n').find((l) => l.startsWith('RESULT ')).slice(7));
    // The poll loop kept going while the JS thread was blocked: logging never waited for it.
    expect(result.during).toBeGreaterThanOrEqual(400);
    expect(result.notice).toMatchObject({ level: 'warn', fields: { dropped: expect.any(Number) } });
    expect(result.notice.fields.dropped).toBeGreaterThan(0);
    // The message was delivered: only log records are ever dropped.
    expect(result.got).toEqual(['sent before the block']);
  }, 90_000);
});
