#!/usr/bin/env node
/**
 * `npm run bench`: the native runtime against the plain-JS baseline, scenario by scenario,
 * on loopback, each figure beside references measured in the same run.
 *
 * Layout of a run:
 *   - the SignalDock test server runs in its own process (its CLI mode), so nothing it
 *     spends is counted against a client;
 *   - every scenario runs each implementation in a fresh child (`bench/scenario.mjs`), so
 *     CPU time and RSS belong to that implementation alone;
 *   - this process only drives (sends the SSE messages, starts the SQLite writer, posts the
 *     group mentions) and measures the floors: a raw loopback HTTP round trip, one delayed
 *     group round trip, a plain JS poll/handle/ack loop, an empty Node process.
 *
 * Prints `scenario | metric | native | baseline | floor | ratio | aim | met?` (ratio is
 * always native ÷ baseline) and writes everything, raw figures included, to
 * `bench/results/latest.json`.
 *
 * Environment:
 *   RUNTIME_BASELINE    the baseline package directory (or its index.js); default
 *                       ../shared/baseline, relative to the repository root.
 *   RUNTIME_NATIVE      the native package's index.js; default the repository's own (set it to
 *                       compare another build, e.g. an instrumented copy).
 *   BENCH_QUICK=1       a CI-sized run (about a minute): fewer messages, fewer
 *                       repetitions, a 10 s idle window, one 8 s scale window.
 *   BENCH_IDLE_SECONDS  the idle window (default 60, or 10 when quick).
 *   BENCH_ONLY          comma-separated scenarios to run: sse, local, groups, throughput,
 *                       journal, idle, scale, stop; `throughput` and `scale` run both
 *                       transport semantics, `throughput:peek`, `throughput:since`,
 *                       `scale:peek` and `scale:since` one of them. Default all.
 */
import { spawn, execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { nowMs, sleep, summarize, median } from './common.mjs';

const BENCH = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(BENCH, '..');
const SCENARIO = join(BENCH, 'scenario.mjs');
const SERVER = join(ROOT, 'testing', 'signaldock-server.mjs');
const QUICK = /^(1|true|yes)$/i.test(process.env.BENCH_QUICK ?? '');
const ONLY = process.env.BENCH_ONLY ? new Set(process.env.BENCH_ONLY.split(',').map((s) => s.trim()).filter(Boolean)) : null;
/** Whether `BENCH_ONLY` asks for scenario `name` (in its variant `variant`, when given). */
const wanted = (name, variant) => !ONLY || ONLY.has(name) || (variant != null && ONLY.has(`${name}:${variant}`))
  || (variant == null && [...ONLY].some((o) => o.startsWith(`${name}:`)));
/** The JS transport semantics the burst and scale scenarios run with (see common.mjs). */
const SEMANTICS = ['since', 'peek'];

/** How big each scenario is, full and quick. */
const PLAN = {
  sseMessages: QUICK ? 1000 : 5000,
  sseRate: 1000,
  localMessages: QUICK ? 30 : 100,
  localIntervalMs: QUICK ? 100 : 120,
  groups: 50,
  groupDelayMs: 20,
  groupReps: QUICK ? 2 : 5,
  burst: QUICK ? 20_000 : 100_000,
  burstReps: QUICK ? 1 : 3,
  // The peek-semantics burst is the size the issue measured it at, in both modes.
  peekBurst: 20_000,
  idleSeconds: Number(process.env.BENCH_IDLE_SECONDS ?? (QUICK ? 10 : 60)),
  idleMany: 100,
  scalePollers: 1000,
  scaleSeconds: QUICK ? 8 : 10,
  scaleReps: QUICK ? 1 : 3,
  stopReps: QUICK ? 3 : 5,
  rttSamples: QUICK ? 300 : 1000,
};

// ------------------------------------------------------------------ implementations

function baselinePath() {
  const given = process.env.RUNTIME_BASELINE ?? '../shared/baseline';
  let path = resolve(ROOT, given);
  if (existsSync(path) && statSync(path).isDirectory()) path = join(path, 'index.js');
  return existsSync(path) ? path : null;
}

const IMPLS = { native: resolve(ROOT, process.env.RUNTIME_NATIVE ?? 'index.js'), baseline: baselinePath() };

// ------------------------------------------------------------------ machine

function machine() {
  const cpuinfo = (() => { try { return readFileSync('/proc/cpuinfo', 'utf8'); } catch { return ''; } })();
  const model = /^model name\s*:\s*(.+)$/m.exec(cpuinfo)?.[1] ?? os.cpus()[0]?.model ?? 'unknown';
  const sh = (cmd, args) => { try { return execFileSync(cmd, args, { cwd: ROOT, encoding: 'utf8' }).trim(); } catch { return null; } };
  const addon = join(ROOT, 'cleo-runtime.linux-x64-gnu.node');
  return {
    nproc: Number(sh('nproc', [])) || os.availableParallelism(),
    cpuModel: model,
    node: process.version,
    platform: `${os.type()} ${os.release()} ${os.arch()}`,
    memTotalMiB: Math.round(os.totalmem() / 2 ** 20),
    commit: sh('git', ['rev-parse', '--short', 'HEAD']),
    dirty: (sh('git', ['status', '--porcelain', '--', 'src', 'index.js']) ?? '') !== '',
    addonBuiltAt: existsSync(addon) ? statSync(addon).mtime.toISOString() : null,
  };
}

// ------------------------------------------------------------------ HTTP helpers

/** One request; resolves { status, body (parsed when JSON), ms }. */
function request(url, { method = 'GET', body, headers = {}, agent } = {}) {
  return new Promise((resolveReq, reject) => {
    const text = body === undefined ? undefined : JSON.stringify(body);
    const t0 = nowMs();
    const req = http.request(url, {
      method, agent,
      headers: { ...headers, ...(text ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) } : {}) },
    }, (res) => {
      let data = '';
      res.setEncoding('utf8');
      res.on('data', (c) => { data += c; });
      res.on('end', () => {
        let parsed = data;
        try { parsed = JSON.parse(data); } catch { /* keep text */ }
        resolveReq({ status: res.statusCode, body: parsed, ms: nowMs() - t0 });
      });
    });
    req.on('error', reject);
    req.end(text);
  });
}

