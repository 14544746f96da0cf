#!/usr/bin/env node
/**
 * One bench scenario in a fresh Node process, so its CPU time and memory belong to one
 * implementation alone:
 *
 *     node bench/scenario.mjs <impl-path | none> <scenario> '<json-args>'
 *
 * `<impl-path>` is the index.js of an implementation of the API.md contract (the native
 * package or the plain-JS baseline), loaded with `import()`; `none` runs the scenario's
 * floor (the same work without any runtime) where it has one.
 *
 * Output, on stdout, one JSON object per line:
 *   - `{"type":"ready", ...}` once the process is set up, in the scenarios the parent drives
 *     from outside (sse, local): the parent starts sending when it reads it;
 *   - `{"type":"result", "scenario", ...figures, "process": {cpuMs, rssMiB, hwmMiB, ...}}`,
 *     always the last line. The `stop` scenario writes it from the 'exit' event.
 *
 * Scenarios (arguments in the JSON):
 *   sse        {url, agentId, apiKey, count, timeoutMs}: createRuntime with sseEndpoint;
 *              handler latency = arrival − the send stamp in the content; `none` = a
 *              plain node:http SSE reader calling the same function.
 *   local      {agentId, count, timeoutMs} with CLEO_DIR set: createRuntime on signaldock.db
 *              (native only); handler latency = arrival − the writer's stamp.
 *   groups     {url, agentId, apiKey, groups, timeoutMs}: time from poller.start() until
 *              one mention per group reached the handler.
 *   throughput {count, pollIntervalMs, semantics}: an AgentPoller over a MemoryTransport of
 *              `count` messages (`semantics` 'since' or 'peek', see common.mjs); msgs/s to a
 *              synchronous handler; `none` = plain poll/handle/ack loop.
 *   idle       {url, agents, seconds, warmupMs}: CPU and RSS of idle runtimes (5 s poll,
 *              30 s heartbeat) over a window; `none` = an empty process for the same window.
 *   scale      {pollers, seconds, intervalMs, semantics}: that many AgentPollers over
 *              in-memory transports; lateness of each poll() call against its poller's
 *              schedule.
 *   stop       {url, agentId, apiKey, settleMs, sse}: a runtime (heartbeat, key rotation,
 *              poller, and the SSE stream when `sse`), then stop(); stop() → 'exit'
 *              event; `none` = an empty process reaching its end.
 */
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { writeSync } from 'node:fs';
import http from 'node:http';
import {
  nowMs, sleep, summarize, procStatus, cpuMsSince, MiB, credential, registryOf, MemoryTransport,
} from './common.mjs';

const [implArg, scenario, argsJson] = process.argv.slice(2);
const args = JSON.parse(argsJson ?? '{}');
const cpuAtStart = process.cpuUsage();
const rssAtStart = process.memoryUsage().rss;

/** The implementation under test, imported on demand (so `idle` can weigh the import). */
const load = async () => (implArg === 'none' ? null : import(pathToFileURL(resolve(implArg)).href));

function emit(line) {
  // Synchronous, so a line is out even when the process exits right after.
  writeSync(1, `${JSON.stringify(line)}\n`);
}

/** What the whole process cost so far, for the result line. */
function processFigures() {
  const status = procStatus();
  return {
    cpuMs: cpuMsSince(cpuAtStart),
    rssMiB: MiB(process.memoryUsage().rss),
    rssAtStartMiB: MiB(rssAtStart),
    hwmMiB: status.vmHwmKiB != null ? status.vmHwmKiB / 1024 : null,
    threads: status.threads,
  };
}

function result(figures) {
  emit({ type: 'result', scenario, impl: implArg, ...figures, process: processFigures() });
}

/** A promise with its resolve, and a timeout that resolves it too (marking `timedOut`). */
function deadline(timeoutMs) {
  let done;
  const state = { timedOut: false };
  const promise = new Promise((r) => { done = r; });
  const timer = setTimeout(() => { state.timedOut = true; done(); }, timeoutMs);
  return { promise, done: () => { clearTimeout(timer); done(); }, state };
}

