'use strict';
// Package entry for @cleocode/runtime. The loops, transports and services are native (see
// src/); this file only loads the addon and gives createRuntime its contract shape: an
// async function (so a bad config is a rejected promise, as callers `await` it) resolving to
// a plain handle whose `stop` is a property. CommonJS with static export assignments, so
// `require`, static `import { … }` and `import()` all see the same named exports.
const native = require('./native.js');

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
