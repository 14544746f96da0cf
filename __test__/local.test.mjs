// LocalTransport (the embedded signaldock.db, WIRE.md "Local SignalDock") and the local
// runtime, through the package entry. Other processes are played by python3's sqlite3, the
// way the cleo CLI and other agents write the same file.
import { spawn, spawnSync } from 'node:child_process';
import { createInterface } from 'node:readline';
import { existsSync, mkdirSync, mkdtempSync, realpathSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { HeartbeatService, LocalTransport, createRuntime } from '@cleocode/runtime';
import { FakeRegistry, credential, sleep, waitFor } from './support/helpers.mjs';

const NOT_CONNECTED = 'LocalTransport is not connected: call connect() first';
const connectAs = (agentId) => ({ agentId, apiKey: '', apiBaseUrl: 'local' });

let dir;
let dbPath;
let savedCleoDir;
const cleanup = [];
beforeEach(() => {
  dir = realpathSync(mkdtempSync(join(tmpdir(), 'cleo-local-')));
  dbPath = join(dir, '.cleo', 'signaldock.db');
  savedCleoDir = process.env.CLEO_DIR;
  delete process.env.CLEO_DIR;
});
afterEach(async () => {
  for (const stop of cleanup.splice(0).reverse()) {
    try { await stop(); } catch { /* best effort */ }
  }
  if (savedCleoDir === undefined) delete process.env.CLEO_DIR;
  else process.env.CLEO_DIR = savedCleoDir;
  rmSync(dir, { recursive: true, force: true });
});

/** Runs a python3 script with sqlite3 against `db`; returns its stdout parsed as JSON. */
function py(db, body, ...args) {
  const script = `import sqlite3, sys, json, time, uuid\ndb = sqlite3.connect(sys.argv[1], timeout=5)\n${body}\n`;
  const out = spawnSync('python3', ['-c', script, db, ...args.map(String)], { encoding: 'utf8' });
  if (out.status !== 0) throw new Error(`python3 failed (${out.status}): ${out.stderr}`);
  return out.stdout.trim() ? JSON.parse(out.stdout) : null;
}

/** Another process writes a pending row for `to` (and its conversation), committed on return. */
function insertFromOtherProcess(db, { from = 'carol', to = 'alice', content = 'from python', createdAt = null, status = 'pending' } = {}) {
  return py(db, `
frm, to, content, created, status = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
now = int(time.time()) if created == '' else int(created)
conv = ','.join(sorted([frm, to]))
mid = str(uuid.uuid4())
db.execute("INSERT OR IGNORE INTO conversations (id, participants, visibility, message_count, created_at, updated_at) VALUES (?, ?, 'private', 0, ?, ?)", ('conv:' + conv, conv, now, now))
db.execute("INSERT INTO messages (id, conversation_id, from_agent_id, to_agent_id, content, status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)", (mid, 'conv:' + conv, frm, to, content, status, now))
db.execute("UPDATE conversations SET message_count = message_count + 1, last_message_at = ?, updated_at = ? WHERE id = ?", (now, now, 'conv:' + conv))
db.commit()
print(json.dumps({'id': mid, 'conversationId': 'conv:' + conv, 'createdAt': now}))
`, from, to, content, createdAt ?? '', status);
}

function row(db, id) {
  return py(db, `
db.row_factory = sqlite3.Row
r = db.execute('SELECT * FROM messages WHERE id = ?', (sys.argv[2],)).fetchone()
print(json.dumps(dict(r) if r else None))
`, id);
}

/**
 * A python3 process that commits `count` pending messages for `to`, one every ~gapMs (with
 * jitter, so the inserts do not phase-lock with any polling), and reports each commit's wall
 * clock time. Resolves with [{ id, at }] once it exits.
 */
function insertSeries(db, { to = 'alice', count, gapMs = 40 }) {
  const script = `
import sqlite3, sys, json, time, uuid, random
db = sqlite3.connect(sys.argv[1], timeout=5, isolation_level=None)
to, count, gap = sys.argv[2], int(sys.argv[3]), float(sys.argv[4]) / 1000
conv = ','.join(sorted(['carol', to]))
for i in range(count):
    now = int(time.time())
    mid = str(uuid.uuid4())
    db.execute('BEGIN IMMEDIATE')
    db.execute("INSERT OR IGNORE INTO conversations (id, participants, visibility, message_count, created_at, updated_at) VALUES (?, ?, 'private', 0, ?, ?)", ('conv:' + conv, conv, now, now))
    db.execute("INSERT INTO messages (id, conversation_id, from_agent_id, to_agent_id, content, created_at) VALUES (?, ?, 'carol', ?, ?, ?)", (mid, 'conv:' + conv, to, 'series %d' % i, now))
    db.execute('COMMIT')
    print(json.dumps({'id': mid, 'at': time.time() * 1000}), flush=True)
    time.sleep(gap * (0.5 + random.random()))
`;
  return new Promise((resolve, reject) => {
    const child = spawn('python3', ['-c', script, db, to, String(count), String(gapMs)], { stdio: ['ignore', 'pipe', 'pipe'] });
    const commits = [];
    let stderr = '';
    createInterface({ input: child.stdout }).on('line', (line) => commits.push(JSON.parse(line)));
    child.stderr.on('data', (d) => { stderr += d; });
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve(commits) : reject(new Error(`python3 exited ${code}: ${stderr}`))));
  });
}

function percentile(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];
}

/** Latencies (ms) from each commit in another process to its delivery here. */
function latencies(commits, receivedAt) {
  return commits.map((c) => {
    const at = receivedAt.get(c.id);
    if (at === undefined) throw new Error(`message ${c.id} was never delivered`);
    return at - c.at;
  }).sort((a, b) => a - b);
}