function getJson(url) {
  return new Promise((resolveGet, reject) => {
    http.get(url, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c) => { body += c; });
      res.on('end', () => { try { resolveGet(JSON.parse(body)); } catch (e) { reject(e); } });
    }).on('error', reject);
  });
}

/**
 * The SSE floor: the least a Node process can do to get a pushed message to a function —
 * one GET on node:http, frames split on blank lines, `data:` parsed as JSON. No reconnect,
 * no dedup, no ack. Returns a function that closes the stream.
 */
function plainSseReader(streamUrl, agentId, apiKey, onMessage) {
  const req = http.get(streamUrl, {
    headers: { accept: 'text/event-stream', authorization: `Bearer ${apiKey}`, 'x-agent-id': agentId },
  }, (res) => {
    res.setEncoding('utf8');
    let buf = '';
    res.on('data', (chunk) => {
      buf += chunk;
      let end;
      while ((end = buf.indexOf('\n\n')) >= 0) {
        const frame = buf.slice(0, end);
        buf = buf.slice(end + 2);
        const data = frame.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trim()).join('\n');
        if (!data || frame.includes('event: connected')) continue;
        const d = JSON.parse(data);
        if (d.message_id) onMessage({ id: d.message_id, from: d.from_agent_id, content: d.content, timestamp: d.created_at });
      }
    });
  });
  req.on('error', () => {});
  return () => req.destroy();
}

// --------------------------------------------------------------------------- scenarios

