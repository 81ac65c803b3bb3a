// vmshift native layer: Linux syscalls for Node, no policy and no protocol knowledge.
//
// Written against V8/node.h rather than Node-API because only V8 can wrap an existing mapping
// as a SharedArrayBuffer (see docs/native.md). Everything about struct layouts lives in
// TypeScript; this file only moves bytes and fds.
//
// Conventions
// - Setup calls throw an Error with `errno` and `syscall` properties.
// - Hot I/O calls (read, write, pread, pwrite, sendmsg, recvmsg, accept, ioctl) return a
//   negative errno instead of throwing, so "would block" costs no exception; src/sys turns
//   any other negative value into a typed SysError.
// - Every fd is created close-on-exec.
// - Integers arrive as JS numbers (exact up to 2^53) or BigInts (full 64 bits); a value
//   that is neither an integer nor representable is a TypeError, never a silent rounding.

#include <node.h>
#include <uv.h>
#include <v8.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <unordered_map>

using namespace v8;

namespace {

constexpr int kMaxFdsPerMessage = 8;
// Receive room for more fds than the protocol allows, so that an over-long message is seen and
// its extra fds are closed by us (reported as `truncated`) rather than silently dropped.
constexpr int kRecvFdRoom = 32;

Local<String> Str(Isolate* iso, const char* s) {
  return String::NewFromUtf8(iso, s).ToLocalChecked();
}

void ThrowSys(Isolate* iso, const char* syscall_name, int err) {
  Local<Context> ctx = iso->GetCurrentContext();
  char msg[256];
  snprintf(msg, sizeof msg, "%s: %s", syscall_name, strerror(err));
  Local<Object> e = Exception::Error(Str(iso, msg)).As<Object>();
  e->Set(ctx, Str(iso, "errno"), Integer::New(iso, err)).Check();
  e->Set(ctx, Str(iso, "syscall"), Str(iso, syscall_name)).Check();
  iso->ThrowException(e);
}

void ThrowType(Isolate* iso, const char* msg) {
  iso->ThrowException(Exception::TypeError(Str(iso, msg)));
}

// An exact 64-bit integer from a number or BigInt argument.
bool ArgU64(const FunctionCallbackInfo<Value>& a, int i, uint64_t* out) {
  Isolate* iso = a.GetIsolate();
  Local<Value> v = a[i];
  if (v->IsBigInt()) {
    bool lossless = false;
    *out = v.As<BigInt>()->Uint64Value(&lossless);
    if (!lossless) {
      ThrowType(iso, "BigInt argument out of u64 range");
      return false;
    }
    return true;
  }
  if (v->IsNumber()) {
    double d = v.As<Number>()->Value();
    if (d >= 0 && d <= 9007199254740991.0 && d == (double)(uint64_t)d) {
      *out = (uint64_t)d;
      return true;
    }
  }
  ThrowType(iso, "expected a non-negative safe integer or BigInt");
  return false;
}

bool ArgInt(const FunctionCallbackInfo<Value>& a, int i, int64_t* out) {
  Local<Value> v = a[i];
  if (v->IsNumber()) {
    double d = v.As<Number>()->Value();
    if (d >= -9007199254740991.0 && d <= 9007199254740991.0 && d == (double)(int64_t)d) {
      *out = (int64_t)d;
      return true;
    }
  }
  ThrowType(a.GetIsolate(), "expected a safe integer");
  return false;
}

bool ArgFd(const FunctionCallbackInfo<Value>& a, int i, int* fd) {
  int64_t v;
  if (!ArgInt(a, i, &v)) return false;
  if (v < 0 || v > INT32_MAX) {
    ThrowType(a.GetIsolate(), "invalid fd");
    return false;
  }
  *fd = (int)v;
  return true;
}

// Pointer and length of a SharedArrayBuffer, ArrayBuffer or any ArrayBufferView.
bool View(Local<Value> v, char** p, size_t* len) {
  if (v->IsSharedArrayBuffer()) {
    auto b = v.As<SharedArrayBuffer>();
    *p = (char*)b->Data();
    *len = b->ByteLength();
    return true;
  }
  if (v->IsArrayBuffer()) {
    auto b = v.As<ArrayBuffer>();
    *p = (char*)b->Data();
    *len = b->ByteLength();
    return true;
  }
  if (v->IsArrayBufferView()) {
    auto b = v.As<ArrayBufferView>();
    *p = (char*)b->Buffer()->Data() + b->ByteOffset();
    *len = b->ByteLength();
    return true;
  }
  return false;
}

bool ArgView(const FunctionCallbackInfo<Value>& a, int i, char** p, size_t* len) {
  if (View(a[i], p, len)) return true;
  ThrowType(a.GetIsolate(), "expected an ArrayBuffer, SharedArrayBuffer or typed array");
  return false;
}

void Ret(const FunctionCallbackInfo<Value>& a, double v) { a.GetReturnValue().Set(v); }
void RetErrno(const FunctionCallbackInfo<Value>& a) { a.GetReturnValue().Set((double)-errno); }

// ---------------------------------------------------------------------------------------------
// Files and memfd

void MemfdCreate(const FunctionCallbackInfo<Value>& a) {
  Isolate* iso = a.GetIsolate();
  String::Utf8Value name(iso, a[0]);
  int64_t flags;
  if (!ArgInt(a, 1, &flags)) return;
  int fd = (int)syscall(SYS_memfd_create, *name, (unsigned)flags | MFD_CLOEXEC);
  if (fd < 0) return ThrowSys(iso, "memfd_create", errno);
  Ret(a, fd);
}

void Open(const FunctionCallbackInfo<Value>& a) {
  Isolate* iso = a.GetIsolate();
  String::Utf8Value path(iso, a[0]);
  int64_t flags, mode;
  if (!ArgInt(a, 1, &flags) || !ArgInt(a, 2, &mode)) return;
  int fd = open(*path, (int)flags | O_CLOEXEC, (mode_t)mode);
  if (fd < 0) return ThrowSys(iso, "open", errno);
  Ret(a, fd);
}

void Close(const FunctionCallbackInfo<Value>& a) {
  int fd;
  if (!ArgFd(a, 0, &fd)) return;
  // Linux releases the fd even when close reports EINTR/EIO; never retry.
  if (close(fd) < 0 && errno == EBADF) return ThrowSys(a.GetIsolate(), "close", errno);
}

void Dup(const FunctionCallbackInfo<Value>& a) {
  int fd;
  if (!ArgFd(a, 0, &fd)) return;
  int r = fcntl(fd, F_DUPFD_CLOEXEC, 3);
  if (r < 0) return ThrowSys(a.GetIsolate(), "fcntl(F_DUPFD_CLOEXEC)", errno);
  Ret(a, r);
}

void Fcntl(const FunctionCallbackInfo<Value>& a) {
  int fd;
  int64_t cmd, arg;
  if (!ArgFd(a, 0, &fd) || !ArgInt(a, 1, &cmd) || !ArgInt(a, 2, &arg)) return;
  int r = fcntl(fd, (int)cmd, (long)arg);
  if (r < 0) return ThrowSys(a.GetIsolate(), "fcntl", errno);
  Ret(a, r);
}

void Ftruncate(const FunctionCallbackInfo<Value>& a) {
  int fd;
  uint64_t len;
  if (!ArgFd(a, 0, &fd) || !ArgU64(a, 1, &len)) return;
  if (ftruncate(fd, (off_t)len) < 0) return ThrowSys(a.GetIsolate(), "ftruncate", errno);
}

void Fallocate(const FunctionCallbackInfo<Value>& a) {
  int fd;
  int64_t mode;
  uint64_t off, len;
  if (!ArgFd(a, 0, &fd) || !ArgInt(a, 1, &mode) || !ArgU64(a, 2, &off) || !ArgU64(a, 3, &len)) return;
  if (fallocate(fd, (int)mode, (off_t)off, (off_t)len) < 0)
    return ThrowSys(a.GetIsolate(), "fallocate", errno);
}

// fstat(fd) -> [size, mode, blksize]
void Fstat(const FunctionCallbackInfo<Value>& a) {
  Isolate* iso = a.GetIsolate();
  int fd;
  if (!ArgFd(a, 0, &fd)) return;
  struct stat st;
  if (fstat(fd, &st) < 0) return ThrowSys(iso, "fstat", errno);
  Local<Context> ctx = iso->GetCurrentContext();
  Local<Array> r = Array::New(iso, 3);
  r->Set(ctx, 0, Number::New(iso, (double)st.st_size)).Check();
  r->Set(ctx, 1, Number::New(iso, (double)st.st_mode)).Check();
  r->Set(ctx, 2, Number::New(iso, (double)st.st_blksize)).Check();
  a.GetReturnValue().Set(r);
}

// ---------------------------------------------------------------------------------------------
// Mappings as SharedArrayBuffers
//
// One mmap() is exposed as one or more SharedArrayBuffers ("windows") over consecutive parts
// of it: typed arrays stop at 4 GiB, and KVM and vhost-user need one contiguous host range.
// The windows share a refcount; the range is munmapped only when V8 has dropped every window
// (the deleter runs on a V8 background thread, so it only calls munmap and touches atomics).
//
// The safety rule: a range is never munmapped while JS can still reach it. An explicit
// retire() overlays the range with private anonymous memory at once (the file or memfd is
// released immediately, other processes no longer share anything with it), and any stale view
// reads zeros and writes into scratch that nobody sees. The address range stays reserved until
// the last view is collected, so it can never be reused by an unrelated mapping while a stale
// view exists.

struct MapRec {
  char* base;
  size_t len;
  std::atomic<int> windows;
  bool retired;
};

std::mutex g_maps_mu;
std::unordered_map<char*, MapRec*> g_maps;  // base -> record, for retire()
std::atomic<int64_t> g_live_maps{0};

void WindowDeleter(void*, size_t, void* arg) {
  MapRec* m = static_cast<MapRec*>(arg);
  if (m->windows.fetch_sub(1) != 1) return;
  {
    std::lock_guard<std::mutex> lock(g_maps_mu);
    g_maps.erase(m->base);
  }
  munmap(m->base, m->len);
  g_live_maps.fetch_sub(1);
  delete m;
}

// mmap(fd, length, offset, prot, flags, windowSize) -> SharedArrayBuffer[]
void Mmap(const FunctionCallbackInfo<Value>& a) {
  Isolate* iso = a.GetIsolate();
  Local<Context> ctx = iso->GetCurrentContext();
  int64_t fd, prot, flags;
  uint64_t len, off, win;
  if (!ArgInt(a, 0, &fd) || !ArgU64(a, 1, &len) || !ArgU64(a, 2, &off) || !ArgInt(a, 3, &prot) ||
      !ArgInt(a, 4, &flags) || !ArgU64(a, 5, &win))
    return;
  if (len == 0 || win == 0 || (win & 4095) != 0) return ThrowType(iso, "bad length or window size");
  // JS never chooses addresses: a fixed mapping could overlay memory V8 or a view owns.
  if (flags & (MAP_FIXED | MAP_FIXED_NOREPLACE)) return ThrowType(iso, "MAP_FIXED is not allowed");
  void* p = mmap(nullptr, len, (int)prot, (int)flags, (int)fd, (off_t)off);
  if (p == MAP_FAILED) return ThrowSys(iso, "mmap", errno);
  size_t n = (len + win - 1) / win;
  MapRec* m = new MapRec{static_cast<char*>(p), len, {(int)n}, false};
  {
    std::lock_guard<std::mutex> lock(g_maps_mu);
    g_maps[m->base] = m;
  }
  g_live_maps.fetch_add(1);
  Local<Array> out = Array::New(iso, (int)n);
  for (size_t i = 0; i < n; i++) {
    size_t wlen = (i == n - 1) ? len - i * win : win;
    std::shared_ptr<BackingStore> bs =
        SharedArrayBuffer::NewBackingStore(m->base + i * win, wlen, WindowDeleter, m);
    out->Set(ctx, (uint32_t)i, SharedArrayBuffer::New(iso, std::move(bs))).Check();
  }
  a.GetReturnValue().Set(out);
}

// retire(firstWindow): see the safety rule above. Idempotent.
void Retire(const FunctionCallbackInfo<Value>& a) {
  Isolate* iso = a.GetIsolate();
  char* p;
  size_t len;
  if (!a[0]->IsSharedArrayBuffer() || !View(a[0], &p, &len))
    return ThrowType(iso, "expected the first window of a mapping");
  std::lock_guard<std::mutex> lock(g_maps_mu);
  auto it = g_maps.find(p);
  if (it == g_maps.end()) return ThrowType(iso, "not the first window of a live mapping");
  MapRec* m = it->second;
  if (m->retired) return;
  void* q = mmap(m->base, m->len, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
  if (q == MAP_FAILED) return ThrowSys(iso, "mmap(retire)", errno);
  m->retired = true;
}

void LiveMappings(const FunctionCallbackInfo<Value>& a) { Ret(a, (double)g_live_maps.load()); }

// addressOf(view) -> BigInt host virtual address of the view's first byte.
void AddressOf(const FunctionCallbackInfo<Value>& a) {
  char* p;
  size_t len;
  if (!ArgView(a, 0, &p, &len)) return;
  a.GetReturnValue().Set(BigInt::NewFromUnsigned(a.GetIsolate(), (uint64_t)(uintptr_t)p));
}

// madvise(view, advice) over the page-aligned view.
void Madvise(const FunctionCallbackInfo<Value>& a) {
  char* p;
  size_t len;
  int64_t adv;
  if (!ArgView(a, 0, &p, &len) || !ArgInt(a, 1, &adv)) return;
  if (((uintptr_t)p & 4095) != 0) return ThrowType(a.GetIsolate(), "madvise needs a page-aligned view");
  if (madvise(p, len, (int)adv) < 0) return ThrowSys(a.GetIsolate(), "madvise", errno);
}

// mincore(view, out Uint8Array) -> fills one byte per page (bit 0 = resident).
void Mincore(const FunctionCallbackInfo<Value>& a) {
  char *p, *out;
  size_t len, outlen;
  if (!ArgView(a, 0, &p, &len) || !ArgView(a, 1, &out, &outlen)) return;
  if (((uintptr_t)p & 4095) != 0) return ThrowType(a.GetIsolate(), "mincore needs a page-aligned view");
  size_t pages = (len + 4095) / 4096;
  if (outlen < pages) return ThrowType(a.GetIsolate(), "mincore output too small");
  if (mincore(p, len, (unsigned char*)out) < 0) return ThrowSys(a.GetIsolate(), "mincore", errno);
}

// ---------------------------------------------------------------------------------------------
// Plain I/O (hot: negative errno on failure)

void Read(const FunctionCallbackInfo<Value>& a) {
  int fd;
  char* p;
  size_t len;
  if (!ArgFd(a, 0, &fd) || !ArgView(a, 1, &p, &len)) return;
  ssize_t n = read(fd, p, len);
  if (n < 0) return RetErrno(a);
  Ret(a, (double)n);
}

void Write(const FunctionCallbackInfo<Value>& a) {
  int fd;
  char* p;
  size_t len;
  if (!ArgFd(a, 0, &fd) || !ArgView(a, 1, &p, &len)) return;
  ssize_t n = write(fd, p, len);
  if (n < 0) return RetErrno(a);
  Ret(a, (double)n);
}

void Pread(const FunctionCallbackInfo<Value>& a) {
  int fd;
  char* p;
  size_t len;
  uint64_t pos;
  if (!ArgFd(a, 0, &fd) || !ArgView(a, 1, &p, &len) || !ArgU64(a, 2, &pos)) return;
  ssize_t n = pread(fd, p, len, (off_t)pos);
  if (n < 0) return RetErrno(a);
  Ret(a, (double)n);
}

void Pwrite(const FunctionCallbackInfo<Value>& a) {
  int fd;
  char* p;
  size_t len;
  uint64_t pos;
  if (!ArgFd(a, 0, &fd) || !ArgView(a, 1, &p, &len) || !ArgU64(a, 2, &pos)) return;
  ssize_t n = pwrite(fd, p, len, (off_t)pos);
  if (n < 0) return RetErrno(a);
  Ret(a, (double)n);
}

// preadv/pwritev(fd, views[], position) -> bytes or -errno: one system call for a request
// scattered over many guest buffers (a virtio-blk request is often 100+ separate pages).
constexpr size_t kMaxIov = 1024;  // IOV_MAX on Linux

bool IovecArg(const FunctionCallbackInfo<Value>& a, int i, iovec* iov, size_t* n) {
  Isolate* iso = a.GetIsolate();
  if (!a[i]->IsArray()) {
    ThrowType(iso, "expected an array of views");
    return false;
  }
  Local<Array> arr = a[i].As<Array>();
  if (arr->Length() > kMaxIov) {
    ThrowType(iso, "at most 1024 views per call");
    return false;
  }
  Local<Context> ctx = iso->GetCurrentContext();
  for (uint32_t k = 0; k < arr->Length(); k++) {
    char* p;
    size_t len;
    if (!View(arr->Get(ctx, k).ToLocalChecked(), &p, &len)) {
      ThrowType(iso, "expected an array of views");
      return false;
    }
    iov[k] = {p, len};
  }
  *n = arr->Length();
  return true;
}

void Preadv(const FunctionCallbackInfo<Value>& a) {
  int fd;
  uint64_t pos;
  iovec iov[kMaxIov];
  size_t n;
  if (!ArgFd(a, 0, &fd) || !IovecArg(a, 1, iov, &n) || !ArgU64(a, 2, &pos)) return;
  ssize_t r = preadv(fd, iov, (int)n, (off_t)pos);
  if (r < 0) return RetErrno(a);
  Ret(a, (double)r);
}

void Pwritev(const FunctionCallbackInfo<Value>& a) {
  int fd;
  uint64_t pos;
  iovec iov[kMaxIov];
  size_t n;
  if (!ArgFd(a, 0, &fd) || !IovecArg(a, 1, iov, &n) || !ArgU64(a, 2, &pos)) return;
  ssize_t r = pwritev(fd, iov, (int)n, (off_t)pos);
  if (r < 0) return RetErrno(a);
  Ret(a, (double)r);
}

void Fdatasync(const FunctionCallbackInfo<Value>& a) {
  int fd;
  if (!ArgFd(a, 0, &fd)) return;
  if (fdatasync(fd) < 0) return RetErrno(a);
  Ret(a, 0);
}

// ioctl(fd, request, arg) where arg is a view (pointer to a caller-packed struct) or an
// integer. Returns the ioctl's result, or -errno.
void Ioctl(const FunctionCallbackInfo<Value>& a) {
  int fd;
  uint64_t req;
  if (!ArgFd(a, 0, &fd) || !ArgU64(a, 1, &req)) return;
  long r;
  char* p;
  size_t len;
  if (View(a[2], &p, &len)) {
    r = ioctl(fd, (unsigned long)req, p);
  } else {
    uint64_t v = 0;
    if (!a[2]->IsUndefined() && !ArgU64(a, 2, &v)) return;
    r = ioctl(fd, (unsigned long)req, (unsigned long)v);
  }
  if (r < 0) return RetErrno(a);
  Ret(a, (double)r);
}

// ---------------------------------------------------------------------------------------------
// eventfd and userfaultfd

void Eventfd(const FunctionCallbackInfo<Value>& a) {
  int64_t init, flags;
  if (!ArgInt(a, 0, &init) || !ArgInt(a, 1, &flags)) return;
  int fd = eventfd((unsigned)init, (int)flags | EFD_CLOEXEC);
  if (fd < 0) return ThrowSys(a.GetIsolate(), "eventfd", errno);
  Ret(a, fd);
}

void Userfaultfd(const FunctionCallbackInfo<Value>& a) {
  int64_t flags;
  if (!ArgInt(a, 0, &flags)) return;
  int fd = (int)syscall(SYS_userfaultfd, (int)flags | O_CLOEXEC);
  if (fd < 0) return ThrowSys(a.GetIsolate(), "userfaultfd", errno);
  Ret(a, fd);
}

// ---------------------------------------------------------------------------------------------
// Unix stream sockets with SCM_RIGHTS

bool FillAddr(Isolate* iso, Local<Value> v, sockaddr_un* sa, socklen_t* salen) {
  String::Utf8Value path(iso, v);
  size_t n = strlen(*path);
  if (n == 0 || n >= sizeof sa->sun_path) {
    ThrowType(iso, "unix socket path empty or longer than 107 bytes");
    return false;
  }
  memset(sa, 0, sizeof *sa);
  sa->sun_family = AF_UNIX;
  memcpy(sa->sun_path, *path, n);
  *salen = (socklen_t)(offsetof(sockaddr_un, sun_path) + n + 1);
  return true;
}

void UnixListen(const FunctionCallbackInfo<Value>& a) {
  Isolate* iso = a.GetIsolate();
  sockaddr_un sa;
  socklen_t salen;
  int64_t backlog;
  if (!FillAddr(iso, a[0], &sa, &salen) || !ArgInt(a, 1, &backlog)) return;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return ThrowSys(iso, "socket", errno);
  if (bind(fd, (sockaddr*)&sa, salen) < 0) {
    int e = errno;
    close(fd);
    return ThrowSys(iso, "bind", e);
  }
  if (listen(fd, (int)backlog) < 0) {
    int e = errno;
    close(fd);
    return ThrowSys(iso, "listen", e);
  }
  Ret(a, fd);
}

// unixConnect(path) -> fd (nonblocking once connected). A unix connect completes at once or
// fails (ECONNREFUSED, ENOENT, EAGAIN when the backlog is full), so it is done blocking.
void UnixConnect(const FunctionCallbackInfo<Value>& a) {
  Isolate* iso = a.GetIsolate();
  sockaddr_un sa;
  socklen_t salen;
  if (!FillAddr(iso, a[0], &sa, &salen)) return;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return ThrowSys(iso, "socket", errno);
  int r;
  do r = connect(fd, (sockaddr*)&sa, salen);
  while (r < 0 && errno == EINTR);
  if (r < 0) {
    int e = errno;
    close(fd);
    return ThrowSys(iso, "connect", e);
  }
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  Ret(a, fd);
}

void Accept(const FunctionCallbackInfo<Value>& a) {
  int fd;
  if (!ArgFd(a, 0, &fd)) return;
  int c = accept4(fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
  if (c < 0) return RetErrno(a);
  Ret(a, c);
}

void Socketpair(const FunctionCallbackInfo<Value>& a) {
  Isolate* iso = a.GetIsolate();
  Local<Context> ctx = iso->GetCurrentContext();
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) < 0)
    return ThrowSys(iso, "socketpair", errno);
  Local<Array> r = Array::New(iso, 2);
  r->Set(ctx, 0, Integer::New(iso, sv[0])).Check();
  r->Set(ctx, 1, Integer::New(iso, sv[1])).Check();
  a.GetReturnValue().Set(r);
}

void Shutdown(const FunctionCallbackInfo<Value>& a) {
  int fd;
  int64_t how;
  if (!ArgFd(a, 0, &fd) || !ArgInt(a, 1, &how)) return;
  if (shutdown(fd, (int)how) < 0 && errno != ENOTCONN) return ThrowSys(a.GetIsolate(), "shutdown", errno);
}

// setsockopt(fd, level, name, intValue) for integer options (SO_SNDBUF, TCP_NODELAY...).
void Setsockopt(const FunctionCallbackInfo<Value>& a) {
  int fd;
  int64_t level, name, value;
  if (!ArgFd(a, 0, &fd) || !ArgInt(a, 1, &level) || !ArgInt(a, 2, &name) || !ArgInt(a, 3, &value)) return;
  int v = (int)value;
  if (setsockopt(fd, (int)level, (int)name, &v, sizeof v) < 0) return ThrowSys(a.GetIsolate(), "setsockopt", errno);
}

// sendmsg(fd, view, fds[]) -> bytes sent or -errno. The fds ride on the first byte.
void Sendmsg(const FunctionCallbackInfo<Value>& a) {
  Isolate* iso = a.GetIsolate();
  Local<Context> ctx = iso->GetCurrentContext();
  int fd;
  char* p;
  size_t len;
  if (!ArgFd(a, 0, &fd) || !ArgView(a, 1, &p, &len)) return;
  int fds[kMaxFdsPerMessage];
  int nfds = 0;
  if (a[2]->IsArray()) {
    Local<Array> arr = a[2].As<Array>();
    if (arr->Length() > kMaxFdsPerMessage) return ThrowType(iso, "at most 8 fds per message");
    for (uint32_t i = 0; i < arr->Length(); i++) {
      Local<Value> v = arr->Get(ctx, i).ToLocalChecked();
      if (!v->IsInt32() || v.As<Int32>()->Value() < 0) return ThrowType(iso, "invalid fd in list");
      fds[nfds++] = v.As<Int32>()->Value();
    }
  }
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
  if (n < 0) return RetErrno(a);
  Ret(a, (double)n);
}

// recvmsg(fd, view) -> -errno, or [bytes, truncated(0/1), fd...]. Fds beyond the protocol's
// limit are still returned so the caller can close them; `truncated` means the kernel had to
// drop some (our room was exceeded), which the caller must treat as a protocol error.
void Recvmsg(const FunctionCallbackInfo<Value>& a) {
  Isolate* iso = a.GetIsolate();
  Local<Context> ctx = iso->GetCurrentContext();
  int fd;
  char* p;
  size_t len;
  if (!ArgFd(a, 0, &fd) || !ArgView(a, 1, &p, &len)) return;
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
  if (n < 0) return RetErrno(a);
  Local<Array> r = Array::New(iso);
  r->Set(ctx, 0, Number::New(iso, (double)n)).Check();
  r->Set(ctx, 1, Integer::New(iso, (m.msg_flags & MSG_CTRUNC) ? 1 : 0)).Check();
  uint32_t k = 2;
  for (cmsghdr* c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t cnt = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < cnt; i++) {
      int rfd;
      memcpy(&rfd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      r->Set(ctx, k++, Integer::New(iso, rfd)).Check();
    }
  }
  a.GetReturnValue().Set(r);
}

// ---------------------------------------------------------------------------------------------
// fd readiness in the libuv loop of the calling thread (main or worker)
//
// watch(fd, events, callback(status, events)) -> handle with stop(), ref(), unref(), update(e).
// The handle is closed when stop() is called or, failing that, when the thread's environment
// is torn down (async cleanup hook), so a worker that exits with a live watch does not leave a
// dangling uv handle behind.

struct Watch {
  uv_poll_t poll;
  Isolate* iso;
  Global<Function> cb;
  Global<Context> ctx;
  Global<Object> self;
  node::AsyncCleanupHookHandle hook;
  void (*cleanup_done)(void*) = nullptr;
  void* cleanup_arg = nullptr;
  bool closing = false;
};

void OnPoll(uv_poll_t* h, int status, int events) {
  Watch* w = static_cast<Watch*>(h->data);
  if (w->closing) return;
  Isolate* iso = w->iso;
  HandleScope hs(iso);
  Local<Context> ctx = w->ctx.Get(iso);
  Context::Scope cs(ctx);
  Local<Value> argv[2] = {Integer::New(iso, status), Integer::New(iso, events)};
  (void)node::MakeCallback(iso, ctx->Global(), w->cb.Get(iso), 2, argv, {0, 0});
}

void OnWatchClosed(uv_handle_t* h) {
  Watch* w = static_cast<Watch*>(h->data);
  void (*done)(void*) = w->cleanup_done;
  void* arg = w->cleanup_arg;
  w->cb.Reset();
  w->ctx.Reset();
  w->self.Reset();
  delete w;
  if (done) done(arg);
}

void CloseWatch(Watch* w) {
  if (w->closing) return;
  w->closing = true;
  uv_poll_stop(&w->poll);
  uv_close(reinterpret_cast<uv_handle_t*>(&w->poll), OnWatchClosed);
}

void WatchCleanupHook(void* arg, void (*done)(void*), void* done_arg) {
  Watch* w = static_cast<Watch*>(arg);
  w->cleanup_done = done;
  w->cleanup_arg = done_arg;
  if (!w->self.IsEmpty()) {
    // Called while the environment is being torn down: the JS object may outlive us.
    HandleScope hs(w->iso);
    w->self.Get(w->iso)->SetAlignedPointerInInternalField(0, nullptr);
  }
  w->hook.reset();
  CloseWatch(w);
}

Watch* Unwrap(const FunctionCallbackInfo<Value>& a) {
  return static_cast<Watch*>(a.This()->GetAlignedPointerFromInternalField(0));
}

void WatchStop(const FunctionCallbackInfo<Value>& a) {
  Watch* w = Unwrap(a);
  if (!w) return;
  a.This()->SetAlignedPointerInInternalField(0, nullptr);
  node::RemoveEnvironmentCleanupHook(std::move(w->hook));
  CloseWatch(w);
}

void WatchRef(const FunctionCallbackInfo<Value>& a) {
  Watch* w = Unwrap(a);
  if (!w) return;
  if (a[0]->IsTrue())
    uv_ref(reinterpret_cast<uv_handle_t*>(&w->poll));
  else
    uv_unref(reinterpret_cast<uv_handle_t*>(&w->poll));
}

void WatchUpdate(const FunctionCallbackInfo<Value>& a) {
  Watch* w = Unwrap(a);
  int64_t events;
  if (!w || !ArgInt(a, 0, &events)) return;
  int r = uv_poll_start(&w->poll, (int)events, OnPoll);
  if (r < 0) return ThrowSys(a.GetIsolate(), "uv_poll_start", -r);
}

void WatchFd(const FunctionCallbackInfo<Value>& a) {
  Isolate* iso = a.GetIsolate();
  Local<Context> ctx = iso->GetCurrentContext();
  int fd;
  int64_t events;
  if (!ArgFd(a, 0, &fd) || !ArgInt(a, 1, &events)) return;
  if (!a[2]->IsFunction()) return ThrowType(iso, "watch needs a callback");
  Watch* w = new Watch();
  w->iso = iso;
  w->cb.Reset(iso, a[2].As<Function>());
  w->ctx.Reset(iso, ctx);
  int r = uv_poll_init(node::GetCurrentEventLoop(iso), &w->poll, fd);
  if (r < 0) {
    delete w;
    return ThrowSys(iso, "uv_poll_init", -r);
  }
  w->poll.data = w;
  r = uv_poll_start(&w->poll, (int)events, OnPoll);
  if (r < 0) {
    w->closing = true;
    uv_close(reinterpret_cast<uv_handle_t*>(&w->poll), OnWatchClosed);
    return ThrowSys(iso, "uv_poll_start", -r);
  }
  // The handle class is built once per addon instance (see WatchClass): V8 caches every
  // template instantiation in the native context for good, so templates made per call leak.
  Local<Object> o = a.Data().As<Function>()->NewInstance(ctx).ToLocalChecked();
  o->SetAlignedPointerInInternalField(0, w);
  w->self.Reset(iso, o);
  w->self.SetWeak();
  w->hook = node::AddEnvironmentCleanupHook(iso, WatchCleanupHook, w);
  a.GetReturnValue().Set(o);
}

// ---------------------------------------------------------------------------------------------
// Bulk memory primitives, kept because the `dirty` benchmark shows JS cannot reach the floor:
// per-page copies pay ~0.35 us of call and view overhead in JS, and a JS bitmap scan is
// several times slower than a C word loop.

// copyPages(dst, dstPageIdx: Uint32Array|null, src, srcPageIdx: Uint32Array|null, count, pageSize)
// Copies `count` pages; a null index list means "consecutive from 0". Indices are checked.
void CopyPages(const FunctionCallbackInfo<Value>& a) {
  Isolate* iso = a.GetIsolate();
  char *dst, *src, *di = nullptr, *si = nullptr;
  size_t dlen, slen, dilen = 0, silen = 0;
  int64_t count, ps;
  if (!ArgView(a, 0, &dst, &dlen) || !ArgView(a, 2, &src, &slen) || !ArgInt(a, 4, &count) ||
      !ArgInt(a, 5, &ps))
    return;
  if (!a[1]->IsNull() && !(a[1]->IsUint32Array() && View(a[1], &di, &dilen)))
    return ThrowType(iso, "dst index list must be a Uint32Array or null");
  if (!a[3]->IsNull() && !(a[3]->IsUint32Array() && View(a[3], &si, &silen)))
    return ThrowType(iso, "src index list must be a Uint32Array or null");
  if (count < 0 || ps <= 0 || (di && dilen / 4 < (size_t)count) || (si && silen / 4 < (size_t)count))
    return ThrowType(iso, "bad page count or page size");
  const uint32_t* dix = reinterpret_cast<const uint32_t*>(di);
  const uint32_t* six = reinterpret_cast<const uint32_t*>(si);
  size_t dpages = dlen / (size_t)ps, spages = slen / (size_t)ps;
  for (int64_t i = 0; i < count; i++) {
    size_t d = dix ? dix[i] : (size_t)i, s = six ? six[i] : (size_t)i;
    if (d >= dpages || s >= spages) return ThrowType(iso, "page index out of range");
    memcpy(dst + d * (size_t)ps, src + s * (size_t)ps, (size_t)ps);
  }
}

// scanClear(bitmap: Uint32Array view, out: Uint32Array, startWord) -> [found, nextWord]
// Atomically takes (exchange with 0) every nonzero 32-bit word from startWord on and writes
// the bit numbers it held into `out`. Stops before a word whose bits would not fit, so no bit
// is ever taken without being reported; nextWord == words means the scan is complete.
// Uses the same 32-bit atomic words as Atomics.or in JS, so concurrent marks are never lost.
void ScanClear(const FunctionCallbackInfo<Value>& a) {
  Isolate* iso = a.GetIsolate();
  Local<Context> ctx = iso->GetCurrentContext();
  char *bm, *out;
  size_t blen, olen;
  int64_t start;
  if (!ArgView(a, 0, &bm, &blen) || !ArgView(a, 1, &out, &olen) || !ArgInt(a, 2, &start)) return;
  if (((uintptr_t)bm & 3) || ((uintptr_t)out & 3)) return ThrowType(iso, "unaligned bitmap");
  uint32_t* w = reinterpret_cast<uint32_t*>(bm);
  uint32_t* o = reinterpret_cast<uint32_t*>(out);
  size_t nw = blen / 4, room = olen / 4, found = 0, i = (size_t)(start < 0 ? 0 : start);
  for (; i < nw; i++) {
    uint32_t v = __atomic_load_n(&w[i], __ATOMIC_RELAXED);
    if (v == 0) continue;
    // The word may gain bits between this load and the exchange: reserve room for all 32.
    if (found + 32 > room) break;
    v = __atomic_exchange_n(&w[i], 0, __ATOMIC_SEQ_CST);
    while (v) {
      o[found++] = (uint32_t)(i * 32 + __builtin_ctz(v));
      v &= v - 1;
    }
  }
  Local<Array> r = Array::New(iso, 2);
  r->Set(ctx, 0, Number::New(iso, (double)found)).Check();
  r->Set(ctx, 1, Number::New(iso, (double)i)).Check();
  a.GetReturnValue().Set(r);
}

// isZero(view) -> true when every byte is zero.
void IsZero(const FunctionCallbackInfo<Value>& a) {
  char* p;
  size_t len;
  if (!ArgView(a, 0, &p, &len)) return;
  size_t i = 0;
  if (((uintptr_t)p & 7) == 0) {
    const uint64_t* q = reinterpret_cast<const uint64_t*>(p);
    for (; i + 64 <= len; i += 64, q += 8)
      if (q[0] | q[1] | q[2] | q[3] | q[4] | q[5] | q[6] | q[7]) {
        a.GetReturnValue().Set(false);
        return;
      }
  }
  for (; i < len; i++)
    if (p[i]) {
      a.GetReturnValue().Set(false);
      return;
    }
  a.GetReturnValue().Set(true);
}

// hashPages(src, srcPageIdx: Uint32Array|null, count, pageSize, out: Uint32Array)
// XXH64 (seed 0) of `count` pages of `src` (a null index list means consecutive from 0), as
// two u32 words per page (low, high) in out[2i], out[2i+1]. Page size must be a multiple of
// 32. Exists because per-page digests of every page sent (migration verification off the
// downtime path) cost too much per call from JS, and SHA-256 over all memory is ~8x slower.
namespace xxh {
constexpr uint64_t P1 = 0x9E3779B185EBCA87ULL, P2 = 0xC2B2AE3D27D4EB4FULL, P3 = 0x165667B19E3779F9ULL,
                   P4 = 0x85EBCA77C2B2AE63ULL, P5 = 0x27D4EB2F165667C5ULL;
inline uint64_t Rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
inline uint64_t Round(uint64_t acc, uint64_t in) { return Rotl(acc + in * P2, 31) * P1; }
inline uint64_t Merge(uint64_t acc, uint64_t v) { return (acc ^ Round(0, v)) * P1 + P4; }
inline uint64_t Load(const char* p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return v;
}
// Whole 32-byte stripes only (len % 32 == 0, len >= 32).
uint64_t Hash(const char* p, size_t len) {
  uint64_t v1 = P1 + P2, v2 = P2, v3 = 0, v4 = 0 - P1;
  for (const char* e = p + len; p < e; p += 32) {
    v1 = Round(v1, Load(p));
    v2 = Round(v2, Load(p + 8));
    v3 = Round(v3, Load(p + 16));
    v4 = Round(v4, Load(p + 24));
  }
  uint64_t h = Rotl(v1, 1) + Rotl(v2, 7) + Rotl(v3, 12) + Rotl(v4, 18);
  h = Merge(Merge(Merge(Merge(h, v1), v2), v3), v4) + (uint64_t)len;
  h ^= h >> 33;
  h *= P2;
  h ^= h >> 29;
  h *= P3;
  h ^= h >> 32;
  return h;
}
}  // namespace xxh

void HashPages(const FunctionCallbackInfo<Value>& a) {
  Isolate* iso = a.GetIsolate();
  char *src, *si = nullptr, *out;
  size_t slen, silen = 0, olen;
  int64_t count, ps;
  if (!ArgView(a, 0, &src, &slen) || !ArgInt(a, 2, &count) || !ArgInt(a, 3, &ps)) return;
  if (!a[1]->IsNull() && !(a[1]->IsUint32Array() && View(a[1], &si, &silen)))
    return ThrowType(iso, "src index list must be a Uint32Array or null");
  if (!(a[4]->IsUint32Array() && View(a[4], &out, &olen))) return ThrowType(iso, "out must be a Uint32Array");
  if (count < 0 || ps < 32 || ps % 32 != 0 || (si && silen / 4 < (size_t)count) || olen / 8 < (size_t)count)
    return ThrowType(iso, "bad page count, page size or output length");
  const uint32_t* six = reinterpret_cast<const uint32_t*>(si);
  size_t spages = slen / (size_t)ps;
  for (int64_t i = 0; i < count; i++) {
    size_t s = six ? six[i] : (size_t)i;
    if (s >= spages) return ThrowType(iso, "page index out of range");
    uint64_t h = xxh::Hash(src + s * (size_t)ps, (size_t)ps);
    memcpy(out + (size_t)i * 8, &h, 8);
  }
}

// The class of watch handles: one internal field (the Watch*), stop/ref/update on the prototype.
Local<Function> WatchClass(Isolate* iso, Local<Context> ctx) {
  Local<FunctionTemplate> t = FunctionTemplate::New(iso);
  t->InstanceTemplate()->SetInternalFieldCount(1);
  Local<ObjectTemplate> proto = t->PrototypeTemplate();
  proto->Set(iso, "stop", FunctionTemplate::New(iso, WatchStop));
  proto->Set(iso, "ref", FunctionTemplate::New(iso, WatchRef));
  proto->Set(iso, "update", FunctionTemplate::New(iso, WatchUpdate));
  return t->GetFunction(ctx).ToLocalChecked();
}

}  // namespace

