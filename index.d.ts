// Type declarations for @cleocode/runtime, the native daemon layer for resident CLEO agents.
// Written by hand (not generated) because the contract includes the shared types of
// @cleocode/contracts, which callers implement themselves: TypeScript is structural, so a
// caller's own Transport or AgentRegistryAPI class type-checks wherever one is expected.

// ---------------------------------------------------------------------------------------
// Shared contract types (compatible with @cleocode/contracts)
// ---------------------------------------------------------------------------------------

/** A message as handlers receive it. */
export interface ConduitMessage {
  /** Server-assigned message id; a message is delivered to the handler once per id. */
  id: string;
  /** Sender's agent id (`'unknown'` when the server did not say). */
  from: string;
  /** Message text. */
  content: string;
  /** Free-form labels, when the transport supplies them. */
  tags?: string[];
  /** Conversation the message belongs to (for a group mention, the group's id by default). */
  threadId?: string;
  /** Group conversation the message was read from, for group @mentions. */
  groupId?: string;
  /** When the message was created, ISO 8601. */
  timestamp: string;
  /** Extra data the server attached. */
  metadata?: Record<string, unknown>;
}

/** Transport settings stored with a credential. */
export interface TransportConfig {
  /** Poll interval for this agent, used when RuntimeConfig.pollIntervalMs is not given. */
  pollIntervalMs?: number;
  /** Absolute URL of the SSE stream; its presence enables the realtime path. */
  sseEndpoint?: string;
  /** WebSocket URL (reserved; not used by this runtime). */
  wsUrl?: string;
  /** Alternative poll endpoint (reserved; not used by this runtime). */
  pollEndpoint?: string;
  /** Second SignalDock base URL to fail over to when the first cannot be reached. */
  apiBaseUrlFallback?: string;
}

/** What `Transport.connect()` receives. */
export interface TransportConnectConfig extends TransportConfig {
  /** The agent this connection acts as. */
  agentId: string;
  /** The agent's API key (sent only in the Authorization header). */
  apiKey: string;
  /** SignalDock base URL, e.g. `https://api.signaldock.io`, or `local`. */
  apiBaseUrl: string;
}

/** Something that carries messages: HTTP, SSE, the local signaldock.db, or your own. */
export interface Transport {
  /** Short name: `'http'`, `'sse'`, `'local'`, or your own. */
  readonly name: string;
  /** Opens the transport. */
  connect(config: TransportConnectConfig): Promise<void>;
  /** Closes the transport. */
  disconnect(): Promise<void>;
  /** Sends a message to an agent, or to a conversation when `options.conversationId` is set. */
  push(
    to: string,
    content: string,
    options?: { conversationId?: string; replyTo?: string },
  ): Promise<{ messageId: string }>;
  /** Pending messages for this agent, oldest first. */
  poll(options?: { limit?: number; since?: string }): Promise<ConduitMessage[]>;
  /** Marks messages handled so they are not offered again. */
  ack(messageIds: string[]): Promise<void>;
  /** Realtime delivery, when the transport has it; returns an unsubscribe function. */
  subscribe?(handler: (message: ConduitMessage) => void): () => void;
}

/** An agent's stored credential. */
export interface AgentCredential {
  /** Agent id. */
  agentId: string;
  /** Human-readable name. */
  displayName: string;
  /** API key for SignalDock. */
  apiKey: string;
  /** SignalDock base URL (`http…`), or `local` for the embedded signaldock.db. */
  apiBaseUrl: string;
  /** Optional classification label. */
  classification?: string;
  /** Who may discover the agent. */
  privacyTier: 'public' | 'discoverable' | 'private';
  /** Declared capabilities. */
  capabilities: string[];
  /** Declared skills. */
  skills: string[];
  /** Preferred transport. */
  transportType: 'http' | 'sse' | 'websocket';
  /** Transport settings. */
  transportConfig: TransportConfig;
  /** Whether this is an active credential. */
  isActive: boolean;
  /** Last use, ISO 8601. */
  lastUsedAt?: string;
  /** Creation time, ISO 8601. */
  createdAt: string;
  /** Last update (the key's age is measured from here), ISO 8601. */
  updatedAt: string;
}