const scenarios = {
  async sse({ url, agentId, apiKey, count, timeoutMs = 60_000, journal }) {
    const impl = await load();
    const latencies = [];
    const end = deadline(timeoutMs);
    const onMessage = (m) => {
      const at = nowMs();
      latencies.push(at - JSON.parse(m.content).t);
      if (latencies.length >= count) end.done();
    };
    let stop;
    if (impl) {
      const handle = await impl.createRuntime(registryOf(credential(agentId, apiKey, url)), {
        agentId, sseEndpoint: `${url}/messages/stream`, heartbeatIntervalMs: 0, maxKeyAgeMs: 0,
        // The journal comparison (issue 14): a path, or false; absent for the baseline.
        ...(journal !== undefined ? { journal } : {}),
      });
      handle.poller.onMessage(onMessage);
      handle.poller.start();
      stop = () => handle.stop();
    } else {
      stop = plainSseReader(`${url}/messages/stream`, agentId, apiKey, onMessage);
    }
    // The server pushes only to open streams: wait until ours is open.
    const t = nowMs();
    while ((await getJson(`${url}/_test/stats`)).streams < 1) {
      if (nowMs() - t > 10_000) throw new Error('the SSE stream did not open within 10 s');
      await sleep(10);
    }
    const cpu0 = process.cpuUsage();
    emit({ type: 'ready' });
    await end.promise;
    const cpuMs = cpuMsSince(cpu0);
    stop();
    result({ received: latencies.length, timedOut: end.state.timedOut, latencyMs: summarize(latencies), cpuMs });
  },

  async local({ agentId, count, timeoutMs = 120_000 }) {
    const { createRuntime, LocalTransport } = await load();
    const dbPath = await LocalTransport.ensureSchema();
    const latencies = [];
    const end = deadline(timeoutMs);
    const handle = await createRuntime(registryOf(credential(agentId, 'unused', 'local')), {
      agentId, heartbeatIntervalMs: 0, maxKeyAgeMs: 0,
    });
    if (handle.transport?.name !== 'local') throw new Error(`resolved ${handle.transport?.name}, not local`);
    handle.poller.onMessage((m) => {
      const at = nowMs();
      latencies.push(at - JSON.parse(m.content).t);
      if (latencies.length >= count) end.done();
    });
    handle.poller.start();
    await sleep(200);
    emit({ type: 'ready', dbPath });
    await end.promise;
    const status = handle.poller.status();
    handle.stop();
    result({
      dbPath, received: latencies.length, timedOut: end.state.timedOut, polls: status.polls,
      latencyMs: summarize(latencies),
    });
  },

  async groups({ url, agentId, apiKey, groups, timeoutMs = 30_000 }) {
    const { createRuntime } = await load();
    const handle = await createRuntime(registryOf(credential(agentId, apiKey, url)), {
      agentId, groupConversationIds: groups, pollIntervalMs: 600_000, heartbeatIntervalMs: 0, maxKeyAgeMs: 0,
    });
    const seenGroups = new Set();
    const end = deadline(timeoutMs);
    let last = 0;
    const t0 = nowMs();
    handle.poller.onMessage((m) => {
      last = nowMs();
      seenGroups.add(m.threadId);
      if (seenGroups.size >= groups.length) end.done();
    });
    handle.poller.start();
    await end.promise;
    handle.stop();
    result({ groupsDelivered: seenGroups.size, timedOut: end.state.timedOut, cycleMs: last - t0 });
  },

  async throughput({ count, pollIntervalMs = 1, semantics = 'since', timeoutMs = 120_000, journal }) {
    const impl = await load();
    const transport = new MemoryTransport(count, { semantics });
    let handled = 0;
    let last = 0;
    const end = deadline(timeoutMs);
    const handler = () => {
      handled += 1;
      if (handled === count) { last = nowMs(); end.done(); }
    };
    const rssBefore = process.memoryUsage().rss;
    const cpu0 = process.cpuUsage();
    const t0 = nowMs();
    let poller = null;
    let handle = null;
    if (impl && journal !== undefined) {
      // The journal comparison: a runtime (the journal is a runtime option) over the same
      // transport, journal on (a path) or off (false).
      handle = await impl.createRuntime(registryOf(credential('alice', 'k', 'http://127.0.0.1:9')), {
        agentId: 'alice', pollIntervalMs, transport, heartbeatIntervalMs: 0, maxKeyAgeMs: 0, journal,
      });
      poller = handle.poller;
      poller.onMessage(handler);
    } else if (impl) {
      poller = new impl.AgentPoller({
        agentId: 'alice', apiKey: 'k', apiBaseUrl: 'http://127.0.0.1:9', pollIntervalMs, transport,
      });
      poller.onMessage(handler);
      poller.start();
    } else {
      // The floor: the same transport and handler, called straight from a JS loop.
      while (handled < count) {
        const page = await transport.poll({ limit: 50 });
        for (const m of page) handler(m);
        await transport.ack(page.map((m) => m.id));
      }
    }
    await end.promise;
    const elapsedMs = (last || nowMs()) - t0;
    const cpuMs = cpuMsSince(cpu0);
    const status = poller?.status();
    if (handle) handle.stop();
    else poller?.stop();
    const hwm = procStatus().vmHwmKiB;
    result({
      count, semantics, handled, timedOut: end.state.timedOut, elapsedMs,
      msgsPerSec: handled / (elapsedMs / 1000), nsPerMsg: (elapsedMs * 1e6) / handled,
      cpuMs, polls: transport.polls, acks: transport.acks, duplicates: transport.duplicates,
      pollerStatus: status ?? null,
      rssBeforeMiB: MiB(rssBefore), peakRssMiB: hwm / 1024, peakAddedMiB: hwm / 1024 - MiB(rssBefore),
    });
  },

  async idle({ url, agents, seconds, warmupMs = 3000 }) {
    const rss0 = process.memoryUsage().rss;
    const impl = await load();
    const handles = [];
    if (impl) {
      for (const { id, key } of agents) {
        const handle = await impl.createRuntime(registryOf(credential(id, key, url)), {
          agentId: id, pollIntervalMs: 5000, heartbeatIntervalMs: 30_000,
        });
        handle.poller.onMessage(() => {});
        handle.poller.start();
        handles.push(handle);
      }
    }
    // Something must keep an empty process alive for the same window.
    const keep = setInterval(() => {}, 1 << 30);
    await sleep(warmupMs);
    const cpu0 = process.cpuUsage();
    const rssWarm = process.memoryUsage().rss;
    await sleep(seconds * 1000);
    const cpuMs = cpuMsSince(cpu0);
    const rssEnd = process.memoryUsage().rss;
    const polls = handles.reduce((n, h) => n + (h.poller.status().polls ?? 0), 0);
    const beats = handles.reduce((n, h) => n + (h.heartbeat?.status().beats ?? 0), 0);
    for (const h of handles) h.stop();
    clearInterval(keep);
    result({
      runtimes: handles.length, seconds, cpuMs, cpuPercent: (cpuMs / (seconds * 1000)) * 100,
      rssBaseMiB: MiB(rss0), rssWarmMiB: MiB(rssWarm), rssEndMiB: MiB(rssEnd),
      rssAddedMiB: MiB(rssEnd - rss0), polls: polls || null, beats: beats || null,
    });
  },

  async scale({ pollers, seconds, intervalMs = 1000, semantics = 'since' }) {
    const { AgentPoller } = await load();
    const calls = Array.from({ length: pollers }, () => []);
    const starts = new Float64Array(pollers);
    const list = [];
    const cpu0 = process.cpuUsage();
    for (let i = 0; i < pollers; i++) {
      const transport = new MemoryTransport(0, { semantics, onPoll: () => calls[i].push(performance.now()) });
      const poller = new AgentPoller({
        agentId: `scale-${i}`, apiKey: 'k', apiBaseUrl: 'http://127.0.0.1:9', pollIntervalMs: intervalMs, transport,
      });
      poller.onMessage(() => {});
      starts[i] = performance.now();
      poller.start();
      list.push(poller);
    }
    const startedAll = performance.now();
    await sleep(seconds * 1000);
    const endAt = performance.now();
    for (const p of list) p.stop();
    const cpuMs = cpuMsSince(cpu0);
    // The k-th call of poller i is due at starts[i] + k·interval. Call 0 is the one start()
    // makes; steady state is k ≥ 1. A call that never came counts as missed.
    const steady = [];
    const first = [];
    let missed = 0;
    let expectedCalls = 0;
    for (let i = 0; i < pollers; i++) {
      const due = (k) => starts[i] + k * intervalMs;
      const expected = Math.floor((endAt - starts[i]) / intervalMs) + 1;
      expectedCalls += expected;
      missed += Math.max(0, expected - calls[i].length);
      calls[i].forEach((at, k) => (k === 0 ? first : steady).push(at - due(k)));
    }
    result({
      pollers, seconds, intervalMs, semantics, startAllMs: startedAll - starts[0],
      latenessMs: summarize(steady), firstCallLatenessMs: summarize(first),
      expectedCalls, calls: steady.length + first.length, missed,
      cpuMs, cpuPercent: (cpuMs / (endAt - starts[0])) * 100,
    });
  },

  async stop({ url, agentId, apiKey, settleMs = 1000, sse = false }) {
    const impl = await load();
    let handle = null;
    if (impl) {
      handle = await impl.createRuntime(registryOf(credential(agentId, apiKey, url)), {
        agentId, ...(sse ? { sseEndpoint: `${url}/messages/stream` } : {}),
      });
      handle.poller.onMessage(() => {});
      handle.poller.start();
    }
    await sleep(settleMs);
    const figures = { sseState: handle?.sseConnection?.status?.().state ?? null };
    const stopAt = nowMs();
    process.on('exit', () => {
      const exitAt = nowMs();
      result({ ...figures, stopAt, exitAt, stopToExitEventMs: exitAt - stopAt });
    });
    handle?.stop();
    figures.stopCallMs = nowMs() - stopAt;
    // Nothing else: the process must now exit by itself.
  },
};

const run = scenarios[scenario];
if (!run) {
  process.stderr.write(`unknown scenario ${scenario}; known: ${Object.keys(scenarios).join(', ')}\n`);
  process.exit(2);
}
run(args).then(
  () => { if (scenario !== 'stop') process.exit(0); },
  (err) => {
    emit({ type: 'error', scenario, impl: implArg, error: String(err?.stack ?? err) });
    process.exit(1);
  },
);
