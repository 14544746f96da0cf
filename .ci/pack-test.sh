#!/usr/bin/env bash
# Packaging test: the package as users get it, installed into a fresh project outside the repo.
#   1. `npm pack` the main package; the tarball ships no target/, __test__/, tests, or .node,
#      and no install script (package.json), but the cleo-runtime-build bin and the testing
#      subpath (its ESM sources and the generated CommonJS build);
#   2. the publish shape: the same tarball with the optionalDependencies `napi prepublish`
#      adds at publish time (one per napi.targets entry, same version);
#   3. the platform package for this machine (npm/<platform>/ plus the built .node), packed;
#   4. a fresh project (mktemp, no access to the repo's node_modules) installs both tarballs
#      with --offline: the platform tarball satisfies its optionalDependency, the other
#      platforms' packages are skipped without touching a registry;
#   5. there: ESM import, CJS require, `tsc --strict --noEmit` of a consumer .mts (no
#      @types/node), one message delivered end to end from the SignalDock test server, and
#      `@cleocode/runtime/testing` imported (ESM) and required (CJS), each delivering one
#      message with pollNow(), type-checked from a .mts and a .cts; `cleo-runtime-build`
#      runs (--help, --check: the binary loads);
#   6. the main tarball alone (no binary): the install succeeds and runs no script,
#      `cleo-runtime-build --check` says no binary loads and exits 1, and the import fails
#      with ONE error naming the platform and `npx cleo-runtime-build`.
# PACK_TEST_FROM_SOURCE=1 adds 7.: the main tarball alone, then `npx cleo-runtime-build`
# builds from source (cargo; minutes). Needs the addon built at the repo root (`npm run build`).
set -euo pipefail
unset NODE_PATH # the consumer project must resolve only its own node_modules
REPO="$(cd "$(dirname "$0")/.." && pwd)"
STARTED=$SECONDS

WORK="$(mktemp -d "${TMPDIR:-/tmp}/cleo-runtime-pack-test.XXXXXX")"
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

