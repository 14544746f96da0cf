// Vitest runs __test__/**/*.test.mjs against the built addon through the package entry.
// Timeouts are generous: these tests assert behaviour, never speed (that is bench/'s job).
import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['__test__/**/*.test.mjs'],
    testTimeout: 30_000,
    hookTimeout: 30_000,
    pool: 'forks',
  },
});
