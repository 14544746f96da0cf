// The native SSE stream's 60 s idle watchdog, through the package entry, against the
// project's SignalDock test server. In a file of its own because it must wait out the real
// 60 s (the timeout is settable only in the Rust core, whose tests pin it with short ones):
// vitest runs files in parallel, so this wait does not add to the rest of sse.test.mjs.
import { afterEach, describe, expect, it } from 'vitest';
import { SseTransport } from '@cleocode/runtime';
import { startSignalDock } from '../testing/signaldock-server.mjs';
import { sleep, waitFor } from './support/helpers.mjs';

const servers = [];
const transports = [];
afterEach(async () => {
  for (const t of transports.splice(0)) await t.disconnect();
  for (const s of servers.splice(0)) await s.close();
});

async function server(options) {
  const sd = await startSignalDock({ agents: { alice: 'key-a', bob: 'key-b' }, ...options });
  servers.push(sd);
  return sd;
}

async function connect(sd) {
  const t = new SseTransport();
  transports.push(t);
  await t.connect({ agentId: 'alice', apiKey: 'key-a', apiBaseUrl: sd.url });
  return t;
}

const streamRequests = (sd) => sd.requests.filter((r) => r.path === '/messages/stream');

describe('SseTransport idle watchdog', () => {
  it('drops a stream silent for 60 s and reconnects; heartbeats (and messages) keep a stream alive', async () => {
    // Side by side: one server silent after its `connected` event, one beating every 2 s.
    const silentServer = await server({ silence: true, heartbeatMs: 2000 });
    const beatingServer = await server({ heartbeatMs: 2000 });
    const silent = await connect(silentServer);
    const live = await connect(beatingServer);
    expect(silent.status().state).toBe('connected');
    expect(live.status().state).toBe('connected');
    const opened = streamRequests(silentServer)[0].at;
    const got = [];
    silent.subscribe((m) => got.push(m.content));

    await sleep(5000);
    // A message is life too: the watchdog counts from here, not from the open.
    const through = silentServer.sendDirect('bob', 'alice', 'through the silence');
    await waitFor(() => got.length === 1, { what: 'message on the silent stream' });
    const lastLife = Date.now();
    expect(silent.status()).toMatchObject({ state: 'connected', reconnects: 0 });

    await waitFor(() => streamRequests(silentServer).length === 2, {
      what: 'the watchdog reconnect', timeoutMs: 70_000, everyMs: 100,
    });
    const reconnectAt = streamRequests(silentServer)[1].at;
    // 60 s of silence, then the first reconnect delay (0.5–1 s).
    expect(reconnectAt - lastLife).toBeGreaterThanOrEqual(59_500);
    expect(reconnectAt - lastLife).toBeLessThan(63_000);
    expect(reconnectAt - opened).toBeGreaterThanOrEqual(64_500);
    await waitFor(() => silent.status().state === 'connected', { what: 'connected again' });
    expect(silent.status().reconnects).toBe(1);
    expect(silent.status().lastError).toMatch(/nothing from the server/);
    expect(streamRequests(silentServer)[1].headers['last-event-id']).toBe(through.id);

    // The beating stream was never replaced.
    expect(live.status()).toMatchObject({ state: 'connected', reconnects: 0 });
    expect(streamRequests(beatingServer)).toHaveLength(1);

    silentServer.sendDirect('bob', 'alice', 'after the watchdog');
    await waitFor(() => got.length === 2, { what: 'message after the watchdog' });
    expect(got).toEqual(['through the silence', 'after the watchdog']);
  }, 100_000);
});