NODE_MODULE_INIT(/* exports, module, context */) {
  Isolate* iso = context->GetIsolate();
  auto set = [&](const char* n, FunctionCallback f) {
    exports->Set(context, Str(iso, n), FunctionTemplate::New(iso, f)->GetFunction(context).ToLocalChecked())
        .Check();
  };
  set("memfdCreate", MemfdCreate);
  set("open", Open);
  set("close", Close);
  set("dup", Dup);
  set("fcntl", Fcntl);
  set("ftruncate", Ftruncate);
  set("fallocate", Fallocate);
  set("fstat", Fstat);
  set("mmap", Mmap);
  set("retire", Retire);
  set("liveMappings", LiveMappings);
  set("addressOf", AddressOf);
  set("madvise", Madvise);
  set("mincore", Mincore);
  set("read", Read);
  set("write", Write);
  set("pread", Pread);
  set("pwrite", Pwrite);
  set("preadv", Preadv);
  set("pwritev", Pwritev);
  set("fdatasync", Fdatasync);
  set("ioctl", Ioctl);
  set("eventfd", Eventfd);
  set("userfaultfd", Userfaultfd);
  set("unixListen", UnixListen);
  set("unixConnect", UnixConnect);
  set("accept", Accept);
  set("socketpair", Socketpair);
  set("shutdown", Shutdown);
  set("setsockopt", Setsockopt);
  set("sendmsg", Sendmsg);
  set("recvmsg", Recvmsg);
  exports
      ->Set(context, Str(iso, "watch"),
            FunctionTemplate::New(iso, WatchFd, WatchClass(iso, context))->GetFunction(context).ToLocalChecked())
      .Check();
  set("copyPages", CopyPages);
  set("scanClear", ScanClear);
  set("isZero", IsZero);
  set("hashPages", HashPages);
}
