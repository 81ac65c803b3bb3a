#!/bin/sh
# `npm pack` / `npm publish` step: a fresh build, no stale outputs, and the prebuilt Node-API
# binary at prebuilds/linux-x64/ (one binary for every supported Node line). postpack removes
# prebuilds/ again so a checkout always loads its own source build.
set -eu
cd "$(dirname "$0")/.."
npm run --silent build
# Outputs of sources that no longer exist must not ship.
find dist/src -name '*.js' | while read -r f; do
  src=${f#dist/}
  [ -f "${src%.js}.ts" ] || rm -f "$f" "${f%.js}.d.ts" "$f.map"
done
mkdir -p prebuilds/linux-x64
cp native/build/Release/vmshift.node prebuilds/linux-x64/vmshift.napi.node
strip --strip-unneeded prebuilds/linux-x64/vmshift.napi.node 2>/dev/null || true
