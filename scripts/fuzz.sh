#!/bin/sh
# npm run fuzz -- [RUNS] [SEED]: the property-based fuzzers (vhost-user decoder, virtqueue walker,
# packed-ring walker, FUSE session, migration stream destination: RUNS/10, each run is a whole migration stream)
# with RUNS runs each (default 100000) and a fresh seed (printed; pass it back to replay a failure).
# The test suite runs the same properties with a fixed seed and a few thousand runs.
set -eu
cd "$(dirname "$0")/.."
runs="${1:-100000}"
seed="${2:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}"
. scripts/node-env.sh
[ -f native/build/Release/vmshift.node ] || npm run --silent build:native >&2
npm run --silent build:ts >&2
echo "fuzz: $runs runs per property, seed $seed" >&2
VMSHIFT_FUZZ_RUNS="$runs" VMSHIFT_FUZZ_SEED="$seed" exec node --test --test-concurrency=1 \
  dist/test/vhost-user/fuzz-decoder.test.js dist/test/virtio/fuzz-queue.test.js dist/test/virtio/fuzz-packed.test.js \
  dist/test/migration/fuzz-stream.test.js dist/test/devices/fs-fuzz.test.js
