/**
 * An in-memory AgentRegistryAPI for tests, shaped like the cleo CLI's real registry.
 *
 * Part of `@cleocode/runtime/testing`. It keeps credentials in memory and hands out copies
 * (so code under test cannot change what the test set up behind its back), records every
 * call in `calls`, and rotates keys the way the real registry does (WIRE.md, "The
 * registry"): `rotateKey(agentId)` asks the SignalDock server at the credential's
 * `apiBaseUrl` for a new key (`POST /agents/{id}/rotate-key`, authenticated with the
 * current one), stores the key it answers, and resolves with a MASKED key,
 * `{ agentId, newApiKey: '<first 8 chars>...rotated' }`. The usable key is the one
 * `get(agentId)` returns afterwards. Against the test server the new key is accepted at
 * once (and the old one too, until the test calls `sd.expireKey(old)`).
 */

/** A complete AgentCredential for `agentId`, dated now; `overrides` replace any field. */
export function testCredential(agentId, apiKey, apiBaseUrl, overrides = {}) {
  for (const [name, value] of [['agentId', agentId], ['apiKey', apiKey], ['apiBaseUrl', apiBaseUrl]]) {
    if (typeof value !== 'string' || value === '') {
      throw new TypeError(`testCredential: ${name} must be a non-empty string (got ${describe(value)})`);
    }
  }
  const now = new Date().toISOString();
  return {
    agentId, displayName: agentId, apiKey, apiBaseUrl, privacyTier: 'private', capabilities: [],
    skills: [], transportType: 'http', transportConfig: {}, isActive: true, createdAt: now,
    updatedAt: now, ...overrides,
  };
}

export class FakeRegistry {
  #creds = new Map();
  /** Every call, in order: `[method, ...arguments]`. */
  calls = [];

  /** `credentials`: AgentCredential objects (see `testCredential`), stored as copies. */
  constructor(credentials = []) {
    if (!Array.isArray(credentials)) {
      throw new TypeError(`FakeRegistry: credentials must be an array (got ${describe(credentials)})`);
    }
    credentials.forEach((c, i) => {
      checkCredential(c, `credentials[${i}]`);
      this.#creds.set(c.agentId, structuredClone(c));
    });
  }

  async register(credential) {
    this.calls.push(['register', credential?.agentId]);
    checkCredential(credential, 'credential');
    if (this.#creds.has(credential.agentId)) {
      throw new Error(`FakeRegistry.register: agent ${credential.agentId} is already registered`);
    }
    const now = new Date().toISOString();
    const stored = { ...structuredClone(credential), createdAt: now, updatedAt: now };
    this.#creds.set(stored.agentId, stored);
    return structuredClone(stored);
  }

  async get(agentId) {
    this.calls.push(['get', agentId]);
    const found = this.#creds.get(agentId);
    return found ? structuredClone(found) : null;
  }

  async list(filter = {}) {
    this.calls.push(['list', filter]);
    const all = [...this.#creds.values()];
    const kept = filter?.active === undefined ? all : all.filter((c) => c.isActive === filter.active);
    return kept.map((c) => structuredClone(c));
  }

  /** Merges `updates` (not `agentId` or `createdAt`); `updatedAt` becomes now unless given,
   *  so a test can age a key with `update(id, { updatedAt: longAgo })`. */
  async update(agentId, updates = {}) {
    this.calls.push(['update', agentId]);
    const stored = this.#require(agentId, 'update');
    const { agentId: _id, createdAt: _created, ...rest } = updates ?? {};
    Object.assign(stored, structuredClone(rest));
    if (rest.updatedAt === undefined) stored.updatedAt = new Date().toISOString();
    return structuredClone(stored);
  }

  async remove(agentId) {
    this.calls.push(['remove', agentId]);
    this.#creds.delete(agentId);
  }

  async rotateKey(agentId) {
    this.calls.push(['rotateKey', agentId]);
    const stored = this.#require(agentId, 'rotateKey');
    if (!/^https?:\/\//.test(stored.apiBaseUrl)) {
      throw new Error(`FakeRegistry.rotateKey: ${agentId}'s apiBaseUrl is not an http(s) URL; keys rotate through SignalDock`);
    }
    const url = `${stored.apiBaseUrl.replace(/\/+$/, '')}/agents/${encodeURIComponent(agentId)}/rotate-key`;
    const response = await fetch(url, {
      method: 'POST',
      headers: { authorization: `Bearer ${stored.apiKey}`, 'x-agent-id': agentId, 'content-type': 'application/json' },
    });
    const body = await response.json().catch(() => null);
    const newKey = body?.data?.apiKey;
    if (!response.ok || typeof newKey !== 'string' || newKey === '') {
      // The status only: a body could echo a key.
      throw new Error(`FakeRegistry.rotateKey: POST /agents/${encodeURIComponent(agentId)}/rotate-key answered ${response.status} without a new key`);
    }
    stored.apiKey = newKey;
    stored.updatedAt = new Date().toISOString();
    return { agentId, newApiKey: `${newKey.slice(0, 8)}...rotated` };
  }

  /** The first active credential, or null. */
  async getActive() {
    this.calls.push(['getActive']);
    const found = [...this.#creds.values()].find((c) => c.isActive);
    return found ? structuredClone(found) : null;
  }

  async markUsed(agentId) {
    this.calls.push(['markUsed', agentId]);
    this.#require(agentId, 'markUsed').lastUsedAt = new Date().toISOString();
  }

  #require(agentId, method) {
    const stored = this.#creds.get(agentId);
    if (!stored) throw new Error(`FakeRegistry.${method}: no agent ${agentId}`);
    return stored;
  }
}

function checkCredential(c, what) {
  if (c === null || typeof c !== 'object') throw new TypeError(`FakeRegistry: ${what} must be an object (got ${describe(c)})`);
  for (const field of ['agentId', 'apiKey', 'apiBaseUrl']) {
    if (typeof c[field] !== 'string' || c[field] === '') {
      throw new TypeError(`FakeRegistry: ${what}.${field} must be a non-empty string (got ${describe(c[field])})`);
    }
  }
}

function describe(value) {
  return value === null ? 'null' : Array.isArray(value) ? 'array' : typeof value;
}
