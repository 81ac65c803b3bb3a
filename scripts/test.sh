#!/bin/sh
# The whole test suite, from a fresh checkout: installs what it needs, builds, runs.
#   npm test                 everything (installs npm packages and, for interop tests, Debian packages)
#   npm test -- FILTER       only test files whose path contains FILTER
#   npm run test:only        skip the install steps (Debian packages; npm packages still come
#                            when node_modules is missing: the pinned Node is one of them)
# Runs on the pinned Node 24 (node_modules/.bin/node). VMSHIFT_TEST_NODE=/path/to/node runs the
# tests on another Node instead (CI: Node 26), with the addon built as usual.
set -eu
cd "$(dirname "$0")/.."
install=1
filter=""
for a in "$@"; do
  case "$a" in
    --no-install) install=0 ;;
    *) filter="$a" ;;
  esac
done
if [ "$install" = 1 ]; then
  sh scripts/install.sh
fi
. scripts/node-env.sh
npm run --silent build
# Lint and format check (biome): fast, and part of what "green" means.
npx biome check src test bench
files=$(find dist/test -name '*.test.js' | sort | grep -F -- "$filter" || true)
if [ -z "$files" ]; then echo "no test files match '$filter'" >&2; exit 1; fi
# One file at a time: the machine has 2 cores and several tests start workers or QEMU.
exec "${VMSHIFT_TEST_NODE:-node}" --test --test-concurrency=1 $files