function report(label, sorted) {
  const f = (n) => n.toFixed(1);
  // Printed on purpose: the figures go into the report.
  console.log(`[latency] ${label}: n=${sorted.length} min=${f(sorted[0])} p50=${f(percentile(sorted, 50))} p90=${f(percentile(sorted, 90))} p99=${f(percentile(sorted, 99))} max=${f(sorted.at(-1))} ms`);
}

async function connected(agentId, path = dbPath) {
  const t = new LocalTransport({ dbPath: path });
  await t.connect(connectAs(agentId));
  cleanup.push(() => t.disconnect());
  return t;
}

const WIRE_COLUMNS = {
  conversations: [
    ['id', 'TEXT', 0, null, 1], ['participants', 'TEXT', 1, null, 0],
    ['visibility', 'TEXT', 1, "'private'", 0], ['message_count', 'INTEGER', 1, '0', 0],
    ['last_message_at', 'INTEGER', 0, null, 0], ['created_at', 'INTEGER', 1, null, 0],
    ['updated_at', 'INTEGER', 1, null, 0],
  ],
  messages: [
    ['id', 'TEXT', 0, null, 1], ['conversation_id', 'TEXT', 1, null, 0],
    ['from_agent_id', 'TEXT', 1, null, 0], ['to_agent_id', 'TEXT', 1, null, 0],
    ['content', 'TEXT', 1, null, 0], ['content_type', 'TEXT', 1, "'text'", 0],
    ['status', 'TEXT', 1, "'pending'", 0], ['attachments', 'TEXT', 1, "'[]'", 0],
    ['group_id', 'TEXT', 0, null, 0], ['metadata', 'TEXT', 0, "'{}'", 0],
    ['reply_to', 'TEXT', 0, null, 0], ['created_at', 'INTEGER', 1, null, 0],
    ['delivered_at', 'INTEGER', 0, null, 0], ['read_at', 'INTEGER', 0, null, 0],
  ],
};

/** The indexes on `messages` of the cleo CLI's signaldock.db (signaldock-storage's
 * `2026-03-28-000000_initial` migration), as SQLite keeps them: [name, table, sql]. */
const REAL_INDEXES = [
  ['idx_messages_group_id', 'messages', 'CREATE INDEX idx_messages_group_id ON messages(group_id) WHERE group_id IS NOT NULL'],
  ['idx_messages_reply_to', 'messages', 'CREATE INDEX idx_messages_reply_to ON messages(reply_to) WHERE reply_to IS NOT NULL'],
  ['messages_conversation_idx', 'messages', 'CREATE INDEX messages_conversation_idx ON messages(conversation_id)'],
  ['messages_created_at_idx', 'messages', 'CREATE INDEX messages_created_at_idx ON messages(created_at)'],
  ['messages_from_agent_idx', 'messages', 'CREATE INDEX messages_from_agent_idx ON messages(from_agent_id)'],
  ['messages_to_agent_idx', 'messages', 'CREATE INDEX messages_to_agent_idx ON messages(to_agent_id)'],
];

/** Every index with a definition (not SQLite's own primary-key ones), by name. */
function indexes(db) {
  return py(db, `print(json.dumps([list(r) for r in db.execute("SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL ORDER BY name")]))`);
}

