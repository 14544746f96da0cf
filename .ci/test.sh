#!/usr/bin/env bash
# The whole test suite, from a fresh clone: install, build, lint, type-check, test.
# `npm test` runs this; so does CI (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s\n' "$*"; }

step "install JS dependencies (npm ci, else npm install)"
bash .ci/install.sh

step "native build (release)"
npm run build

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (core, and with the Node-API boundary)"
cargo clippy --all-targets -- -D warnings
cargo clippy --features node -- -D warnings

step "cargo test (core)"
cargo test

step "tsc --strict on a consumer written like the cleo CLI"
npx tsc -p __test__/types/tsconfig.json

step "vitest (ESM, through the package entry)"
npx vitest run

step "jest (CommonJS, through the package entry; nothing left open after stop())"
JEST_LOG="$(mktemp)"
npx jest --config __test__/jest/jest.config.cjs --detectOpenHandles 2>&1 | tee "$JEST_LOG"
# Jest only prints what --detectOpenHandles finds (the run still passes): fail on it here.
if grep -q "detected the following .* open handle" "$JEST_LOG"; then
  rm -f "$JEST_LOG"; echo "jest --detectOpenHandles found open handles (above)" >&2; exit 1
fi
rm -f "$JEST_LOG"

step "packaging: the tarballs installed into a fresh project (import, require, types, one message)"
bash .ci/pack-test.sh
