#!/bin/sh
# Runs the vmshift CLI from a fresh checkout: installs and builds on first use.
set -eu
cd "$(dirname "$0")/.."
if [ ! -f native/build/Release/vmshift.node ] || [ ! -f dist/src/cli/main.js ] || [ -n "$(find src native -newer dist/src/cli/main.js -name '*.ts' -o -newer dist/src/cli/main.js -name '*.cc' 2>/dev/null | head -1)" ]; then
  [ -d node_modules ] || npm ci --no-audit --no-fund >&2
  npm run --silent build >&2
fi
exec node dist/src/cli/main.js "$@"