describe('LocalTransport.ensureSchema', () => {
  it('creates the file, its directory and exactly the two tables of WIRE.md, in WAL mode', async () => {
    expect(existsSync(dbPath)).toBe(false);
    await expect(LocalTransport.ensureSchema(dbPath)).resolves.toBe(dbPath);
    expect(existsSync(dbPath)).toBe(true);
    const info = py(dbPath, `
tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
cols = {t: [list(r[1:]) for r in db.execute('PRAGMA table_info(%s)' % t)] for t in tables}
fks = [list(r[2:5]) for r in db.execute('PRAGMA foreign_key_list(messages)')]
mode = db.execute('PRAGMA journal_mode').fetchone()[0]
print(json.dumps({'tables': tables, 'cols': cols, 'fks': fks, 'mode': mode}))
`);
    expect(info.tables).toEqual(['conversations', 'messages']);
    expect(info.cols).toEqual(WIRE_COLUMNS);
    expect(info.fks).toEqual([['conversations', 'conversation_id', 'id']]);
    expect(info.mode).toBe('wal');
    expect(indexes(dbPath)).toEqual(REAL_INDEXES);
  });

  it('adds the real indexes to tables an earlier ensureSchema made without them; idempotent; nothing else', async () => {
    mkdirSync(join(dir, '.cleo'));
    // The two tables as WIRE.md gives them, no index; a row; somebody else's table and index.
    py(dbPath, `
db.executescript("""
CREATE TABLE conversations (id TEXT PRIMARY KEY, participants TEXT NOT NULL, visibility TEXT NOT NULL DEFAULT 'private',
  message_count INTEGER NOT NULL DEFAULT 0, last_message_at INTEGER, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);
CREATE TABLE messages (id TEXT PRIMARY KEY, conversation_id TEXT NOT NULL REFERENCES conversations(id),
  from_agent_id TEXT NOT NULL, to_agent_id TEXT NOT NULL, content TEXT NOT NULL, content_type TEXT NOT NULL DEFAULT 'text',
  status TEXT NOT NULL DEFAULT 'pending', attachments TEXT NOT NULL DEFAULT '[]', group_id TEXT, metadata TEXT DEFAULT '{}',
  reply_to TEXT, created_at INTEGER NOT NULL, delivered_at INTEGER, read_at INTEGER);
CREATE TABLE agents (id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, status TEXT);
CREATE INDEX agents_by_status ON agents(status);
INSERT INTO conversations VALUES ('c1', 'alice,bob', 'private', 1, 1, 1, 1);
INSERT INTO messages (id, conversation_id, from_agent_id, to_agent_id, content, created_at) VALUES ('m1', 'c1', 'bob', 'alice', 'kept', 1);
""")
`);
    const agentsIndex = ['agents_by_status', 'agents', 'CREATE INDEX agents_by_status ON agents(status)'];
    expect(indexes(dbPath)).toEqual([agentsIndex]);
    await LocalTransport.ensureSchema(dbPath);
    await LocalTransport.ensureSchema(dbPath);
    expect(indexes(dbPath)).toEqual([agentsIndex, ...REAL_INDEXES]);
    expect(row(dbPath, 'm1')).toMatchObject({ content: 'kept', status: 'pending' });
  });

  it('leaves a pre-existing unrelated table (schema, rows, index) exactly as it was', async () => {
    mkdirSync(join(dir, '.cleo'));
    const snapshot = `
rows = [list(r) for r in db.execute('SELECT * FROM agents ORDER BY id')]
master = [list(r) for r in db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master WHERE tbl_name = 'agents' ORDER BY name")]
print(json.dumps({'rows': rows, 'master': master}))
`;
    py(dbPath, `
db.execute('CREATE TABLE agents (id TEXT PRIMARY KEY, name TEXT NOT NULL, created_at INTEGER)')
db.execute('CREATE INDEX agents_by_name ON agents(name)')
db.executemany('INSERT INTO agents VALUES (?, ?, ?)', [('a1', 'Alice', 1), ('b2', 'Bob', 2)])
db.commit()
`);
    const before = py(dbPath, snapshot);
    expect(before.rows).toEqual([['a1', 'Alice', 1], ['b2', 'Bob', 2]]);
    await LocalTransport.ensureSchema(dbPath);
    await LocalTransport.ensureSchema(dbPath);
    expect(py(dbPath, snapshot)).toEqual(before);
    const tables = py(dbPath, `print(json.dumps([r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]))`);
    expect(tables).toEqual(['agents', 'conversations', 'messages']);
  });

  it('is idempotent on a live file: existing messages survive', async () => {
    await LocalTransport.ensureSchema(dbPath);
    const alice = await connected('alice');
    const { messageId } = await alice.push('bob', 'keep me');
    await LocalTransport.ensureSchema(dbPath);
    expect(row(dbPath, messageId)).toMatchObject({ content: 'keep me', status: 'pending' });
  });

  it('without a path it uses $CLEO_DIR/signaldock.db, else <cwd>/.cleo/signaldock.db', async () => {
    process.env.CLEO_DIR = join(dir, 'custom-cleo');
    await expect(LocalTransport.ensureSchema()).resolves.toBe(join(dir, 'custom-cleo', 'signaldock.db'));
    expect(existsSync(join(dir, 'custom-cleo', 'signaldock.db'))).toBe(true);
    delete process.env.CLEO_DIR;
    const cwd = process.cwd();
    process.chdir(dir);
    try {
      await expect(LocalTransport.ensureSchema()).resolves.toBe(dbPath);
    } finally {
      process.chdir(cwd);
    }
    expect(existsSync(dbPath)).toBe(true);
  });
});

describe('LocalTransport: path and connect', () => {
  it('dbPath: explicit option, else $CLEO_DIR, else <cwd>/.cleo (empty CLEO_DIR counts as unset)', () => {
    expect(new LocalTransport({ dbPath: '/somewhere/else.db' }).dbPath).toBe('/somewhere/else.db');
    process.env.CLEO_DIR = join(dir, 'env-cleo');
    expect(new LocalTransport().dbPath).toBe(join(dir, 'env-cleo', 'signaldock.db'));
    expect(new LocalTransport({ dbPath: '/explicit/wins.db' }).dbPath).toBe('/explicit/wins.db');
    process.env.CLEO_DIR = 'relative-cleo';
    expect(new LocalTransport().dbPath).toBe(join(process.cwd(), 'relative-cleo', 'signaldock.db'));
    process.env.CLEO_DIR = '';
    expect(new LocalTransport().dbPath).toBe(join(process.cwd(), '.cleo', 'signaldock.db'));
    delete process.env.CLEO_DIR;
    expect(new LocalTransport().dbPath).toBe(join(process.cwd(), '.cleo', 'signaldock.db'));
    expect(new LocalTransport().name).toBe('local');
  });

  it('connect to a missing file fails with "signaldock.db not found at <path>" and creates nothing', async () => {
    const t = new LocalTransport({ dbPath });
    const e = await t.connect(connectAs('alice')).catch((err) => err);
    expect(e).toBeInstanceOf(Error);
    expect(e.message).toContain(`signaldock.db not found at ${dbPath}`);
    expect(existsSync(dbPath)).toBe(false);
    await expect(t.poll()).rejects.toThrow(NOT_CONNECTED);
  });

  it('connect to a database without a messages table fails with "messages table missing", untouched', async () => {
    mkdirSync(join(dir, '.cleo'));
    py(dbPath, "db.execute('CREATE TABLE agents (id TEXT)'); db.commit()");
    const e = await new LocalTransport({ dbPath }).connect(connectAs('alice')).catch((err) => err);
    expect(e.message).toContain('messages table missing');
    expect(py(dbPath, `print(json.dumps([r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]))`)).toEqual(['agents']);
  });

  it('connect to a file that is not SQLite fails (and does not crash)', async () => {
    mkdirSync(join(dir, '.cleo'));
    writeFileSync(dbPath, 'this is not a database, just text '.repeat(200));
    await expect(new LocalTransport({ dbPath }).connect(connectAs('alice'))).rejects.toThrow(/signaldock\.db/);
  });

  it('connect uses $CLEO_DIR when no dbPath is given', async () => {
    const envDir = join(dir, 'env-cleo');
    process.env.CLEO_DIR = envDir;
    await LocalTransport.ensureSchema();
    const alice = new LocalTransport();
    await alice.connect(connectAs('alice'));
    cleanup.push(() => alice.disconnect());
    const { messageId } = await alice.push('bob', 'in the CLEO_DIR file');
    expect(row(join(envDir, 'signaldock.db'), messageId)).toMatchObject({ to_agent_id: 'bob' });
  });

  it('every call before connect and after disconnect rejects with the not-connected error', async () => {
    await LocalTransport.ensureSchema(dbPath);
    const t = new LocalTransport({ dbPath });
    await expect(t.push('bob', 'x')).rejects.toThrow(NOT_CONNECTED);
    await expect(t.poll()).rejects.toThrow(NOT_CONNECTED);
    await expect(t.ack(['x'])).rejects.toThrow(NOT_CONNECTED);
    expect(() => t.subscribe(() => {})).toThrow(NOT_CONNECTED);
    await t.connect(connectAs('alice'));
    await expect(t.poll()).resolves.toEqual([]);
    await t.disconnect();
    await expect(t.push('bob', 'x')).rejects.toThrow(NOT_CONNECTED);
    await expect(t.poll()).rejects.toThrow(NOT_CONNECTED);
    await expect(t.ack(['x'])).rejects.toThrow(NOT_CONNECTED);
    await expect(t.disconnect()).resolves.toBeUndefined();
    // connect() again after disconnect() works.
    await t.connect(connectAs('alice'));
    await expect(t.poll()).resolves.toEqual([]);
    await t.disconnect();
  });
});