pass() { printf 'PASS  %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*" >&2; exit 1; }
# Runs a command with its output in a log; on failure prints the log and fails.
run() {
  local what="$1"; shift
  local log
  log="$(mktemp "$WORK/log.XXXXXX")"
  if ! "$@" >"$log" 2>&1; then
    sed 's/^/      | /' "$log" >&2
    fail "$what"
  fi
  cat "$log" >"$WORK/last.log"
}
# Node one-liners run from $WORK: nothing there resolves into the repo.
js() { (cd "$WORK" && node -e "$@"); }
size() { js 'const s=require("fs").statSync(process.argv[1]).size; console.log(s>1048576?(s/1048576).toFixed(1)+" MiB":(s/1024).toFixed(1)+" kB")' "$1"; }

NPM_FLAGS=(--no-audit --no-fund --offline --foreground-scripts)
PLATFORM="$(js 'console.log(require(process.argv[1]).platformId())' "$REPO/platform.cjs")"
VERSION="$(js 'console.log(require(process.argv[1]).version)' "$REPO/package.json")"
BINARY="$REPO/cleo-runtime.$PLATFORM.node"
echo "pack-test: @cleocode/runtime@$VERSION on $PLATFORM, Node $(node -v), npm $(npm -v 2>/dev/null), in $WORK"
[ -f "$BINARY" ] || fail "no $BINARY: run \`npm run build\` first"
[ -f "$REPO/npm/$PLATFORM/package.json" ] || fail "no npm/$PLATFORM/package.json: $PLATFORM is not a napi target"

# ---------------------------------------------------------------- 1. the main tarball
mkdir -p "$WORK/packed" "$WORK/publish" "$WORK/platform"
run "npm pack (main package)" bash -c "cd '$REPO' && npm pack --json --pack-destination '$WORK/packed' > '$WORK/pack.json'"
PACKED="$WORK/packed/$(js 'console.log(require(process.argv[1])[0].filename)' "$WORK/pack.json")"
[ -f "$PACKED" ] || fail "npm pack wrote no tarball"
tar tzf "$PACKED" | sed 's|^package/||' | sort >"$WORK/contents.txt"
FORBIDDEN="$(grep -E '^(target|__test__|tests|bench|examples|node_modules|npm|scripts|\.ci|artifacts)/|\.node$|\.tgz$|(^|/)tests\.rs$' "$WORK/contents.txt" || true)"
[ -z "$FORBIDDEN" ] || fail "the tarball ships what it must not: $(echo "$FORBIDDEN" | tr '\n' ' ')"
for f in package.json index.js index.d.ts native.js platform.cjs bin/cleo-runtime-build.cjs README.md LICENSE \
  Cargo.toml Cargo.lock build.rs src/lib.rs testing/index.mjs testing/index.d.ts testing/index.d.mts \
  testing/signaldock-server.mjs testing/fake-registry.mjs testing/cjs/index.cjs \
  testing/cjs/signaldock-server.cjs testing/cjs/fake-registry.cjs; do
  grep -qx "$f" "$WORK/contents.txt" || fail "the tarball lacks $f"
done
# Package managers block or refuse install scripts (pnpm 11 fails the install): none ships.
run "package.json: no install scripts, the bin" js '
  const { execFileSync } = require("child_process");
  const pkg = JSON.parse(execFileSync("tar", ["xzOf", process.argv[1], "package/package.json"], { encoding: "utf8" }));
  const scripts = Object.keys(pkg.scripts || {}).filter((s) => ["preinstall", "install", "postinstall"].includes(s));
  if (scripts.length > 0) throw new Error(`install scripts: ${scripts}`);
  if (pkg.bin?.["cleo-runtime-build"] !== "bin/cleo-runtime-build.cjs") throw new Error(`bin: ${JSON.stringify(pkg.bin)}`);
  if (!pkg.exports?.["./testing"]) throw new Error("no ./testing export");' "$PACKED"
PACKED_BYTES="$(js 'console.log(require("fs").statSync(process.argv[1]).size)' "$PACKED")"
pass "npm pack: $(basename "$PACKED") ($(size "$PACKED") = $PACKED_BYTES bytes, $(wc -l <"$WORK/contents.txt") files; no target/, __test__/, tests, .node or install script)"

# ---------------------------------------------------------------- 2. the publish shape
# `napi prepublish` (prepublishOnly) writes these into package.json at publish time, one per
# napi.targets entry: the repo's package.json has none, or `npm ci` would fail on them
# (npm cannot lock packages that are not on the registry yet).
mkdir -p "$WORK/stage"
tar xzf "$PACKED" -C "$WORK/stage"
run "optionalDependencies for the publish shape" js '
  const { createRequire } = require("module");
  const fs = require("fs");
  const napi = createRequire(process.argv[1] + "/package.json")("@napi-rs/cli");
  napi.readNapiConfig(process.argv[1] + "/package.json").then(({ targets, packageName }) => {
    const file = process.argv[2];
    const pkg = JSON.parse(fs.readFileSync(file, "utf8"));
    pkg.optionalDependencies = Object.fromEntries(targets.map((t) => [`${packageName}-${t.platformArchABI}`, pkg.version]));
    fs.writeFileSync(file, JSON.stringify(pkg, null, 2) + "\n");
    console.log(Object.keys(pkg.optionalDependencies).join(" "));
  });' "$REPO" "$WORK/stage/package/package.json"
OPTIONAL="$(cat "$WORK/last.log")"
echo "$OPTIONAL" | grep -qw "@cleocode/runtime-$PLATFORM" || fail "optionalDependencies lack @cleocode/runtime-$PLATFORM: $OPTIONAL"
# --ignore-scripts: prepack (the testing subpath's CommonJS build) ran in the repo already;
# its script is not in the tarball.
run "npm pack (publish shape)" bash -c "cd '$WORK/stage/package' && npm pack --ignore-scripts --json --pack-destination '$WORK/publish' > '$WORK/pack-publish.json'"
MAIN_TGZ="$WORK/publish/$(js 'console.log(require(process.argv[1])[0].filename)' "$WORK/pack-publish.json")"
pass "publish shape: optionalDependencies $(echo "$OPTIONAL" | wc -w) platform packages @ $VERSION"

# ---------------------------------------------------------------- 3. the platform package
cp "$REPO/npm/$PLATFORM/package.json" "$WORK/platform/"
[ -f "$REPO/npm/$PLATFORM/README.md" ] && cp "$REPO/npm/$PLATFORM/README.md" "$WORK/platform/"
cp "$BINARY" "$WORK/platform/"
run "npm pack (platform package)" bash -c "cd '$WORK/platform' && npm pack --json --pack-destination '$WORK/packed' > '$WORK/pack-platform.json'"
PLATFORM_TGZ="$WORK/packed/$(js 'console.log(require(process.argv[1])[0].filename)' "$WORK/pack-platform.json")"
tar tzf "$PLATFORM_TGZ" | grep -qx "package/cleo-runtime.$PLATFORM.node" || fail "the platform tarball lacks cleo-runtime.$PLATFORM.node"
pass "platform package: $(basename "$PLATFORM_TGZ") ($(size "$PLATFORM_TGZ"); .node $(size "$BINARY"))"

# ---------------------------------------------------------------- 4. a fresh project installs both
APP="$WORK/app"
mkdir -p "$APP"
echo '{ "name": "pack-test-consumer", "private": true }' >"$APP/package.json"
run "npm install <main.tgz> <platform.tgz>" bash -c "cd '$APP' && npm install ${NPM_FLAGS[*]} '$MAIN_TGZ' '$PLATFORM_TGZ'"
grep -qi "script" "$WORK/last.log" && { sed 's/^/      | /' "$WORK/last.log"; fail "npm mentions a script: the package must have none"; }
[ -f "$APP/node_modules/@cleocode/runtime-$PLATFORM/cleo-runtime.$PLATFORM.node" ] || fail "@cleocode/runtime-$PLATFORM not installed"
EXTRA="$(cd "$APP/node_modules/@cleocode" && ls | grep -v -x -e runtime -e "runtime-$PLATFORM" || true)"
[ -z "$EXTRA" ] || fail "unexpected packages installed: $EXTRA"
ls "$APP/node_modules/@cleocode/runtime/"*.node >/dev/null 2>&1 && fail "a .node appeared in the main package (built from source?)"
(cd "$APP" && node -e 'require.resolve("vitest")' >/dev/null 2>&1) && fail "the consumer resolves the repo's node_modules"
pass "fresh project: installed both tarballs offline; other platform packages skipped; no script ran"
run "npx cleo-runtime-build --help" bash -c "cd '$APP' && npx --no-install cleo-runtime-build --help"
grep -q "usage: cleo-runtime-build" "$WORK/last.log" || fail "cleo-runtime-build --help printed no usage"
run "npx cleo-runtime-build --check" bash -c "cd '$APP' && npx --no-install cleo-runtime-build --check"
grep -q "a native binary for $PLATFORM loads" "$WORK/last.log" || { sed 's/^/      | /' "$WORK/last.log"; fail "cleo-runtime-build --check did not find the platform binary"; }
pass "bin: npx cleo-runtime-build --help and --check run; the platform binary loads"

# ---------------------------------------------------------------- 5a. ESM and CJS
cat >"$APP/esm.mjs" <<'EOF'
import * as all from '@cleocode/runtime';
import { createRuntime, AgentPoller, HeartbeatService, KeyRotationService, SseConnectionService,
  HttpTransport, SseTransport, LocalTransport } from '@cleocode/runtime';
const named = { createRuntime, AgentPoller, HeartbeatService, KeyRotationService, SseConnectionService, HttpTransport, SseTransport, LocalTransport };
for (const [name, value] of Object.entries(named)) {
  if (typeof value !== 'function') throw new Error(`${name} is ${typeof value}`);
  if (all[name] !== value) throw new Error(`${name} differs between named and namespace import`);
}
const rejected = await createRuntime(null).then(() => null, (e) => e);
if (!(rejected instanceof TypeError)) throw new Error(`createRuntime(null) should reject with a TypeError, got ${rejected}`);
console.log(Object.keys(named).join(','));
EOF
run "ESM import" bash -c "cd '$APP' && node esm.mjs"
pass "ESM: import { $(cat "$WORK/last.log") }"
cat >"$APP/cjs.cjs" <<'EOF'
const runtime = require('@cleocode/runtime');
const names = ['createRuntime', 'AgentPoller', 'HeartbeatService', 'KeyRotationService', 'SseConnectionService', 'HttpTransport', 'SseTransport', 'LocalTransport'];
for (const name of names) if (typeof runtime[name] !== 'function') throw new Error(`${name} is ${typeof runtime[name]}`);
if (require('@cleocode/runtime/package.json').version !== process.argv[2]) throw new Error('version mismatch');
console.log(Object.keys(runtime).length);
EOF
run "CJS require" bash -c "cd '$APP' && node cjs.cjs '$VERSION'"
pass "CJS: require('@cleocode/runtime') gives $(cat "$WORK/last.log") exports"

# ---------------------------------------------------------------- 5b. types
cat >"$APP/tsconfig.json" <<'EOF'
{
  "compilerOptions": {
    "strict": true, "noEmit": true, "target": "ES2022", "lib": ["ES2022"],
    "module": "NodeNext", "moduleResolution": "NodeNext", "types": [], "skipLibCheck": false
  },
  "files": ["consumer.mts"]
}
EOF
cat >"$APP/consumer.mts" <<'EOF'
import { createRuntime, AgentPoller, LocalTransport, type AgentCredential, type ConduitMessage,
  type RuntimeConfig, type RuntimeHandle, type RuntimeRegistry, type Transport } from '@cleocode/runtime';

const now = new Date().toISOString();
const credential: AgentCredential = {
  agentId: 'bob', displayName: 'bob', apiKey: 'key-b', apiBaseUrl: 'http://127.0.0.1:1',
  privacyTier: 'private', capabilities: [], skills: [], transportType: 'http', transportConfig: {},
  isActive: true, createdAt: now, updatedAt: now,
};
const registry: RuntimeRegistry = {
  get: async (id: string) => (id === credential.agentId ? credential : null),
  getActive: async () => credential,
  rotateKey: async (agentId: string) => ({ agentId, newApiKey: 'key-b2' }),
};
const config: RuntimeConfig = { agentId: 'bob', pollIntervalMs: 1000, heartbeatIntervalMs: 0 };
const handle: RuntimeHandle = await createRuntime(registry, config);
handle.poller.onMessage((message: ConduitMessage) => { const text: string = message.content; void text; });
const transport: Transport = handle.transport;
const poller: AgentPoller = handle.poller;
const local: Transport = new LocalTransport({ dbPath: '/tmp/signaldock.db' });
void transport; void poller; void local;
handle.stop();
// @ts-expect-error pollIntervalMs is a number
await createRuntime(registry, { pollIntervalMs: '1000' });
EOF
[ -x "$REPO/node_modules/.bin/tsc" ] || fail "no $REPO/node_modules/.bin/tsc (npm ci first)"
run "tsc --strict --noEmit (consumer.mts)" bash -c "cd '$APP' && '$REPO/node_modules/.bin/tsc' -p tsconfig.json --strict --noEmit"
pass "types: tsc --strict --noEmit of consumer.mts against the installed index.d.ts (no @types/node)"

# ---------------------------------------------------------------- 5c. one message end to end
# A coprocess: its stdin is a pipe this script holds, so the server also exits if we are killed.
coproc SIGNALDOCK { exec node "$REPO/testing/signaldock-server.mjs" --agents alice:key-a,bob:key-b >"$WORK/server.out" 2>"$WORK/server.err"; }
SERVER_PID=$SIGNALDOCK_PID
for _ in $(seq 1 100); do
  [ -s "$WORK/server.out" ] && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.err" >&2; fail "the SignalDock test server exited"; }
  sleep 0.1
done
SD_URL="$(js 'console.log(JSON.parse(require("fs").readFileSync(process.argv[1], "utf8").split("\n")[0]).url)' "$WORK/server.out")" \
  || fail "no JSON line from the SignalDock test server"
CONTENT="pack-test $(date +%s)-$$"
run "POST /_test/send" js '
  const [url, content] = process.argv.slice(1);
  fetch(url + "/_test/send", { method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ from: "alice", to: "bob", content }) })
    .then(async (r) => { if (!r.ok) throw new Error(`${r.status} ${await r.text()}`); })
    .catch((e) => { console.error(e); process.exit(1); });' "$SD_URL" "$CONTENT"
