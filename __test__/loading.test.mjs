// The package loads the way every consumer loads it: static ESM import, dynamic import(),
// and CommonJS require() — all giving the same named exports.
import { describe, expect, it } from 'vitest';
import { createRequire } from 'node:module';
import * as staticImport from '@cleocode/runtime';
import { AgentPoller, HeartbeatService, KeyRotationService, SseConnectionService, createRuntime } from '@cleocode/runtime';

const EXPORTS = ['createRuntime', 'AgentPoller', 'HeartbeatService', 'KeyRotationService', 'SseConnectionService'];

describe('module systems', () => {
  it('static import gives every export', () => {
    for (const name of EXPORTS) expect(typeof staticImport[name], name).toBe('function');
    expect([AgentPoller, HeartbeatService, KeyRotationService, SseConnectionService, createRuntime].every((v) => typeof v === 'function')).toBe(true);
  });

  it('dynamic import() gives the same exports, as the cleo CLI loads it', async () => {
    const mod = await import('@cleocode/runtime');
    for (const name of EXPORTS) expect(mod[name], name).toBe(staticImport[name]);
  });

  it('require() gives the same exports', () => {
    const require = createRequire(import.meta.url);
    const mod = require('@cleocode/runtime');
    // The native classes are one addon instance whatever the loader; createRuntime is the
    // entry's JS wrapper, which vitest's module graph may evaluate separately from require's.
    expect(Object.keys(mod).sort()).toEqual(Object.keys(staticImport).filter((k) => k !== 'default').sort());
    for (const name of EXPORTS.filter((n) => n !== 'createRuntime')) expect(mod[name], name).toBe(staticImport[name]);
    expect(typeof mod.createRuntime).toBe('function');
  });

  it('createRuntime is an async function: bad input rejects, never throws synchronously', async () => {
    let promise;
    expect(() => { promise = createRuntime(null); }).not.toThrow();
    await expect(promise).rejects.toThrow(TypeError);
  });
});
