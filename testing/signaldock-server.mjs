/**
 * A SignalDock-compatible test server, built from the SignalDock wire contract (WIRE.md).
 *
 * The real SignalDock server is not public, so the project ships its own:
 * plain ESM on node:http, no dependencies, loopback only (127.0.0.1, port 0).
 * It speaks the REST routes and the SSE stream of WIRE.md, keeps all state in
 * memory where tests can read and change it, records every request, and can
 * inject faults (error statuses, Retry-After, delays, hangs, resets,
 * malformed bodies, dropped streams).
 *
 * Three ways to use it:
 *   - in-process:  const sd = await startSignalDock({ agents: { alice: 'key-a' } });
 *                  ... sd.url, sd.sendDirect(...), sd.inject(...), await sd.close();
 *   - as a CLI:    node testing/signaldock-server.mjs --agents alice:key-a,bob:key-b
 *                  prints one JSON line {"url": ..., "control": ".../_test"} and runs
 *                  until SIGTERM/SIGINT or until its stdin pipe closes;
 *   - remotely:    the control API under /_test/ (no auth, JSON in and out, not
 *                  recorded in sd.requests) drives a server in another process,
 *                  which is how benchmarks use it.
 *
 * It behaves like the real server as the public SignalDock crates show it
 * (kryptobaseddev/cleo: signaldock-storage, -protocol, -transport), by default
 * including where that is awkward, because a kinder server hides exactly the bugs
 * that lose messages in production:
 *   - createdAt is in WHOLE SECONDS (the store keeps Unix seconds): messages in one
 *     second tie. Pass `extra.createdAt` to force a timestamp.
 *   - GET /messages/peek is this agent's inbox, scoped by X-Agent-Id; `mentioned`
 *     is an @-mention content filter on it, not the inbox owner. `since` keeps rows
 *     created strictly after that instant (seconds, so rows of the same second as
 *     `since` are not returned); option `peekSince: 'refuse'` answers 400 instead.
 *   - A post to a conversation is stored as one copy per member but the sender (its
 *     own id, shared `groupId`), each in its member's inbox and pushed to its stream.
 *     Members are those given to createConversation(), else every agent the server
 *     knows when the conversation is first posted to.
 *   - GET /conversations/:id/messages lists one row per COALESCE(groupId, id), the
 *     copy with the smallest id, ordered by the earliest createdAt of its copies with
 *     NO tiebreak: rows of one second come back in a different order per request
 *     (seeded PRNG).
 *   - SSE frames are the real ones: `id: <messageId>`, `event: message`, camelCase
 *     data without groupId; keep-alives are `event: heartbeat`. A pushed message is
 *     marked delivered at once, so a peek never returns it. Last-Event-ID replays up
 *     to 100 of the agent's messages after that message. Options `sseShape: 'snake' |
 *     'camel'` send the shapes of other servers.
 *   - Errors are the structured envelope {success:false, error:{code, message,
 *     category, retryable, retry_after_ms?}}; a 429 carries its wait in the body
 *     (retry_after_ms, default 60000) and a Retry-After header only when the fault
 *     rule gives `retryAfter` (seconds).
 *   - POST /agents/:id/rotate-key answers the new key (a real registry then masks it
 *     for its caller): the old key stays valid until expireKey().
 *   - Fault rules match the RAW request path (as sent, still percent-encoded).
 *   - Creating routes (POST /messages, POST /conversations/:id/messages) answer
 *     201, everything else that succeeds answers 200.
 */
import http from 'node:http';
import { randomUUID } from 'node:crypto';
import { fstatSync, realpathSync } from 'node:fs';
import { pathToFileURL } from 'node:url';

const PEEK_DEFAULT_LIMIT = 50;
const PEEK_MAX_LIMIT = 500;
const GROUP_DEFAULT_LIMIT = 50;
// Enough events for a reconnect after a short drop; a real server keeps a window too.
const SSE_HISTORY = 256;
const MAX_BODY_BYTES = 16 * 1024 * 1024;
const RULE_KEYS = new Set([
  'method', 'path', 'agentId', 'times', 'probability', 'status', 'retryAfter', 'retryAfterMs',
  'delayMs', 'hang', 'malformed', 'reset', 'dropAfterMs', 'message', 'query', 'every',
]);
// The real server replays at most this many messages after a Last-Event-ID.
const SSE_REPLAY = 100;
// signaldock-protocol error.rs: status -> code, category and retryable of the envelope.
const ERROR_KINDS = {
  400: ['E_VALIDATION', 'validation', false], 401: ['E_UNAUTHORIZED', 'auth', false],
  403: ['E_FORBIDDEN', 'auth', false], 404: ['E_NOT_FOUND', 'not_found', false],
  409: ['E_CONFLICT', 'conflict', false], 429: ['E_RATE_LIMITED', 'rate_limit', true],
  500: ['E_INTERNAL', 'internal', true], 503: ['E_UNAVAILABLE', 'unavailable', true],
};
// Query parameters that would carry a key in a URL. The old TypeScript client
// used ?token=; refusing the others too keeps any key-in-URL loud in tests.
const KEY_QUERY_PARAMS = ['token', 'api_key', 'apiKey', 'key'];

