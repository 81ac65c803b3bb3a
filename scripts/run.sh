#!/bin/sh
# Runs the vmshift CLI from a fresh checkout on the pinned Node: installs and builds on first use.
set -eu
cd "$(dirname "$0")/.."
. scripts/node-env.sh
if [ ! -f native/build/Release/vmshift.node ] || [ ! -f dist/src/cli/main.js ] || [ -n "$(find src native -newer dist/src/cli/main.js \( -name '*.ts' -o -name '*.cc' -o -name '*.h' \) 2>/dev/null | head -1)" ]; then
  npm run --silent build >&2
fi
exec node dist/src/cli/main.js "$@"
