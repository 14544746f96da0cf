'use strict';
// Package entry for @cleocode/runtime. The loops, transports and services are native (see
// src/); this file only loads the addon and gives createRuntime its contract shape: an
// async function (so a bad config is a rejected promise, as callers `await` it) resolving to
// a plain handle whose `stop` is a property. CommonJS with static export assignments, so
// `require`, static `import { … }` and `import()` all see the same named exports.
const native = loadNative();

/**
 * Loads the addon through napi's generated loader (native.js: `cleo-runtime.<platform>.node`
 * next to this file, then the platform package `@cleocode/runtime-<platform>`). When nothing
 * loads, throws ONE error naming the platform and what to do, with napi's chain of attempts
 * as `cause`, instead of the loader's stack of attempts.
 */
function loadNative() {
  const prefix = '@cleocode/runtime:';
  if (!(Number(process.versions.napi) >= 9)) {
    throw new Error(`${prefix} needs Node-API 9 (Node ^18.17.0 or >= 20.3.0); Node ${process.version} `
      + `has Node-API ${process.versions.napi}. Upgrade Node.`);
  }
  try {
    return require('./native.js');
  } catch (cause) {
    const { PUBLISHED, platformId } = require('./platform.cjs');
    const platform = platformId();
    // napi's loader chains one plain Error per attempt; "Cannot find module" only means absent.
    const failures = [];
    for (let e = cause && cause.cause; e && failures.length < 20; e = e.cause) {
      const first = String(e.message || e).split('\n')[0];
      if (!first.startsWith('Cannot find module')) failures.push(first);
    }
    const found = failures.length > 0 ? ` A binary was found but did not load: ${failures[0]}.` : '';
    // The package has no install script: building from source is this explicit command.
    const build = 'install Rust (https://rustup.rs, 1.95 or newer) and run `npx cleo-runtime-build` '
      + '(a command of this package) to build it from source';
    const todo = PUBLISHED.includes(platform)
      ? ` The prebuilt binary is the optional dependency @cleocode/runtime-${platform}: reinstall without `
        + '--omit=optional / --no-optional (if npm skipped it, delete node_modules and package-lock.json '
        + `first: npm/cli#4828), or ${build}.`
      : ` No prebuilt binary is published for ${platform}: ${build}.`;
    const error = new Error(`${prefix} no native binary for ${platform} (Node ${process.version}).${found}${todo}`);
    error.cause = cause;
    throw error;
  }
}

/**
 * Starts a resident agent runtime. See index.d.ts and README.md.
 * @param {import('./index').AgentRegistryAPI} registry
 * @param {import('./index').RuntimeConfig} [config]
 * @returns {Promise<import('./index').RuntimeHandle>}
 */
async function createRuntime(registry, config) {
  const runtime = await native.startRuntime(registry, config);
  const transport = runtime.takeTransport() ?? config.transport;
  return {
    poller: runtime.takePoller(),
    heartbeat: runtime.takeHeartbeat(),
    keyRotation: runtime.takeKeyRotation(),
    sseConnection: runtime.takeSseConnection(),
    transport,
    agentId: runtime.agentId,
    stop: () => runtime.stop(),
  };
}

module.exports.createRuntime = createRuntime;
module.exports.AgentPoller = native.AgentPoller;
module.exports.HeartbeatService = native.HeartbeatService;
module.exports.KeyRotationService = native.KeyRotationService;
module.exports.SseConnectionService = native.SseConnectionService;
module.exports.HttpTransport = native.HttpTransport;
module.exports.SseTransport = native.SseTransport;
module.exports.LocalTransport = native.LocalTransport;
module.exports.setLogger = native.setLogger;