describe('LocalTransport: push, poll, ack', () => {
  beforeEach(async () => { await LocalTransport.ensureSchema(dbPath); });

  it('two agents exchange messages both ways in one DM conversation keyed by sorted participants', async () => {
    const alice = await connected('alice');
    const bob = await connected('bob');
    // bob writes first: the key is still "alice,bob".
    const first = await bob.push('alice', 'hi alice');
    const [got] = await alice.poll();
    expect(got).toMatchObject({ id: first.messageId, from: 'bob', content: 'hi alice' });
    expect(typeof got.threadId).toBe('string');
    expect(new Date(got.timestamp).toISOString()).toBe(got.timestamp);
    expect(Math.abs(Date.parse(got.timestamp) - Date.now())).toBeLessThan(5000);
    const back = await alice.push('bob', 'hi bob');
    const [reply] = await bob.poll();
    expect(reply).toMatchObject({ id: back.messageId, from: 'alice', content: 'hi bob', threadId: got.threadId });
    // Nobody sees their own message.
    expect((await alice.poll()).map((m) => m.id)).toEqual([first.messageId]);
    expect((await bob.poll()).map((m) => m.id)).toEqual([back.messageId]);
    const conversations = py(dbPath, `
db.row_factory = sqlite3.Row
print(json.dumps([dict(r) for r in db.execute('SELECT * FROM conversations')]))
`);
    expect(conversations).toHaveLength(1);
    expect(conversations[0]).toMatchObject({ id: got.threadId, participants: 'alice,bob', visibility: 'private', message_count: 2 });
    expect(row(dbPath, first.messageId)).toMatchObject({
      conversation_id: got.threadId, from_agent_id: 'bob', to_agent_id: 'alice', content: 'hi alice',
      content_type: 'text', status: 'pending', attachments: '[]', delivered_at: null,
    });
  });

  it('reuses a DM conversation another writer created, and sorts participants (zed → amy is "amy,zed")', async () => {
    const existing = insertFromOtherProcess(dbPath, { from: 'carol', to: 'alice' });
    const alice = await connected('alice');
    const { messageId } = await alice.push('carol', 'into the existing conversation');
    expect(row(dbPath, messageId).conversation_id).toBe(existing.conversationId);
    const zed = await connected('zed');
    const z = await zed.push('amy', 'sorted?');
    const conv = row(dbPath, z.messageId).conversation_id;
    expect(py(dbPath, "print(json.dumps(db.execute('SELECT participants FROM conversations WHERE id = ?', (sys.argv[2],)).fetchone()[0]))", conv)).toBe('amy,zed');
  });

  it('reuses a DM conversation signaldock-storage made (participants a JSON array), in either direction and by id', async () => {
    py(dbPath, `
db.execute("""INSERT INTO conversations (id, participants, visibility, message_count, created_at, updated_at) VALUES
  ('sd-pair', '["alice","bob"]', 'private', 0, 1, 1),
  ('sd-team', '["alice","bob","carol"]', 'private', 0, 2, 2)""")
db.commit()
`);
    const alice = await connected('alice');
    const bob = await connected('bob');
    const a = await alice.push('bob', 'hi bob');
    const b = await bob.push('alice', 'hi alice');
    const byId = await alice.push('bob', 'same thread', { conversationId: 'sd-pair' });
    const team = await alice.push('bob', '@bob team news', { conversationId: 'sd-team' });
    for (const { messageId } of [a, b, byId]) {
      expect(row(dbPath, messageId)).toMatchObject({ conversation_id: 'sd-pair', group_id: null });
    }
    expect(row(dbPath, team.messageId)).toMatchObject({ conversation_id: 'sd-team', group_id: 'sd-team' });
    const conversations = py(dbPath, "print(json.dumps([list(r) for r in db.execute('SELECT id, participants, message_count FROM conversations ORDER BY created_at')]))");
    expect(conversations).toEqual([['sd-pair', '["alice","bob"]', 3], ['sd-team', '["alice","bob","carol"]', 1]]);
    const got = await bob.poll();
    expect(got.map((m) => [m.content, m.threadId, m.groupId])).toEqual([
      ['hi bob', 'sd-pair', undefined], ['same thread', 'sd-pair', undefined], ['@bob team news', 'sd-team', 'sd-team'],
    ]);
  });

  it('push with conversationId and replyTo stores both; the recipient sees the thread', async () => {
    const alice = await connected('alice');
    const bob = await connected('bob');
    const root = await alice.push('bob', 'root');
    const reply = await alice.push('bob', 'threaded', { conversationId: 'thread-42', replyTo: root.messageId });
    expect(row(dbPath, reply.messageId)).toMatchObject({ conversation_id: 'thread-42', reply_to: root.messageId, to_agent_id: 'bob' });
    const got = await bob.poll();
    expect(got.map((m) => [m.id, m.threadId])).toEqual([[root.messageId, expect.any(String)], [reply.messageId, 'thread-42']]);
    expect(got[0].threadId).not.toBe('thread-42');
  });

  it('push into a conversation with more members is a group message (group_id → groupId)', async () => {
    py(dbPath, `
db.execute("INSERT INTO conversations (id, participants, visibility, message_count, created_at, updated_at) VALUES ('team', 'alice,bob,carol', 'private', 0, 1, 1)")
db.commit()
`);
    const alice = await connected('alice');
    const bob = await connected('bob');
    const { messageId } = await alice.push('bob', '@bob see this', { conversationId: 'team' });
    expect(row(dbPath, messageId)).toMatchObject({ conversation_id: 'team', group_id: 'team' });
    const [got] = await bob.poll();
    expect(got).toMatchObject({ id: messageId, from: 'alice', threadId: 'team', groupId: 'team' });
    expect(py(dbPath, "print(json.dumps(db.execute(\"SELECT message_count FROM conversations WHERE id = 'team'\").fetchone()[0]))")).toBe(1);
  });

  it('poll: only my pending rows, oldest first (created_at, then insertion), with limit and since', async () => {
    const alice = await connected('alice');
    // Written out of order by another process, with explicit Unix-second timestamps.
    const c = insertFromOtherProcess(dbPath, { content: 'at 3000', createdAt: 3000 });
    const a = insertFromOtherProcess(dbPath, { content: 'at 1000', createdAt: 1000 });
    const b1 = insertFromOtherProcess(dbPath, { content: 'at 2000 first', createdAt: 2000 });
    const b2 = insertFromOtherProcess(dbPath, { content: 'at 2000 second', createdAt: 2000 });
    insertFromOtherProcess(dbPath, { content: 'already delivered', createdAt: 500, status: 'delivered' });
    insertFromOtherProcess(dbPath, { to: 'bob', content: 'for bob', createdAt: 100 });
    const all = await alice.poll();
    expect(all.map((m) => m.content)).toEqual(['at 1000', 'at 2000 first', 'at 2000 second', 'at 3000']);
    expect(all.map((m) => m.id)).toEqual([a.id, b1.id, b2.id, c.id]);
    expect(all[0]).toEqual({ id: a.id, from: 'carol', content: 'at 1000', threadId: a.conversationId, timestamp: '1970-01-01T00:16:40.000Z' });
    expect((await alice.poll({ limit: 2 })).map((m) => m.content)).toEqual(['at 1000', 'at 2000 first']);
    expect((await alice.poll({ limit: 1 })).map((m) => m.content)).toEqual(['at 1000']);
    expect((await alice.poll({ since: new Date(2000 * 1000).toISOString() })).map((m) => m.content)).toEqual(['at 3000']);
    expect((await alice.poll({ since: '1000' })).map((m) => m.content)).toEqual(['at 2000 first', 'at 2000 second', 'at 3000']);
    expect((await alice.poll({ since: '1999', limit: 1 })).map((m) => m.content)).toEqual(['at 2000 first']);
    expect(await alice.poll({ since: all[3].timestamp })).toEqual([]);
    await expect(alice.poll({ since: 'yesterday-ish' })).rejects.toThrow(/since/);
  });

  it('poll limit defaults to 50', async () => {
    const bob = await connected('bob');
    const alice = await connected('alice');
    for (let i = 0; i < 60; i++) await bob.push('alice', `n${i}`);
    const page = await alice.poll();
    expect(page).toHaveLength(50);
    expect(page[0].content).toBe('n0');
    expect(page[49].content).toBe('n49');
  });

  it('ack marks my messages delivered (with delivered_at) and only mine', async () => {
    const alice = await connected('alice');
    const bob = await connected('bob');
    const m1 = await bob.push('alice', 'one');
    const m2 = await bob.push('alice', 'two');
    const forBob = await alice.push('bob', 'not alice\'s to ack');
    const before = Math.floor(Date.now() / 1000);
    await alice.ack([m1.messageId, forBob.messageId, 'no-such-id']);
    const acked = row(dbPath, m1.messageId);
    expect(acked.status).toBe('delivered');
    expect(acked.delivered_at).toBeGreaterThanOrEqual(before - 1);
    expect(acked.delivered_at).toBeLessThanOrEqual(Math.floor(Date.now() / 1000) + 1);
    expect(row(dbPath, m2.messageId)).toMatchObject({ status: 'pending', delivered_at: null });
    expect(row(dbPath, forBob.messageId)).toMatchObject({ status: 'pending', delivered_at: null });
    expect((await alice.poll()).map((m) => m.id)).toEqual([m2.messageId]);
    await expect(alice.ack([])).resolves.toBeUndefined();
  });
});