class Server {
  static async start(agents) {
    const list = agents.map(([id, key]) => `${id}:${key}`).join(',');
    // stdin stays a pipe: the server exits when we do, whatever happens to us.
    const child = spawn(process.execPath, [SERVER, '--agents', list], { stdio: ['pipe', 'pipe', 'inherit'] });
    const line = await new Promise((resolveLine, reject) => {
      createInterface({ input: child.stdout }).once('line', resolveLine);
      child.once('exit', (code) => reject(new Error(`the test server exited (${code})`)));
    });
    return new Server(child, JSON.parse(line));
  }

  constructor(child, { url, control }) {
    this.child = child;
    this.url = url;
    this.controlUrl = control;
    this.agent = new http.Agent({ keepAlive: true, maxSockets: 8 });
  }

  async control(path, body) {
    const res = await request(`${this.controlUrl}${path}`, { method: body ? 'POST' : 'GET', body, agent: this.agent });
    if (res.status !== 200) throw new Error(`control ${path}: ${res.status} ${JSON.stringify(res.body)}`);
    return res.body;
  }

  close() {
    this.agent.destroy();
    this.child.stdin.end();
    this.child.kill('SIGTERM');
  }
}

// ------------------------------------------------------------------ children

/**
 * Runs `scenario.mjs <impl> <scenario> <args>` and resolves its result line, the moment
 * this process saw it exit (`exitSeenAt`), and whatever `onReady` returned (awaited).
 */
function runChild(impl, scenario, args, { env = {}, onReady, timeoutMs = 180_000 } = {}) {
  return new Promise((resolveRun) => {
    const child = spawn(process.execPath, [SCENARIO, impl, scenario, JSON.stringify(args)], {
      cwd: ROOT, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'],
    });
    const out = { result: null, error: null, stderr: '', exitSeenAt: null, driven: null, killed: false };
    let driving = Promise.resolve();
    createInterface({ input: child.stdout }).on('line', (line) => {
      let msg;
      try { msg = JSON.parse(line); } catch { return; }
      if (msg.type === 'ready' && onReady) {
        driving = Promise.resolve(onReady(msg)).then((v) => { out.driven = v; }, (e) => { out.error = `driver: ${e?.stack ?? e}`; });
      } else if (msg.type === 'result') out.result = msg;
      else if (msg.type === 'error') out.error = msg.error;
    });
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (c) => { out.stderr = (out.stderr + c).slice(-4000); });
    const timer = setTimeout(() => { out.killed = true; child.kill('SIGKILL'); }, timeoutMs);
    child.on('exit', (code, signal) => {
      out.exitSeenAt = nowMs();
      out.code = code;
      out.signal = signal;
    });
    child.on('close', async () => {
      clearTimeout(timer);
      await driving;
      if (!out.result && !out.error) out.error = `no result (exit ${out.code ?? out.signal}${out.killed ? ', killed after timeout' : ''}): ${out.stderr.trim().slice(-600)}`;
      if (out.error) log(`    ! ${impl === 'none' ? 'floor' : implName(impl)} ${scenario}: ${out.error.split('\n')[0]}`);
      resolveRun(out);
    });
  });
}