/** The credential store. The runtime calls `get`, `getActive` and `rotateKey`. */
export interface AgentRegistryAPI {
  /** Stores a new credential. */
  register(credential: Omit<AgentCredential, 'createdAt' | 'updatedAt'>): Promise<AgentCredential>;
  /** The credential of `agentId`, or null. */
  get(agentId: string): Promise<AgentCredential | null>;
  /** All credentials, optionally only active ones. */
  list(filter?: { active?: boolean }): Promise<AgentCredential[]>;
  /** Updates a credential. */
  update(agentId: string, updates: Partial<Omit<AgentCredential, 'agentId' | 'createdAt'>>): Promise<AgentCredential>;
  /** Deletes a credential. */
  remove(agentId: string): Promise<void>;
  /** Issues a new API key for `agentId`. */
  rotateKey(agentId: string): Promise<{ agentId: string; newApiKey: string }>;
  /** The active credential, or null. */
  getActive(): Promise<AgentCredential | null>;
  /** Records that `agentId` was used. */
  markUsed(agentId: string): Promise<void>;
}

// ---------------------------------------------------------------------------------------
// Package types
// ---------------------------------------------------------------------------------------

/** Receives each message once. May be async: the next message waits for it to settle. A
 * handler that throws or rejects is reported and counted; the loop goes on. */
export type MessageHandler = (message: ConduitMessage) => void;
/** Receives each message pushed over SSE. */
export type SseMessageHandler = (message: ConduitMessage) => void;

/** `createRuntime` options. */
export interface RuntimeConfig {
  /** Which agent; default `registry.getActive()`. */
  agentId?: string;
  /** Poll interval; default the credential's `transportConfig.pollIntervalMs`, else 5000. */
  pollIntervalMs?: number;
  /** Group conversations to watch for @mentions. */
  groupConversationIds?: string[];
  /** Recent messages read per group per poll; default 15. */
  groupPollLimit?: number;
  /** Heartbeat interval; default 30000; 0 disables the heartbeat. */
  heartbeatIntervalMs?: number;
  /** Rotate the key when older than this; default 30 days; 0 disables rotation. */
  maxKeyAgeMs?: number;
  /** SSE stream URL; default the credential's `transportConfig.sseEndpoint`. */
  sseEndpoint?: string;
  /** Builds the SSE transport; without it the native one is used. */
  createSseTransport?: () => Transport;
  /** A transport not yet connected; createRuntime connects it. Default: resolved natively. */
  transport?: Transport;
  /** Where this runtime's log records go; default the logger given to `setLogger`, else
   * stderr. */
  logger?: Logger | LogFunction | null;
  /** The journal: a SQLite file (one per agent) where every message the runtime takes is
   * recorded before it counts as received and marked handled once its handler settles, so
   * nothing is lost across `stop()`, a crash or a restart, and a restart neither re-handles
   * what was handled nor skips group mentions posted while nothing ran. A path (relative to
   * the working directory), or `false` for none. Default: `<CLEO_DIR>/runtime/<agentId>.db`
   * when `CLEO_DIR` is set, else `<cwd>/.cleo/runtime/<agentId>.db` when `<cwd>/.cleo`
   * exists, else none (delivery state in memory only). One running runtime per journal: a
   * second one rejects. A message offered again after a crash in the middle of its handler
   * carries `metadata.redelivered: true`. */
  journal?: string | false;
}

/** What `createRuntime` resolves to. */
export interface RuntimeHandle {
  /** The poller: register the handler with `poller.onMessage`. */
  poller: AgentPoller;
  /** The heartbeat (REST; into signaldock.db for a local runtime), or null when disabled or
   * when a transport of your own has no http(s) base URL to beat to. */
  heartbeat: HeartbeatService | null;
  /** Key rotation, or null when disabled. */
  keyRotation: KeyRotationService | null;
  /** The SSE connection, or null when no SSE endpoint is known. */
  sseConnection: SseConnectionService | null;
  /** The transport in use (the caller's own when one was given). */
  transport: Transport;
  /** The agent this runtime runs as. */
  agentId: string;
  /** Stops everything (SSE, heartbeat, key rotation, poller, transport); never throws.
   * Afterwards the process may exit by itself. Until then the runtime runs whether or not
   * this handle is still referenced (it is a GC root, like a timer), and it stops by itself
   * when its worker thread (its Node environment) ends. */
  stop: () => void;
}

/** `new AgentPoller(config)`. */
export interface AgentPollerConfig {
  /** The agent to poll for. Like every `agentId`: no newline, CR, NUL or other control
   * character (it travels in the `X-Agent-Id` header); else a `TypeError`. */
  agentId: string;
  /** Its API key. */
  apiKey: string;
  /** SignalDock base URL (required to be http(s) without a transport or with groups). */
  apiBaseUrl: string;
  /** Interval between poll cycles; default 5000. */
  pollIntervalMs?: number;
  /** Group conversations to watch for @mentions. */
  groupConversationIds?: string[];
  /** Recent messages read per group per poll; default 15. */
  groupPollLimit?: number;
  /** Direct messages come from `transport.poll()` when given, else the SignalDock peek. */
  transport?: Transport;
}