describe('LocalTransport: realtime across processes', () => {
  beforeEach(async () => { await LocalTransport.ensureSchema(dbPath); });

  it('a row committed by another process reaches a subscriber, which acks it after the handler', async () => {
    const alice = await connected('alice');
    const got = [];
    const unsubscribe = alice.subscribe((m) => { got.push(m); });
    expect(typeof unsubscribe).toBe('function');
    const written = insertFromOtherProcess(dbPath, { content: 'hello from python' });
    await waitFor(() => got.length === 1, { what: 'delivery to the subscriber', timeoutMs: 5000 });
    expect(got[0]).toMatchObject({ id: written.id, from: 'carol', content: 'hello from python', threadId: written.conversationId });
    await waitFor(() => row(dbPath, written.id).status === 'delivered', { what: 'ack after the handler', timeoutMs: 5000, everyMs: 50 });
    await sleep(200);
    expect(got).toHaveLength(1);
    // Unsubscribed: a later row stays pending, for poll().
    unsubscribe();
    const later = insertFromOtherProcess(dbPath, { content: 'after unsubscribe' });
    await sleep(400);
    expect(got).toHaveLength(1);
    expect((await alice.poll()).map((m) => m.id)).toEqual([later.id]);
  });

  it('pending rows are delivered at subscribe time; an async handler settles before the ack', async () => {
    const bob = await connected('bob');
    const alice = await connected('alice');
    const early = await bob.push('alice', 'before subscribe');
    const got = [];
    const statusWhileHandling = [];
    alice.subscribe(async (m) => {
      await sleep(100);
      statusWhileHandling.push(row(dbPath, m.id).status);
      got.push(m.content);
    });
    await waitFor(() => got.length === 1, { what: 'the early row', timeoutMs: 5000 });
    await waitFor(() => row(dbPath, early.messageId).status === 'delivered', { what: 'acked', timeoutMs: 5000, everyMs: 50 });
    // Another transport in this process is another connection: its commits wake us too.
    await bob.push('alice', 'from bob, live');
    await waitFor(() => got.length === 2, { what: 'the live row', timeoutMs: 5000 });
    expect(got).toEqual(['before subscribe', 'from bob, live']);
    expect(statusWhileHandling).toEqual(['pending', 'pending']);
  });

  it('a subscriber that throws does not stop delivery; the failed message is acked, not offered for ever', async () => {
    const alice = await connected('alice');
    const bob = await connected('bob');
    const got = [];
    bob.subscribe((m) => {
      got.push(m.content);
      if (m.content === 'poison') throw new Error('handler failure');
    });
    const poison = await alice.push('bob', 'poison');
    const fine = await alice.push('bob', 'fine');
    await waitFor(() => got.includes('fine'), { what: 'the next message', timeoutMs: 5000 });
    await waitFor(() => row(dbPath, poison.messageId).status === 'delivered' && row(dbPath, fine.messageId).status === 'delivered',
      { what: 'both acked', timeoutMs: 5000, everyMs: 50 });
    await sleep(200);
    expect(got).toEqual(['poison', 'fine']);
  });

  it('disconnect ends subscriptions', async () => {
    const alice = await connected('alice');
    const got = [];
    alice.subscribe((m) => { got.push(m); });
    await alice.disconnect();
    const written = insertFromOtherProcess(dbPath, { content: 'nobody listens' });
    await sleep(400);
    expect(got).toHaveLength(0);
    expect(row(dbPath, written.id).status).toBe('pending');
  });

  it('latency: commits by another process reach a subscriber within 200 ms p99', async () => {
    const alice = await connected('alice');
    const receivedAt = new Map();
    alice.subscribe((m) => { receivedAt.set(m.id, Date.now()); });
    // Warm-up: python's start-up and the first commit are not measured.
    const [warm] = await insertSeries(dbPath, { count: 1 });
    await waitFor(() => receivedAt.has(warm.id), { what: 'warm-up delivery', timeoutMs: 5000 });
    const commits = await insertSeries(dbPath, { count: 50, gapMs: 40 });
    await waitFor(() => commits.every((c) => receivedAt.has(c.id)), { what: 'all 50 delivered', timeoutMs: 10_000 });
    const sorted = latencies(commits, receivedAt);
    report('LocalTransport.subscribe, python3 commit → handler', sorted);
    expect(sorted).toHaveLength(50);
    expect(sorted[0]).toBeGreaterThanOrEqual(-5); // same clock: nothing arrives before it is written
    expect(percentile(sorted, 99)).toBeLessThan(200);
    await waitFor(() => py(dbPath, "print(json.dumps(db.execute(\"SELECT COUNT(*) FROM messages WHERE status = 'pending'\").fetchone()[0]))") === 0,
      { what: 'all acked', timeoutMs: 5000, everyMs: 50 });
  }, 60_000);
});

