// Every service and transport under Jest's --detectOpenHandles (`.ci/test.sh` runs this suite
// with it and fails on any report): once stopped or disconnected, nothing of the runtime may
// stay open. Each test starts one thing, uses it, and stops it.
const os = require('node:os');
const path = require('node:path');
const fs = require('node:fs');
const runtime = require('@cleocode/runtime');
const { startSignalDock, FakeRegistry, testCredential } = require('@cleocode/runtime/testing');

const HOUR = 3_600_000;
let sd;

beforeEach(async () => {
  sd = await startSignalDock({ agents: { alice: 'key-alice-1', bob: 'key-bob-1' } });
});

afterEach(async () => {
  await sd.close();
});

async function until(check) {
  for (let i = 0; i < 1000 && !check(); i++) await new Promise((r) => setTimeout(r, 10));
  expect(check()).toBe(true);
}

test('AgentPoller with a JS transport and a handler', async () => {
  const transport = { name: 'fake', async poll() { return []; }, async ack() {} };
  const poller = new runtime.AgentPoller({ agentId: 'bob', apiKey: 'k', apiBaseUrl: 'local', transport, pollIntervalMs: HOUR });
  poller.onMessage(() => {});
  poller.start();
  expect(await poller.pollNow()).toMatchObject({ handled: 0 });
  poller.stop();
});

test('AgentPoller on the REST peek, started twice', async () => {
  const poller = new runtime.AgentPoller({ agentId: 'bob', apiKey: 'key-bob-1', apiBaseUrl: sd.url, pollIntervalMs: HOUR });
  const got = [];
  poller.onMessage((m) => { got.push(m.content); });
  poller.start();
  poller.stop();
  sd.sendDirect('alice', 'bob', 'after a restart');
  poller.start();
  await poller.pollNow();
  poller.stop();
  expect(got).toEqual(['after a restart']);
});

test('HeartbeatService and a standalone KeyRotationService', async () => {
  const heartbeat = new runtime.HeartbeatService({ agentId: 'bob', apiKey: 'key-bob-1', apiBaseUrl: sd.url, intervalMs: HOUR });
  heartbeat.start();
  expect(await heartbeat.beatNow()).toMatchObject({ ok: true });
  heartbeat.stop();
  const registry = new FakeRegistry([testCredential('bob', 'key-bob-1', sd.url)]);
  const rotation = new runtime.KeyRotationService({ agentId: 'bob', registry, intervalMs: HOUR });
  rotation.start();
  expect(await rotation.checkNow()).toMatchObject({ rotated: false });
  rotation.stop();
});

test('createRuntime over REST and over SSE', async () => {
  for (const sse of [false, true]) {
    const registry = new FakeRegistry([testCredential('bob', 'key-bob-1', sd.url)]);
    const config = { pollIntervalMs: HOUR, heartbeatIntervalMs: HOUR, maxKeyAgeMs: 0 };
    if (sse) config.sseEndpoint = `${sd.url}/messages/stream`;
    const handle = await runtime.createRuntime(registry, config);
    const got = [];
    handle.poller.onMessage((m) => { got.push(m.content); });
    sd.sendDirect('alice', 'bob', `hello ${sse}`);
    await until(() => got.length === 1);
    handle.stop();
  }
});

test('SseConnectionService and SseTransport', async () => {
  const service = new runtime.SseConnectionService({
    agentId: 'bob', apiKey: 'key-bob-1', apiBaseUrl: sd.url, sseEndpoint: `${sd.url}/messages/stream`, transport: new runtime.SseTransport(),
  });
  const got = [];
  service.onMessage((m) => { got.push(m.content); });
  await service.start();
  sd.sendDirect('alice', 'bob', 'over the stream');
  await until(() => got.length === 1);
  await service.stop();

  const transport = new runtime.SseTransport();
  await transport.connect({ agentId: 'bob', apiKey: 'key-bob-1', apiBaseUrl: sd.url, sseEndpoint: `${sd.url}/messages/stream` });
  const seen = [];
  const unsubscribe = transport.subscribe((m) => { seen.push(m.content); });
  sd.sendDirect('alice', 'bob', 'to a subscriber');
  await until(() => seen.length === 1);
  unsubscribe();
  await transport.disconnect();
});

test('HttpTransport and a subscribed LocalTransport', async () => {
  const http = new runtime.HttpTransport();
  await http.connect({ agentId: 'bob', apiKey: 'key-bob-1', apiBaseUrl: sd.url });
  await http.push('alice', 'hi');
  await http.disconnect();

  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cleo-open-handles-'));
  const dbPath = path.join(dir, 'signaldock.db');
  await runtime.LocalTransport.ensureSchema(dbPath);
  const alice = new runtime.LocalTransport({ dbPath });
  const bob = new runtime.LocalTransport({ dbPath });
  await alice.connect({ agentId: 'alice', apiKey: 'k', apiBaseUrl: 'local' });
  await bob.connect({ agentId: 'bob', apiKey: 'k', apiBaseUrl: 'local' });
  const seen = [];
  const unsubscribe = bob.subscribe((m) => { seen.push(m.content); });
  await alice.push('bob', 'local hello');
  await until(() => seen.length === 1);
  unsubscribe();
  await bob.disconnect();
  await alice.disconnect();
  fs.rmSync(dir, { recursive: true, force: true });
});
