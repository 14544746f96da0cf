#!/usr/bin/env node
'use strict';
// The `install` script of @cleocode/runtime. It never fails the user's install (exit 0
// always); the import is what fails, with one clear error (see index.js), when no binary
// loads. What it does:
//   1. a native binary loads (the platform package @cleocode/runtime-<platform>, or a
//      cleo-runtime.<platform>.node next to this file): nothing to do;
//   2. none loads and `cargo` is on PATH: builds the addon from the shipped sources
//      (`cargo build --release --locked --features node`) and copies the library to
//      cleo-runtime.<platform>.node, where the loader (native.js) looks first;
//   3. neither: prints what to do and exits 0.
// Skipped in a development checkout (there `npm run build` builds the addon) and when
// CLEO_RUNTIME_NO_BUILD=1 (no build from source; step 1 still reports).
// npm ≥ 7 shows an install script's output only when it fails or with --foreground-scripts.
const { spawnSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const ROOT = __dirname;
const BINARY_NAME = 'cleo-runtime';
const NAPI_VERSION = 9;

const log = (message) => process.stderr.write(`@cleocode/runtime: ${message}\n`);

/** The platform id napi's loader (native.js) uses in file and package names, e.g. `linux-x64-gnu`. */
function platformId() {
  const { platform, arch } = process;
  if (platform === 'linux') {
    const musl = isMusl();
    if (arch === 'arm') return `linux-arm-${musl ? 'musleabihf' : 'gnueabihf'}`;
    return `linux-${arch}-${musl ? 'musl' : 'gnu'}`;
  }
  if (platform === 'win32') return `win32-${arch}-msvc`;
  if (platform === 'android' && arch === 'arm') return 'android-arm-eabi';
  return `${platform}-${arch}`;
}

function isMusl() {
  try {
    return fs.readFileSync('/usr/bin/ldd', 'utf8').includes('musl');
  } catch {
    const report = typeof process.report?.getReport === 'function' ? process.report.getReport() : null;
    return Boolean(report && !report.header?.glibcVersionRuntime);
  }
}

/** Loads native.js in a child Node (a crashing binary cannot take this script down). */
function probe() {
  const source = [
    'require(process.argv[1]);',
    "const hit = Object.keys(require.cache).find((f) => f.endsWith('.node'));",
    "process.stdout.write(hit || '');",
  ].join('');
  const child = spawnSync(process.execPath, ['-e', source, path.join(ROOT, 'native.js')], {
    encoding: 'utf8',
    timeout: 60_000,
    stdio: ['ignore', 'pipe', 'pipe'],
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

/** This package's own checkout (a git clone, or `npm install` run in it), not an installed copy. */
function developmentCheckout() {
  if (fs.existsSync(path.join(ROOT, '.git'))) return true;
  const initCwd = process.env.INIT_CWD;
  return Boolean(initCwd) && path.resolve(initCwd) === ROOT && !ROOT.split(path.sep).includes('node_modules');
}

function libraryFile() {
  if (process.platform === 'win32') return 'cleo_runtime.dll';
  if (process.platform === 'darwin') return 'libcleo_runtime.dylib';
  return 'libcleo_runtime.so';
}

function rel(file) {
  const relative = path.relative(process.env.INIT_CWD || process.cwd(), file);
  return relative && !relative.startsWith('..') ? relative : file;
}

function buildFromSource(platform, cargo) {
  const missing = ['Cargo.toml', 'Cargo.lock', 'build.rs', path.join('src', 'lib.rs')]
    .filter((file) => !fs.existsSync(path.join(ROOT, file)));
  if (missing.length > 0) {
    log(`cannot build from source: ${missing.join(', ')} missing from ${ROOT}.`);
    return false;
  }
  const ownTarget = !process.env.CARGO_TARGET_DIR;
  const targetDir = process.env.CARGO_TARGET_DIR || fs.mkdtempSync(path.join(os.tmpdir(), 'cleo-runtime-build-'));
  const dest = path.join(ROOT, `${BINARY_NAME}.${platform}.node`);
  const args = ['build', '--release', '--locked', '--features', 'node'];
  log(`no prebuilt binary for ${platform} (Node ${process.version}); building from source with ${cargo}.`);
  log(`running \`cargo ${args.join(' ')}\` in ${ROOT} (target dir ${targetDir}); this takes a few minutes.`);
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
    log(`building from source failed: ${err.message}`);
    return false;
  } finally {
    if (ownTarget) fs.rmSync(targetDir, { recursive: true, force: true });
  }
}

function whatToDo(platform) {
  return [
    `The prebuilt binaries come in the optional dependency @cleocode/runtime-${platform}`,
    '(published for linux-x64-gnu, linux-x64-musl, linux-arm64-gnu, darwin-x64, darwin-arm64,',
    'win32-x64-msvc): reinstall without --omit=optional / --no-optional. Elsewhere, install Rust',
    '(https://rustup.rs, 1.95 or newer) and run `npm rebuild @cleocode/runtime --foreground-scripts`',
    '(with npm 11, approve this package\'s install script first: `npm install-scripts approve @cleocode/runtime`).',
  ].join('\n  ');
}

function main() {
  if (developmentCheckout()) {
    log('development checkout: skipping the binary check (`npm run build` builds the addon).');
    return;
  }
  const platform = platformId();
  const napi = Number(process.versions.napi);
  if (!(napi >= NAPI_VERSION)) {
    log(`needs Node-API ${NAPI_VERSION} (Node ^18.17.0 or >= 20.3.0); Node ${process.version} has Node-API ${process.versions.napi}. Upgrade Node.`);
    return;
  }
  const first = probe();
  if (first.ok) {
    log(`native binary for ${platform} loads${first.file ? ` (${rel(first.file)})` : ''}.`);
    return;
  }
  if (process.env.CLEO_RUNTIME_NO_BUILD === '1') {
    log(`no loadable binary for ${platform} (Node ${process.version}) and CLEO_RUNTIME_NO_BUILD=1: not building from source.\n  ${whatToDo(platform)}`);
    return;
  }
  const cargo = cargoVersion();
  if (!cargo) {
    log(`no prebuilt binary for ${platform} (Node ${process.version}) and no Rust toolchain (cargo) on PATH:`
      + ` importing @cleocode/runtime will fail.${first.detail ? `\n  Loader: ${first.detail}` : ''}\n  ${whatToDo(platform)}`);
    return;
  }
  if (!buildFromSource(platform, cargo)) {
    log(`importing @cleocode/runtime will fail on ${platform} until a binary is available.\n  ${whatToDo(platform)}`);
    return;
  }
  const second = probe();
  if (second.ok) log(`native binary for ${platform} built from source and loads.`);
  else log(`the binary built from source does not load: ${second.detail}`);
}

if (require.main === module) {
  try {
    main();
  } catch (err) {
    log(`install check failed: ${err && err.stack ? err.stack : err}`);
  }
  process.exitCode = 0;
}

module.exports = { platformId };