cat >"$APP/e2e.mjs" <<'EOF'
import { createRuntime } from '@cleocode/runtime';
const [url, content] = process.argv.slice(2);
const deadline = setTimeout(() => { console.error('no message within 15 s'); process.exit(1); }, 15_000);
const now = new Date().toISOString();
const credential = {
  agentId: 'bob', displayName: 'bob', apiKey: 'key-b', apiBaseUrl: url, privacyTier: 'private',
  capabilities: [], skills: [], transportType: 'http', transportConfig: {}, isActive: true,
  createdAt: now, updatedAt: now,
};
const registry = {
  async get(id) { return id === 'bob' ? credential : null; },
  async getActive() { return credential; },
  async rotateKey(agentId) { return { agentId, newApiKey: credential.apiKey }; },
};
const handle = await createRuntime(registry, { agentId: 'bob', pollIntervalMs: 200, heartbeatIntervalMs: 0, maxKeyAgeMs: 0 });
const msg = await new Promise((resolve) => handle.poller.onMessage(resolve));
if (msg.from !== 'alice' || msg.content !== content) {
  console.error(`unexpected message ${JSON.stringify(msg)}`);
  process.exit(1);
}
// The ack goes out once the handler has settled; stop after the server has it.
let acked = 0;
for (let i = 0; i < 100 && acked !== 1; i++) {
  await new Promise((resolve) => setTimeout(resolve, 50));
  acked = (await (await fetch(`${url}/_test/stats`)).json()).acked.bob;
}
if (acked !== 1) { console.error(`the server saw ${acked} acks for bob`); process.exit(1); }
console.log(`bob received "${msg.content}" from ${msg.from} over ${handle.transport.name}; acked`);
clearTimeout(deadline);
handle.stop(); // the process then exits by itself
EOF
run "end-to-end delivery" bash -c "cd '$APP' && timeout 30 node e2e.mjs '$SD_URL' '$CONTENT'"
DELIVERED="$(cat "$WORK/last.log")"
kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""
pass "end to end: $DELIVERED; the process exited by itself after stop()"

