#!/bin/sh
# npm run bench -- NAME [--json]
set -eu
cd "$(dirname "$0")/.."
. scripts/node-env.sh
npm run --silent build >&2
exec node --expose-gc dist/bench/main.js "$@"
