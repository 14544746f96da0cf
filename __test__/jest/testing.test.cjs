// A Jest suite written the way a user migrates one off fake timers: the runtime against the
// test server of `@cleocode/runtime/testing`, driven by pollNow()/beatNow()/checkNow()
// instead of advancing a clock. Jest's fake timers stay on for the test's own code; they
// never reach the runtime's clock (tokio), and with these hooks they do not need to.
const { createRuntime } = require('@cleocode/runtime');
const { startSignalDock, FakeRegistry, testCredential } = require('@cleocode/runtime/testing');

const HOUR = 3_600_000;
let sd;
let handle;

beforeEach(async () => {
  sd = await startSignalDock({ agents: { alice: 'key-alice-1', bob: 'key-bob-1' } });
});

afterEach(async () => {
  jest.useRealTimers();
  handle?.stop();
  handle = undefined;
  await sd.close();
});

test('pollNow delivers with a one-hour interval and fake timers installed', async () => {
  const registry = new FakeRegistry([testCredential('bob', 'key-bob-1', sd.url)]);
  handle = await createRuntime(registry, { pollIntervalMs: HOUR, heartbeatIntervalMs: HOUR, maxKeyAgeMs: 0 });
  const got = [];
  handle.poller.onMessage(async (m) => { got.push(`${m.from}: ${m.content}`); });
  jest.useFakeTimers();
  sd.sendDirect('alice', 'bob', 'first');
  sd.sendDirect('alice', 'bob', 'second');
  const report = await handle.poller.pollNow();
  expect(report).toEqual({ handled: 2, failed: 0, errors: [] });
  expect(got).toEqual(['alice: first', 'alice: second']);
  expect(sd.pending('bob')).toEqual([]);
  expect(sd.acked('bob')).toHaveLength(2);
  // Advancing the fake clock by hours polls nothing: the runtime's clock is not Jest's.
  const peeks = sd.requests.filter((r) => r.path === '/messages/peek').length;
  sd.sendDirect('alice', 'bob', 'third');
  jest.advanceTimersByTime(5 * HOUR);
  expect(sd.requests.filter((r) => r.path === '/messages/peek')).toHaveLength(peeks);
  expect(await handle.poller.pollNow()).toEqual({ handled: 1, failed: 0, errors: [] });
  expect(got).toHaveLength(3);
});

test('beatNow and checkNow report their outcome; the registry rotates like the real one', async () => {
  const old = new Date(Date.now() - 40 * 24 * HOUR).toISOString();
  const registry = new FakeRegistry([testCredential('bob', 'key-bob-1', sd.url, { updatedAt: old })]);
  handle = await createRuntime(registry, { pollIntervalMs: HOUR, heartbeatIntervalMs: HOUR });
  // The beat at start first: a beatNow asked at the same instant may share it.
  for (let i = 0; i < 1000 && handle.heartbeat.status().beats < 1; i++) await new Promise((r) => setTimeout(r, 10));
  expect(await handle.heartbeat.beatNow()).toEqual({ ok: true, consecutiveFailures: 0 });
  expect(sd.heartbeats('bob')).toHaveLength(2);
  sd.inject({ path: '/agents/bob/heartbeat', status: 503 });
  const failed = await handle.heartbeat.beatNow();
  expect(failed).toMatchObject({ ok: false, consecutiveFailures: 1 });
  expect(failed.error).toContain('503');

  const checked = await handle.keyRotation.checkNow();
  expect(checked).toMatchObject({ rotated: true });
  const stored = await registry.get('bob');
  expect(stored.apiKey).not.toBe('key-bob-1');
  expect(sd.keysOf('bob')).toContain(stored.apiKey);
  expect(registry.calls).toContainEqual(['rotateKey', 'bob']);
});
