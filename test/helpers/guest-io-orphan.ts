/**
 * Worker for test/sys/guest-io.test.ts: makes a GuestIoPool, queues `transfers` writes of its
 * mapping to `path`, says how many threads it started, and ends without closing the pool (a queue
 * worker torn down with requests in flight): the pool's finalizer must neither hang the exit nor
 * leak its threads or its eventfd.
 */
import { parentPort, workerData } from "node:worker_threads";
import { GuestIoPool, GuestIoTable } from "../../src/sys/guest-io.js";
import { openFd } from "../../src/sys/io.js";
import { Mapping } from "../../src/sys/mapping.js";
import { O_RDWR } from "../../src/sys/memfd.js";

const { path, transfers, bytes } = workerData as { path: string; transfers: number; bytes: number };
// Our own open, as BlockImage's: nothing closes it behind the pool's back when the worker ends.
const fd = openFd(path, O_RDWR).fd;
const m = Mapping.anonymous(bytes);
const t = new GuestIoTable(m.windows);
const pool = new GuestIoPool(2);
const segs = Uint32Array.of(0, 0, bytes);
for (let k = 0; k < transfers; k++) void pool.transfer(t, fd, true, 0, segs, 1);
// The fd is the parent's to close once the pool's threads are gone (they still use it).
parentPort?.postMessage({ inFlight: pool.inFlight, fd });
// No close(): the worker's loop has nothing keeping it (the pool's watch is unref'd while idle,
// ref'd now; process.exit ends the thread regardless).
process.exit(0);
