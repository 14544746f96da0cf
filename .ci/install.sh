#!/usr/bin/env bash
# Installs the JS dependencies from the lockfile. `npm ci` first; npm 11.16+ refuses a
# lockfile that lacks optional platform packages the registry does not serve (here: some
# @napi-rs/* and @unrs/* binaries for other platforms, which 404), so fall back to
# `npm install`, which resolves the same tree from the same lockfile and leaves it unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! npm ci --no-audit --no-fund; then
  echo "npm ci refused the lockfile; installing with npm install instead" >&2
  npm install --no-audit --no-fund
fi
