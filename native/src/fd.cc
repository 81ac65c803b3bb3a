// Files, memfd, plain and vectored I/O, ioctl, eventfd, userfaultfd.
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "args.h"

#ifndef F_ADD_SEALS
#define F_ADD_SEALS 1033
#define F_GET_SEALS 1034
#endif

namespace vmshift {
namespace {

napi_value MemfdCreate(napi_env env, napi_callback_info info) {
  Args a(env, info);
  char name[250];  // memfd_create names are at most 249 bytes
  size_t n;
  int64_t flags;
  if (!ArgString(a, 0, name, sizeof name, &n) || !ArgInt(a, 1, &flags)) return nullptr;
  int fd = (int)syscall(SYS_memfd_create, name, (unsigned)flags | MFD_CLOEXEC);
  if (fd < 0) return ThrowSys(env, "memfd_create", errno);
  return Num(env, fd);
}

napi_value Open(napi_env env, napi_callback_info info) {
  Args a(env, info);
  char path[PATH_MAX];
  size_t n;
  int64_t flags, mode;
  if (!ArgString(a, 0, path, sizeof path, &n) || !ArgInt(a, 1, &flags) || !ArgInt(a, 2, &mode)) return nullptr;
  int fd = open(path, (int)flags | O_CLOEXEC, (mode_t)mode);
  if (fd < 0) return ThrowSys(env, "open", errno);
  return Num(env, fd);
}

napi_value Close(napi_env env, napi_callback_info info) {
  Args a(env, info);
  int fd;
  if (!ArgFd(a, 0, &fd)) return nullptr;
  // Linux releases the fd even when close reports EINTR/EIO; never retry.
  if (close(fd) < 0 && errno == EBADF) return ThrowSys(env, "close", errno);
  return nullptr;
}

napi_value Dup(napi_env env, napi_callback_info info) {
  Args a(env, info);
  int fd;
  if (!ArgFd(a, 0, &fd)) return nullptr;
  int r = fcntl(fd, F_DUPFD_CLOEXEC, 3);
  if (r < 0) return ThrowSys(env, "fcntl(F_DUPFD_CLOEXEC)", errno);
  return Num(env, r);
}

// fcntl(fd, cmd, intArg) for the commands we use, all of which take an integer (or nothing).
// Anything else (F_DUPFD without CLOEXEC, locks that take a struct pointer...) is refused.
napi_value Fcntl(napi_env env, napi_callback_info info) {
  Args a(env, info);
  int fd;
  int64_t cmd, arg;
  if (!ArgFd(a, 0, &fd) || !ArgInt(a, 1, &cmd) || !ArgInt(a, 2, &arg)) return nullptr;
  switch (cmd) {
    case F_GETFD:
    case F_SETFD:
    case F_GETFL:
    case F_SETFL:
    case F_ADD_SEALS:
    case F_GET_SEALS:
      break;
    default:
      return ThrowType(env, "fcntl command not allowed");
  }
  if (arg < INT_MIN || arg > INT_MAX) return ThrowType(env, "fcntl argument out of int range");
  int r = fcntl(fd, (int)cmd, (int)arg);
  if (r < 0) return ThrowSys(env, "fcntl", errno);
  return Num(env, r);
}

napi_value Ftruncate(napi_env env, napi_callback_info info) {
  Args a(env, info);
  int fd;
  uint64_t len;
  if (!ArgFd(a, 0, &fd) || !ArgU64(a, 1, &len)) return nullptr;
  if (len > (uint64_t)INT64_MAX) return ThrowType(env, "length out of range");
  if (ftruncate(fd, (off_t)len) < 0) return ThrowSys(env, "ftruncate", errno);
  return nullptr;
}

napi_value Fallocate(napi_env env, napi_callback_info info) {
  Args a(env, info);
  int fd;
  int64_t mode;
  uint64_t off, len;
  if (!ArgFd(a, 0, &fd) || !ArgInt(a, 1, &mode) || !ArgU64(a, 2, &off) || !ArgU64(a, 3, &len)) return nullptr;
  if (fallocate(fd, (int)mode, (off_t)off, (off_t)len) < 0) return ThrowSys(env, "fallocate", errno);
  return nullptr;
}

// fstat(fd) -> [size, mode, blksize]
napi_value Fstat(napi_env env, napi_callback_info info) {
  Args a(env, info);
  int fd;
  if (!ArgFd(a, 0, &fd)) return nullptr;
  struct stat st;
  if (fstat(fd, &st) < 0) return ThrowSys(env, "fstat", errno);
  napi_value r;
  napi_create_array_with_length(env, 3, &r);
  napi_set_element(env, r, 0, Num(env, (double)st.st_size));
  napi_set_element(env, r, 1, Num(env, (double)st.st_mode));
  napi_set_element(env, r, 2, Num(env, (double)st.st_blksize));
  return r;
}

// ---- plain I/O (hot: negative errno on failure)

napi_value Read(napi_env env, napi_callback_info info) {
  Args a(env, info);
  int fd;
  char* p;
  size_t len;
  if (!ArgFd(a, 0, &fd) || !ArgView(a, 1, &p, &len)) return nullptr;
  ssize_t n = read(fd, p, len);
  return n < 0 ? RetErrno(env) : Num(env, (double)n);
}

napi_value Write(napi_env env, napi_callback_info info) {
  Args a(env, info);
  int fd;
  char* p;
  size_t len;
  if (!ArgFd(a, 0, &fd) || !ArgView(a, 1, &p, &len)) return nullptr;
  ssize_t n = write(fd, p, len);
  return n < 0 ? RetErrno(env) : Num(env, (double)n);
}

napi_value Pread(napi_env env, napi_callback_info info) {
  Args a(env, info);
  int fd;
  char* p;
  size_t len;
  uint64_t pos;
  if (!ArgFd(a, 0, &fd) || !ArgView(a, 1, &p, &len) || !ArgU64(a, 2, &pos)) return nullptr;
  ssize_t n = pread(fd, p, len, (off_t)pos);
  return n < 0 ? RetErrno(env) : Num(env, (double)n);
}

napi_value Pwrite(napi_env env, napi_callback_info info) {
  Args a(env, info);
  int fd;
  char* p;
  size_t len;
  uint64_t pos;
  if (!ArgFd(a, 0, &fd) || !ArgView(a, 1, &p, &len) || !ArgU64(a, 2, &pos)) return nullptr;
  ssize_t n = pwrite(fd, p, len, (off_t)pos);
  return n < 0 ? RetErrno(env) : Num(env, (double)n);
}

// preadv/pwritev(fd, views[], position) -> bytes or -errno: one system call for a request
// scattered over many guest buffers (a virtio-blk request is often 100+ separate pages).
constexpr uint32_t kMaxIov = 1024;  // IOV_MAX on Linux

bool IovecArg(const Args& a, size_t i, iovec* iov, size_t* n) {
  bool is = false;
  napi_is_array(a.env, a[i], &is);
  if (!is) {
    ThrowType(a.env, "expected an array of views");
    return false;
  }
  // The length is read once: an element getter could grow the array while we fill iov[].
  uint32_t len = 0;
  napi_get_array_length(a.env, a[i], &len);
  if (len > kMaxIov) {
    ThrowType(a.env, "at most 1024 views per call");
    return false;
  }
  // All elements first (their getters may run JS, which could resize or detach a buffer),
  // then the pointers, with no JS running in between.
  napi_value vals[kMaxIov];
  for (uint32_t k = 0; k < len; k++) {
    if (napi_get_element(a.env, a[i], k, &vals[k]) != napi_ok) return false;  // a getter threw
  }
  for (uint32_t k = 0; k < len; k++) {
    char* p;
    size_t vlen;
    if (!View(a.env, vals[k], &p, &vlen)) {
      ThrowType(a.env, "expected an array of views");
      return false;
    }
    iov[k] = {p, vlen};
  }
  *n = len;
  return true;
}

napi_value Preadv(napi_env env, napi_callback_info info) {
  Args a(env, info);
  int fd;
  uint64_t pos;
  iovec iov[kMaxIov];
  size_t n;
  if (!ArgFd(a, 0, &fd) || !IovecArg(a, 1, iov, &n) || !ArgU64(a, 2, &pos)) return nullptr;
  ssize_t r = preadv(fd, iov, (int)n, (off_t)pos);
  return r < 0 ? RetErrno(env) : Num(env, (double)r);
}

napi_value Pwritev(napi_env env, napi_callback_info info) {
  Args a(env, info);
  int fd;
  uint64_t pos;
  iovec iov[kMaxIov];
  size_t n;
  if (!ArgFd(a, 0, &fd) || !IovecArg(a, 1, iov, &n) || !ArgU64(a, 2, &pos)) return nullptr;
  ssize_t r = pwritev(fd, iov, (int)n, (off_t)pos);
  return r < 0 ? RetErrno(env) : Num(env, (double)r);
}

napi_value Fdatasync(napi_env env, napi_callback_info info) {
  Args a(env, info);
  int fd;
  if (!ArgFd(a, 0, &fd)) return nullptr;
  if (fdatasync(fd) < 0) return RetErrno(env);
  return Num(env, 0);
}

// ioctl(fd, request, arg) where arg is a view (pointer to a caller-packed struct) or an
// integer. Returns the ioctl's result, or -errno. A view must hold at least the struct size the
// request number encodes (_IOC_SIZE), so the kernel never reads or writes past it.
napi_value Ioctl(napi_env env, napi_callback_info info) {
  Args a(env, info);
  int fd;
  uint64_t req;
  if (!ArgFd(a, 0, &fd) || !ArgU64(a, 1, &req)) return nullptr;
  if (req > 0xffffffffull) return ThrowType(env, "ioctl request out of range");
  long r;
  char* p;
  size_t len;
  if (View(env, a[2], &p, &len)) {
    if (_IOC_DIR(req) != _IOC_NONE && len < _IOC_SIZE(req))
      return ThrowType(env, "ioctl view shorter than the request's struct size");
    r = ioctl(fd, (unsigned long)req, p);
  } else {
    napi_valuetype t;
    napi_typeof(env, a[2], &t);
    uint64_t v = 0;
    if (t != napi_undefined && !ArgU64(a, 2, &v)) return nullptr;
    r = ioctl(fd, (unsigned long)req, (unsigned long)v);
  }
  return r < 0 ? RetErrno(env) : Num(env, (double)r);
}

// ---- eventfd and userfaultfd

napi_value Eventfd(napi_env env, napi_callback_info info) {
  Args a(env, info);
  int64_t init, flags;
  if (!ArgInt(a, 0, &init) || !ArgInt(a, 1, &flags)) return nullptr;
  int fd = eventfd((unsigned)init, (int)flags | EFD_CLOEXEC);
  if (fd < 0) return ThrowSys(env, "eventfd", errno);
  return Num(env, fd);
}

napi_value Userfaultfd(napi_env env, napi_callback_info info) {
  Args a(env, info);
  int64_t flags;
  if (!ArgInt(a, 0, &flags)) return nullptr;
  int fd = (int)syscall(SYS_userfaultfd, (int)flags | O_CLOEXEC);
  if (fd < 0) return ThrowSys(env, "userfaultfd", errno);
  return Num(env, fd);
}

}  // namespace

void RegisterFd(napi_env env, napi_value exports) {
  SetFunction(env, exports, "memfdCreate", MemfdCreate);
  SetFunction(env, exports, "open", Open);
  SetFunction(env, exports, "close", Close);
  SetFunction(env, exports, "dup", Dup);
  SetFunction(env, exports, "fcntl", Fcntl);
  SetFunction(env, exports, "ftruncate", Ftruncate);
  SetFunction(env, exports, "fallocate", Fallocate);
  SetFunction(env, exports, "fstat", Fstat);
  SetFunction(env, exports, "read", Read);
  SetFunction(env, exports, "write", Write);
  SetFunction(env, exports, "pread", Pread);
  SetFunction(env, exports, "pwrite", Pwrite);
  SetFunction(env, exports, "preadv", Preadv);
  SetFunction(env, exports, "pwritev", Pwritev);
  SetFunction(env, exports, "fdatasync", Fdatasync);
  SetFunction(env, exports, "ioctl", Ioctl);
  SetFunction(env, exports, "eventfd", Eventfd);
  SetFunction(env, exports, "userfaultfd", Userfaultfd);
}

}  // namespace vmshift