# ---------------------------------------------------------------- 5d. the testing subpath
# A user's test: the test server and fake registry from @cleocode/runtime/testing, one
# message delivered with pollNow() (a one-hour interval: nothing else would poll), as ESM,
# as CommonJS (the generated build; Node 18/20 cannot require ESM), and type-checked.
cat >"$APP/testing-esm.mjs" <<'EOF'
import { createRuntime } from '@cleocode/runtime';
import { FakeRegistry, startSignalDock, testCredential } from '@cleocode/runtime/testing';
const sd = await startSignalDock({ agents: { alice: 'key-alice', bob: 'key-bob' } });
const registry = new FakeRegistry([testCredential('bob', 'key-bob', sd.url)]);
const handle = await createRuntime(registry, { pollIntervalMs: 3_600_000, heartbeatIntervalMs: 0, maxKeyAgeMs: 0 });
const got = [];
handle.poller.onMessage(async (m) => { got.push(`${m.from}: ${m.content}`); });
sd.sendDirect('alice', 'bob', 'hello from the testing subpath');
const report = await handle.poller.pollNow();
if (report.handled !== 1 || got[0] !== 'alice: hello from the testing subpath' || sd.acked('bob').length !== 1) {
  console.error(`unexpected: ${JSON.stringify({ report, got, acked: sd.acked('bob') })}`);
  process.exit(1);
}
handle.stop();
await sd.close();
console.log(`ESM: ${got[0]} (pollNow ${JSON.stringify(report)})`);
EOF
{
  echo '(async () => {'
  sed -e "s|^import { createRuntime } from '@cleocode/runtime';|const { createRuntime } = require('@cleocode/runtime');|" \
      -e "s|^import { FakeRegistry, startSignalDock, testCredential } from '@cleocode/runtime/testing';|const { FakeRegistry, startSignalDock, testCredential } = require('@cleocode/runtime/testing');|" \
      -e 's|^console.log(`ESM: |console.log(`CJS: |' "$APP/testing-esm.mjs"
  echo '})().catch((e) => { console.error(e); process.exit(1); });'
} >"$APP/testing-cjs.cjs"
grep -q "require('@cleocode/runtime/testing')" "$APP/testing-cjs.cjs" || fail "the CommonJS testing consumer was not written"
run "testing subpath (ESM)" bash -c "cd '$APP' && timeout 30 node testing-esm.mjs"
TESTING_ESM="$(cat "$WORK/last.log")"
run "testing subpath (CommonJS)" bash -c "cd '$APP' && timeout 30 node testing-cjs.cjs"
TESTING_CJS="$(cat "$WORK/last.log")"
cat >"$APP/testing.mts" <<'EOF'
import { createRuntime, type PollNowResult } from '@cleocode/runtime';
import { FakeRegistry, startSignalDock, testCredential, type InjectedFault } from '@cleocode/runtime/testing';
const sd = await startSignalDock({ agents: { bob: 'key-bob' } });
const registry = new FakeRegistry([testCredential('bob', 'key-bob', sd.url)]);
const handle = await createRuntime(registry, { pollIntervalMs: 3_600_000 });
const report: PollNowResult = await handle.poller.pollNow();
const fault: InjectedFault = sd.inject({ path: '/messages/peek', status: 503, every: 2 });
// @ts-expect-error every is a number
sd.inject({ path: '/messages/peek', every: 'often' });
void [report.handled, fault.hits];
EOF
cat >"$APP/testing.cts" <<'EOF'
import testing = require('@cleocode/runtime/testing');
export async function start(): Promise<number> {
  const sd = await testing.startSignalDock({ agents: { bob: 'key-bob' } });
  const registry: testing.FakeRegistry = new testing.FakeRegistry([testing.testCredential('bob', 'key-bob', sd.url)]);
  const row: testing.MessageRow = sd.sendDirect('alice', 'bob', 'hi');
  void [registry, row.id];
  return sd.requests.length;
}
EOF
cat >"$APP/tsconfig.testing.json" <<'EOF'
{
  "compilerOptions": {
    "strict": true, "noEmit": true, "target": "ES2022", "lib": ["ES2022"],
    "module": "NodeNext", "moduleResolution": "NodeNext", "types": [], "skipLibCheck": false
  },
  "files": ["testing.mts", "testing.cts"]
}
EOF
run "tsc --strict --noEmit (testing.mts, testing.cts)" bash -c "cd '$APP' && '$REPO/node_modules/.bin/tsc' -p tsconfig.testing.json"
pass "testing subpath: $TESTING_ESM; $TESTING_CJS; tsc --strict of an ESM and a CommonJS consumer"

