// The package under Jest (CommonJS): require() gives the same named exports, and a poller
// with a hand-written fake transport delivers through the native loop.
const runtime = require('@cleocode/runtime');

const EXPORTS = ['createRuntime', 'AgentPoller', 'HeartbeatService', 'KeyRotationService', 'SseConnectionService'];

test('require() exposes every export', () => {
  for (const name of EXPORTS) expect(typeof runtime[name]).toBe('function');
});

test('a poller delivers through a fake transport under Jest', async () => {
  const pending = [
    { id: 'j1', from: 'bob', content: 'hello', timestamp: new Date().toISOString() },
    { id: 'j2', from: 'bob', content: 'again', timestamp: new Date().toISOString() },
  ];
  const acked = [];
  const transport = {
    name: 'fake',
    async poll() { return pending.filter((m) => !acked.includes(m.id)); },
    async ack(ids) { acked.push(...ids); },
  };
  const poller = new runtime.AgentPoller({ agentId: 'alice', apiKey: 'k', apiBaseUrl: 'local', transport, pollIntervalMs: 50 });
  const got = [];
  const done = new Promise((resolve) => {
    poller.onMessage(async (m) => { got.push(m.id); if (got.length === 2) resolve(); });
  });
  poller.start();
  await done;
  // Acks go out once each handler has settled; wait for them before stopping.
  for (let i = 0; i < 500 && acked.length < 2; i++) await new Promise((r) => setTimeout(r, 10));
  poller.stop();
  expect(got).toEqual(['j1', 'j2']);
  expect(acked.sort()).toEqual(['j1', 'j2']);
});
