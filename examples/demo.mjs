// The main job, as a demo: resident agents exchanging messages on the runtime.
//
// Part 1 — the embedded default: a temporary project with its own `.cleo/signaldock.db`,
// two agents (alice, bob), each with its own runtime resolved to the local transport. They
// message each other both ways; each reply is sent by the other agent's handler.
// Part 2 — the same exchange over HTTP + SSE against the project's SignalDock test server
// (loopback), where the runtime resolves the SSE transport.
//
// Prints each step and a latency summary per path, then shuts everything down and exits by
// itself (a deadline of 30 s turns a hang into a failure). Run: `npm run demo`.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createRuntime, LocalTransport } from '@cleocode/runtime';
import { startSignalDock } from '../testing/signaldock-server.mjs';

const ROUNDS = 5;
const deadline = setTimeout(() => {
  console.error('demo: did not finish within 30 s');
  process.exit(1);
}, 30_000);
deadline.unref();

const clock = () => performance.timeOrigin + performance.now();
const log = (...parts) => console.log(...parts);

/** The smallest registry the runtime needs, in memory. */
class DemoRegistry {
  #credentials = new Map();
  add(agentId, apiKey, apiBaseUrl, transportConfig = {}) {
    const now = new Date().toISOString();
    this.#credentials.set(agentId, {
      agentId, displayName: agentId, apiKey, apiBaseUrl, transportConfig, privacyTier: 'private',
      capabilities: [], skills: [], transportType: transportConfig.sseEndpoint ? 'sse' : 'http',
      isActive: true, createdAt: now, updatedAt: now,
    });
  }
  async get(agentId) { return this.#credentials.get(agentId) ?? null; }
  async getActive() { return null; }
  async rotateKey(agentId) { return { agentId, newApiKey: this.#credentials.get(agentId).apiKey }; }
}

/**
 * alice and bob ping-pong: alice sends `ping n`, bob's handler answers `pong n`, alice's
 * handler records the round trip. Returns one-way latencies (send → handler) in ms.
 */
async function exchange(label, alice, bob) {
  const oneWay = [];
  const sentAt = new Map();
  let done;
  const finished = new Promise((resolve) => { done = resolve; });
  bob.poller.onMessage(async (msg) => {
    oneWay.push(clock() - sentAt.get(msg.content));
    log(`  [${label}] bob   <- ${msg.from}: ${msg.content}`);
    const reply = msg.content.replace('ping', 'pong');
    sentAt.set(reply, clock());
    await bob.transport.push(msg.from, reply);
  });
  alice.poller.onMessage((msg) => {
    oneWay.push(clock() - sentAt.get(msg.content));
    log(`  [${label}] alice <- ${msg.from}: ${msg.content}`);
    if (msg.content === `pong ${ROUNDS}`) done();
  });
  alice.poller.start();
  bob.poller.start();
  for (let n = 1; n <= ROUNDS; n++) {
    const text = `ping ${n}`;
    sentAt.set(text, clock());
    const { messageId } = await alice.transport.push('bob', text);
    log(`  [${label}] alice -> bob: ${text} (${messageId.slice(0, 8)})`);
  }
  await finished;
  return oneWay;
}

function summary(label, latencies) {
  const sorted = [...latencies].sort((a, b) => a - b);
  const at = (q) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
  log(`  ${label}: ${sorted.length} messages, one-way latency p50 ${at(0.5).toFixed(1)} ms, max ${sorted.at(-1).toFixed(1)} ms`);
}

async function localPart() {
  const project = mkdtempSync(path.join(tmpdir(), 'cleo-demo-'));
  process.env.CLEO_DIR = path.join(project, '.cleo');
  try {
    const db = await LocalTransport.ensureSchema();
    log(`\n1. Local SignalDock: ${db}`);
    const registry = new DemoRegistry();
    registry.add('alice', 'local-key-a', 'local');
    registry.add('bob', 'local-key-b', 'local');
    // A long poll interval on purpose: delivery rides on SQLite's commit watcher, not polling.
    // No heartbeat: a local one records presence in the agent's row of signaldock.db's agents
    // table, which the cleo CLI's registry writes; this in-memory registry writes none, so
    // every beat would fail (and say so).
    const config = { pollIntervalMs: 30_000, heartbeatIntervalMs: 0, maxKeyAgeMs: 0 };
    const alice = await createRuntime(registry, { ...config, agentId: 'alice' });
    const bob = await createRuntime(registry, { ...config, agentId: 'bob' });
    log(`  runtimes up: alice over '${alice.transport.name}', bob over '${bob.transport.name}', heartbeat ${alice.heartbeat ? 'running' : 'off (no agents rows in this demo)'}`);
    const latencies = await exchange('local', alice, bob);
    alice.stop();
    bob.stop();
    log('  runtimes stopped');
    return latencies;
  } finally {
    delete process.env.CLEO_DIR;
    rmSync(project, { recursive: true, force: true });
  }
}

async function cloudPart() {
  const server = await startSignalDock({ agents: { alice: 'cloud-key-a', bob: 'cloud-key-b' } });
  try {
    log(`\n2. HTTP + SSE against the SignalDock test server at ${server.url}`);
    const registry = new DemoRegistry();
    const sseEndpoint = `${server.url}/messages/stream`;
    registry.add('alice', 'cloud-key-a', server.url, { sseEndpoint });
    registry.add('bob', 'cloud-key-b', server.url, { sseEndpoint });
    const config = { pollIntervalMs: 5_000, heartbeatIntervalMs: 1_000 };
    const alice = await createRuntime(registry, { ...config, agentId: 'alice' });
    const bob = await createRuntime(registry, { ...config, agentId: 'bob' });
    // The stream connects in the background (polling covers until it does); wait to show it.
    for (let i = 0; i < 100 && alice.sseConnection.status().state !== 'connected'; i++) {
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    log(`  runtimes up: transport '${alice.transport.name}', stream ${alice.sseConnection.status().state}, heartbeat ${alice.heartbeat ? 'running' : 'disabled'}`);
    const latencies = await exchange('sse', alice, bob);
    log(`  heartbeats recorded by the server: alice ${server.heartbeats('alice').length}, bob ${server.heartbeats('bob').length}`);
    alice.stop();
    bob.stop();
    log('  runtimes stopped');
    return latencies;
  } finally {
    await server.close();
  }
}

const started = clock();
log('CLEO runtime demo: two resident agents, each with its own native runtime.');
const local = await localPart();
const cloud = await cloudPart();
log('\nLatency summary (send -> the other agent\'s handler):');
summary('local (signaldock.db)', local);
summary('http + sse           ', cloud);
log(`\nDone in ${((clock() - started) / 1000).toFixed(1)} s; every runtime stopped, the process exits by itself.`);
