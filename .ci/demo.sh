#!/usr/bin/env bash
# The README's main command: installs and builds only what is missing, then runs the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d node_modules/@napi-rs/cli ] || npm ci --no-audit --no-fund
ls cleo-runtime.*.node >/dev/null 2>&1 || npm run build
node examples/demo.mjs
