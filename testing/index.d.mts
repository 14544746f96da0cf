// Types of @cleocode/runtime/testing for `import` (testing/index.mjs): the same declarations
// as index.d.ts, which describes the CommonJS build.
export * from './index.js';
