// Block I/O straight between a file and guest memory, for the virtio-blk queue workers.
//
// A request's buffers arrive as (window, offset, length) triples in a Uint32Array over a table
// of guest-memory windows, not as one typed-array view per buffer: a 126-page request is one
// call, no 126 views for V8 to make and collect. Every triple is checked here against the
// window's real length before anything reaches the kernel; a triple outside gives -EFAULT and
// nothing is read or written.
//
// The table pins the mappings its windows lie in (PinMapping, mmap.cc): a range is never
// munmapped while a table or a transfer in flight still refers to it, whatever JS does with
// the windows meanwhile. A table is freed when its JS handle is collected and no transfer uses
// it any more, on whichever thread drops the last reference.
//
// Transfers run inline (guestIoRun) or on a pool of threads of the caller's own (guestIoPool):
// jobs are taken in order by the first free thread, completions are queued and announced on an
// eventfd the caller watches in its event loop, and harvested in batches (tag, result) into a
// Float64Array. Completion order is whatever the threads make it. Closing the pool lets the
// threads finish every job already queued (none is lost) and joins them; their completions stay
// harvestable. A submission may ask to try the page cache first (RWF_NOWAIT) in the calling
// thread: what is cached is copied there and then, without a hop to a thread and back, and only
// a transfer that would block (a page-cache miss) goes on, from where it stopped, in the pool.
//
// A read past the end of the file fills the rest with zeros (the image's length may not be a
// whole number of sectors); a write that moves nothing is EIO; EINTR is retried; a short
// transfer goes on from where it stopped.
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <vector>

#include "args.h"

