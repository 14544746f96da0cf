/**
 * Pieces shared by the bench orchestrator (`run.mjs`) and its worker (`scenario.mjs`):
 * the shared clock, percentiles, what a process costs (CPU, RSS, peak RSS), a fake
 * registry, and the in-memory transport the throughput and scale scenarios poll.
 *
 * Everything here is plain JavaScript that both implementations see the same way; none of
 * it is taken from either implementation.
 */
import { readFileSync } from 'node:fs';

/**
 * Milliseconds since the Unix epoch with sub-millisecond resolution. Every process of the
 * bench stamps with this (Python: `time.time() * 1000`), so a timestamp written by one
 * process can be subtracted from one taken in another: both read CLOCK_REALTIME.
 */
export const nowMs = () => performance.timeOrigin + performance.now();

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Nearest-rank percentile of an ascending array (`p` in 0..100). */
export function percentile(sorted, p) {
  if (sorted.length === 0) return null;
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length - 1, Math.max(0, rank - 1))];
}

/** n, min, mean, p50, p90, p99, max of a list of numbers (milliseconds, usually). */
export function summarize(values) {
  const sorted = Float64Array.from(values).sort();
  const n = sorted.length;
  const mean = n ? sorted.reduce((a, b) => a + b, 0) / n : null;
  return {
    n,
    min: n ? sorted[0] : null,
    mean,
    p50: percentile(sorted, 50),
    p90: percentile(sorted, 90),
    p99: percentile(sorted, 99),
    max: n ? sorted[n - 1] : null,
  };
}

export const median = (values) => summarize(values).p50;

/** VmRSS, VmHWM (peak RSS) and thread count from /proc/self/status, in KiB / count. */
export function procStatus() {
  const out = { vmRssKiB: null, vmHwmKiB: null, threads: null };
  try {
    for (const line of readFileSync('/proc/self/status', 'utf8').split('\n')) {
      const [key, value] = line.split(':');
      if (key === 'VmRSS') out.vmRssKiB = parseInt(value, 10);
      else if (key === 'VmHWM') out.vmHwmKiB = parseInt(value, 10);
      else if (key === 'Threads') out.threads = parseInt(value, 10);
    }
  } catch { /* not Linux: leave nulls */ }
  return out;
}

/** User + system CPU milliseconds since `since` (a `process.cpuUsage()` value). */
export function cpuMsSince(since) {
  const d = process.cpuUsage(since);
  return (d.user + d.system) / 1000;
}

export const MiB = (bytes) => bytes / (1024 * 1024);

/** A credential as the registry hands it out. */
export function credential(agentId, apiKey, apiBaseUrl, transportConfig = {}) {
  const now = new Date().toISOString();
  return {
    agentId, displayName: agentId, apiKey, apiBaseUrl, privacyTier: 'private',
    capabilities: [], skills: [], transportType: 'http', transportConfig, isActive: true,
    createdAt: now, updatedAt: now,
  };
}

/** The three registry methods the runtime calls, over a fixed set of credentials. */
export function registryOf(...credentials) {
  const byId = new Map(credentials.map((c) => [c.agentId, c]));
  return {
    async get(agentId) { return byId.get(agentId) ?? null; },
    async getActive() { return credentials[0] ?? null; },
    async rotateKey(agentId) { return { agentId, newApiKey: `${agentId}-rotated` }; },
  };
}

/**
 * A Transport over an in-memory list, as a caller's own JS transport would be written:
 * `poll({ limit, since })` returns the oldest pending messages (after `since` when given),
 * `ack(ids)` removes them. Message `i` has id `m<i>` and a strictly increasing timestamp,
 * so `since` is a binary search and `ack` an index lookup: the transport's own cost stays
 * small and identical for both implementations.
 *
 * Two semantics, chosen by `semantics`:
 *   - `'since'` (the default): `since` is honoured, as the project's own MemoryTransport does;
 *   - `'peek'`: `since` is ignored and `poll` returns the oldest *unacked* messages, as the
 *     real HTTP peek does and as the cleo CLI's local transport ends up doing (it binds an ISO
 *     `since` against integer seconds and so matches nothing). A page polled before the
 *     previous one is acked is then all duplicates.
 *
 * `onPoll`, when given, is called with nothing at the start of every `poll()` (the scale
 * scenario records call times with it).
 */
export class MemoryTransport {
  name = 'memory';
  #messages;
  #done;
  #head = 0;
  #onPoll;
  #honoursSince;
  polls = 0;
  acks = 0;
  /** Messages returned by `poll()` that had been returned before and were not acked yet. */
  duplicates = 0;
  #returned;

  constructor(count = 0, { onPoll, epochMs = Date.UTC(2026, 0, 1), semantics = 'since' } = {}) {
    if (semantics !== 'since' && semantics !== 'peek') throw new TypeError(`semantics: ${semantics}`);
    this.#honoursSince = semantics === 'since';
    this.#messages = new Array(count);
    for (let i = 0; i < count; i++) {
      this.#messages[i] = {
        id: `m${i}`, from: 'bob', content: `message ${i}`, threadId: 'alice,bob',
        timestamp: new Date(epochMs + i).toISOString(),
      };
    }
    this.#done = new Uint8Array(count);
    this.#returned = new Uint8Array(count);
    this.#onPoll = onPoll;
  }

  async connect() {}
  async disconnect() {}
  async push() { return { messageId: 'unused' }; }

  async poll(options) {
    this.#onPoll?.();
    this.polls += 1;
    const limit = options?.limit ?? 50;
    let i = this.#head;
    if (options?.since && this.#honoursSince) i = Math.max(i, this.#firstAfter(options.since));
    const page = [];
    const all = this.#messages;
    for (; i < all.length && page.length < limit; i++) {
      if (this.#done[i]) continue;
      this.duplicates += this.#returned[i];
      this.#returned[i] = 1;
      page.push(all[i]);
    }
    return page;
  }

  async ack(ids) {
    this.acks += 1;
    for (const id of ids) {
      const i = Number(id.slice(1));
      if (i >= 0 && i < this.#done.length) this.#done[i] = 1;
    }
    while (this.#head < this.#done.length && this.#done[this.#head]) this.#head += 1;
  }

  /** How many messages have not been acked. */
  get pending() {
    let n = 0;
    for (let i = this.#head; i < this.#done.length; i++) n += this.#done[i] ? 0 : 1;
    return n;
  }

  #firstAfter(since) {
    let lo = 0;
    let hi = this.#messages.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.#messages[mid].timestamp <= since) lo = mid + 1; else hi = mid;
    }
    return lo;
  }
}
