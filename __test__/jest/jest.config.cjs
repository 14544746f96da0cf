// Jest runs the CommonJS suite: the package loaded with require(), as Jest callers do.
// Jest's resolver does not follow a package's self-reference, so the package name maps to
// the package root, which Jest then resolves through package.json like any dependency, and
// the testing subpath to its CommonJS build (generated from testing/*.mjs; regenerated here
// when stale, so `npx jest` never runs an old copy).
const path = require('node:path');

require('../../scripts/build-testing-cjs.cjs').generate();

module.exports = {
  rootDir: __dirname,
  testMatch: ['**/*.test.cjs'],
  testEnvironment: 'node',
  testTimeout: 30000,
  moduleNameMapper: {
    '^@cleocode/runtime$': path.resolve(__dirname, '../..'),
    '^@cleocode/runtime/testing$': path.resolve(__dirname, '../../testing/cjs/index.cjs'),
  },
};