const implName = (path) => Object.entries(IMPLS).find(([, p]) => p === path)?.[0] ?? path;
const log = (...a) => process.stderr.write(`${a.join(' ')}\n`);

/** Runs `fn(impl, name)` for native then baseline (the baseline skipped when absent). */
async function both(fn) {
  const out = {};
  for (const name of ['native', 'baseline']) {
    if (IMPLS[name]) out[name] = await fn(IMPLS[name], name);
  }
  return out;
}

// ------------------------------------------------------------------ floors

/** Sequential keep-alive round trips from Node to the server (after a warm-up). */
async function roundTrips(url, n, headers = {}) {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  for (let i = 0; i < Math.min(50, n); i++) await request(url, { agent, headers });
  const ms = [];
  for (let i = 0; i < n; i++) ms.push((await request(url, { agent, headers })).ms);
  agent.destroy();
  return summarize(ms);
}

// ------------------------------------------------------------------ scenarios

const AGENT_KEY = (id) => `key-${id}`;

/**
 * Waits (10 s at most) until the server has no stream open. A child starts once it sees a
 * stream open on the server, which counts every agent's streams: a previous child's stream
 * not closed yet (a loaded machine) would pass for its own, and the messages sent before its
 * own opened were lost to the run.
 */
async function noStreamsOpen(server) {
  for (const t = nowMs(); (await server.control('/stats')).streams > 0 && nowMs() - t < 10_000;) await sleep(20);
}

async function scenarioSse(server) {
  const drive = sseDriver(server);
  const run = async (impl, name, count = PLAN.sseMessages) => {
    const agentId = `sse-${name}`;
    await noStreamsOpen(server);
    return runChild(impl, 'sse', {
      url: server.url, agentId, apiKey: AGENT_KEY(agentId), count,
    }, { onReady: () => drive(agentId, count) });
  };
  // The frames in the snake_case shape (`message_id`, `from_agent_id`, …) that the baseline
  // and the floor's reader parse; the server's default is the real server's camelCase shape,
  // which the baseline reads without ids (it then drops messages as duplicates). The native
  // runtime reads both.
  const shape = (await server.control('/set', {})).sseShape;
  await server.control('/set', { sseShape: 'snake' });
  try {
    // Warm the server's send and push path up first (its JIT), so the first one measured is
    // not also the one that pays for that.
    await run('none', 'floor', Math.min(2000, PLAN.sseMessages));
    return { floor: await run('none', 'floor'), ...(await both(run)) };
  } finally {
    await server.control('/set', { sseShape: shape });
  }
}

/** Sends direct messages to `agentId` at PLAN.sseRate from here, each stamped with its send time. */
function sseDriver(server) {
  // Sends at a steady rate from here; the stamp goes into the content just before the
  // request leaves, so the figure includes this driver → server hop (see the floor).
  return async (agentId, count) => {
    const agent = new http.Agent({ keepAlive: true, maxSockets: 8 });
    const send = (i) => request(`${server.controlUrl}/send`, {
      method: 'POST', agent, body: { from: 'bob', to: agentId, content: JSON.stringify({ t: nowMs(), i }) },
    });
    const pending = [];
    const t0 = nowMs();
    let i = 0;
    while (i < count) {
      const due = Math.min(count, Math.floor(((nowMs() - t0) * PLAN.sseRate) / 1000) + 1);
      while (i < due) pending.push(send(i++));
      await sleep(1);
    }
    await Promise.all(pending);
    agent.destroy();
    return { sent: i, seconds: (nowMs() - t0) / 1000, rate: i / ((nowMs() - t0) / 1000) };
  };
}

/**
 * Journal on vs off (issue 14), native only, in the same run: the SSE scenario (latency) and
 * the burst through a JS transport (throughput), each with `journal: false` and with a
 * journal in a temporary directory. Aim: on within 10 % of off.
 */