/** The `agents` columns a local beat touches or must leave alone, declared as the cleo CLI's
 * migration declares them (the real table, the CLI's agent registry, has two dozen more). */
const AGENTS_TABLE = `CREATE TABLE agents (
  id TEXT PRIMARY KEY, agent_id TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
  status TEXT NOT NULL DEFAULT 'online', last_seen INTEGER,
  created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL)`;

/** Another process (the CLI's registry) creates the agents table with rows [agentId, status, lastSeen]. */
function registerAgents(db, ...agents) {
  py(db, `
db.execute(sys.argv[2])
for i, (agent, status, seen) in enumerate(json.loads(sys.argv[3])):
    db.execute("INSERT INTO agents (id, agent_id, name, status, last_seen, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 100, 200)",
               ('u-%d' % i, agent, agent.title(), status, seen))
db.commit()
`, AGENTS_TABLE, JSON.stringify(agents));
}

/** `{ status, last_seen, updated_at }` of the agent's row, or null. */
function agentRow(db, agentId) {
  return py(db, `
db.row_factory = sqlite3.Row
r = db.execute('SELECT status, last_seen, updated_at FROM agents WHERE agent_id = ?', (sys.argv[2],)).fetchone()
print(json.dumps(dict(r) if r else None))
`, agentId);
}

