// Small helpers shared by the JS suites: waiting on conditions (never fixed sleeps for
// correctness), fake transports and registries written the way callers write them.
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Resolves once `condition()` is truthy; rejects with `what` after `timeoutMs`. */
export async function waitFor(condition, { timeoutMs = 15_000, everyMs = 10, what = 'condition' } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await condition();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(everyMs);
  }
}

let seq = 0;
export function message(overrides = {}) {
  seq += 1;
  return { id: `m-${seq}`, from: 'bob', content: `hello ${seq}`, timestamp: new Date().toISOString(), ...overrides };
}

/**
 * A transport as cleo's dispatch layer writes one: a class with private state, so its
 * methods only work when called with `this` bound to the instance.
 */
export class FakeTransport {
  name = 'fake';
  #pending = [];
  #acked = [];
  calls = [];
  stopped = false;
  constructor(messages = []) { this.#pending.push(...messages); }
  add(...messages) { this.#pending.push(...messages); }
  get acked() { return [...this.#acked]; }
  get pendingCount() { return this.#pending.length; }
  async connect(config) { this.calls.push(['connect', config]); }
  async disconnect() { this.calls.push(['disconnect']); }
  async push(to, content) { this.calls.push(['push', to, content]); return { messageId: `p-${to}` }; }
  async poll(options) {
    this.calls.push(['poll', options]);
    return this.#pending.slice(0, options?.limit ?? 50);
  }
  async ack(ids) {
    this.calls.push(['ack', ids]);
    this.#acked.push(...ids);
    this.#pending = this.#pending.filter((m) => !ids.includes(m.id));
  }
}

/**
 * A registry over one mutable credential per agent, modelled on the real one
 * (agent-registry-accessor.ts): rotateKey stores the new key and resolves with a MASKED
 * one, `"<first 8 chars>...rotated"`; the usable key is what get() returns. With `server`
 * set (a test SignalDock), rotateKey asks the server for the new key, as the real one does.
 */
export class FakeRegistry {
  #creds = new Map();
  calls = [];
  rotations = 0;
  answered = [];
  server = null;
  constructor(...credentials) { for (const c of credentials) this.#creds.set(c.agentId, { ...c }); }
  async get(agentId) { this.calls.push(['get', agentId]); return this.#creds.get(agentId) ?? null; }
  async getActive() { this.calls.push(['getActive']); return [...this.#creds.values()].find((c) => c.isActive) ?? null; }
  async rotateKey(agentId) {
    this.calls.push(['rotateKey', agentId]);
    this.rotations += 1;
    const cred = this.#creds.get(agentId);
    if (this.server) {
      const answer = await fetch(`${this.server.url}/agents/${encodeURIComponent(agentId)}/rotate-key`, {
        method: 'POST', headers: { authorization: `Bearer ${cred.apiKey}`, 'x-agent-id': agentId },
      });
      const body = await answer.json();
      if (!body.success) throw new Error(`rotate-key: ${body.error?.message}`);
      cred.apiKey = body.data.apiKey;
    } else {
      cred.apiKey = `${agentId}-rotated-${this.rotations}`;
    }
    cred.updatedAt = new Date().toISOString();
    const answer = { agentId, newApiKey: `${cred.apiKey.slice(0, 8)}...rotated` };
    this.answered.push(answer);
    return answer;
  }
  set(agentId, patch) { Object.assign(this.#creds.get(agentId), patch); }
}

export function credential(agentId, apiKey, apiBaseUrl, extra = {}) {
  const now = new Date().toISOString();
  return {
    agentId, displayName: agentId, apiKey, apiBaseUrl, privacyTier: 'private', capabilities: [], skills: [],
    transportType: 'http', transportConfig: {}, isActive: true, createdAt: now, updatedAt: now, ...extra,
  };
}

/**
 * Runs `source` as an ES module in a child Node process (cwd: the package root) and
 * resolves with its exit code, output and how long it ran.
 */
export function runChild(source, { timeoutMs = 20_000, env = {} } = {}) {
  const root = fileURLToPath(new URL('../..', import.meta.url));
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const child = spawn(process.execPath, ['--input-type=module', '-e', source], {
      cwd: root, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => { stdout += d; });
    child.stderr.on('data', (d) => { stderr += d; });
    const timer = setTimeout(() => { child.kill('SIGKILL'); }, timeoutMs);
    child.on('error', reject);
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr, ms: Date.now() - started });
    });
  });
}
