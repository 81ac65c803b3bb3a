// Mappings as SharedArrayBuffers.
//
// One mmap() is exposed as one or more SharedArrayBuffers ("windows") over consecutive parts of
// it: typed arrays stop at 4 GiB, and KVM and vhost-user need one contiguous host range. Each
// window is made with node_api_create_external_sharedarraybuffer; the windows share a refcount
// and the range is munmapped only when every window has been collected. That finalizer gets no
// env and may run on any thread (V8 frees backing stores on a background sweeper), so it only
// calls munmap and touches atomics and a mutex-guarded table.
//
// The safety rule: a range is never munmapped while JS can still reach it. An explicit retire()
// overlays the range with private anonymous memory at once (the file or memfd is released
// immediately, other processes no longer share anything with it), and any stale view reads
// zeros and writes into scratch that nobody sees. The address range stays reserved until the
// last view is collected, so it can never be reused by an unrelated mapping while a stale view
// exists.
#include <errno.h>
#include <sys/mman.h>

#include <atomic>
#include <mutex>
#include <unordered_map>

#include "args.h"

namespace vmshift {
namespace {

struct MapRec {
  char* base;
  size_t len;
  std::atomic<size_t> windows;
  bool retired;  // guarded by g_maps_mu
};

std::mutex g_maps_mu;
std::unordered_map<char*, MapRec*> g_maps;  // base -> record, for retire()
std::atomic<int64_t> g_live_maps{0};

// node_api_noenv_finalize: any thread, no env.
void WindowFinalize(void*, void* hint) {
  MapRec* m = static_cast<MapRec*>(hint);
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
napi_value Mmap(napi_env env, napi_callback_info info) {
  Args a(env, info);
  int64_t fd, prot, flags;
  uint64_t len, off, win;
  if (!ArgInt(a, 0, &fd) || !ArgU64(a, 1, &len) || !ArgU64(a, 2, &off) || !ArgInt(a, 3, &prot) ||
      !ArgInt(a, 4, &flags) || !ArgU64(a, 5, &win))
    return nullptr;
  if (len == 0 || win == 0 || (win & 4095) != 0) return ThrowType(env, "bad length or window size");
  if ((len + win - 1) / win > 1u << 20) return ThrowType(env, "too many windows");
  // JS never chooses addresses: a fixed mapping could overlay memory V8 or a view owns.
  if (flags & (MAP_FIXED | MAP_FIXED_NOREPLACE)) return ThrowType(env, "MAP_FIXED is not allowed");
  void* p = mmap(nullptr, len, (int)prot, (int)flags, (int)fd, (off_t)off);
  if (p == MAP_FAILED) return ThrowSys(env, "mmap", errno);
  size_t n = (len + win - 1) / win;
  MapRec* m = new MapRec{static_cast<char*>(p), len, {n}, false};
  {
    std::lock_guard<std::mutex> lock(g_maps_mu);
    g_maps[m->base] = m;
  }
  g_live_maps.fetch_add(1);
  napi_value out;
  napi_create_array_with_length(env, n, &out);
  for (size_t i = 0; i < n; i++) {
    size_t wlen = (i == n - 1) ? len - i * win : win;
    napi_value sab;
    napi_status s = node_api_create_external_sharedarraybuffer(env, m->base + i * win, wlen, WindowFinalize, m, &sab);
    if (s != napi_ok) {
      // The windows already made own their share of the count; drop the ones never made.
      for (size_t k = i; k < n; k++) WindowFinalize(nullptr, m);
      return ThrowSys(env, "node_api_create_external_sharedarraybuffer", ENOMEM);
    }
    napi_set_element(env, out, (uint32_t)i, sab);
  }
  return out;
}

// retire(firstWindow): see the safety rule above. Idempotent.
napi_value Retire(napi_env env, napi_callback_info info) {
  Args a(env, info);
  bool is = false;
  node_api_is_sharedarraybuffer(env, a[0], &is);
  char* p;
  size_t len;
  if (!is || !View(env, a[0], &p, &len)) return ThrowType(env, "expected the first window of a mapping");
  std::lock_guard<std::mutex> lock(g_maps_mu);
  auto it = g_maps.find(p);
  if (it == g_maps.end()) return ThrowType(env, "not the first window of a live mapping");
  MapRec* m = it->second;
  if (m->retired) return nullptr;
  void* q = mmap(m->base, m->len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
  if (q == MAP_FAILED) return ThrowSys(env, "mmap(retire)", errno);
  m->retired = true;
  return nullptr;
}

napi_value LiveMappings(napi_env env, napi_callback_info) { return Num(env, (double)g_live_maps.load()); }

// addressOf(view) -> BigInt host virtual address of the view's first byte.
napi_value AddressOf(napi_env env, napi_callback_info info) {
  Args a(env, info);
  char* p;
  size_t len;
  if (!ArgView(a, 0, &p, &len)) return nullptr;
  napi_value r;
  napi_create_bigint_uint64(env, (uint64_t)(uintptr_t)p, &r);
  return r;
}

// madvise(view, advice) over the page-aligned view.
napi_value Madvise(napi_env env, napi_callback_info info) {
  Args a(env, info);
  char* p;
  size_t len;
  int64_t adv;
  if (!ArgView(a, 0, &p, &len) || !ArgInt(a, 1, &adv)) return nullptr;
  if (((uintptr_t)p & 4095) != 0) return ThrowType(env, "madvise needs a page-aligned view");
  if (madvise(p, len, (int)adv) < 0) return ThrowSys(env, "madvise", errno);
  return nullptr;
}

// mincore(view, out Uint8Array) -> fills one byte per page (bit 0 = resident).
napi_value Mincore(napi_env env, napi_callback_info info) {
  Args a(env, info);
  char *p, *out;
  size_t len, outlen;
  if (!ArgView(a, 0, &p, &len) || !ArgView(a, 1, &out, &outlen)) return nullptr;
  if (((uintptr_t)p & 4095) != 0) return ThrowType(env, "mincore needs a page-aligned view");
  size_t pages = (len + 4095) / 4096;
  if (outlen < pages) return ThrowType(env, "mincore output too small");
  if (mincore(p, len, (unsigned char*)out) < 0) return ThrowSys(env, "mincore", errno);
  return nullptr;
}

}  // namespace

// A pin is one more holder of the record's count, like a window: the range stays mapped until
// every window and every pin is gone. Taken under g_maps_mu, so a record whose last window is
// being finalized (count already 0, about to be erased) is never revived.
void* PinMapping(const char* p, size_t len) {
  std::lock_guard<std::mutex> lock(g_maps_mu);
  for (auto& kv : g_maps) {
    MapRec* m = kv.second;
    if (p < m->base || len > m->len || (size_t)(p - m->base) > m->len - len) continue;
    size_t n = m->windows.load();
    while (n > 0 && !m->windows.compare_exchange_weak(n, n + 1)) {
    }
    return n > 0 ? m : nullptr;
  }
  return nullptr;
}

void UnpinMapping(void* pin) { WindowFinalize(nullptr, pin); }

void RegisterMmap(napi_env env, napi_value exports) {
  SetFunction(env, exports, "mmap", Mmap);
  SetFunction(env, exports, "retire", Retire);
  SetFunction(env, exports, "liveMappings", LiveMappings);
  SetFunction(env, exports, "addressOf", AddressOf);
  SetFunction(env, exports, "madvise", Madvise);
  SetFunction(env, exports, "mincore", Mincore);
}

}  // namespace vmshift
