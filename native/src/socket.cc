// Unix stream sockets with SCM_RIGHTS, and the few socket calls Node's net module lacks.
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "args.h"

namespace vmshift {
namespace {

constexpr uint32_t kMaxFdsPerMessage = 8;
// Receive room for more fds than the protocol allows, so that an over-long message is seen and
// its extra fds are closed by the caller (reported as `truncated`) rather than silently dropped.
constexpr int kRecvFdRoom = 32;

bool FillAddr(const Args& a, size_t i, sockaddr_un* sa, socklen_t* salen) {
  memset(sa, 0, sizeof *sa);
  char path[PATH_MAX];
  size_t n = 0;
  if (!ArgString(a, i, path, sizeof path, &n)) return false;
  if (n == 0 || n >= sizeof sa->sun_path) {
    ThrowType(a.env, "unix socket path empty or longer than 107 bytes");
    return false;
  }
  sa->sun_family = AF_UNIX;
  memcpy(sa->sun_path, path, n);
  *salen = (socklen_t)(offsetof(sockaddr_un, sun_path) + n + 1);
  return true;
}

napi_value UnixListen(napi_env env, napi_callback_info info) {
  Args a(env, info);
  sockaddr_un sa;
  socklen_t salen;
  int64_t backlog;
  if (!FillAddr(a, 0, &sa, &salen) || !ArgInt(a, 1, &backlog)) return nullptr;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return ThrowSys(env, "socket", errno);
  if (bind(fd, (sockaddr*)&sa, salen) < 0) {
    int e = errno;
    close(fd);
    return ThrowSys(env, "bind", e);
  }
  if (listen(fd, (int)backlog) < 0) {
    int e = errno;
    close(fd);
    return ThrowSys(env, "listen", e);
  }
  return Num(env, fd);
}

// unixConnect(path) -> fd (nonblocking once connected). A unix connect completes at once or
// fails (ECONNREFUSED, ENOENT, EAGAIN when the backlog is full), so it is done blocking.
napi_value UnixConnect(napi_env env, napi_callback_info info) {
  Args a(env, info);
  sockaddr_un sa;
  socklen_t salen;
  if (!FillAddr(a, 0, &sa, &salen)) return nullptr;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return ThrowSys(env, "socket", errno);
  int r;
  do r = connect(fd, (sockaddr*)&sa, salen);
  while (r < 0 && errno == EINTR);
  if (r < 0) {
    int e = errno;
    close(fd);
    return ThrowSys(env, "connect", e);
  }
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  return Num(env, fd);
}

napi_value Accept(napi_env env, napi_callback_info info) {
  Args a(env, info);
  int fd;
  if (!ArgFd(a, 0, &fd)) return nullptr;
  int c = accept4(fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
  return c < 0 ? RetErrno(env) : Num(env, c);
}

napi_value Socketpair(napi_env env, napi_callback_info) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) < 0)
    return ThrowSys(env, "socketpair", errno);
  return Pair(env, sv[0], sv[1]);
}

napi_value Shutdown(napi_env env, napi_callback_info info) {
  Args a(env, info);
  int fd;
  int64_t how;
  if (!ArgFd(a, 0, &fd) || !ArgInt(a, 1, &how)) return nullptr;
  if (shutdown(fd, (int)how) < 0 && errno != ENOTCONN) return ThrowSys(env, "shutdown", errno);
  return nullptr;
}

// setsockopt(fd, level, name, intValue) for integer options (SO_SNDBUF, TCP_NODELAY...).
napi_value Setsockopt(napi_env env, napi_callback_info info) {
  Args a(env, info);
  int fd;
  int64_t level, name, value;
  if (!ArgFd(a, 0, &fd) || !ArgInt(a, 1, &level) || !ArgInt(a, 2, &name) || !ArgInt(a, 3, &value)) return nullptr;
  int v = (int)value;
  if (setsockopt(fd, (int)level, (int)name, &v, sizeof v) < 0) return ThrowSys(env, "setsockopt", errno);
  return nullptr;
}