/** `new HeartbeatService(config)`. */
export interface HeartbeatConfig {
  /** The agent reporting presence. */
  agentId: string;
  /** Its API key. */
  apiKey: string;
  /** SignalDock base URL. */
  apiBaseUrl: string;
  /** Interval between beats; default 30000. */
  intervalMs?: number;
}

/** `new KeyRotationService(config)`. */
export interface KeyRotationConfig {
  /** The agent whose key rotates. */
  agentId: string;
  /** Where credentials live; `get` and `rotateKey` are called. */
  registry: Pick<AgentRegistryAPI, 'get' | 'rotateKey'>;
  /** Interval between checks; default 3600000 (1 h). The first check is 5 s after start. */
  checkIntervalMs?: number;
  /** Rotate when the key is older than this; default 2592000000 (30 days). */
  maxKeyAgeMs?: number;
}

/** `new SseConnectionService(config)`. */
export interface SseConnectionConfig {
  /** The agent receiving messages. */
  agentId: string;
  /** Its API key. */
  apiKey: string;
  /** SignalDock base URL. */
  apiBaseUrl: string;
  /** SSE stream URL. */
  sseEndpoint?: string;
  /** The transport to connect and subscribe to. */
  transport: Transport;
}

/** `AgentPoller.status()`. */
export interface AgentPollerStatus {
  /** Whether the poller is started. */
  running: boolean;
  /** Message ids remembered for dedup. */
  seenCount: number;
  /** Handler calls that settled successfully. */
  delivered: number;
  /** Handler calls that threw or rejected. */
  failed: number;
  /** Rows skipped because they could not be mapped to a message. */
  malformed: number;
  /** Poll cycles run. */
  polls: number;
  /** When the last cycle ran, ISO 8601. */
  lastPollAt?: string;
  /** The last failure (a track, an ack or a handler), without secrets. */
  lastError?: string;
  /** Whether the realtime path (SSE) is up, slowing direct polling. */
  realtime: boolean;
  /** Handled direct messages whose ack is still to be sent. */
  pendingAcks: number;
}

/** What `AgentPoller.pollNow()` resolves with. */
export interface PollNowResult {
  /** Handler calls that returned or resolved between the call and the answer (whichever
   * path brought the message). */
  handled: number;
  /** Handler calls that threw or rejected in the same span. */
  failed: number;
  /** Tracks that failed or waited out a `Retry-After` (`direct: …`, `group <id>: …`),
   * without secrets; empty when every track answered. */
  errors: string[];
}

/** Polls SignalDock for direct messages and group @mentions. */
export declare class AgentPoller {
  constructor(config: AgentPollerConfig);
  /** Sets THE handler (a second call replaces the first). */
  onMessage(handler: MessageHandler | ((message: ConduitMessage) => Promise<void>)): void;
  /** Starts polling: one cycle now, then one every `pollIntervalMs`. Idempotent. From here
   * until `stop()` the poller is a GC root (like a timer): it runs without any reference to
   * it, and stops by itself when its Node environment (worker thread) ends. */
  start(): void;
  /** Stops at once. Idempotent; no handler call after it returns. The poller, its handler
   * and its transport are collectable again. */
  stop(): void;
  /** Counters and state. */
  status(): AgentPollerStatus;
  /** One poll cycle over every track now (direct messages and every group, except a track
   * waiting out a `Retry-After`), then the next pages at once while pages come back full
   * and, after a full page, another round once what it found has been acked (one second's
   * ties can only be paged past then). Resolves once everything it found has been handled
   * (an async handler awaited) and acked. Needs no clock, unlike fake timers, which cannot
   * reach the runtime's: the hook for tests. The schedule is left alone. Rejects when the
   * poller is not running, has no handler yet, or is stopped before it completes. */
  pollNow(): Promise<PollNowResult>;
}

/** `HeartbeatService.status()`. */
export interface HeartbeatStatus {
  /** Whether the service is started. */
  running: boolean;
  /** Failed beats since the last successful one. */
  consecutiveFailures: number;
  /** Beats sent. */
  beats: number;
  /** The last failure. */
  lastError?: string;
}

/** What `HeartbeatService.beatNow()` resolves with. */
export interface BeatNowResult {
  /** The beat succeeded (the server answered 2xx). */
  ok: boolean;
  /** Why the beat failed, without secrets. */
  error?: string;
  /** Failed beats in a row, this one included. */
  consecutiveFailures: number;
}