# ---------------------------------------------------------------- 6. no binary: one clear error
BARE="$WORK/bare"
mkdir -p "$BARE"
echo '{ "name": "pack-test-bare", "private": true }' >"$BARE/package.json"
run "npm install <main.tgz> alone" bash -c "cd '$BARE' && npm install ${NPM_FLAGS[*]} '$MAIN_TGZ'"
grep -qi "script" "$WORK/last.log" && { sed 's/^/      | /' "$WORK/last.log"; fail "npm mentions a script: the package must have none"; }
ls "$BARE/node_modules/@cleocode/runtime/"*.node >/dev/null 2>&1 && fail "a .node appeared in the main package"
if (cd "$BARE" && npx --no-install cleo-runtime-build --check) >"$WORK/check.log" 2>&1; then
  sed 's/^/      | /' "$WORK/check.log" >&2; fail "cleo-runtime-build --check exited 0 without a binary"
fi
grep -q "no native binary for $PLATFORM" "$WORK/check.log" || { sed 's/^/      | /' "$WORK/check.log" >&2; fail "cleo-runtime-build --check printed no diagnosis"; }
cat >"$BARE/check.mjs" <<'EOF'
const [platform] = process.argv.slice(2);
try {
  await import('@cleocode/runtime');
  console.error('the import succeeded without a binary');
  process.exit(1);
} catch (err) {
  const expected = `@cleocode/runtime: no native binary for ${platform} (Node ${process.version}).`;
  if (!err.message.startsWith(expected)) { console.error(`unexpected error: ${err.stack}`); process.exit(1); }
  if (!err.message.includes('`npx cleo-runtime-build`')) { console.error(`the error names no build command: ${err.message}`); process.exit(1); }
  if (!err.cause) { console.error('no cause attached'); process.exit(1); }
  console.log(err.message);
}
EOF
run "import without a binary" bash -c "cd '$BARE' && node check.mjs '$PLATFORM'"
pass "no binary: no script ran; cleo-runtime-build --check exits 1; the import throws one error naming \`npx cleo-runtime-build\`"

# ---------------------------------------------------------------- 7. build from source (opt-in)
if [ "${PACK_TEST_FROM_SOURCE:-0}" = "1" ]; then
  SRC="$WORK/from-source"
  mkdir -p "$SRC"
  echo '{ "name": "pack-test-source", "private": true }' >"$SRC/package.json"
  run "npm install <main.tgz> alone" bash -c "cd '$SRC' && npm install ${NPM_FLAGS[*]} '$MAIN_TGZ'"
  run "npx cleo-runtime-build (from source)" bash -c "cd '$SRC' && npx --no-install cleo-runtime-build"
  grep -q "the binary built from source loads" "$WORK/last.log" || { tail -20 "$WORK/last.log" | sed 's/^/      | /'; fail "no binary built from source"; }
  BUILT="$(grep -o 'built node_modules/[^ ]*' "$WORK/last.log" || echo 'built')"
  cp "$APP/esm.mjs" "$SRC/esm.mjs"
  run "ESM import (built from source)" bash -c "cd '$SRC' && node esm.mjs"
  pass "from source: $BUILT; ESM import works"
fi

pass "pack-test: all checks in $((SECONDS - STARTED)) s"