// sendmsg(fd, view, fds[] | null) -> bytes sent or -errno. The fds ride on the first byte.
napi_value Sendmsg(napi_env env, napi_callback_info info) {
  Args a(env, info);
  int fd;
  if (!ArgFd(a, 0, &fd)) return nullptr;
  int fds[kMaxFdsPerMessage];
  uint32_t nfds = 0;
  bool is_array = false;
  napi_is_array(env, a[2], &is_array);
  if (is_array) {
    // The length is read once: an element getter could grow the array while we fill fds[].
    napi_get_array_length(env, a[2], &nfds);
    if (nfds > kMaxFdsPerMessage) return ThrowType(env, "at most 8 fds per message");
    for (uint32_t i = 0; i < nfds; i++) {
      napi_value v;
      if (napi_get_element(env, a[2], i, &v) != napi_ok) return nullptr;
      napi_valuetype t;
      napi_typeof(env, v, &t);
      double d = -1;
      if (t == napi_number) napi_get_value_double(env, v, &d);
      if (!(d >= 0 && d <= INT32_MAX && d == (double)(int)d)) return ThrowType(env, "invalid fd in list");
      fds[i] = (int)d;
    }
  }
  // The view last: the fd list's getters (JS) ran above and cannot move it any more.
  char* p;
  size_t len;
  if (!ArgView(a, 1, &p, &len)) return nullptr;
  iovec iov = {p, len};
  msghdr m = {};
  m.msg_iov = &iov;
  m.msg_iovlen = 1;
  alignas(cmsghdr) char cbuf[CMSG_SPACE(sizeof(int) * kMaxFdsPerMessage)];
  if (nfds > 0) {
    m.msg_control = cbuf;
    m.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    cmsghdr* c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
  }
  ssize_t n;
  do n = sendmsg(fd, &m, MSG_NOSIGNAL);
  while (n < 0 && errno == EINTR);
  return n < 0 ? RetErrno(env) : Num(env, (double)n);
}

// recvmsg(fd, view) -> -errno, or [bytes, truncated(0/1), fd...]. Fds beyond the protocol's
// limit are still returned so the caller can close them; `truncated` means the kernel had to
// drop some (our room was exceeded), which the caller must treat as a protocol error.
napi_value Recvmsg(napi_env env, napi_callback_info info) {
  Args a(env, info);
  int fd;
  char* p;
  size_t len;
  if (!ArgFd(a, 0, &fd) || !ArgView(a, 1, &p, &len)) return nullptr;
  iovec iov = {p, len};
  alignas(cmsghdr) char cbuf[CMSG_SPACE(sizeof(int) * kRecvFdRoom)];
  msghdr m = {};
  m.msg_iov = &iov;
  m.msg_iovlen = 1;
  m.msg_control = cbuf;
  m.msg_controllen = sizeof cbuf;
  ssize_t n;
  do n = recvmsg(fd, &m, MSG_CMSG_CLOEXEC);
  while (n < 0 && errno == EINTR);
  if (n < 0) return RetErrno(env);
  napi_value r;
  napi_create_array(env, &r);
  napi_set_element(env, r, 0, Num(env, (double)n));
  napi_set_element(env, r, 1, Num(env, (m.msg_flags & MSG_CTRUNC) ? 1 : 0));
  uint32_t k = 2;
  for (cmsghdr* c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t cnt = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < cnt; i++) {
      int rfd;
      memcpy(&rfd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      napi_set_element(env, r, k++, Num(env, rfd));
    }
  }
  return r;
}

}  // namespace

void RegisterSocket(napi_env env, napi_value exports) {
  SetFunction(env, exports, "unixListen", UnixListen);
  SetFunction(env, exports, "unixConnect", UnixConnect);
  SetFunction(env, exports, "accept", Accept);
  SetFunction(env, exports, "socketpair", Socketpair);
  SetFunction(env, exports, "shutdown", Shutdown);
  SetFunction(env, exports, "setsockopt", Setsockopt);
  SetFunction(env, exports, "sendmsg", Sendmsg);
  SetFunction(env, exports, "recvmsg", Recvmsg);
}

}  // namespace vmshift
