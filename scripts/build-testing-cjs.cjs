#!/usr/bin/env node
'use strict';
// Writes testing/cjs/*.cjs, the CommonJS build of `@cleocode/runtime/testing`, from the ESM
// sources in testing/. Why generated: Jest on Node < 24.9 can neither `require()` an ES
// module nor `import()` one without --experimental-vm-modules, and Node 18 cannot require
// ESM at all, so a CommonJS test suite needs real CommonJS; keeping one source (the ESM the
// project's own tests use) means the two cannot drift. TypeScript's transpiler (a
// devDependency) does the module conversion; nothing else changes.
//
// Runs from `prepack` (so the tarball always holds a fresh build) and from the Jest config
// (so `npx jest` in a checkout never sees a stale one). Fails loudly when a source uses
// something CommonJS cannot express (top-level await, import.meta other than its url).
const fs = require('node:fs');
const path = require('node:path');

const ROOT = path.resolve(__dirname, '..');
const SOURCE_DIR = path.join(ROOT, 'testing');
const OUT_DIR = path.join(SOURCE_DIR, 'cjs');
const SOURCES = ['index.mjs', 'signaldock-server.mjs', 'fake-registry.mjs'];

/** True when every output exists and is newer than its source and this script. */
function upToDate() {
  const self = fs.statSync(__filename).mtimeMs;
  return SOURCES.every((name) => {
    const out = path.join(OUT_DIR, name.replace(/\.mjs$/, '.cjs'));
    if (!fs.existsSync(out)) return false;
    const built = fs.statSync(out).mtimeMs;
    return built >= fs.statSync(path.join(SOURCE_DIR, name)).mtimeMs && built >= self;
  });
}

function convert(ts, name, source) {
  // CommonJS has no import.meta; the url is the only part the sources use (the CLI check).
  const text = source.replace(/import\.meta\.url/g, "require('node:url').pathToFileURL(__filename).href");
  if (/import\.meta/.test(text)) throw new Error(`testing/${name}: uses import.meta beyond .url`);
  const { outputText, diagnostics } = ts.transpileModule(text, {
    fileName: name.replace(/\.mjs$/, '.js'),
    reportDiagnostics: true,
    compilerOptions: {
      module: ts.ModuleKind.CommonJS,
      target: ts.ScriptTarget.ES2022,
      esModuleInterop: true,
      allowJs: true,
      removeComments: false,
    },
  });
  if (diagnostics && diagnostics.length > 0) {
    const first = ts.flattenDiagnosticMessageText(diagnostics[0].messageText, '\n');
    throw new Error(`testing/${name}: ${first}`);
  }
  // Sibling imports point at the sibling .cjs files.
  const linked = outputText.replace(/require\((["'])\.\/([\w.-]+)\.mjs\1\)/g, 'require($1./$2.cjs$1)');
  return `// Generated from testing/${name} by scripts/build-testing-cjs.cjs; do not edit.\n${linked}`;
}

/** Writes the CommonJS build when it is missing or stale; returns the files written. */
function generate({ force = false } = {}) {
  if (!force && upToDate()) return [];
  const ts = require('typescript');
  fs.mkdirSync(OUT_DIR, { recursive: true });
  const written = [];
  for (const name of SOURCES) {
    const out = path.join(OUT_DIR, name.replace(/\.mjs$/, '.cjs'));
    fs.writeFileSync(out, convert(ts, name, fs.readFileSync(path.join(SOURCE_DIR, name), 'utf8')));
    written.push(out);
  }
  // Loading it proves the conversion (a top-level await would be a syntax error here).
  const entry = path.join(OUT_DIR, 'index.cjs');
  delete require.cache[entry];
  const loaded = require(entry);
  for (const name of ['startSignalDock', 'SignalDock', 'FakeRegistry', 'testCredential', 'dmConversationId']) {
    if (typeof loaded[name] !== 'function') throw new Error(`testing/cjs/index.cjs lacks ${name}`);
  }
  return written;
}

module.exports = { generate };

if (require.main === module) {
  const written = generate({ force: true });
  // stderr: `npm pack --json` runs this as prepack, and its stdout is the JSON.
  process.stderr.write(`wrote ${written.map((f) => path.relative(ROOT, f)).join(', ')}\n`);
}