namespace vmshift {
namespace {

constexpr size_t kMaxSegs = 1024;  // IOV_MAX: per request, as preadv takes them
constexpr uint32_t kMaxWindows = 1u << 16;
constexpr size_t kMaxThreads = 64;

const napi_type_tag kTableTag = {0x766d73686966742dull, 0x626c6b696f746162ull};
const napi_type_tag kPoolTag = {0x766d73686966742dull, 0x626c6b696f706f6cull};

struct Window {
  char* base;
  size_t len;
  void* pin;
};

struct Table {
  std::atomic<int> refs{1};
  std::vector<Window> windows;
};

void TableUnref(Table* t) {
  if (t->refs.fetch_sub(1) != 1) return;
  for (Window& w : t->windows) UnpinMapping(w.pin);
  delete t;
}

void TableFinalize(node_api_basic_env, void* data, void*) { TableUnref(static_cast<Table*>(data)); }

// Resolves `count` triples into iov[]; -EFAULT (nothing resolved) when one is outside its window.
int Resolve(const Table* t, const uint32_t* seg, size_t count, iovec* iov) {
  size_t n = t->windows.size();
  for (size_t i = 0; i < count; i++) {
    uint32_t w = seg[3 * i], off = seg[3 * i + 1], len = seg[3 * i + 2];
    if (w >= n || (uint64_t)off + len > t->windows[w].len) return -EFAULT;
    iov[i] = {t->windows[w].base + off, len};
  }
  return 0;
}

// Where a transfer stands: the next iovec, the file position, the bytes done. A transfer tried
// with RWF_NOWAIT stops where the page cache would make it wait and goes on later (on a pool
// thread) from there.
struct Cursor {
  iovec* iov;
  size_t n;
  size_t i = 0;
  uint64_t pos;
  int64_t done = 0;
};

// Moves what is left; 0 when all is done, else -errno (-EAGAIN: `flags` had RWF_NOWAIT and the
// rest would block). iov[] is consumed (advanced past what is done).
int Step(int fd, bool write, Cursor* c, int flags) {
  while (c->i < c->n && c->iov[c->i].iov_len == 0) c->i++;
  while (c->i < c->n) {
    int cnt = (int)(c->n - c->i);
    ssize_t r = write ? pwritev2(fd, c->iov + c->i, cnt, (off_t)c->pos, flags)
                      : preadv2(fd, c->iov + c->i, cnt, (off_t)c->pos, flags);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (r == 0) {
      if (write) return -EIO;
      // End of file: the rest reads as zeros.
      for (; c->i < c->n; c->i++) {
        memset(c->iov[c->i].iov_base, 0, c->iov[c->i].iov_len);
        c->done += (int64_t)c->iov[c->i].iov_len;
      }
      return 0;
    }
    c->pos += (uint64_t)r;
    c->done += r;
    size_t left = (size_t)r;
    while (c->i < c->n && left >= c->iov[c->i].iov_len) {
      left -= c->iov[c->i].iov_len;
      c->i++;
    }
    if (left > 0) {
      c->iov[c->i].iov_base = static_cast<char*>(c->iov[c->i].iov_base) + left;
      c->iov[c->i].iov_len -= left;
    }
  }
  return 0;
}

// The whole transfer, blocking; bytes moved or -errno.
int64_t Transfer(int fd, bool write, Cursor* c) {
  int r = Step(fd, write, c, 0);
  return r < 0 ? r : c->done;
}

bool ArgTagged(const Args& a, size_t i, const napi_type_tag* tag, void** out, const char* what) {
  bool ok = false;
  napi_valuetype t;
  napi_typeof(a.env, a[i], &t);
  if (t == napi_external) napi_check_object_type_tag(a.env, a[i], tag, &ok);
  if (!ok || napi_get_value_external(a.env, a[i], out) != napi_ok) {
    ThrowType(a.env, what);
    return false;
  }
  return true;
}

// The segment list: a Uint32Array holding at least 3 * count values, count <= kMaxSegs.
bool ArgSegments(const Args& a, size_t i, size_t ci, const uint32_t** seg, size_t* count) {
  uint32_t* p;
  size_t len;
  int64_t c;
  if (!ArgU32ArrayOrNull(a, i, &p, &len, "segments must be a Uint32Array") || !ArgInt(a, ci, &c)) return false;
  if (!p || c < 0 || (size_t)c > kMaxSegs || (size_t)c * 3 > len) {
    ThrowType(a.env, "segment count out of range (at most 1024 triples within the array)");
    return false;
  }
  *seg = p;
  *count = (size_t)c;
  return true;
}

bool ArgPos(const Args& a, size_t i, uint64_t* pos) {
  if (!ArgU64(a, i, pos)) return false;
  if (*pos > (uint64_t)INT64_MAX) {
    ThrowType(a.env, "file position out of range");
    return false;
  }
  return true;
}

// guestIoTable(windows: SharedArrayBuffer[]) -> table handle. Each window must lie in a live
// mapping made by mmap(); it is pinned until the table is gone.
napi_value NewTable(napi_env env, napi_callback_info info) {
  Args a(env, info);
  bool is = false;
  napi_is_array(env, a[0], &is);
  if (!is) return ThrowType(env, "expected an array of SharedArrayBuffer windows");
  uint32_t n = 0;
  napi_get_array_length(env, a[0], &n);
  if (n > kMaxWindows) return ThrowType(env, "too many windows");
  std::vector<napi_value> vals(n);
  for (uint32_t k = 0; k < n; k++)
    if (napi_get_element(env, a[0], k, &vals[k]) != napi_ok) return nullptr;
  Table* t = new Table();
  t->windows.reserve(n);
  for (uint32_t k = 0; k < n; k++) {
    bool sab = false;
    node_api_is_sharedarraybuffer(env, vals[k], &sab);
    char* p;
    size_t len;
    void* pin = nullptr;
    if (sab && View(env, vals[k], &p, &len)) pin = PinMapping(p, len);
    if (!pin) {
      TableUnref(t);
      return ThrowType(env, "a window is not a SharedArrayBuffer over a live mapping");
    }
    t->windows.push_back({p, len, pin});
  }
  napi_value ext;
  if (napi_create_external(env, t, TableFinalize, nullptr, &ext) != napi_ok) {
    TableUnref(t);
    return ThrowSys(env, "napi_create_external", ENOMEM);
  }
  napi_type_tag_object(env, ext, &kTableTag);
  return ext;
}

// guestIoRun(table, fd, write, pos, segments, count) -> bytes or -errno, in the calling thread.
napi_value Run(napi_env env, napi_callback_info info) {
  Args a(env, info);
  void* tp;
  int fd;
  uint64_t pos;
  const uint32_t* seg;
  size_t count;
  if (!ArgTagged(a, 0, &kTableTag, &tp, "expected a guest I/O table") || !ArgFd(a, 1, &fd) || !ArgPos(a, 3, &pos) ||
      !ArgSegments(a, 4, 5, &seg, &count))
    return nullptr;
  bool write = IsTrue(env, a[2]);
  iovec iov[kMaxSegs];
  int r = Resolve(static_cast<Table*>(tp), seg, count, iov);
  if (r < 0) return Num(env, r);
  Cursor c{iov, count, 0, pos};
  return Num(env, (double)Transfer(fd, write, &c));
}

struct Job {
  Table* table;
  int fd;
  bool write;
  Cursor cursor;
  double tag;
  int64_t result;
  iovec iov[kMaxSegs];
};

struct Pool {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Job*> queue;
  std::vector<Job*> done;
  std::vector<Job*> spare;  // finished jobs kept for reuse (as many as were ever in flight)
  std::vector<pthread_t> threads;
  int efd = -1;
  bool stopping = false;
  bool closed = false;
  size_t running = 0;  // jobs a thread is transferring now
  size_t alive = 0;    // threads not yet returned
  bool orphaned = false;  // collected with work left: the last thread to return frees the pool
};

void FreeParts(Pool* p);

void Serve(Pool* p) {
  std::unique_lock<std::mutex> lock(p->mu);
  for (;;) {
    p->cv.wait(lock, [p] { return p->stopping || !p->queue.empty(); });
    if (p->queue.empty()) break;  // stopping, and every queued job is done
    Job* j = p->queue.front();
    p->queue.pop_front();
    p->running++;
    lock.unlock();
    j->result = Transfer(j->fd, j->write, &j->cursor);
    lock.lock();
    p->running--;
    bool wake = p->done.empty();
    p->done.push_back(j);
    if (wake) {
      // Only the first completion of a batch signals: the harvest takes the whole list.
      lock.unlock();
      SignalEventfd(p->efd);
      lock.lock();
    }
  }
  bool last = --p->alive == 0 && p->orphaned;
  lock.unlock();
  if (last) FreeParts(p);
}

void* ServeThread(void* arg) {
  Serve(static_cast<Pool*>(arg));
  return nullptr;
}

void ClosePool(Pool* p) {
  {
    std::lock_guard<std::mutex> lock(p->mu);
    if (p->closed) return;
    p->closed = true;
    p->stopping = true;
  }
  p->cv.notify_all();
  for (pthread_t t : p->threads) pthread_join(t, nullptr);
  p->threads.clear();
  close(p->efd);
  p->efd = -1;
}

// Everything but the threads, which have all returned.
void FreeParts(Pool* p) {
  if (p->efd >= 0) close(p->efd);
  for (Job* j : p->done) {
    TableUnref(j->table);
    delete j;
  }
  for (Job* j : p->spare) delete j;
  delete p;
}

void FreePool(Pool* p) {
  ClosePool(p);
  FreeParts(p);
}

// Collected without close() (a worker torn down with requests in flight): an idle pool is
// joined and freed here; one with work left is not waited for (a transfer may wait for ever on
// a postcopy page that never comes): its threads finish the queue and the last one frees it.
// The eventfd's watch holds the JS handle, so this only runs once that watch is gone.
void PoolFinalize(node_api_basic_env, void* data, void*) {
  Pool* p = static_cast<Pool*>(data);
  {
    std::lock_guard<std::mutex> lock(p->mu);
    if (!p->closed && (!p->queue.empty() || p->running > 0)) {
      p->closed = true;
      p->stopping = true;
      p->orphaned = true;
      for (pthread_t t : p->threads) pthread_detach(t);
      p->threads.clear();
      p->cv.notify_all();
      return;
    }
  }
  FreePool(p);
}

// guestIoPool(threads) -> [pool handle, eventfd]
napi_value NewPool(napi_env env, napi_callback_info info) {
  Args a(env, info);
  int64_t n;
  if (!ArgInt(a, 0, &n)) return nullptr;
  if (n < 1 || (size_t)n > kMaxThreads) return ThrowType(env, "pool threads: 1..64");
  int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (efd < 0) return ThrowSys(env, "eventfd", errno);
  // Pool threads may run this library's code after the environment that loaded it is gone (a
  // worker torn down with transfers in flight): one more reference, never dropped, keeps Node
  // from unloading it under them.
  static std::once_flag pinned;
  std::call_once(pinned, [] {
    Dl_info self;
    if (dladdr(reinterpret_cast<void*>(&ServeThread), &self) && self.dli_fname)
      (void)dlopen(self.dli_fname, RTLD_NOW | RTLD_NOLOAD);
  });
  Pool* p = new Pool();
  p->efd = efd;
  for (int64_t k = 0; k < n; k++) {
    pthread_t t;
    int r = pthread_create(&t, nullptr, ServeThread, p);
    if (r != 0) {
      FreePool(p);  // joins the threads already made
      return ThrowSys(env, "pthread_create", r);
    }
    pthread_setname_np(t, "vmshift-blkio");  // what ps and perf show
    p->threads.push_back(t);
    {
      std::lock_guard<std::mutex> lock(p->mu);
      p->alive++;
    }
  }
  napi_value ext, out;
  if (napi_create_external(env, p, PoolFinalize, nullptr, &ext) != napi_ok) {
    FreePool(p);
    return ThrowSys(env, "napi_create_external", ENOMEM);
  }
  napi_type_tag_object(env, ext, &kPoolTag);
  napi_value fdv;
  napi_create_int32(env, efd, &fdv);
  napi_create_array_with_length(env, 2, &out);
  napi_set_element(env, out, 0, ext);
  napi_set_element(env, out, 1, fdv);
  return out;
}

// guestIoSubmit(pool, table, fd, flags, pos, segments, count, tag) -> -EINPROGRESS (queued: its
// completion comes with `tag`), or bytes moved at once, or -errno: -EFAULT (a segment outside
// its window: nothing done), -ESHUTDOWN (the pool is closed). flags: 1 write, 2 try the page
// cache in the calling thread first (RWF_NOWAIT) and queue only the rest.
napi_value Submit(napi_env env, napi_callback_info info) {
  Args a(env, info);
  void *pp, *tp;
  int fd;
  uint64_t pos;
  const uint32_t* seg;
  size_t count;
  double tag;
  if (!ArgTagged(a, 0, &kPoolTag, &pp, "expected a guest I/O pool") ||
      !ArgTagged(a, 1, &kTableTag, &tp, "expected a guest I/O table") || !ArgFd(a, 2, &fd) || !ArgPos(a, 4, &pos) ||
      !ArgSegments(a, 5, 6, &seg, &count))
    return nullptr;
  if (napi_get_value_double(env, a[7], &tag) != napi_ok) return ThrowType(env, "tag must be a number");
  int64_t flags;
  if (!ArgInt(a, 3, &flags)) return nullptr;
  Pool* p = static_cast<Pool*>(pp);
  Table* t = static_cast<Table*>(tp);
  bool write = (flags & 1) != 0, nowait = (flags & 2) != 0;
  Job* j = nullptr;
  {
    std::lock_guard<std::mutex> lock(p->mu);
    if (p->stopping) return Num(env, -ESHUTDOWN);
    if (!p->spare.empty()) {
      j = p->spare.back();
      p->spare.pop_back();
    }
  }
  if (!j) j = new Job();
  int r = Resolve(t, seg, count, j->iov);
  if (r < 0) {
    std::lock_guard<std::mutex> lock(p->mu);
    p->spare.push_back(j);
    return Num(env, r);
  }
  j->cursor = Cursor{j->iov, count, 0, pos};
  if (nowait) {
    // Whatever the page cache holds is done here, at once; only what would block goes to a thread.
    // EOPNOTSUPP: the file (system) has no non-blocking path for this (ext4 buffered writes).
    int r = Step(fd, write, &j->cursor, RWF_NOWAIT);
    if (r != -EAGAIN && r != -EOPNOTSUPP) {
      std::lock_guard<std::mutex> lock(p->mu);
      p->spare.push_back(j);
      return Num(env, r < 0 ? (double)r : (double)j->cursor.done);
    }
  }
  t->refs.fetch_add(1);
  j->table = t;
  j->fd = fd;
  j->write = write;
  j->tag = tag;
  j->result = 0;
  {
    std::lock_guard<std::mutex> lock(p->mu);
    p->queue.push_back(j);
  }
  p->cv.notify_one();
  return Num(env, -EINPROGRESS);
}

// guestIoHarvest(pool, out: Float64Array) -> completions written as (tag, result) pairs. Call
// again while it fills `out` completely.
napi_value Harvest(napi_env env, napi_callback_info info) {
  Args a(env, info);
  void* pp;
  if (!ArgTagged(a, 0, &kPoolTag, &pp, "expected a guest I/O pool")) return nullptr;
  bool is = false;
  napi_is_typedarray(env, a[1], &is);
  napi_typedarray_type type = napi_uint8_array;
  size_t len = 0;
  void* data = nullptr;
  if (is) napi_get_typedarray_info(env, a[1], &type, &len, &data, nullptr, nullptr);
  if (!is || type != napi_float64_array) return ThrowType(env, "out must be a Float64Array");
  Pool* p = static_cast<Pool*>(pp);
  double* out = static_cast<double*>(data);
  size_t room = len / 2, n = 0;
  std::vector<Job*> taken;
  {
    std::lock_guard<std::mutex> lock(p->mu);
    if (p->efd >= 0) {
      uint64_t v;
      (void)!read(p->efd, &v, sizeof v);  // EAGAIN: nothing signalled since the last harvest
    }
    n = p->done.size() < room ? p->done.size() : room;
    for (size_t k = 0; k < n; k++) {
      Job* j = p->done[k];
      out[2 * k] = j->tag;
      out[2 * k + 1] = (double)j->result;
      taken.push_back(j);
    }
    p->done.erase(p->done.begin(), p->done.begin() + (ptrdiff_t)n);
    for (Job* j : taken) {
      // Unref outside the transfer: the table may go here (its handle already collected).
      TableUnref(j->table);
      j->table = nullptr;
      p->spare.push_back(j);
    }
  }
  return Num(env, (double)n);
}

// guestIoPoolClose(pool): the threads finish every queued job and are joined; the eventfd is
// closed (stop watching it first). Completions stay harvestable. Idempotent.
napi_value PoolClose(napi_env env, napi_callback_info info) {
  Args a(env, info);
  void* pp;
  if (!ArgTagged(a, 0, &kPoolTag, &pp, "expected a guest I/O pool")) return nullptr;
  ClosePool(static_cast<Pool*>(pp));
  return nullptr;
}

}  // namespace

void RegisterBlkio(napi_env env, napi_value exports) {
  SetFunction(env, exports, "guestIoTable", NewTable);
  SetFunction(env, exports, "guestIoRun", Run);
  SetFunction(env, exports, "guestIoPool", NewPool);
  SetFunction(env, exports, "guestIoSubmit", Submit);
  SetFunction(env, exports, "guestIoHarvest", Harvest);
  SetFunction(env, exports, "guestIoPoolClose", PoolClose);
}

}  // namespace vmshift
