// Type declarations for @cleocode/runtime/testing: the SignalDock-compatible test server and
// the in-memory registry this project tests the runtime against (testing/index.mjs for
// `import`, testing/cjs/index.cjs for `require`; index.d.mts re-exports these for ESM).
import type { AgentCredential, AgentRegistryAPI } from '../index.js';

/** A message row as the server stores and serves it (REST shape, camelCase). */
export interface MessageRow {
  id: string;
  fromAgentId: string;
  /** The recipient of a direct message; null for a conversation post. */
  toAgentId: string | null;
  content: string;
  contentType: string;
  conversationId: string;
  /** ISO 8601, in whole seconds (as the real store keeps it): rows of one second tie. */
  createdAt: string;
  /** Set on every copy of a conversation post (one copy per member but the sender). */
  groupId?: string;
  /** Whatever `extra` gave: `metadata`, `replyTo`, or a forced `createdAt`, … */
  [field: string]: unknown;
}

/** What `postToConversation` returns: the copy the listing shows, with all the copies. */
export interface PostedRow extends MessageRow {
  groupId: string;
  copies: MessageRow[];
}

/** `startSignalDock(options)` / `new SignalDock(options)`. */
export interface SignalDockOptions {
  /** Agents and their accepted keys: `{ alice: 'key-a', bob: ['key-b', 'key-b2'] }`. */
  agents?: Record<string, string | string[]>;
  /** Interval of the stream's heartbeat frames; default 30000. */
  heartbeatMs?: number;
  /** Stream frames: `'real'` (the real server's, default), or the `'snake'` / `'camel'`
   * payload shapes of other servers. */
  sseShape?: 'real' | 'snake' | 'camel';
  /** A peek's `since`: `'timestamp'` (rows strictly after it, default) or `'refuse'` (400). */
  peekSince?: 'timestamp' | 'refuse';
  /** Whether stream frames carry `id:` lines (and `Last-Event-ID` replays); default true. */
  eventIds?: boolean;
  /** Whether a direct message is pushed to the recipient's open streams; default true. */
  pushToStreams?: boolean;
  /** Whether the stream stops sending heartbeat frames; default false. */
  silence?: boolean;
  /** Whether creating routes answer `{ id }` (older servers) instead of `{ message }`. */
  legacyIds?: boolean;
  /** Delay before each conversation listing answers, in ms; default 0. */
  groupDelayMs?: number;
  /** Seed of the PRNG behind `probability` fault rules; default 1. */
  seed?: number;
}

/** A fault for `sd.inject(rule)`. Rules are tried in order; the first match applies. */
export interface FaultRule {
  /** HTTP method to match, e.g. `'GET'`. */
  method?: string;
  /** The raw request path (still percent-encoded): exact, `'prefix*'`, or a RegExp. */
  path?: string | RegExp;
  /** The `X-Agent-Id` header to match. */
  agentId?: string;
  /** How many matching requests it applies to; default 1; `Infinity` until cleared. */
  times?: number;
  /** Applies to a matching request with this probability (seeded PRNG). */
  probability?: number;
  /** Applies to every n-th matching request (the n-th, 2n-th, …): deterministic, unlike
   * `probability`, whatever other traffic does. */
  every?: number;
  /** Answer with this status and an error body. */
  status?: number;
  /** Query parameters to match: a value, or `true` for "present". */
  query?: Record<string, string | true>;
  /** Send `Retry-After: <seconds>` (alone: a 429). */
  retryAfter?: number;
  /** The wait a 429's error body carries (`retry_after_ms`); default 60000. */
  retryAfterMs?: number;
  /** Wait this long first, then carry on (with the other effects, or normally). */
  delayMs?: number;
  /** Never answer. */
  hang?: boolean;
  /** Answer 200 with a body that is not JSON. */
  malformed?: boolean;
  /** Destroy the socket. */
  reset?: boolean;
  /** For the stream: open it, then drop it after this long. */
  dropAfterMs?: number;
  /** The error message of a `status` answer. */
  message?: string;
}

/** A stored rule: its counters stay live for assertions. */
export interface InjectedFault extends FaultRule {
  /** Requests the rule applied to. */
  hits: number;
  /** Applications left. */
  remaining: number;
}

/** One request the server received (control routes under /_test/ are not recorded). */
export interface RecordedRequest {
  method: string;
  /** The raw path, without the query. */
  path: string;
  query: Record<string, string>;
  headers: Record<string, string | string[] | undefined>;
  /** The body parsed as JSON when it parses, else the text; null when empty. */
  body: unknown;
  /** When it arrived, ms since the epoch. */
  at: number;
  /** The `X-Agent-Id` header, or null. */
  agentId: string | null;
}

