#!/bin/sh
# npm run bench -- NAME [--json]
set -eu
cd "$(dirname "$0")/.."
[ -d node_modules ] || npm ci --no-audit --no-fund >&2
npm run --silent build >&2
exec node --expose-gc dist/bench/main.js "$@"
