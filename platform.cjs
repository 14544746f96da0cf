'use strict';
// The platform id napi's loader (native.js) uses in file and package names, e.g.
// `linux-x64-gnu`, and the platforms a prebuilt binary is published for. Shared by the
// package entry (index.js: its one load error names the platform) and the build command
// (bin/cleo-runtime-build.cjs: the file it writes is named after it).
const fs = require('node:fs');

/** Platforms with a prebuilt binary package, `@cleocode/runtime-<id>` (package.json napi.targets). */
const PUBLISHED = ['linux-x64-gnu', 'linux-x64-musl', 'linux-arm64-gnu', 'darwin-x64', 'darwin-arm64', 'win32-x64-msvc'];

/** This machine's platform id, as native.js computes it. */
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

// The same two sources native.js reads: ldd's text, else the process report.
function isMusl() {
  try {
    return fs.readFileSync('/usr/bin/ldd', 'utf8').includes('musl');
  } catch {
    const report = typeof process.report?.getReport === 'function' ? process.report.getReport() : null;
    return Boolean(report && !report.header?.glibcVersionRuntime);
  }
}

module.exports = { PUBLISHED, platformId };
