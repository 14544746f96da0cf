// Type-checked with `tsc --strict --noEmit` (never run): code written the way the cleo CLI,
// the cleo dispatch layer and callers' tests use the package, with their own classes
// implementing the shared contract types. If index.d.ts drifts from the contract, this fails.
import {
  AgentPoller,
  HeartbeatService,
  KeyRotationService,
  SseConnectionService,
  createRuntime,
  setLogger,
  type AgentCredential,
  type AgentPollerConfig,
  type AgentRegistryAPI,
  type ConduitMessage,
  type HeartbeatConfig,
  type KeyRotationConfig,
  type LogFunction,
  type LogRecord,
  type Logger,
  type MessageHandler,
  type RuntimeConfig,
  type RuntimeHandle,
  type SseConnectionConfig,
  type SseMessageHandler,
  type Transport,
  type TransportConnectConfig,
} from '@cleocode/runtime';
import type { BeatNowResult, CheckNowResult, PollNowResult } from '@cleocode/runtime';
import { FakeRegistry, startSignalDock, testCredential, type InjectedFault, type MessageRow, type SignalDock } from '@cleocode/runtime/testing';

/** A caller's own registry, as in cleo's tests. */
class MemoryRegistry implements AgentRegistryAPI {
  private creds = new Map<string, AgentCredential>();
  async register(c: Omit<AgentCredential, 'createdAt' | 'updatedAt'>): Promise<AgentCredential> {
    const now = new Date().toISOString();
    const full = { ...c, createdAt: now, updatedAt: now };
    this.creds.set(c.agentId, full);
    return full;
  }
  async get(agentId: string) { return this.creds.get(agentId) ?? null; }
  async list(filter?: { active?: boolean }) {
    return [...this.creds.values()].filter((c) => filter?.active === undefined || c.isActive === filter.active);
  }
  async update(agentId: string, updates: Partial<Omit<AgentCredential, 'agentId' | 'createdAt'>>) {
    const cur = this.creds.get(agentId);
    if (!cur) throw new Error('missing');
    const next = { ...cur, ...updates, updatedAt: new Date().toISOString() };
    this.creds.set(agentId, next);
    return next;
  }
  async remove(agentId: string) { this.creds.delete(agentId); }
  async rotateKey(agentId: string) { return { agentId, newApiKey: `k-${Date.now()}` }; }
  async getActive() { return [...this.creds.values()].find((c) => c.isActive) ?? null; }
  async markUsed(_agentId: string) {}
}

/** A caller's own transport (their LocalTransport), already connected. */
class MyLocalTransport implements Transport {
  readonly name = 'local';
  async connect(_config: TransportConnectConfig): Promise<void> {}
  async disconnect(): Promise<void> {}
  async push(_to: string, _content: string, _options?: { conversationId?: string; replyTo?: string }) {
    return { messageId: 'm1' };
  }
  async poll(_options?: { limit?: number; since?: string }): Promise<ConduitMessage[]> { return []; }
  async ack(_ids: string[]): Promise<void> {}
  subscribe(handler: (message: ConduitMessage) => void): () => void {
    void handler;
    return () => {};
  }
}

// `cleo agent start <id>`
export async function agentStart(registry: AgentRegistryAPI, agentId: string): Promise<void> {
  const config: RuntimeConfig = { agentId, pollIntervalMs: 5000, heartbeatIntervalMs: 30000, groupConversationIds: ['general'] };
  const durable: RuntimeConfig = { agentId, journal: `.cleo/runtime/${agentId}.db` };
  const inMemory: RuntimeConfig = { agentId, journal: false };
  void [durable, inMemory];
  const handle: RuntimeHandle = await createRuntime(registry, config);
  handle.poller.onMessage(async (msg) => {
    const line: string = `${msg.from}: ${msg.content} (${msg.threadId ?? '-'}, ${msg.timestamp})`;
    void line;
  });
  handle.poller.start();
  const transportName: string = handle.transport.name;
  const id: string = handle.agentId;
  const heartbeat: string = handle.heartbeat ? 'running' : 'disabled';
  const rotation: string = handle.keyRotation ? 'active' : 'disabled';
  const sse: string = handle.sseConnection ? handle.sseConnection.status().transportName : 'off';
  void [transportName, id, heartbeat, rotation, sse];
  const stop: () => void = handle.stop;
  process.on('SIGINT', () => { stop(); process.exit(0); });
}

// `cleo agent watch` through dynamic import, as the CLI loads it.
export async function agentWatch(registry: AgentRegistryAPI): Promise<RuntimeHandle> {
  const { createRuntime: create } = await import('@cleocode/runtime');
  return create(registry, { transport: new MyLocalTransport(), maxKeyAgeMs: 0, createSseTransport: () => new MyLocalTransport() });
}

