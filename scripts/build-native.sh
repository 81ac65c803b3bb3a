#!/bin/sh
# Builds the addon when its sources are newer than the build (node-gyp, local Node headers via
# the project .npmrc). `--force` rebuilds unconditionally.
set -eu
cd "$(dirname "$0")/.."
out=native/build/Release/vmshift.node
ref=native/build/Release/vmshift_bench_ref.node
if [ "${1:-}" != "--force" ] && [ -f "$out" ] && [ -f "$ref" ] \
   && [ -z "$(find native -maxdepth 1 \( -name '*.cc' -o -name '*.h' -o -name 'binding.gyp' \) -newer "$out")" ]; then
  exit 0
fi
exec node-gyp rebuild --directory=native --jobs=2