async function scenarioJournal(server, sseDrive) {
  const dir = mkdtempSync(join(os.tmpdir(), 'cleo-bench-journal-'));
  try {
    const out = { sse: {}, throughput: { on: [], off: [] } };
    for (const [mode, journal] of [['off', false], ['on', join(dir, 'sse.db')]]) {
      const agentId = `sse-journal-${mode}`;
      await server.control('/add-agent', { id: agentId, key: AGENT_KEY(agentId) });
      await noStreamsOpen(server);
      out.sse[mode] = await runChild(IMPLS.native, 'sse', {
        url: server.url, agentId, apiKey: AGENT_KEY(agentId), count: PLAN.sseMessages, journal,
      }, { onReady: () => sseDrive(agentId, PLAN.sseMessages) });
    }
    for (let rep = 0; rep < PLAN.burstReps; rep++) {
      out.throughput.off.push(await runChild(IMPLS.native, 'throughput', { count: PLAN.burst, pollIntervalMs: 1, journal: false }));
      out.throughput.on.push(await runChild(IMPLS.native, 'throughput', { count: PLAN.burst, pollIntervalMs: 1, journal: join(dir, `burst-${rep}.db`) }));
    }
    return out;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

async function scenarioLocal() {
  const python = (() => { try { execFileSync('python3', ['-c', 'import sqlite3']); return 'python3'; } catch { return null; } })();
  if (!python) return { skipped: 'python3 with sqlite3 is not available' };
  const dir = mkdtempSync(join(os.tmpdir(), 'cleo-bench-'));
  try {
    const run = await runChild(IMPLS.native, 'local', { agentId: 'alice', count: PLAN.localMessages }, {
      env: { CLEO_DIR: dir },
      onReady: ({ dbPath }) => new Promise((resolveWriter, reject) => {
        const writer = spawn(python, [join(BENCH, 'local-writer.py'), dbPath, 'bob', 'alice', String(PLAN.localMessages), String(PLAN.localIntervalMs)], { stdio: ['ignore', 'pipe', 'inherit'] });
        let text = '';
        writer.stdout.on('data', (c) => { text += c; });
        writer.on('close', (code) => (code === 0 ? resolveWriter(JSON.parse(text)) : reject(new Error(`writer exited ${code}`))));
      }),
    });
    return { native: run };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

async function scenarioGroups(server) {
  await server.control('/set', { groupDelayMs: PLAN.groupDelayMs });
  try {
    const rtt = await roundTrips(`${server.url}/conversations/rtt-probe/messages?sort=desc&limit=15`, 15, {
      authorization: `Bearer ${AGENT_KEY('alice')}`, 'x-agent-id': 'alice',
    });
    const runs = { native: [], baseline: [] };
    for (let rep = 0; rep < PLAN.groupReps; rep++) {
      const got = await both(async (impl, name) => {
        const agentId = `grp-${name}`;
        const groups = Array.from({ length: PLAN.groups }, (_, i) => `g-${name}-${rep}-${i}`);
        for (const g of groups) {
          await server.control('/post', { conversationId: g, from: 'bob', content: `@${agentId} ping ${g}` });
        }
        return runChild(impl, 'groups', { url: server.url, agentId, apiKey: AGENT_KEY(agentId), groups });
      });
      for (const [name, run] of Object.entries(got)) runs[name].push(run);
    }
    return { rtt, ...runs };
  } finally {
    await server.control('/set', { groupDelayMs: 0 });
  }
}

async function scenarioThroughput(semantics) {
  const out = { floor: [], native: [], baseline: [] };
  const count = semantics === 'peek' ? PLAN.peekBurst : PLAN.burst;
  for (let rep = 0; rep < PLAN.burstReps; rep++) {
    out.floor.push(await runChild('none', 'throughput', { count, semantics }));
    const got = await both((impl) => runChild(impl, 'throughput', { count, semantics, pollIntervalMs: 1 }));
    for (const [name, run] of Object.entries(got)) out[name].push(run);
  }
  return out;
}

async function scenarioIdle(server) {
  const agents = Array.from({ length: PLAN.idleMany }, (_, i) => ({ id: `idle-${i}`, key: AGENT_KEY(`idle-${i}`) }));
  const args = (n) => ({ url: server.url, agents: agents.slice(0, n), seconds: PLAN.idleSeconds });
  const timeoutMs = (PLAN.idleSeconds + 60) * 1000;
  // Concurrently: the processes are idle by design, so they barely compete, and the window
  // then costs the run one idle period instead of five.
  const jobs = { floor: runChild('none', 'idle', args(0), { timeoutMs }) };
  for (const name of ['native', 'baseline']) {
    if (!IMPLS[name]) continue;
    jobs[`${name}1`] = runChild(IMPLS[name], 'idle', args(1), { timeoutMs });
    jobs[`${name}${PLAN.idleMany}`] = runChild(IMPLS[name], 'idle', args(PLAN.idleMany), { timeoutMs });
  }
  const out = {};
  for (const [k, p] of Object.entries(jobs)) out[k] = await p;
  return out;
}

async function scenarioScale(semantics) {
  const out = { native: [], baseline: [] };
  for (let rep = 0; rep < PLAN.scaleReps; rep++) {
    const got = await both((impl) => runChild(impl, 'scale', { pollers: PLAN.scalePollers, seconds: PLAN.scaleSeconds, intervalMs: 1000, semantics }));
    for (const [name, run] of Object.entries(got)) out[name].push(run);
  }
  return out;
}

const STOP_TIMEOUT_MS = 15_000;

async function scenarioStop(server) {
  const out = { floor: [], native: [], baseline: [], nativeSse: [], baselineSse: [] };
  for (let rep = 0; rep < PLAN.stopReps; rep++) {
    out.floor.push(await runChild('none', 'stop', { settleMs: 300 }, { timeoutMs: STOP_TIMEOUT_MS }));
    for (const sse of [false, true]) {
      const got = await both((impl, name) => {
        const agentId = `stop-${name}`;
        return runChild(impl, 'stop', { url: server.url, agentId, apiKey: AGENT_KEY(agentId), settleMs: 1000, sse }, { timeoutMs: STOP_TIMEOUT_MS });
      });
      for (const [name, run] of Object.entries(got)) out[`${name}${sse ? 'Sse' : ''}`].push(run);
    }
  }
  return out;
}

// ------------------------------------------------------------------ table

/**
 * A table row. `better` says which way is good ('lower' | 'higher'); `aim` is one of
 *   { beat: true }               native better than baseline,
 *   { max: n }                   native ≤ n,
 *   { ratioMax: r } / { ratioMin: r }   native ÷ baseline ≤ r / ≥ r,
 *   null                         reported only.
 */
function row(scenario, metric, unit, native, baseline, floor, aim, better = 'lower', note) {
  const ratio = native != null && baseline != null && baseline !== 0 ? native / baseline : null;
  const checks = [];
  if (aim?.max != null) checks.push(native != null ? native <= aim.max : null);
  if (aim?.beat) checks.push(native != null && baseline != null ? (better === 'lower' ? native < baseline : native > baseline) : null);
  if (aim?.ratioMax != null) checks.push(ratio != null ? ratio <= aim.ratioMax : null);
  if (aim?.ratioMin != null) checks.push(ratio != null ? ratio >= aim.ratioMin : null);
  if (aim?.floorMax != null) checks.push(native != null && floor != null ? native <= floor * aim.floorMax : null);
  const known = checks.filter((c) => c !== null);
  const met = known.length ? known.every(Boolean) : null;
  return { scenario, metric, unit, native, baseline, floor, ratio, aim, met, better, note };
}

function aimText({ aim, unit, better }) {
  if (!aim) return '—';
  const parts = [];
  if (aim.max != null) parts.push(unit === '×' ? `≤ ${aim.max}×` : `≤ ${aim.max} ${unit}`);
  if (aim.beat) parts.push(better === 'higher' ? '> base' : '< base');
  if (aim.ratioMax != null) parts.push(`≤ ${aim.ratioMax}× base`);
  if (aim.ratioMin != null) parts.push(`≥ ${aim.ratioMin}× base`);
  if (aim.floorMax != null) parts.push(`≤ ${aim.floorMax}× floor`);
  return parts.join(', ');
}

function fmt(v, unit) {
  if (v == null || Number.isNaN(v)) return '—';
  if (typeof v === 'string') return v;
  const abs = Math.abs(v);
  const digits = abs >= 1000 ? 0 : abs >= 100 ? 1 : abs >= 10 ? 2 : abs >= 1 ? 2 : 3;
  const n = abs > 0 && abs < 0.01 ? v.toPrecision(2) : v.toLocaleString('en-US', { maximumFractionDigits: digits });
  if (!unit) return n;
  return unit === '×' ? `${n}×` : `${n} ${unit}`;
}

function buildRows(r) {
  const rows = [];
  const get = (run, f) => (run?.result ? f(run.result) : null);
  const med = (runs, f) => {
    const v = (runs ?? []).map((run) => get(run, f)).filter((x) => x != null);
    return v.length ? median(v) : null;
  };
  const rtt = r.floors?.httpRtt;

  if (rtt) {
    rows.push(row('0 floor', 'loopback HTTP round trip p50', 'ms', null, null, rtt.p50, null, 'lower', 'keep-alive GET /health from Node, sequential'));
    rows.push(row('0 floor', 'loopback HTTP round trip p99', 'ms', null, null, rtt.p99, null));
  }
  if (r.sse) {
    // A run that lost messages has no latency figure: it did not do the scenario.
    const lat = (name, p) => get(r.sse[name], (x) => (x.received === PLAN.sseMessages ? x.latencyMs[p] : null));
    const label = `1 SSE → handler @${PLAN.sseRate}/s`;
    rows.push(row(label, 'latency p50', 'ms', lat('native', 'p50'), lat('baseline', 'p50'), lat('floor', 'p50'), { ratioMax: 1, floorMax: 1.1 }, 'lower', 'floor: plain node:http SSE reader'));
    rows.push(row(label, 'latency p90', 'ms', lat('native', 'p90'), lat('baseline', 'p90'), lat('floor', 'p90'), null, 'lower'));
    rows.push(row(label, 'latency p99', 'ms', lat('native', 'p99'), lat('baseline', 'p99'), lat('floor', 'p99'), { ratioMax: 1, floorMax: 1.1 }, 'lower'));
    rows.push(row(label, 'client CPU', 'ms', get(r.sse.native, (x) => x.cpuMs), get(r.sse.baseline, (x) => x.cpuMs), get(r.sse.floor, (x) => x.cpuMs), null, 'lower', 'CPU of the receiving process over the send window'));
  }
  if (r.local?.native) {
    const lat = (p) => get(r.local.native, (x) => (x.received === PLAN.localMessages ? x.latencyMs[p] : null));
    const w = r.local.native.driven;
    rows.push(row('2 local cross-process (5 s poll)', 'latency p50', 'ms', lat('p50'), null, w?.commitMsP50, { max: 200 }, 'lower', 'baseline has no local transport; floor: writer insert+commit p50'));
    rows.push(row('2 local cross-process (5 s poll)', 'latency p99', 'ms', lat('p99'), null, w?.commitMsMax, { max: 200 }, 'lower', 'floor: writer insert+commit max'));
  } else if (r.local?.skipped) {
    rows.push(row('2 local cross-process (5 s poll)', `skipped: ${r.local.skipped}`, '', null, null, null, null));
  }
  if (r.groups) {
    const g = r.groups;
    const cyc = (name) => med(g[name], (x) => (x.groupsDelivered === PLAN.groups ? x.cycleMs : null));
    const one = g.rtt.p50;
    rows.push(row(`3 one cycle, ${PLAN.groups} groups +${PLAN.groupDelayMs} ms`, 'cycle time', 'ms', cyc('native'), cyc('baseline'), one, { beat: true }, 'lower', 'median of reps; floor: one delayed group round trip'));
    rows.push(row(`3 one cycle, ${PLAN.groups} groups +${PLAN.groupDelayMs} ms`, 'cycle ÷ round trip', '×', cyc('native') != null ? cyc('native') / one : null, cyc('baseline') != null ? cyc('baseline') / one : null, 1, { max: 2, beat: true }, 'lower'));
  }
  for (const semantics of SEMANTICS) {
    const t = r[`throughput:${semantics}`];
    if (!t) continue;
    const rate = (runs) => med(runs, (x) => (x.handled === x.count ? x.msgsPerSec : null));
    const ns = (runs) => med(runs, (x) => (x.handled === x.count ? x.nsPerMsg : null));
    const peak = (runs) => med(runs, (x) => x.peakAddedMiB);
    const dup = (runs) => med(runs, (x) => x.duplicates);
    const count = semantics === 'peek' ? PLAN.peekBurst : PLAN.burst;
    const burst = `4 burst of ${count.toLocaleString('en-US')} via JS transport, ${semantics === 'peek' ? 'peek semantics' : 'honours since'}`;
    rows.push(row(burst, 'throughput', 'msg/s', rate(t.native), rate(t.baseline), rate(t.floor), { ratioMin: 2 }, 'higher', 'floor: plain JS poll→handler→ack loop'));
    rows.push(row(burst, 'time per message', 'ns', ns(t.native), ns(t.baseline), ns(t.floor), null, 'lower', 'native − floor ≈ the boundary cost per message'));
    rows.push(row(burst, 'peak RSS added', 'MiB', peak(t.native), peak(t.baseline), peak(t.floor), semantics === 'peek' ? { ratioMax: 1 } : null, 'lower', 'VmHWM − RSS before start'));
    rows.push(row(burst, 'duplicate messages polled', '', dup(t.native), dup(t.baseline), dup(t.floor), null, 'lower', 'rows a poll() returned again before their ack'));
  }
  if (r.journal) {
    // Journal on in the native column, off in the baseline column: ratio = on ÷ off.
    const j = r.journal;
    const lat = (run, p) => get(run, (x) => (x.received === PLAN.sseMessages ? x.latencyMs[p] : null));
    const label = 'J journal on ÷ off (native)';
    const note = 'native column: journal on; base column: journal off';
    rows.push(row(label, `SSE latency p50 @${PLAN.sseRate}/s`, 'ms', lat(j.sse.on, 'p50'), lat(j.sse.off, 'p50'), null, { ratioMax: 1.1 }, 'lower', note));
    rows.push(row(label, `SSE latency p99 @${PLAN.sseRate}/s`, 'ms', lat(j.sse.on, 'p99'), lat(j.sse.off, 'p99'), null, { ratioMax: 1.1 }, 'lower', note));
    const rate = (runs) => med(runs, (x) => (x.handled === x.count ? x.msgsPerSec : null));
    rows.push(row(label, `burst of ${PLAN.burst.toLocaleString('en-US')} via JS transport`, 'msg/s', rate(j.throughput.on), rate(j.throughput.off), null, { ratioMin: 0.9 }, 'higher', note));
  }
  if (r.idle) {
    const i = r.idle;
    const cpu = (k) => get(i[k], (x) => x.cpuPercent);
    const rss = (k) => get(i[k], (x) => x.rssAddedMiB);
    const label = `5 idle ${PLAN.idleSeconds} s (5 s poll, 30 s beat)`;
    for (const n of [1, PLAN.idleMany]) {
      rows.push(row(label, `CPU, ${n} runtime${n > 1 ? 's' : ''}`, '% core', cpu(`native${n}`), cpu(`baseline${n}`), cpu('floor'), { ratioMax: 0.5 }, 'lower', 'floor: empty Node process'));
      rows.push(row(label, `RSS added, ${n} runtime${n > 1 ? 's' : ''}`, 'MiB', rss(`native${n}`), rss(`baseline${n}`), rss('floor'), { ratioMax: 1 }, 'lower', 'RSS at end − RSS before import'));
    }
  }
  for (const semantics of SEMANTICS) {
    const s = r[`scale:${semantics}`];
    if (!s) continue;
    const late = (name, p) => med(s[name], (x) => x.latenessMs[p]);
    const label = `6 ${PLAN.scalePollers} pollers @1 s (in-memory JS transports, ${semantics === 'peek' ? 'peek semantics' : 'honour since'})`;
    rows.push(row(label, 'lateness p50', 'ms', late('native', 'p50'), late('baseline', 'p50'), null, null, 'lower', 'median of reps'));
    rows.push(row(label, 'lateness p99', 'ms', late('native', 'p99'), late('baseline', 'p99'), null, { beat: true }, 'lower', 'k-th poll() vs start + k·1 s, k ≥ 1; median of reps'));
    rows.push(row(label, 'missed cycles', '', med(s.native, (x) => x.missed), med(s.baseline, (x) => x.missed), null, null, 'lower'));
    rows.push(row(label, 'CPU', '% core', med(s.native, (x) => x.cpuPercent), med(s.baseline, (x) => x.cpuPercent), null, { ratioMax: 1 }, 'lower'));
  }
  if (r.stop) {
    const st = r.stop;
    // A child that never exited was killed at the timeout: it counts as the timeout.
    const ev = (runs) => median((runs ?? []).map((run) => (run.killed ? STOP_TIMEOUT_MS : run.result?.stopToExitEventMs)).filter((x) => x != null));
    const seen = (runs) => median((runs ?? []).map((run) => (run.killed ? STOP_TIMEOUT_MS : run.result && run.exitSeenAt - run.result.stopAt)).filter((x) => x != null));
    for (const sse of [false, true]) {
      const [n, b] = sse ? [st.nativeSse, st.baselineSse] : [st.native, st.baseline];
      const label = `7 stop() → exit, ${sse ? 'with SSE' : 'HTTP runtime'}`;
      rows.push(row(label, "to 'exit' event", 'ms', ev(n), ev(b), ev(st.floor), { max: 50 }, 'lower', 'median; floor: an empty process ending'));
      rows.push(row(label, 'to exit seen by parent', 'ms', seen(n), seen(b), seen(st.floor), { max: 50 }, 'lower'));
    }
  }
  return rows;
}

function printTable(rows) {
  const header = ['scenario', 'metric', 'native', 'baseline', 'floor', 'ratio', 'aim', 'met?'];
  const lines = rows.map((x) => [
    x.scenario, x.metric, fmt(x.native, x.unit), fmt(x.baseline, x.unit), fmt(x.floor, x.unit),
    x.ratio != null ? `${fmt(x.ratio)}×` : '—',
    aimText(x),
    x.met == null ? '—' : x.met ? 'yes' : 'NO',
  ]);
  const widths = header.map((h, c) => Math.max(h.length, ...lines.map((l) => l[c].length)));
  const line = (cells) => `| ${cells.map((s, c) => (c >= 2 && c <= 5 ? s.padStart(widths[c]) : s.padEnd(widths[c]))).join(' | ')} |`;
  console.log(line(header));
  console.log(`|${widths.map((w, c) => (c >= 2 && c <= 5 ? `${'-'.repeat(w + 1)}:` : '-'.repeat(w + 2))).join('|')}|`);
  for (const l of lines) console.log(line(l));
}

// ------------------------------------------------------------------ main

async function main() {
  const started = nowMs();
  const info = machine();
  log(`bench: ${QUICK ? 'quick' : 'full'} run on ${info.nproc} × ${info.cpuModel}, Node ${info.node}`);
  log(`  native:   ${IMPLS.native}`);
  log(`  baseline: ${IMPLS.baseline ?? '(not found: set RUNTIME_BASELINE)'}`);

  const agents = ['alice', 'bob', 'sse-floor', 'sse-native', 'sse-baseline', 'grp-native', 'grp-baseline', 'stop-native', 'stop-baseline',
    ...Array.from({ length: PLAN.idleMany }, (_, i) => `idle-${i}`)].map((id) => [id, AGENT_KEY(id)]);
  const server = await Server.start(agents);
  const results = { floors: {} };
  const step = async (name, fn, variant) => {
    if (!wanted(name, variant)) return;
    const key = variant ? `${name}:${variant}` : name;
    const t = nowMs();
    log(`- ${key} …`);
    results[key] = await fn();
    log(`  ${key} done in ${((nowMs() - t) / 1000).toFixed(1)} s`);
  };
  try {
    results.floors.httpRtt = await roundTrips(`${server.url}/health`, PLAN.rttSamples);
    log(`  floor: loopback HTTP round trip p50 ${results.floors.httpRtt.p50.toFixed(3)} ms`);
    await step('sse', () => scenarioSse(server));
    await step('local', () => scenarioLocal());
    await step('groups', () => scenarioGroups(server));
    for (const semantics of SEMANTICS) await step('throughput', () => scenarioThroughput(semantics), semantics);
    await step('journal', () => scenarioJournal(server, sseDriver(server)));
    await step('idle', () => scenarioIdle(server));
    for (const semantics of SEMANTICS) await step('scale', () => scenarioScale(semantics), semantics);
    await step('stop', () => scenarioStop(server));
  } finally {
    server.close();
  }

  const rows = buildRows(results);
  console.log(`\n@cleocode/runtime bench (${QUICK ? 'quick' : 'full'}) — ${info.nproc} × ${info.cpuModel}, Node ${info.node}, commit ${info.commit}${info.dirty ? ' (dirty)' : ''}`);
  console.log('ratio = native ÷ baseline; floor = the same measurement without a runtime (see bench/README.md)\n');
  printTable(rows);
  const misses = rows.filter((x) => x.met === false);
  console.log(`\n${rows.filter((x) => x.met === true).length} aims met, ${misses.length} missed${misses.length ? `: ${misses.map((x) => `${x.scenario} / ${x.metric}`).join('; ')}` : ''}.`);

  mkdirSync(join(BENCH, 'results'), { recursive: true });
  const file = join(BENCH, 'results', 'latest.json');
  writeFileSync(file, `${JSON.stringify({
    at: new Date().toISOString(), quick: QUICK, durationSeconds: (nowMs() - started) / 1000,
    machine: info, plan: PLAN, implementations: IMPLS, table: rows, raw: results,
  }, null, 2)}\n`);
  console.log(`wrote ${file} (${((nowMs() - started) / 1000).toFixed(0)} s)`);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