/** The DM conversation id: the two agent ids sorted and joined by ','. */
export function dmConversationId(a, b) {
  return [a, b].sort().join(',');
}

/** Start a server on 127.0.0.1 with an ephemeral port; resolves once listening. */
export async function startSignalDock(options = {}) {
  const sd = new SignalDock(options);
  await sd.listen();
  return sd;
}

export class SignalDock {
  // Credentials: agentId -> Set of valid keys. Expired keys are simply removed.
  #keys = new Map();
  // Messages addressed to an agent (DMs and its fan-out copies): agentId -> [{ row, state, via }].
  #inbox = new Map();
  // Every stored row of every conversation (group copies included): conversationId -> [row].
  #conversations = new Map();
  // Members of a conversation: conversationId -> [agentId].
  #members = new Map();
  #acked = new Map();
  #heartbeats = [];
  #statuses = [];
  #requests = [];
  #faults = [];
  // SSE: agentId -> Set of { res, socket, timer }; per-agent event counter and history.
  #streams = new Map();
  #eventSeq = new Map();
  #history = new Map();
  // Everything close() must tear down.
  #server = null;
  #sockets = new Set();
  #sleepers = new Map();
  #closed = false;
  #seed = 1;
  #rng = 1;

  constructor(options = {}) {
    this.heartbeatMs = options.heartbeatMs ?? 30_000;
    this.sseShape = options.sseShape ?? 'real';
    this.peekSince = options.peekSince ?? 'timestamp';
    this.eventIds = options.eventIds ?? true;
    this.pushToStreams = options.pushToStreams ?? true;
    this.silence = options.silence ?? false;
    this.legacyIds = options.legacyIds ?? false;
    this.groupDelayMs = options.groupDelayMs ?? 0;
    this.seed = options.seed ?? 1;
    this.url = null;
    for (const [id, keys] of Object.entries(options.agents ?? {})) {
      for (const key of [keys].flat()) this.addAgent(id, key);
    }
  }

