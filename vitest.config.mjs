// Vitest runs __test__/**/*.test.mjs against the built addon through the package entry.
// Timeouts are generous: these tests assert behaviour, never speed (that is bench/'s job).
// The testing subpath's CommonJS build (required by __test__/testing.test.mjs) is
// regenerated here when stale, as the Jest config does.
import { createRequire } from 'node:module';
import { defineConfig } from 'vitest/config';

createRequire(import.meta.url)('./scripts/build-testing-cjs.cjs').generate();

export default defineConfig({
  test: {
    include: ['__test__/**/*.test.mjs'],
    testTimeout: 30_000,
    hookTimeout: 30_000,
    pool: 'forks',
  },
});
