/**
 * A test device: echo, except that a request whose first byte is 0xFF blocks forever when the
 * process runs with VMSHIFT_TEST_GATE=1 (a back-end that dies with a request in flight).
 * Run as a program, it serves the device on argv[2] (one process = one back-end life).
 */
import { isMainThread } from "node:worker_threads";
import { echoDevice } from "../../src/devices/examples/echo.js";
import { VhostUserDaemon } from "../../src/vhost-user/backend/daemon.js";
import type { QueueContext, QueueHandler, VhostUserDevice } from "../../src/vhost-user/backend/device.js";
import { featureMask, ProtocolFeature } from "../../src/vhost-user/protocol/constants.js";

export function gateDevice(): VhostUserDevice {
  const base = echoDevice();
  return {
    ...base,
    info: { ...base.info, protocolFeatures: featureMask(ProtocolFeature.INFLIGHT_SHMFD), packedRing: true },
    queueWorker: new URL(import.meta.url),
    workerData: () => ({ gate: process.env.VMSHIFT_TEST_GATE === "1" }),
  };
}

export function createQueueHandler(ctx: QueueContext): QueueHandler {
  const gate = (ctx.data as { gate: boolean }).gate;
  const never = new Int32Array(new SharedArrayBuffer(4));
  return {
    process(chain) {
      const data = chain.readReadable();
      if (gate && data[0] === 0xff) Atomics.wait(never, 0, 0);
      return chain.writeWritable(data);
    },
  };
}

if (isMainThread && process.argv[2] && import.meta.url === new URL(process.argv[1] ?? "", "file://").href) {
  const d = VhostUserDaemon.listen(gateDevice(), process.argv[2]);
  d.on("log", (level, msg) => process.stderr.write(`[gate ${process.pid}] ${level}: ${msg}\n`));
  process.stdout.write("listening\n");
  await d.serve();
}
