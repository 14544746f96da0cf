// The README's main job runs in CI: the demo exchanges messages both ways on the local
// SignalDock and over HTTP + SSE, prints a latency summary, and exits by itself, cleanly.
import { describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';

describe('examples/demo.mjs', () => {
  it('runs to completion within 30 s and reports both paths', async () => {
    const root = fileURLToPath(new URL('..', import.meta.url));
    const run = await new Promise((resolve, reject) => {
      const child = spawn(process.execPath, ['examples/demo.mjs'], { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      let err = '';
      child.stdout.on('data', (d) => { out += d; });
      child.stderr.on('data', (d) => { err += d; });
      const timer = setTimeout(() => child.kill('SIGKILL'), 40_000);
      child.on('error', reject);
      child.on('exit', (code, signal) => { clearTimeout(timer); resolve({ code, signal, out, err }); });
    });
    expect(run.code, run.err).toBe(0);
    for (let n = 1; n <= 5; n++) {
      expect(run.out).toContain(`[local] alice <- bob: pong ${n}`);
      expect(run.out).toContain(`[sse] alice <- bob: pong ${n}`);
      expect(run.out).toContain(`[local] bob   <- alice: ping ${n}`);
      expect(run.out).toContain(`[sse] bob   <- alice: ping ${n}`);
    }
    expect(run.out).toMatch(/alice over 'local', bob over 'local'/);
    expect(run.out).toMatch(/transport 'sse', stream connected/);
    expect(run.out).toMatch(/local \(signaldock\.db\): 10 messages/);
    expect(run.out).toMatch(/http \+ sse\s+: 10 messages/);
    expect(run.err).not.toMatch(/WARN|ERROR|panicked/);
  }, 60_000);
});