const unixNow = () => Math.floor(Date.now() / 1000);

describe('createRuntime on the local signaldock.db', () => {
  const registry = () => new FakeRegistry(credential('alice', '', 'local'));

  it('resolves local from $CLEO_DIR, with a heartbeat, realtime despite pollIntervalMs 60000', async () => {
    process.env.CLEO_DIR = join(dir, '.cleo');
    await LocalTransport.ensureSchema();
    const handle = await createRuntime(registry(), { pollIntervalMs: 60_000, maxKeyAgeMs: 0 });
    cleanup.push(() => handle.stop());
    expect(handle.transport.name).toBe('local');
    expect(handle.transport).toBeInstanceOf(LocalTransport);
    expect(handle.transport.dbPath).toBe(dbPath);
    expect(handle.agentId).toBe('alice');
    // As the old package (and `cleo agent start`, which prints "heartbeat: running"): a
    // heartbeat unless heartbeatIntervalMs is 0, here beating into signaldock.db.
    expect(handle.heartbeat).toBeInstanceOf(HeartbeatService);
    expect(handle.heartbeat.status().running).toBe(true);
    expect(handle.sseConnection).toBeNull();
    const receivedAt = new Map();
    const ids = [];
    handle.poller.onMessage((m) => { receivedAt.set(m.id, Date.now()); ids.push(m.id); });
    handle.poller.start();
    const [warm] = await insertSeries(dbPath, { count: 1 });
    await waitFor(() => receivedAt.has(warm.id), { what: 'warm-up delivery', timeoutMs: 5000 });
    const commits = await insertSeries(dbPath, { count: 50, gapMs: 40 });
    await waitFor(() => commits.every((c) => receivedAt.has(c.id)), { what: 'all 50 delivered', timeoutMs: 10_000 });
    const sorted = latencies(commits, receivedAt);
    report('createRuntime (local, pollIntervalMs 60000), python3 commit → poller handler', sorted);
    expect(percentile(sorted, 99)).toBeLessThan(200);
    // Each message once.
    expect(ids).toHaveLength(51);
    expect(new Set(ids).size).toBe(51);
    // The poller acked what it handled.
    await waitFor(() => py(dbPath, "print(json.dumps(db.execute(\"SELECT COUNT(*) FROM messages WHERE status = 'pending'\").fetchone()[0]))") === 0,
      { what: 'all acked', timeoutMs: 5000, everyMs: 50 });
    // The handle's transport is usable: alice answers, another process reads it.
    const { messageId } = await handle.transport.push('carol', 'thanks');
    expect(row(dbPath, messageId)).toMatchObject({ from_agent_id: 'alice', to_agent_id: 'carol', status: 'pending' });
    // Commit-driven, not a busy loop: idle, the poller does not poll (the interval is 60 s).
    await sleep(300);
    const idle = handle.poller.status().polls;
    await sleep(700);
    expect(handle.poller.status().polls).toBe(idle);
  }, 60_000);

  it('the local heartbeat records presence in signaldock.db: status online, last_seen now, updated_at untouched', async () => {
    process.env.CLEO_DIR = join(dir, '.cleo');
    await LocalTransport.ensureSchema();
    registerAgents(dbPath, ['alice', 'offline', null], ['bob', 'offline', 7]);
    const before = unixNow();
    const handle = await createRuntime(registry(), { pollIntervalMs: 60_000, heartbeatIntervalMs: 200, maxKeyAgeMs: 0 });
    cleanup.push(() => handle.stop());
    expect(handle.transport.name).toBe('local');
    await waitFor(() => agentRow(dbPath, 'alice').status === 'online', { what: 'alice online', timeoutMs: 5000, everyMs: 50 });
    const alice = agentRow(dbPath, 'alice');
    expect(alice.last_seen).toBeGreaterThanOrEqual(before);
    expect(alice.last_seen).toBeLessThanOrEqual(unixNow());
    // updated_at is the registry's credential clock, the key's age for rotation.
    expect(alice.updated_at).toBe(200);
    // Every interval, not once: marked offline behind the runtime's back, alice is back online.
    py(dbPath, "db.execute(\"UPDATE agents SET status = 'offline', last_seen = 5 WHERE agent_id = 'alice'\"); db.commit()");
    await waitFor(() => { const r = agentRow(dbPath, 'alice'); return r.status === 'online' && r.last_seen >= before; },
      { what: 'the next beat', timeoutMs: 5000, everyMs: 50 });
    expect(handle.heartbeat.status()).toMatchObject({ running: true, consecutiveFailures: 0 });
    expect(handle.heartbeat.status().beats).toBeGreaterThanOrEqual(2);
    expect(agentRow(dbPath, 'bob')).toEqual({ status: 'offline', last_seen: 7, updated_at: 200 });
    // stop() stops the beats.
    handle.stop();
    expect(handle.heartbeat.status().running).toBe(false);
    py(dbPath, "db.execute(\"UPDATE agents SET status = 'offline' WHERE agent_id = 'alice'\"); db.commit()");
    await sleep(600);
    expect(agentRow(dbPath, 'alice').status).toBe('offline');
  });

  it('a local beat for an agent with no row counts failures and says why; delivery goes on; 0 disables it', async () => {
    process.env.CLEO_DIR = join(dir, '.cleo');
    await LocalTransport.ensureSchema();
    const handle = await createRuntime(registry(), { pollIntervalMs: 60_000, heartbeatIntervalMs: 100, maxKeyAgeMs: 0 });
    cleanup.push(() => handle.stop());
    await waitFor(() => handle.heartbeat.status().consecutiveFailures >= 2, { what: 'failed beats (no agents table)', timeoutMs: 5000 });
    expect(handle.heartbeat.status().lastError).toBe(
      `signaldock.db has no agents table (at ${dbPath}; the cleo CLI's agent registry creates it)`);
    registerAgents(dbPath, ['bob', 'offline', 7]);
    await waitFor(() => handle.heartbeat.status().lastError?.startsWith('agent "alice"'), { what: 'the missing-row error', timeoutMs: 5000 });
    expect(handle.heartbeat.status().lastError).toBe(
      `agent "alice" has no row in signaldock.db (agents table at ${dbPath}; \`cleo agent register\` adds it)`);
    expect(handle.heartbeat.status()).toMatchObject({ running: true });
    expect(handle.heartbeat.status().consecutiveFailures).toBeGreaterThanOrEqual(3);
    expect(agentRow(dbPath, 'alice')).toBeNull();
    expect(agentRow(dbPath, 'bob')).toEqual({ status: 'offline', last_seen: 7, updated_at: 200 });
    const got = [];
    handle.poller.onMessage((m) => { got.push(m.content); });
    insertFromOtherProcess(dbPath, { content: 'still delivered' });
    await waitFor(() => got.length === 1, { what: 'delivery', timeoutMs: 5000 });

    const quiet = await createRuntime(new FakeRegistry(credential('bob', '', 'local')), { pollIntervalMs: 60_000, heartbeatIntervalMs: 0, maxKeyAgeMs: 0 });
    cleanup.push(() => quiet.stop());
    expect(quiet.transport.name).toBe('local');
    expect(quiet.heartbeat).toBeNull();
  });

  it('resolves local from <cwd>/.cleo when CLEO_DIR is unset (read at createRuntime time)', async () => {
    await LocalTransport.ensureSchema(dbPath);
    const cwd = process.cwd();
    process.chdir(dir);
    let handle;
    try {
      handle = await createRuntime(registry(), { pollIntervalMs: 60_000, maxKeyAgeMs: 0 });
    } finally {
      process.chdir(cwd);
    }
    cleanup.push(() => handle.stop());
    expect(handle.transport.name).toBe('local');
    expect(handle.transport.dbPath).toBe(dbPath);
    const got = [];
    handle.poller.onMessage((m) => { got.push(m.content); });
    insertFromOtherProcess(dbPath, { content: 'found via cwd' });
    await waitFor(() => got.length === 1, { what: 'delivery', timeoutMs: 5000 });
    expect(got).toEqual(['found via cwd']);
  });

  it('a row committed before the handler is registered is delivered once, after', async () => {
    process.env.CLEO_DIR = join(dir, '.cleo');
    await LocalTransport.ensureSchema();
    const handle = await createRuntime(registry(), { pollIntervalMs: 60_000, maxKeyAgeMs: 0 });
    cleanup.push(() => handle.stop());
    const early = insertFromOtherProcess(dbPath, { content: 'early' });
    await sleep(300);
    expect(row(dbPath, early.id).status).toBe('pending');
    const got = [];
    handle.poller.onMessage((m) => { got.push(m.content); });
    // A later commit wakes the poller at once (the interval is a minute).
    insertFromOtherProcess(dbPath, { content: 'later' });
    await waitFor(() => got.length === 2, { what: 'both', timeoutMs: 5000 });
    expect(got).toEqual(['early', 'later']);
    await sleep(300);
    expect(got).toHaveLength(2);
  });

  it('stop() disconnects: later transport calls reject, new rows stay pending', async () => {
    process.env.CLEO_DIR = join(dir, '.cleo');
    await LocalTransport.ensureSchema();
    const handle = await createRuntime(registry(), { pollIntervalMs: 60_000, maxKeyAgeMs: 0 });
    const got = [];
    handle.poller.onMessage((m) => { got.push(m.content); });
    insertFromOtherProcess(dbPath, { content: 'before stop' });
    await waitFor(() => got.length === 1, { what: 'delivery', timeoutMs: 5000 });
    handle.stop();
    handle.stop();
    await waitFor(async () => (await handle.transport.poll().then(() => null, (e) => e.message)) === NOT_CONNECTED,
      { timeoutMs: 5000, what: 'the transport disconnected' });
    await expect(handle.transport.push('carol', 'x')).rejects.toThrow(NOT_CONNECTED);
    await expect(handle.transport.ack(['x'])).rejects.toThrow(NOT_CONNECTED);
    const after = insertFromOtherProcess(dbPath, { content: 'after stop' });
    await sleep(400);
    expect(got).toEqual(['before stop']);
    expect(row(dbPath, after.id).status).toBe('pending');
  });

  it('a caller-given LocalTransport is connected by createRuntime and used as the transport', async () => {
    await LocalTransport.ensureSchema(dbPath);
    const t = new LocalTransport({ dbPath });
    const handle = await createRuntime(registry(), { transport: t, pollIntervalMs: 100, maxKeyAgeMs: 0 });
    cleanup.push(() => handle.stop());
    expect(handle.transport).toBe(t);
    const got = [];
    handle.poller.onMessage((m) => { got.push(m.content); });
    const written = insertFromOtherProcess(dbPath, { content: 'through the caller transport' });
    await waitFor(() => got.length === 1, { what: 'delivery', timeoutMs: 5000 });
    await waitFor(() => row(dbPath, written.id).status === 'delivered', { what: 'acked', timeoutMs: 5000, everyMs: 50 });
    handle.stop();
    await waitFor(async () => (await t.poll().then(() => null, (e) => e.message)) === NOT_CONNECTED,
      { timeoutMs: 5000, what: 'disconnected by stop()' });
  });

  it('a missing database with a non-http base URL: createRuntime rejects', async () => {
    process.env.CLEO_DIR = join(dir, '.cleo');
    await expect(createRuntime(registry(), { maxKeyAgeMs: 0 })).rejects.toThrow(/^createRuntime: /);
  });
});
