/**
 * Child process for the fd-passing test: connects to argv[2], sends a memfd (holding
 * CHILD_BYTES) and an eventfd with the message "memfd+eventfd", then waits for the parent to
 * signal the eventfd and prints "signalled N".
 */
import { EventFd } from "../../src/sys/eventfd.js";
import { Mapping } from "../../src/sys/mapping.js";
import { createMemfd } from "../../src/sys/memfd.js";
import { UnixSocket } from "../../src/sys/unix-socket.js";

const CHILD_BYTES = "bytes written by the child process";

const path = process.argv[2];
if (!path) throw new Error("usage: fdpass-child SOCKET");
const sock = UnixSocket.connect(path);
const memfd = createMemfd("fdpass-child", 4096);
const m = Mapping.map(memfd, 4096);
m.write(0, new TextEncoder().encode(CHILD_BYTES));
m.close();
const efd = new EventFd();
const watch = efd.onSignal((n) => {
  process.stdout.write(`signalled ${n}\n`);
  watch.close();
  efd.close();
  sock.close();
});
await sock.send(new TextEncoder().encode("memfd+eventfd"), [memfd, efd.fd]);
memfd.close(); // the parent holds its own copy now