/** A heartbeat or status call the server received. */
export interface PresenceRecord {
  agentId: string;
  /** The agent whose key authenticated the call. */
  caller: string;
  body: unknown;
  status?: string;
  at: number;
}

/** The SignalDock-compatible test server: REST and SSE on 127.0.0.1, state in memory. */
export declare class SignalDock {
  constructor(options?: SignalDockOptions);
  /** `http://127.0.0.1:<port>` once listening, else null. */
  url: string | null;
  heartbeatMs: number;
  sseShape: 'real' | 'snake' | 'camel';
  peekSince: 'timestamp' | 'refuse';
  eventIds: boolean;
  pushToStreams: boolean;
  silence: boolean;
  legacyIds: boolean;
  groupDelayMs: number;
  /** Setting it restarts the PRNG. */
  seed: number;
  listen(): Promise<this>;
  /** Stops listening and destroys every socket (streams, hung requests). */
  close(): Promise<void>;
  addAgent(id: string, key?: string): void;
  addKey(id: string, key: string): void;
  /** The key stops being accepted (the end of a rotation's overlap). */
  expireKey(key: string): void;
  keysOf(id: string): string[];
  /** A direct message, pushed to `to`'s open streams or queued for its peek. */
  sendDirect(from: string, to: string, content: string, extra?: Record<string, unknown>): MessageRow;
  /** Declares a conversation's members (whom a post to it fans out to); default: every
   * agent the server knows when the conversation is first posted to. */
  createConversation(conversationId: string, members: string[]): void;
  /** A post to a conversation: one copy per member but the sender, each in its member's
   * inbox and pushed to its streams. */
  postToConversation(conversationId: string, from: string, content: string, extra?: Record<string, unknown>): PostedRow;
  /** Direct messages to `agentId` still pending (not acked, not pushed). */
  pending(agentId: string): MessageRow[];
  /** Direct messages to `agentId` acked or pushed. */
  delivered(agentId: string): MessageRow[];
  /** Ids `agentId` acked, in order. */
  acked(agentId: string): string[];
  heartbeats(agentId?: string): PresenceRecord[];
  readonly statuses: PresenceRecord[];
  /** Every request received, in order. */
  readonly requests: RecordedRequest[];
  clearRequests(): void;
  /** Open streams, of one agent or all. */
  streams(agentId?: string): number;
  /** Drops open streams as a network failure would; returns how many. */
  dropStreams(agentId?: string): number;
  /** Writes raw text into open streams (all when `agentId` is null or undefined). */
  sseSendRaw(agentId: string | null | undefined, text: string): number;
  /** Adds a fault rule; unknown keys are a TypeError. */
  inject(rule: FaultRule): InjectedFault;
  clearFaults(): void;
  readonly faults: InjectedFault[];
}

/** Starts a server on 127.0.0.1, port 0; resolves once it listens. */
export declare function startSignalDock(options?: SignalDockOptions): Promise<SignalDock & { url: string }>;

/** The id of the direct conversation of two agents: both ids sorted, joined by `,`. */
export declare function dmConversationId(a: string, b: string): string;

/** A complete credential for `agentId`, dated now; `overrides` replace any field. */
export declare function testCredential(
  agentId: string,
  apiKey: string,
  apiBaseUrl: string,
  overrides?: Partial<AgentCredential>,
): AgentCredential;

/** An in-memory AgentRegistryAPI shaped like the real one: it hands out copies, and
 * `rotateKey` rotates through the server (`POST /agents/{id}/rotate-key`), stores the new
 * key and resolves with it MASKED (`'<first 8 chars>...rotated'`); `get` returns the real one. */
export declare class FakeRegistry implements AgentRegistryAPI {
  constructor(credentials?: AgentCredential[]);
  /** Every call, in order: `[method, ...arguments]`. */
  calls: unknown[][];
  register(credential: Omit<AgentCredential, 'createdAt' | 'updatedAt'>): Promise<AgentCredential>;
  get(agentId: string): Promise<AgentCredential | null>;
  list(filter?: { active?: boolean }): Promise<AgentCredential[]>;
  /** `updatedAt` becomes now unless `updates` gives it (to age a key). */
  update(agentId: string, updates: Partial<Omit<AgentCredential, 'agentId' | 'createdAt'>>): Promise<AgentCredential>;
  remove(agentId: string): Promise<void>;
  rotateKey(agentId: string): Promise<{ agentId: string; newApiKey: string }>;
  getActive(): Promise<AgentCredential | null>;
  markUsed(agentId: string): Promise<void>;
}
