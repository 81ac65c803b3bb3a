#!/bin/sh
# Builds the addon (Node-API, so one binary serves every supported Node line) when its sources are
# newer than the build. `--force` rebuilds unconditionally.
#
# Headers: those of the Node that runs this script (under `npm run`, node_modules/.bin/node, the
# pinned Node 24), found from its own executable: <prefix>/bin/node -> <prefix>/include/node.
# That holds for the npm registry's Node packages, the official tarballs and images (/usr/local),
# nvm and the nodesource .deb (/usr). Only when that prefix has no headers does node-gyp fall back
# to its own header cache (which needs a download).
set -eu
cd "$(dirname "$0")/.."
out=native/build/Release/vmshift.node
ref=native/build/Release/vmshift_bench_ref.node
if [ "${1:-}" != "--force" ] && [ -f "$out" ] && [ -f "$ref" ] \
   && [ -z "$(find native -maxdepth 2 \( -name '*.cc' -o -name '*.h' -o -name 'binding.gyp' \) -newer "$out")" ]; then
  exit 0
fi
prefix=$(node -p 'require("node:path").resolve(require("node:fs").realpathSync(process.execPath), "../..")')
# A nodedir from the environment or a user's ~/.npmrc (npm exports it as npm_config_nodedir) would
# pair this Node with another Node's headers: the running Node's own prefix wins.
unset npm_config_nodedir NPM_CONFIG_NODEDIR
if [ -f "$prefix/include/node/node_api.h" ]; then
  set -- --nodedir="$prefix"
else
  echo "build-native.sh: no headers under $prefix/include/node; node-gyp will use its header cache" >&2
  set --
fi
gyp=${npm_config_node_gyp:-}
if [ -n "$gyp" ]; then
  exec node "$gyp" rebuild --directory=native --jobs=2 "$@"
fi
exec node-gyp rebuild --directory=native --jobs=2 "$@"