// The dispatch layer builds a poller directly on its own transport.
export function dispatch(apiKey: string): AgentPoller {
  const config: AgentPollerConfig = {
    agentId: 'cleo-core', apiKey, apiBaseUrl: 'https://api.signaldock.io', pollIntervalMs: 1000,
    groupConversationIds: ['ops'], transport: new MyLocalTransport(),
  };
  const poller = new AgentPoller(config);
  const handler: MessageHandler = (m: ConduitMessage) => { void m.id; };
  poller.onMessage(handler);
  poller.start();
  const s = poller.status();
  const running: boolean = s.running;
  const seen: number = s.seenCount;
  void [running, seen];
  poller.stop();
  return poller;
}

// The services on their own.
export function services(registry: AgentRegistryAPI): void {
  const hbConfig: HeartbeatConfig = { agentId: 'a', apiKey: 'k', apiBaseUrl: 'https://api.signaldock.io', intervalMs: 30000 };
  const hb = new HeartbeatService(hbConfig);
  hb.start();
  const failures: number = hb.status().consecutiveFailures;
  hb.stop();
  const krConfig: KeyRotationConfig = { agentId: 'a', registry, checkIntervalMs: 3600000, maxKeyAgeMs: 86400000 };
  const kr = new KeyRotationService(krConfig);
  kr.start();
  const last: string | null = kr.status().lastRotationAt;
  kr.stop();
  const sseConfig: SseConnectionConfig = { agentId: 'a', apiKey: 'k', apiBaseUrl: 'https://x', sseEndpoint: 'https://x/messages/stream', transport: new MyLocalTransport() };
  const sse = new SseConnectionService(sseConfig);
  const onSse: SseMessageHandler = (m) => { void m.content; };
  sse.onMessage(onSse);
  void sse.start().then(() => sse.stop());
  void [failures, last];
}

// A partial fake registry, as hand-written tests use, is enough for createRuntime.
export async function partialRegistry(cred: AgentCredential): Promise<void> {
  const handle = await createRuntime({ get: async () => cred, getActive: async () => cred, rotateKey: async (agentId) => ({ agentId, newApiKey: 'n' }) });
  handle.stop();
}

/** A logger shaped like pino's: overloaded methods, (fields, message), `bindings()`. */
interface PinoShaped {
  bindings(): Record<string, unknown>;
  trace: PinoLogFn; debug: PinoLogFn; info: PinoLogFn; warn: PinoLogFn; error: PinoLogFn;
}
interface PinoLogFn {
  <T extends object>(obj: T, msg?: string, ...args: unknown[]): void;
  (msg: string, ...args: unknown[]): void;
}

// The application's logger: console, a pino- or winston-shaped object, or a function.
export function logging(registry: AgentRegistryAPI, pino: PinoShaped): void {
  setLogger(console);
  setLogger(pino);
  const toStdout: LogFunction = (record: LogRecord) => {
    const line: string = `${record.level} ${record.target} ${record.message} ${JSON.stringify(record.fields)}`;
    process.stdout.write(`${line}\n`);
  };
  setLogger(toStdout);
  setLogger(null);
  const winstonShaped: Logger = { debug: (m: string, meta?: object) => { void [m, meta]; }, info() {}, warn() {}, error() {} };
  void createRuntime(registry, { logger: winstonShaped }).then((h) => h.stop());
  void createRuntime(registry, { logger: async (r) => { void r.fields.agentId; } }).then((h) => h.stop());
}

// The clock-free hooks, and the testing subpath, as a user's test writes them.
export async function hooks(): Promise<void> {
  const sd = await startSignalDock({ agents: { bob: ['key-b', 'key-b2'] }, seed: 7 });
  const server: SignalDock = sd; // startSignalDock's url is a string: it listens
  const url: string = sd.url;
  const registry = new FakeRegistry([testCredential('bob', 'key-b', url, { transportType: 'sse' })]);
  const handle = await createRuntime(registry, { pollIntervalMs: 3_600_000 });
  handle.poller.onMessage((m) => { void m.id; });
  const row: MessageRow = sd.sendDirect('alice', 'bob', 'hi');
  const polled: PollNowResult = await handle.poller.pollNow();
  const handled: number = polled.handled;
  const beat: BeatNowResult | undefined = await handle.heartbeat?.beatNow();
  const checked: CheckNowResult | undefined = await handle.keyRotation?.checkNow();
  const fault: InjectedFault = sd.inject({ path: /^\/messages\//, status: 503, every: 3, times: Infinity });
  const hits: number = fault.hits;
  // @ts-expect-error a typo in a fault rule is a type error
  sd.inject({ pth: '/messages/peek' });
  handle.stop();
  await sd.close();
  void [row.id, handled, beat?.ok, checked?.rotated, hits, server.url];
}