  // Setting the seed restarts the PRNG, so a test can replay a probability sequence.
  get seed() { return this.#seed; }
  set seed(value) {
    this.#seed = Number(value) >>> 0;
    this.#rng = this.#seed || 0x9e3779b9;
  }

  async listen() {
    this.#server = http.createServer((req, res) => {
      this.#handle(req, res).catch((err) => {
        if (!res.headersSent && !res.destroyed) send(res, 500, fail(String(err?.message ?? err), 500));
        else res.destroy();
      });
    });
    this.#server.on('connection', (socket) => {
      this.#sockets.add(socket);
      socket.on('close', () => this.#sockets.delete(socket));
    });
    // Node's default keep-alive / request timeouts would cut hung requests; tests control those.
    this.#server.requestTimeout = 0;
    await new Promise((resolve, reject) => {
      this.#server.once('error', reject);
      this.#server.listen(0, '127.0.0.1', resolve);
    });
    this.url = `http://127.0.0.1:${this.#server.address().port}`;
    return this;
  }

  /** Stop listening and destroy every socket (SSE streams, hung and delayed requests too). */
  async close() {
    if (this.#closed || !this.#server) return;
    this.#closed = true;
    for (const set of this.#streams.values()) for (const s of set) this.#forgetStream(s);
    // Wake delayed handlers so they notice #closed instead of lingering on a timer.
    for (const [timer, wake] of this.#sleepers) { clearTimeout(timer); wake(); }
    this.#sleepers.clear();
    const closed = new Promise((resolve) => this.#server.close(() => resolve()));
    for (const socket of this.#sockets) socket.destroy();
    await closed;
  }

  // ---------------------------------------------------------------- agents and keys

  addAgent(id, key) {
    if (!this.#keys.has(id)) this.#keys.set(id, new Set());
    if (key != null) this.#keys.get(id).add(key);
  }

  addKey(id, key) { this.addAgent(id, key); }

  expireKey(key) {
    for (const keys of this.#keys.values()) keys.delete(key);
  }

  keysOf(id) { return [...(this.#keys.get(id) ?? [])]; }

  // ---------------------------------------------------------------- messages

  sendDirect(from, to, content, extra = {}) {
    const row = {
      id: randomUUID(), conversationId: dmConversationId(from, to), fromAgentId: from, toAgentId: to,
      content, contentType: 'text', createdAt: this.#timestamp(), ...extra,
    };
    this.#conversation(row.conversationId).push(row);
    this.#deliver(to, row);
    return { ...row };
  }

  /** Declares a conversation's members (the agents a post to it fans out to). */
  createConversation(conversationId, members) {
    this.#members.set(conversationId, [...members]);
  }

  /**
   * Posts to a conversation: one copy per member but the sender, each with its own id and
   * the post's groupId, addressed to that member (inbox and stream). Returns the post as
   * the listing shows it (the copy with the smallest id), with `copies` listing them all.
   */
  postToConversation(conversationId, from, content, extra = {}) {
    if (!this.#members.has(conversationId)) this.#members.set(conversationId, [...this.#keys.keys()]);
    const groupId = randomUUID();
    const createdAt = this.#timestamp();
    const recipients = this.#members.get(conversationId).filter((m) => m !== from);
    // A post nobody else receives is still stored, as the sender's own row.
    const copies = (recipients.length ? recipients : [null]).map((to) => ({
      id: randomUUID(), conversationId, fromAgentId: from, toAgentId: to, content,
      contentType: 'text', createdAt, groupId, ...extra,
    }));
    this.#conversation(conversationId).push(...copies);
    for (const row of copies) if (row.toAgentId !== null) this.#deliver(row.toAgentId, row);
    const listed = copies.reduce((a, b) => (b.id < a.id ? b : a));
    return { ...listed, copies: copies.map((c) => ({ ...c })) };
  }

  pending(agentId) { return this.#rowsIn(agentId, 'pending'); }
  /** How each of an agent's messages left the inbox: 'sse' (pushed or replayed), 'ack', or null. */
  deliveries(agentId) {
    return (this.#inbox.get(agentId) ?? []).map((e) => ({ id: e.row.id, state: e.state, via: e.via }));
  }
  delivered(agentId) { return this.#rowsIn(agentId, 'delivered'); }
  acked(agentId) { return [...(this.#acked.get(agentId) ?? [])]; }
  heartbeats(agentId) {
    return agentId === undefined ? [...this.#heartbeats] : this.#heartbeats.filter((h) => h.agentId === agentId);
  }
  get statuses() { return this.#statuses; }

  // ---------------------------------------------------------------- recorded requests

  get requests() { return this.#requests; }
  clearRequests() { this.#requests.length = 0; }

  // ---------------------------------------------------------------- SSE helpers

  streams(agentId) {
    if (agentId !== undefined) return this.#streams.get(agentId)?.size ?? 0;
    let n = 0;
    for (const set of this.#streams.values()) n += set.size;
    return n;
  }

  /** Destroy the sockets of open streams, as a network drop would. Returns how many. */
  dropStreams(agentId) {
    const victims = this.#streamList(agentId);
    for (const s of victims) { this.#forgetStream(s); s.socket.destroy(); }
    return victims.length;
  }

  /** Write raw text (malformed frames, custom events, retry: lines) into an agent's streams
   *  (every stream when agentId is omitted). Returns how many streams got it. */
  sseSendRaw(agentId, text) {
    const targets = this.#streamList(agentId);
    for (const s of targets) s.res.write(text);
    return targets.length;
  }

  // ---------------------------------------------------------------- faults

  /**
   * Add a fault rule. Rules are tried in order before auth; the first match applies and
   * uses up one of its `times` (default 1, Infinity allowed). Match on `method`, `path`
   * (raw path: exact string, 'prefix*', or RegExp), `agentId` (X-Agent-Id) and
   * `probability` (seeded PRNG; a miss does not use up the rule) or `every: n` (the n-th,
   * 2n-th, … otherwise-matching request: a schedule that does not depend on how requests
   * interleave, for a test that asserts the fault happened). Effects, in order:
   * `delayMs` (wait, then carry on), `reset` (destroy the socket), `hang` (never answer),
   * `status`/`retryAfter` (error body; retryAfter alone means 429; optional `message`),
   * `malformed` (200 with a non-JSON body), `dropAfterMs` (SSE only: open, then destroy).
   * Returns the stored rule, whose `hits` and `remaining` stay live for assertions.
   */
  inject(rule) {
    for (const key of Object.keys(rule)) {
      // A typo such as `delay:` would otherwise make a fault test pass vacuously.
      if (!RULE_KEYS.has(key)) throw new TypeError(`unknown fault rule key: ${key}`);
    }
    const stored = { ...rule, remaining: rule.times ?? 1, hits: 0, seen: 0 };
    if (!(stored.remaining > 0)) throw new TypeError('fault rule times must be > 0');
    if (rule.every !== undefined && !(Number.isInteger(rule.every) && rule.every > 0)) {
      throw new TypeError('fault rule every must be a positive integer');
    }
    if (rule.every !== undefined && rule.probability !== undefined) {
      throw new TypeError('fault rule: every and probability exclude each other');
    }
    this.#faults.push(stored);
    return stored;
  }

  clearFaults() { this.#faults.length = 0; }
  get faults() { return [...this.#faults]; }

  // ================================================================ internals

  // Whole seconds, as the real store keeps them (RFC 3339 with a Z, as serde writes UTC).
  #timestamp() {
    return new Date(Math.floor(Date.now() / 1000) * 1000).toISOString().replace('.000Z', 'Z');
  }

  // Into the addressee's inbox, and straight to its streams when it has any (delivered).
  #deliver(to, row) {
    const entry = { row, state: 'pending', via: null };
    if (!this.#inbox.has(to)) this.#inbox.set(to, []);
    this.#inbox.get(to).push(entry);
    if (this.#push(to, row)) { entry.state = 'delivered'; entry.via = 'sse'; }
  }

  #conversation(id) {
    if (!this.#conversations.has(id)) this.#conversations.set(id, []);
    return this.#conversations.get(id);
  }

  #rowsIn(agentId, state) {
    return (this.#inbox.get(agentId) ?? []).filter((e) => e.state === state).map((e) => ({ ...e.row }));
  }

  // mulberry32: small, fast and deterministic for a given seed.
  #random() {
    let t = (this.#rng = (this.#rng + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }

  #sleep(ms) {
    if (this.#closed) return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(() => { this.#sleepers.delete(timer); resolve(); }, ms);
      this.#sleepers.set(timer, resolve);
    });
  }

  #authenticate(req) {
    const match = /^Bearer\s+(\S+)\s*$/i.exec(req.headers.authorization ?? '');
    if (!match) return null;
    const key = match[1];
    const claimed = req.headers['x-agent-id'];
    if (claimed !== undefined) return this.#keys.get(claimed)?.has(key) ? claimed : null;
    for (const [id, keys] of this.#keys) if (keys.has(key)) return id;
    return null;
  }

  #takeFault(rec) {
    for (let i = 0; i < this.#faults.length; i++) {
      const rule = this.#faults[i];
      if (rule.method && rule.method.toUpperCase() !== rec.method) continue;
      if (rule.path != null && !pathMatches(rule.path, rec.path)) continue;
      if (rule.agentId != null && rule.agentId !== rec.agentId) continue;
      // `query`: { name: value } must match; a value of true only asks that it be present.
      if (rule.query != null && !Object.entries(rule.query).every(([k, v]) => (v === true ? k in rec.query : rec.query[k] === v))) continue;
      // Draw only for otherwise-matching rules so the sequence depends on traffic, not rule count.
      if (rule.probability != null && !(this.#random() < rule.probability)) continue;
      // Counted per rule, so other rules and other traffic cannot shift the schedule.
      if (rule.every != null && (rule.seen += 1) % rule.every !== 0) continue;
      rule.hits += 1;
      rule.remaining -= 1;
      if (rule.remaining <= 0) this.#faults.splice(i, 1);
      return rule;
    }
    return null;
  }

  /** Applies a fault. Returns true when the request has been dealt with. */
  async #applyFault(rule, req, res) {
    if (rule.delayMs > 0) await this.#sleep(rule.delayMs);
    if (this.#closed || res.destroyed) return true;
    if (rule.reset) { req.socket.destroy(); return true; }
    // A hung request keeps its socket open; close() or the client's abort ends it.
    if (rule.hang) return true;
    if (rule.status != null || rule.retryAfter != null || rule.retryAfterMs != null) {
      const status = rule.status ?? 429;
      const headers = rule.retryAfter != null ? { 'retry-after': String(rule.retryAfter) } : {};
      const waitMs = rule.retryAfterMs ?? (rule.retryAfter != null ? rule.retryAfter * 1000 : 60_000);
      send(res, status, fail(rule.message ?? `injected ${status}`, status, status === 429 ? waitMs : undefined), headers);
      return true;
    }
    if (rule.malformed) {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end('{"success":true,"data":{"messages":[{"id":');
      return true;
    }
    return false;
  }

  async #handle(req, res) {
    const raw = req.url ?? '/';
    const q = raw.indexOf('?');
    const path = q < 0 ? raw : raw.slice(0, q);
    const query = Object.fromEntries(new URLSearchParams(q < 0 ? '' : raw.slice(q + 1)));
    const body = await readBody(req);
    if (path === '/_test' || path.startsWith('/_test/')) return this.#control(req, res, path, body);

    const agentHeader = req.headers['x-agent-id'];
    const rec = {
      method: req.method, path, query, headers: { ...req.headers }, body, at: Date.now(),
      agentId: agentHeader ?? null,
    };
    this.#requests.push(rec);

    const rule = this.#takeFault(rec);
    if (rule && (await this.#applyFault(rule, req, res))) return;

    let segs;
    try {
      // Decode each raw segment on its own, so an encoded '/' stays inside its id.
      segs = path.split('/').slice(1).map(decodeURIComponent);
    } catch {
      return send(res, 400, fail('malformed percent-encoding in path', 400));
    }
    // Route key: '/conversations/<id>/messages' -> 'conversations/:id/messages'. Only the
    // /messages/* routes have no id segment; every other two-level route has one.
    const hasParam = segs.length > 1 && segs[0] !== 'messages';
    const route = `${req.method} ${hasParam ? `${segs[0]}/:id/${segs.slice(2).join('/')}` : segs.join('/')}`;
    const param = hasParam ? segs[1] : undefined;

    if (route === 'GET health') return send(res, 200, ok({ status: 'ok' }));

    const isStream = route === 'GET messages/stream';
    if (isStream && KEY_QUERY_PARAMS.some((p) => p in query)) {
      return send(res, 401, fail('unauthorized: credentials in the URL are refused', 401));
    }
    const caller = this.#authenticate(req);
    if (!caller) return send(res, 401, fail('unauthorized', 401));

    switch (route) {
      case 'GET messages/stream':
        return this.#openStream(req, res, caller, rule?.dropAfterMs);
      case 'GET messages/peek':
        if (query.since !== undefined && this.peekSince === 'refuse') {
          return send(res, 400, fail('unknown query parameter: since', 400));
        }
        return send(res, 200, ok({ messages: this.#peek(caller, query) }));
      case 'POST messages/ack':
        return send(res, 200, ok({ acked: this.#ack(caller, body?.messageIds) }));
      case 'POST messages': {
        if (typeof body?.toAgentId !== 'string' || !body.toAgentId || typeof body.content !== 'string') {
          return send(res, 400, fail('toAgentId and content are required', 400));
        }
        const extra = body.metadata !== undefined ? { metadata: body.metadata } : {};
        const row = this.sendDirect(caller, body.toAgentId, body.content, extra);
        return send(res, 201, ok(this.legacyIds ? { id: row.id } : { message: row }));
      }
      case 'POST conversations/:id/messages': {
        if (!param) return send(res, 404, fail('not found', 404));
        if (typeof body?.content !== 'string') return send(res, 400, fail('content is required', 400));
        const extra = body.replyTo != null ? { replyTo: body.replyTo } : {};
        const { copies, ...row } = this.postToConversation(param, caller, body.content, extra);
        return send(res, 201, ok(this.legacyIds ? { id: row.id } : { message: row }));
      }
      case 'GET conversations/:id/messages': {
        if (!param) return send(res, 404, fail('not found', 404));
        if (this.groupDelayMs > 0) await this.#sleep(this.groupDelayMs);
        if (this.#closed) return;
        const limit = clampLimit(query.limit, GROUP_DEFAULT_LIMIT);
        return send(res, 200, ok({ messages: this.#listing(param, query.sort === 'asc').slice(0, limit) }));
      }
      case 'POST agents/:id/heartbeat':
        this.#heartbeats.push({ agentId: param, caller, body, status: body?.status, at: Date.now() });
        return send(res, 200, ok({ agentId: param, status: body?.status ?? 'online' }));
      case 'PUT agents/:id/status':
        this.#statuses.push({ agentId: param, caller, body, status: body?.status, at: Date.now() });
        return send(res, 200, ok({ agentId: param, status: body?.status }));
      case 'POST agents/:id/rotate-key': {
        if (!this.#keys.has(param)) return send(res, 404, fail('unknown agent', 404));
        // The old key stays valid (the overlap window) until a test calls expireKey.
        const apiKey = `sk-${param}-${randomUUID()}`;
        this.addKey(param, apiKey);
        return send(res, 200, ok({ agentId: param, apiKey }));
      }
      default:
        return send(res, 404, fail('not found', 404));
    }
  }

  // diesel_messages.rs: one row per COALESCE(group_id, id) (the smallest id of the copies),
  // ordered by the earliest created_at of the group, NO tiebreak. Ties are shuffled per
  // request, so a client that relies on an order among them is found out.
  #listing(conversationId, ascending) {
    const groups = new Map();
    for (const row of this.#conversations.get(conversationId) ?? []) {
      const key = row.groupId ?? row.id;
      const at = Date.parse(row.createdAt);
      const seen = groups.get(key);
      if (!seen) groups.set(key, { row, at });
      else {
        if (row.id < seen.row.id) seen.row = row;
        seen.at = Math.min(seen.at, at);
      }
    }
    const listed = [...groups.values()].map((g) => ({ ...g, tie: this.#random() }));
    listed.sort((a, b) => (ascending ? a.at - b.at : b.at - a.at) || a.tie - b.tie);
    return listed.map((g) => ({ ...g.row, groupId: g.row.groupId ?? g.row.id }));
  }

  #peek(agentId, query) {
    const limit = clampLimit(query.limit, PEEK_DEFAULT_LIMIT);
    let rows = (this.#inbox.get(agentId) ?? []).filter((e) => e.state === 'pending').map((e) => e.row);
    if (query.since) rows = rows.filter((r) => isAfter(r.createdAt, query.since));
    // MessageQuery.mentioned: messages whose content @-mentions that agent, within the inbox.
    if (query.mentioned) rows = rows.filter((r) => mentionsAgent(r.content, query.mentioned));
    // Stable sort: rows with forced equal timestamps keep their arrival order.
    rows.sort((a, b) => compareTime(a.createdAt, b.createdAt));
    return rows.slice(0, limit);
  }

  #ack(caller, ids) {
    if (!Array.isArray(ids)) return 0;
    if (!this.#acked.has(caller)) this.#acked.set(caller, []);
    const record = this.#acked.get(caller);
    const wanted = new Set(ids);
    for (const id of wanted) if (!record.includes(id)) record.push(id);
    // Only the caller's own messages change state; acking someone else's is a no-op.
    let n = 0;
    for (const entry of this.#inbox.get(caller) ?? []) {
      if (entry.state === 'pending' && wanted.has(entry.row.id)) {
        entry.state = 'delivered';
        entry.via = 'ack';
        n += 1;
      }
    }
    return n;
  }

  #openStream(req, res, agentId, dropAfterMs) {
    res.writeHead(200, {
      'content-type': 'text/event-stream',
      'cache-control': 'no-cache',
      'x-accel-buffering': 'no',
    });
    req.socket.setNoDelay(true);
    const stream = { agentId, res, socket: req.socket, timer: null, dropTimer: null };
    if (!this.#streams.has(agentId)) this.#streams.set(agentId, new Set());
    this.#streams.get(agentId).add(stream);
    res.on('close', () => this.#forgetStream(stream));

    res.write(`event: connected\ndata: ${JSON.stringify({ agentId })}\n\n`);
    const lastId = req.headers['last-event-id'];
    if (this.eventIds && lastId) this.#replay(stream, lastId);
    stream.timer = setInterval(() => {
      if (this.silence) return;
      res.write(this.sseShape === 'real'
        ? `event: heartbeat\ndata: ${JSON.stringify({ timestamp: rfc3339(Date.now()) })}\n\n`
        : 'data: {"type":"heartbeat"}\n\n');
    }, this.heartbeatMs);
    if (dropAfterMs != null) {
      stream.dropTimer = setTimeout(() => { this.#forgetStream(stream); stream.socket.destroy(); }, dropAfterMs);
    }
  }

  #forgetStream(stream) {
    clearInterval(stream.timer);
    clearTimeout(stream.dropTimer);
    const set = this.#streams.get(stream.agentId);
    if (set?.delete(stream) && set.size === 0) this.#streams.delete(stream.agentId);
  }

  #streamList(agentId) {
    if (agentId !== undefined && agentId !== null) return [...(this.#streams.get(agentId) ?? [])];
    return [...this.#streams.values()].flatMap((set) => [...set]);
  }

  /** Push a message to the addressee's open streams; true when at least one stream got it. */
  #push(agentId, row) {
    const targets = this.#streamList(agentId);
    if (!this.pushToStreams || targets.length === 0) return false;
    const frame = this.#frame(agentId, row);
    for (const s of targets) s.res.write(frame);
    return true;
  }

  #frame(agentId, row) {
    if (this.sseShape === 'real') {
      // signaldock-transport adapters/sse.rs: the message id is the event id; no groupId.
      const data = {
        messageId: row.id, conversationId: row.conversationId, from: row.fromAgentId,
        content: row.content, contentType: row.contentType, createdAt: rfc3339(Date.parse(row.createdAt)),
        attachments: [],
      };
      return `${this.eventIds ? `id: ${row.id}\n` : ''}event: message\ndata: ${JSON.stringify(data)}\n\n`;
    }
    const payload = this.sseShape === 'camel'
      ? { id: row.id, from: row.fromAgentId, content: row.content, threadId: row.conversationId, timestamp: row.createdAt }
      : {
          message_id: row.id, conversation_id: row.conversationId, from_agent_id: row.fromAgentId,
          from_agent_name: row.fromAgentId, to_agent_id: row.toAgentId, content: row.content,
          content_type: row.contentType, created_at: row.createdAt, attachments: [],
        };
    let frame = `data: ${JSON.stringify(payload)}\n\n`;
    if (this.eventIds) {
      const id = (this.#eventSeq.get(agentId) ?? 0) + 1;
      this.#eventSeq.set(agentId, id);
      frame = `id: ${id}\n${frame}`;
      if (!this.#history.has(agentId)) this.#history.set(agentId, []);
      const history = this.#history.get(agentId);
      history.push({ id, frame });
      if (history.length > SSE_HISTORY) history.shift();
    }
    return frame;
  }

  // Last-Event-ID: the real server replays up to 100 of the agent's messages after that one
  // (and they are delivered now); the other shapes replay their numbered frames.
  #replay(stream, lastId) {
    if (this.sseShape === 'real') {
      const inbox = this.#inbox.get(stream.agentId) ?? [];
      const at = inbox.findIndex((e) => e.row.id === lastId);
      if (at < 0) return;
      for (const entry of inbox.slice(at + 1, at + 1 + SSE_REPLAY)) {
        stream.res.write(this.#frame(stream.agentId, entry.row));
        if (entry.state === 'pending') { entry.state = 'delivered'; entry.via = 'sse'; }
      }
      return;
    }
    const n = Number.parseInt(lastId, 10);
    if (!Number.isFinite(n)) return;
    for (const ev of this.#history.get(stream.agentId) ?? []) if (ev.id > n) stream.res.write(ev.frame);
  }

  // ---------------------------------------------------------------- control API (/_test/)

  async #control(req, res, path, body) {
    const b = body && typeof body === 'object' ? body : {};
    try {
      switch (`${req.method} ${path.slice('/_test'.length)}`) {
        case 'POST /send':
          return send(res, 200, { message: this.sendDirect(b.from, b.to, b.content, b.extra) });
        case 'POST /post':
          return send(res, 200, { message: this.postToConversation(b.conversationId, b.from, b.content, b.extra) });
        case 'POST /conversation':
          this.createConversation(b.conversationId, b.members ?? []);
          return send(res, 200, { conversationId: b.conversationId, members: b.members ?? [] });
        case 'POST /inject': {
          const { pathRegex, ...rule } = b.rule ?? {};
          if (pathRegex != null) rule.path = new RegExp(pathRegex);
          // JSON has no Infinity; accept the string (or null) for "until cleared".
          if (rule.times === 'Infinity' || rule.times === null) rule.times = Infinity;
          const stored = this.inject(rule);
          return send(res, 200, { injected: this.#faults.indexOf(stored), faults: this.#faults.length });
        }
        case 'POST /clear-faults':
          this.clearFaults();
          return send(res, 200, { faults: 0 });
        case 'POST /drop-streams':
          return send(res, 200, { dropped: this.dropStreams(b.agentId) });
        case 'POST /add-agent':
          this.addAgent(b.id, b.key);
          return send(res, 200, { agentId: b.id, keys: this.keysOf(b.id).length });
        case 'POST /add-key':
          this.addKey(b.id, b.key);
          return send(res, 200, { agentId: b.id, keys: this.keysOf(b.id).length });
        case 'POST /expire-key':
          this.expireKey(b.key);
          return send(res, 200, { expired: true });
        case 'POST /clear-requests':
          this.clearRequests();
          return send(res, 200, { requests: 0 });
        case 'GET /requests':
          return send(res, 200, { requests: this.#requests });
        case 'GET /stats':
          return send(res, 200, this.#stats());
        case 'POST /set': {
          const settable = ['pushToStreams', 'silence', 'legacyIds', 'groupDelayMs', 'heartbeatMs', 'sseShape', 'eventIds', 'seed', 'peekSince'];
          for (const key of Object.keys(b)) {
            if (!settable.includes(key)) throw new TypeError(`cannot set ${key}`);
            this[key] = b[key];
          }
          return send(res, 200, Object.fromEntries(settable.map((k) => [k, this[k]])));
        }
        default:
          return send(res, 404, { error: 'unknown control route' });
      }
    } catch (err) {
      return send(res, 400, { error: String(err?.message ?? err) });
    }
  }

  #stats() {
    const agents = new Set([...this.#keys.keys(), ...this.#inbox.keys()]);
    const pending = {};
    const delivered = {};
    const acked = {};
    for (const id of agents) {
      const inbox = this.#inbox.get(id) ?? [];
      pending[id] = inbox.filter((e) => e.state === 'pending').length;
      delivered[id] = inbox.length - pending[id];
      acked[id] = this.#acked.get(id)?.length ?? 0;
    }
    return {
      requests: this.#requests.length, streams: this.streams(), pending, delivered, acked,
      faults: this.#faults.length, heartbeats: this.#heartbeats.length,
    };
  }
}

// ------------------------------------------------------------------ small helpers

function ok(data) { return { success: true, data }; }

/** The structured error envelope of signaldock-protocol `error.rs`. */
function fail(message, status = 500, retryAfterMs = undefined) {
  const [code, category, retryable] = ERROR_KINDS[status] ?? (status >= 500 ? ERROR_KINDS[500] : ERROR_KINDS[400]);
  const error = { code, message, category, retryable };
  if (retryAfterMs !== undefined) error.retry_after_ms = retryAfterMs;
  return { success: false, error };
}

/** chrono's `to_rfc3339()` of a UTC instant in whole seconds: `2026-04-07T12:00:00+00:00`. */
function rfc3339(ms) {
  return new Date(Math.floor(ms / 1000) * 1000).toISOString().replace('.000Z', '+00:00');
}

function send(res, status, payload, headers = {}) {
  if (res.destroyed || res.headersSent) return;
  const text = JSON.stringify(payload);
  res.writeHead(status, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(text),
    ...headers,
  });
  res.end(text);
}

/** Body as parsed JSON when it parses, else the raw string; null when empty or aborted. */
function readBody(req) {
  return new Promise((resolve) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size <= MAX_BODY_BYTES) chunks.push(chunk);
    });
    req.on('end', () => {
      const text = Buffer.concat(chunks).toString('utf8');
      if (text === '') return resolve(null);
      try { resolve(JSON.parse(text)); } catch { resolve(text); }
    });
    req.on('error', () => resolve(null));
  });
}

function pathMatches(pattern, path) {
  if (pattern instanceof RegExp) {
    pattern.lastIndex = 0; // a /g regex would otherwise alternate between match and miss
    return pattern.test(path);
  }
  if (pattern.endsWith('*')) return path.startsWith(pattern.slice(0, -1));
  return path === pattern;
}

function clampLimit(value, fallback) {
  const n = Number.parseInt(value ?? '', 10);
  if (!Number.isFinite(n) || n <= 0) return fallback;
  return Math.min(n, PEEK_MAX_LIMIT);
}

// ISO strings from different writers may differ in precision ("...00Z" vs "...00.000Z"),
// so compare as instants when both parse, and as strings otherwise.
function compareTime(a, b) {
  const x = Date.parse(a);
  const y = Date.parse(b);
  if (Number.isFinite(x) && Number.isFinite(y)) return x - y;
  return a < b ? -1 : a > b ? 1 : 0;
}

function isAfter(createdAt, since) { return compareTime(createdAt, since) > 0; }

function mentionsAgent(content, agentId) {
  return typeof content === 'string' && content.toLowerCase().includes(`@${String(agentId).toLowerCase()}`);
}

// ------------------------------------------------------------------ CLI mode

function parseArgs(argv) {
  const opts = { agents: {} };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const [flag, inline] = arg.includes('=') ? [arg.slice(0, arg.indexOf('=')), arg.slice(arg.indexOf('=') + 1)] : [arg, undefined];
    const value = () => inline ?? argv[++i];
    switch (flag) {
      case '--agents':
        for (const pair of value().split(',').filter(Boolean)) {
          const at = pair.indexOf(':');
          if (at <= 0) throw new Error(`--agents expects id:key pairs, got ${pair}`);
          const id = pair.slice(0, at);
          opts.agents[id] = [...[opts.agents[id] ?? []].flat(), pair.slice(at + 1)];
        }
        break;
      case '--heartbeat-ms': opts.heartbeatMs = Number(value()); break;
      case '--group-delay-ms': opts.groupDelayMs = Number(value()); break;
      case '--sse-shape': opts.sseShape = value(); break;
      case '--peek-since': opts.peekSince = value(); break;
      case '--no-event-ids': opts.eventIds = false; break;
      case '--seed': opts.seed = Number(value()); break;
      case '--help':
        process.stdout.write('usage: signaldock-server.mjs [--agents id:key,...] [--heartbeat-ms N] '
          + '[--group-delay-ms N] [--sse-shape real|snake|camel] [--peek-since timestamp|refuse] '
          + '[--no-event-ids] [--seed N]\n');
        process.exit(0);
        break;
      default: throw new Error(`unknown argument: ${arg}`);
    }
  }
  return opts;
}

async function main() {
  const sd = await startSignalDock(parseArgs(process.argv.slice(2)));
  let stopping = false;
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    await sd.close();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  // Exit with the parent: when stdin is a pipe or socket and it closes, so do we.
  // (A parent spawning with stdin 'ignore' gives /dev/null, which must not stop us.)
  const stdin = fstatSync(0);
  if (stdin.isFIFO() || stdin.isSocket()) {
    process.stdin.on('end', stop);
    process.stdin.on('close', stop);
    process.stdin.resume();
  }
  process.stdout.write(`${JSON.stringify({ url: sd.url, control: `${sd.url}/_test` })}\n`);
}

function invokedDirectly() {
  try {
    return import.meta.url === pathToFileURL(realpathSync(process.argv[1])).href;
  } catch {
    return false; // no argv[1], or not a file: we were imported
  }
}

if (invokedDirectly()) {
  main().catch((err) => {
    process.stderr.write(`signaldock-server: ${err?.stack ?? err}\n`);
    process.exit(1);
  });
}
