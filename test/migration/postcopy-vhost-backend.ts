/**
 * A vmshift vhost-user back-end (the echo device, counting what it served as its device state:
 * test/helpers/stateful-device.ts) in its own process, for the postcopy tests:
 * `node postcopy-vhost-backend.js SOCKET [no-pagefault]`. Prints "ready" once listening; exits
 * on SIGTERM or when stdin closes (the test that owns it is gone).
 */
import { VhostUserDaemon } from "../../src/vhost-user/backend/daemon.js";
import type { VhostUserDevice } from "../../src/vhost-user/backend/device.js";
import { featureMask, ProtocolFeature } from "../../src/vhost-user/protocol/constants.js";
import { statefulDevice } from "../helpers/stateful-device.js";

const [path, mode] = process.argv.slice(2);
if (!path) throw new Error("usage: postcopy-vhost-backend SOCKET [no-pagefault]");
const echo = statefulDevice();
const device: VhostUserDevice =
  mode === "no-pagefault"
    ? { ...echo, info: { ...echo.info, withoutProtocolFeatures: featureMask(ProtocolFeature.PAGEFAULT) } }
    : echo;
const daemon = VhostUserDaemon.listen(device, path);
daemon.on("log", (level, message) => {
  if (level !== "info" && !stopping) process.stderr.write(`backend ${level}: ${message}\n`);
});
let stopping = false;
const serving = daemon.serve();
const stop = () => {
  if (stopping) return;
  stopping = true;
  void daemon
    .close()
    .then(() => serving)
    .finally(() => process.exit(0));
};
process.on("SIGTERM", stop);
process.stdin.on("end", stop);
process.stdin.resume();
process.stdout.write("ready\n");
