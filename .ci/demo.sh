#!/usr/bin/env bash
# The README's main command: installs and builds only what is missing, then runs the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d node_modules/@napi-rs/cli ] || bash .ci/install.sh
ls cleo-runtime.*.node >/dev/null 2>&1 || npm run build
node examples/demo.mjs
