/**
 * Child for the EMFILE test: a daemon in a process whose fd limit (set by the parent with
 * prlimit) is used up by the process itself, so accept(2) fails with EMFILE. Protocol on stdout:
 * "exhausted" once no fd is left, "retrying" when the daemon reports the failed accept (then the
 * hoard is released), "served" when the front-end's session starts.
 */
import { openSync } from "node:fs";
import { echoDevice } from "../../src/devices/examples/echo.js";
import { Fd } from "../../src/sys/fd.js";
import { VhostUserDaemon } from "../../src/vhost-user/backend/daemon.js";

const daemon = VhostUserDaemon.listen(echoDevice(), process.argv[2] as string);
const hoard: Fd[] = [];
daemon.on("log", (_level, msg) => {
  if (msg.includes("accept failed (EMFILE)") && hoard.length > 0) {
    process.stdout.write("retrying\n");
    for (const f of hoard.splice(0)) f.close();
  }
});
daemon.on("session", () => process.stdout.write("served\n"));
for (;;) {
  try {
    hoard.push(new Fd(openSync("/dev/null", "r")));
  } catch {
    break;
  }
}
process.stdout.write("exhausted\n");
process.on("SIGTERM", () => void daemon.close().then(() => process.exit(0)));
await daemon.serve();