/** Reports presence with `POST /agents/{id}/heartbeat` (a local runtime's heartbeat writes the
 * agent's row of signaldock.db instead). */
export declare class HeartbeatService {
  constructor(config: HeartbeatConfig);
  /** One beat now, then one per interval; resets the failure count. Idempotent. A GC root
   * until `stop()` (or the end of its Node environment). */
  start(): void;
  /** Stops. Idempotent. */
  stop(): void;
  /** Counters and state. */
  status(): HeartbeatStatus;
  /** One beat now (a beat already starting at this instant may answer for it); resolves
   * with its outcome. The schedule is left alone. Rejects when not running or stopped
   * before the beat completes. */
  beatNow(): Promise<BeatNowResult>;
}

/** `KeyRotationService.status()`. */
export interface KeyRotationStatus {
  /** Whether the service is started. */
  running: boolean;
  /** When this service last rotated the key, ISO 8601, or null. */
  lastRotationAt: string | null;
  /** Checks run. */
  checks: number;
  /** Rotations done. */
  rotations: number;
  /** The last failure. */
  lastError?: string;
}

/** What `KeyRotationService.checkNow()` resolves with. */
export interface CheckNowResult {
  /** The key was older than `maxKeyAgeMs` and `registry.rotateKey` was called. */
  rotated: boolean;
  /** The registry held a newer key (rotated elsewhere), which the runtime now uses. */
  adopted: boolean;
  /** Why the check failed (the registry threw), without secrets. */
  error?: string;
}

/** Rotates the API key before it expires. */
export declare class KeyRotationService {
  constructor(config: KeyRotationConfig);
  /** First check 5 s from now, then every `checkIntervalMs`. Idempotent. A GC root until
   * `stop()` (or the end of its Node environment), and so is its registry. */
  start(): void;
  /** Stops, including a pending first check. Idempotent. */
  stop(): void;
  /** Counters and state. */
  status(): KeyRotationStatus;
  /** One check now (also before the first scheduled one); resolves with what it did. The
   * schedule is left alone. Rejects when not running or stopped before it completes. */
  checkNow(): Promise<CheckNowResult>;
}

/** `SseConnectionService.status()`. */
export interface SseConnectionStatus {
  /** Whether the service is started. */
  running: boolean;
  /** The transport's name. */
  transportName: string;
  /** The native stream's state (`connecting`, `connected`, `reconnecting`, `closed`), when
   * the runtime's own SSE transport is in use. */
  state?: 'connecting' | 'connected' | 'reconnecting' | 'closed';
  /** Reconnects of the native stream. */
  reconnects?: number;
  /** When the native stream last received anything, ISO 8601. */
  lastEventAt?: string;
  /** Handler calls that settled, when the service calls its own `onMessage` handler. */
  delivered?: number;
  /** Handler calls that threw or rejected, when the service calls its own handler. */
  failed?: number;
}

/** Keeps a transport's realtime subscription and forwards its messages to a handler. */
export declare class SseConnectionService {
  constructor(config: SseConnectionConfig);
  /** Sets the handler (also after start). */
  onMessage(handler: SseMessageHandler): void;
  /** Connects the transport and subscribes. Idempotent. A GC root until `stop()` (or the end
   * of its Node environment), and so are its transport and handler. */
  start(): Promise<void>;
  /** Unsubscribes and disconnects. */
  stop(): Promise<void>;
  /** State. */
  status(): SseConnectionStatus;
}

/** SignalDock REST as a Transport (push, peek-based poll, ack), with base-URL failover. */
export declare class HttpTransport implements Transport {
  constructor();
  readonly name: 'http';
  connect(config: TransportConnectConfig): Promise<void>;
  disconnect(): Promise<void>;
  push(to: string, content: string, options?: { conversationId?: string; replyTo?: string }): Promise<{ messageId: string }>;
  poll(options?: { limit?: number; since?: string }): Promise<ConduitMessage[]>;
  ack(messageIds: string[]): Promise<void>;
}

/** The registry methods the runtime calls; any full AgentRegistryAPI fits. */
export type RuntimeRegistry = Pick<AgentRegistryAPI, 'get' | 'getActive' | 'rotateKey'>;

/** `SseTransport.status()`. */
export interface SseTransportStatus {
  /** `connecting`, `connected`, `reconnecting` or `closed`. */
  state: 'connecting' | 'connected' | 'reconnecting' | 'closed';
  /** Reconnects since connect. */
  reconnects: number;
  /** When the stream last received anything (data, heartbeat), ISO 8601. */
  lastEventAt?: string;
  /** Messages the stream delivered. */
  delivered: number;
  /** Frames skipped because they could not be read as a message. */
  malformed: number;
  /** The last connection failure, without secrets. */
  lastError?: string;
  /** Stream messages waiting for `poll()` (nobody subscribed). */
  buffered: number;
}

