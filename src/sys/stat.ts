/** What kind of file an fd refers to (fstat's S_IFMT), for checks on fds a peer sent us. */
import type { Fd } from "./fd.js";
import { native } from "./native.js";

const S_IFMT = 0o170000;

export type FileKind = "socket" | "symlink" | "file" | "block" | "directory" | "char" | "fifo" | "unknown";

export function fileKind(fd: Fd): FileKind {
  const [, mode] = native.fstat(fd.fd);
  switch (mode & S_IFMT) {
    case 0o140000:
      return "socket";
    case 0o120000:
      return "symlink";
    case 0o100000:
      return "file";
    case 0o060000:
      return "block";
    case 0o040000:
      return "directory";
    case 0o020000:
      return "char";
    case 0o010000:
      return "fifo";
    default:
      return "unknown";
  }
}
