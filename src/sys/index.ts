/**
 * src/sys: typed owners over the native syscall layer. Each owner (Fd, Mapping, EventFd,
 * UnixSocket, UnixListener, Watch, Userfaultfd) closes exactly once and implements
 * Symbol.dispose. No protocol knowledge lives here.
 */
export * from "./errors.js";
export * from "./eventfd.js";
export * from "./fd.js";
export * from "./ioctl.js";
export * from "./mapping.js";
export * from "./memfd.js";
export { native, type View } from "./native.js";
export * from "./poller.js";
export * from "./unix-path.js";
export * from "./unix-socket.js";
export * from "./userfaultfd.js";
