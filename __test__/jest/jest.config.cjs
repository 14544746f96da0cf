// Jest runs the CommonJS suite: the package loaded with require(), as Jest callers do.
// Jest's resolver does not follow a package's self-reference, so the package name maps to
// the package root, which Jest then resolves through package.json like any dependency.
const path = require('node:path');

module.exports = {
  rootDir: __dirname,
  testMatch: ['**/*.test.cjs'],
  testEnvironment: 'node',
  testTimeout: 30000,
  moduleNameMapper: { '^@cleocode/runtime$': path.resolve(__dirname, '../..') },
};
