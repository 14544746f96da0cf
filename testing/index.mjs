/**
 * `@cleocode/runtime/testing`: what this project tests the runtime against, for your tests.
 *
 * - `startSignalDock(options)`: the SignalDock-compatible test server (in-process, loopback,
 *   port 0, every request recorded, fault injection); see signaldock-server.mjs.
 * - `FakeRegistry`, `testCredential`: an in-memory AgentRegistryAPI that rotates keys through
 *   that server the way the real registry does; see fake-registry.mjs.
 *
 * With `poller.pollNow()`, `heartbeat.beatNow()` and `keyRotation.checkNow()` a test needs
 * no clock: fake timers cannot reach the runtime's own (see the README, "Testing code that
 * uses the runtime"). CommonJS gets the same exports from testing/cjs/index.cjs.
 */
export { SignalDock, dmConversationId, startSignalDock } from './signaldock-server.mjs';
export { FakeRegistry, testCredential } from './fake-registry.mjs';
