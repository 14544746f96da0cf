#!/usr/bin/env node
'use strict';
// `cleo-runtime-build`: builds the @cleocode/runtime addon from the Rust sources the package
// ships, for a platform no prebuilt binary fits. Users run it by hand (`npx cleo-runtime-build`)
// when the import says so: the package has no install script, because package managers now
// block or refuse them (pnpm 11 fails the install, Bun and Yarn 4 skip it, npm warns), and a
// prebuilt binary needs none. What it does:
//   1. a native binary loads (the platform package @cleocode/runtime-<platform>, or a
//      cleo-runtime.<platform>.node next to index.js): says so; nothing to build;
//   2. else, with `cargo` on PATH: `cargo build --release --locked --features node` in the
//      package directory, then copies the library to cleo-runtime.<platform>.node, where the
//      loader (native.js) looks first, and checks that it loads;
//   3. else: says what to do.
// `--check` stops after 1 (exit 1 when nothing loads); `--force` builds even when one loads.
const { spawnSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { PUBLISHED, platformId } = require('../platform.cjs');

const ROOT = path.resolve(__dirname, '..');
const BINARY_NAME = 'cleo-runtime';
const NAPI_VERSION = 9;
const USAGE = `usage: cleo-runtime-build [--check] [--force] [--help]

Builds the @cleocode/runtime native addon from the Rust sources in the package, for a
platform with no prebuilt binary (published for ${PUBLISHED.join(', ')}).

  (no option)  check whether a binary loads; when none does, build one with
               \`cargo build --release --locked --features node\` (Rust 1.95 or newer,
               crates.io access, a few minutes) and write cleo-runtime.<platform>.node
               into the package directory, where the package loads it from
  --check      only check: exit 0 when a binary loads, 1 when none does
  --force      build even when a binary loads
  --help       this text

Environment: CARGO_TARGET_DIR (default: a temporary directory, removed afterwards),
CARGO_BUILD_TARGET, and cargo's own variables.
Package directory: ${ROOT}
`;

const log = (message) => process.stderr.write(`cleo-runtime-build: ${message}\n`);

/**
 * Loads native.js in a child process (a crashing binary cannot take this command down).
 * The path goes in the environment, not argv: under Deno the child's argv[1] is Deno's own
 * eval file, and the probe would look in the wrong place.
 */
function probe() {
  const source = [
    'require(process.env.CLEO_RUNTIME_PROBE);',
    "const hit = Object.keys(require.cache).find((f) => f.endsWith('.node'));",
    "process.stdout.write(hit || '');",
  ].join('');
  const child = spawnSync(process.execPath, ['-e', source], {
    encoding: 'utf8',
    timeout: 60_000,
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, CLEO_RUNTIME_PROBE: path.join(ROOT, 'native.js') },
  });
  if (child.status === 0) return { ok: true, file: child.stdout.trim() };
  const detail = (child.stderr || String(child.error || `exit ${child.status ?? child.signal}`))
    .split('\n')
    .find((line) => /Error|error:/.test(line)) ?? '';
  return { ok: false, detail: detail.trim() };
}