/** SignalDock's realtime path as a Transport: an SSE stream authenticated by headers (never a
 * key in the URL) that reconnects for ever with jittered backoff, plus REST for push, peek
 * and ack. `poll()` returns what the stream delivered plus what the server queued. */
export declare class SseTransport implements Transport {
  constructor();
  readonly name: 'sse';
  /** Opens the stream. While it is open (until `disconnect()`, or the end of its Node
   * environment) the transport is a GC root and keeps the process alive. */
  connect(config: TransportConnectConfig): Promise<void>;
  disconnect(): Promise<void>;
  push(to: string, content: string, options?: { conversationId?: string; replyTo?: string }): Promise<{ messageId: string }>;
  poll(options?: { limit?: number; since?: string }): Promise<ConduitMessage[]>;
  ack(messageIds: string[]): Promise<void>;
  subscribe(handler: (message: ConduitMessage) => void): () => void;
  /** The stream's state and counters. */
  status(): SseTransportStatus;
}

/** `new LocalTransport(options?)`. */
export interface LocalTransportOptions {
  /** The database file; default `$CLEO_DIR/signaldock.db`, else `<cwd>/.cleo/signaldock.db`. */
  dbPath?: string;
}

/** The embedded local SignalDock (`signaldock.db`), shared with the cleo CLI and other
 * agents' processes. Rows other processes commit reach `subscribe` handlers (and a runtime's
 * handler) within milliseconds, whatever the poll interval. */
export declare class LocalTransport implements Transport {
  constructor(options?: LocalTransportOptions);
  readonly name: 'local';
  /** The database file this transport uses. */
  readonly dbPath: string;
  /** Creates the file, the `conversations` and `messages` tables and the cleo CLI's indexes on
   * `messages` when missing (never touching other tables); resolves with the path. */
  static ensureSchema(dbPath?: string): Promise<string>;
  connect(config: TransportConnectConfig): Promise<void>;
  disconnect(): Promise<void>;
  push(to: string, content: string, options?: { conversationId?: string; replyTo?: string }): Promise<{ messageId: string }>;
  poll(options?: { limit?: number; since?: string }): Promise<ConduitMessage[]>;
  ack(messageIds: string[]): Promise<void>;
  /** Delivers pending messages as they are committed, acking each once its handler settled.
   * While a subscription is live (until unsubscribed or `disconnect()`, or the end of its
   * Node environment) the transport is a GC root and keeps the process alive. */
  subscribe(handler: (message: ConduitMessage) => void | Promise<void>): () => void;
}

/** Starts a resident agent runtime for the registry's (active or named) agent: resolves the
 * credential, connects the transport, starts polling (handler-less until `onMessage`), the
 * heartbeat, key rotation and the SSE path. */
export declare function createRuntime(registry: RuntimeRegistry, config?: RuntimeConfig): Promise<RuntimeHandle>;

/** The level of a log record. */
export type LogLevel = 'trace' | 'debug' | 'info' | 'warn' | 'error';

/** One log record, as a `LogFunction` receives it. */
export interface LogRecord {
  level: LogLevel;
  /** The Rust module that logged it, e.g. `cleo_runtime::core::sse`. */
  target: string;
  message: string;
  /** The record's fields (`error`, `status`, …); a runtime's records also carry `agentId`. */
  fields: Record<string, string | number | boolean | null>;
}

/** A logger object; pino, winston and `console` all fit. Called as
 * `logger[level](message, fields)`, or `logger[level](fields, message)` when it has a
 * `bindings()` method (pino). `trace` is used when present, else `debug`. */
export interface Logger {
  trace?(...args: any[]): unknown;
  debug(...args: any[]): unknown;
  info(...args: any[]): unknown;
  warn(...args: any[]): unknown;
  error(...args: any[]): unknown;
}

/** A function logger: called with each record. */
export type LogFunction = (record: LogRecord) => unknown;

/** Sends the log records of every runtime without its own `RuntimeConfig.logger` (and of
 * standalone services) to `logger`; `null` or `undefined` sends them back to stderr. The
 * level filter stays `CLEO_RUNTIME_LOG` (default `warn`). Throws a `TypeError` for anything
 * that is not a logger. */
export declare function setLogger(logger: Logger | LogFunction | null | undefined): void;
