// Type-checked with `tsc --strict --noEmit` (never run), after the native build: the classes
// the addon really exports (napi's generated native.d.ts) must be assignable to the ones the
// hand-written index.d.ts declares, method by method, so the two cannot drift apart. Every
// class index.d.ts declares is listed; a class or method missing on the native side, or a
// return type that no longer fits, fails the build here.
import type * as Native from '../../native.js';
import type * as Declared from '../../index.js';

type Assert<T extends true> = T;
type Fits<Actual, Wanted> = [Actual] extends [Wanted] ? true : false;
type Instance<C> = C extends abstract new (...args: never[]) => infer I ? I : never;

export type Checks = [
  Assert<Fits<Instance<typeof Native.AgentPoller>, Instance<typeof Declared.AgentPoller>>>,
  Assert<Fits<Instance<typeof Native.HeartbeatService>, Instance<typeof Declared.HeartbeatService>>>,
  Assert<Fits<Instance<typeof Native.KeyRotationService>, Instance<typeof Declared.KeyRotationService>>>,
  Assert<Fits<Instance<typeof Native.SseConnectionService>, Instance<typeof Declared.SseConnectionService>>>,
  Assert<Fits<Instance<typeof Native.HttpTransport>, Instance<typeof Declared.HttpTransport>>>,
  Assert<Fits<Instance<typeof Native.SseTransport>, Instance<typeof Declared.SseTransport>>>,
  Assert<Fits<Instance<typeof Native.LocalTransport>, Instance<typeof Declared.LocalTransport>>>,
  // The constructors take what index.d.ts says callers pass.
  Assert<Fits<ConstructorParameters<typeof Declared.AgentPoller>, ConstructorParameters<typeof Native.AgentPoller>>>,
  Assert<Fits<ConstructorParameters<typeof Declared.HeartbeatService>, ConstructorParameters<typeof Native.HeartbeatService>>>,
  Assert<Fits<ConstructorParameters<typeof Declared.KeyRotationService>, ConstructorParameters<typeof Native.KeyRotationService>>>,
  Assert<Fits<ConstructorParameters<typeof Declared.SseConnectionService>, ConstructorParameters<typeof Native.SseConnectionService>>>,
  // The exported functions the entry passes through unchanged.
  Assert<Fits<typeof Native.setLogger, typeof Declared.setLogger>>,
];