function cargoVersion() {
  const child = spawnSync('cargo', ['--version'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
  return child.status === 0 ? child.stdout.trim() : null;
}

function libraryFile() {
  if (process.platform === 'win32') return 'cleo_runtime.dll';
  if (process.platform === 'darwin') return 'libcleo_runtime.dylib';
  return 'libcleo_runtime.so';
}

function rel(file) {
  const relative = path.relative(process.cwd(), file);
  return relative && !relative.startsWith('..') ? relative : file;
}

/** Builds and copies the library next to index.js; true on success. */
function buildFromSource(platform, cargo) {
  const missing = ['Cargo.toml', 'Cargo.lock', 'build.rs', path.join('src', 'lib.rs')]
    .filter((file) => !fs.existsSync(path.join(ROOT, file)));
  if (missing.length > 0) {
    log(`cannot build: ${missing.join(', ')} missing from ${ROOT}.`);
    return false;
  }
  const ownTarget = !process.env.CARGO_TARGET_DIR;
  const targetDir = process.env.CARGO_TARGET_DIR || fs.mkdtempSync(path.join(os.tmpdir(), 'cleo-runtime-build-'));
  const dest = path.join(ROOT, `${BINARY_NAME}.${platform}.node`);
  const args = ['build', '--release', '--locked', '--features', 'node'];
  log(`building for ${platform} (Node ${process.version}) with ${cargo}:`);
  log(`\`cargo ${args.join(' ')}\` in ${ROOT} (target dir ${targetDir}); this takes a few minutes.`);
  const started = Date.now();
  try {
    const child = spawnSync('cargo', args, {
      cwd: ROOT,
      env: { ...process.env, CARGO_TARGET_DIR: targetDir },
      stdio: ['ignore', 2, 2],
    });
    if (child.status !== 0) {
      log(`cargo build failed (${child.error ? child.error.message : `exit ${child.status ?? child.signal}`}).`);
      return false;
    }
    // A CARGO_BUILD_TARGET in the environment puts the output under target/<triple>/.
    const built = path.join(targetDir, process.env.CARGO_BUILD_TARGET || '', 'release', libraryFile());
    fs.copyFileSync(built, dest);
    const mib = (fs.statSync(dest).size / 1048576).toFixed(1);
    log(`built ${rel(dest)} (${mib} MiB) in ${Math.round((Date.now() - started) / 1000)} s.`);
    return true;
  } catch (err) {
    // Typically a read-only package directory (Yarn Plug'n'Play keeps packages in zips).
    log(`building failed: ${err.message}`);
    return false;
  } finally {
    if (ownTarget) fs.rmSync(targetDir, { recursive: true, force: true });
  }
}

function whatToDo(platform) {
  const prebuilt = PUBLISHED.includes(platform)
    ? `The prebuilt binary for ${platform} is the optional dependency @cleocode/runtime-${platform}: `
      + 'reinstall without --omit=optional / --no-optional. Or install '
    : `No prebuilt binary is published for ${platform}. Install `;
  return `${prebuilt}Rust (https://rustup.rs, 1.95 or newer) and run \`npx cleo-runtime-build\` again.`;
}

/** Returns the exit code. */
function main(argv) {
  const flags = new Set(argv);
  const unknown = argv.filter((a) => !['--check', '--force', '--help', '-h'].includes(a));
  if (unknown.length > 0) {
    process.stderr.write(`cleo-runtime-build: unknown argument ${unknown[0]}\n\n${USAGE}`);
    return 2;
  }
  if (flags.has('--help') || flags.has('-h')) {
    process.stdout.write(USAGE);
    return 0;
  }
  const platform = platformId();
  const napi = Number(process.versions.napi);
  if (!(napi >= NAPI_VERSION)) {
    log(`needs Node-API ${NAPI_VERSION} (Node ^18.17.0 or >= 20.3.0); Node ${process.version} has Node-API ${process.versions.napi}. Upgrade Node.`);
    return 1;
  }
  const first = probe();
  if (first.ok && !flags.has('--force')) {
    log(`a native binary for ${platform} loads${first.file ? ` (${rel(first.file)})` : ''}: nothing to build.`);
    return 0;
  }
  if (!first.ok) {
    log(`no native binary for ${platform} (Node ${process.version}) loads.${first.detail ? ` Loader: ${first.detail}` : ''}`);
  }
  if (flags.has('--check')) {
    if (!first.ok) log(whatToDo(platform));
    return first.ok ? 0 : 1;
  }
  const cargo = cargoVersion();
  if (!cargo) {
    log(`no Rust toolchain (cargo) on PATH. ${whatToDo(platform)}`);
    return 1;
  }
  if (!buildFromSource(platform, cargo)) return 1;
  const second = probe();
  if (!second.ok) {
    log(`the binary built from source does not load: ${second.detail}`);
    return 1;
  }
  log(`the binary built from source loads; import @cleocode/runtime as usual.`);
  return 0;
}

if (require.main === module) {
  try {
    process.exitCode = main(process.argv.slice(2));
  } catch (err) {
    log(`failed: ${err && err.stack ? err.stack : err}`);
    process.exitCode = 1;
  }
}
