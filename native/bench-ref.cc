// C reference loops for `npm run bench`, measured in the same run as the TypeScript code they
// are compared with. Bench-only: nothing in src/ loads this addon. Node-API, like the main addon,
// so it builds and loads on every supported Node line.
#include <node_api.h>
#include <string.h>
#include <time.h>

namespace {

double NowNs() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e9 + t.tv_nsec;
}

// Pointer and byte length of a SharedArrayBuffer or a typed array (bench inputs only).
char* Ptr(napi_env env, napi_value v, size_t* len) {
  bool is = false;
  napi_is_typedarray(env, v, &is);
  if (is) {
    napi_typedarray_type t;
    size_t n;
    void* data;
    napi_get_typedarray_info(env, v, &t, &n, &data, nullptr, nullptr);
    size_t es = t == napi_uint32_array || t == napi_int32_array || t == napi_float32_array ? 4
                : t == napi_uint8_array || t == napi_int8_array || t == napi_uint8_clamped_array ? 1
                : t == napi_uint16_array || t == napi_int16_array ? 2 : 8;
    *len = n * es;
    return static_cast<char*>(data);
  }
  void* data = nullptr;
  *len = 0;
  napi_get_arraybuffer_info(env, v, &data, len);
  return static_cast<char*>(data);
}

struct Call {
  napi_env env;
  size_t argc = 5;
  napi_value argv[5];
  Call(napi_env e, napi_callback_info info) : env(e) { napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr); }
  double Num(int i) const {
    double d = 0;
    napi_get_value_double(env, argv[i], &d);
    return d;
  }
  napi_value Ret(double d) const {
    napi_value v;
    napi_create_double(env, d, &v);
    return v;
  }
};

// markRandom(bitmap, nops, seed) -> ns. The same xorshift32 stream the JS side uses.
napi_value MarkRandom(napi_env env, napi_callback_info info) {
  Call a(env, info);
  size_t len;
  uint32_t* w = (uint32_t*)Ptr(env, a.argv[0], &len);
  uint32_t nbits = (uint32_t)(len * 8);
  long n = (long)a.Num(1);
  uint32_t x = (uint32_t)a.Num(2);
  double t0 = NowNs();
  for (long i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    uint32_t b = x % nbits;
    __atomic_fetch_or(&w[b >> 5], 1u << (b & 31), __ATOMIC_SEQ_CST);
  }
  return a.Ret(NowNs() - t0);
}

// scanClear(bitmap, out) -> [ns, found]: the plain C loop (load, exchange nonzero, ctz).
napi_value ScanClear(napi_env env, napi_callback_info info) {
  Call a(env, info);
  size_t len, olen;
  uint64_t* w = (uint64_t*)Ptr(env, a.argv[0], &len);
  uint32_t* o = (uint32_t*)Ptr(env, a.argv[1], &olen);
  size_t nw = len / 8, found = 0, room = olen / 4;
  double t0 = NowNs();
  for (size_t i = 0; i < nw; i++) {
    if (__atomic_load_n(&w[i], __ATOMIC_RELAXED) == 0) continue;
    uint64_t v = __atomic_exchange_n(&w[i], 0, __ATOMIC_SEQ_CST);
    while (v) {
      if (found < room) o[found] = (uint32_t)(i * 64 + __builtin_ctzll(v));
      found++;
      v &= v - 1;
    }
  }
  double dt = NowNs() - t0;
  napi_value r;
  napi_create_array_with_length(env, 2, &r);
  napi_set_element(env, r, 0, a.Ret(dt));
  napi_set_element(env, r, 1, a.Ret((double)found));
  return r;
}

// copyPages(dst, src, pageIdx: Uint32Array, count, pageSize) -> ns: memcpy per page.
napi_value CopyPages(napi_env env, napi_callback_info info) {
  Call a(env, info);
  size_t dl, sl, il;
  char* d = Ptr(env, a.argv[0], &dl);
  char* s = Ptr(env, a.argv[1], &sl);
  uint32_t* idx = (uint32_t*)Ptr(env, a.argv[2], &il);
  long n = (long)a.Num(3);
  size_t ps = (size_t)a.Num(4);
  double t0 = NowNs();
  for (long i = 0; i < n; i++) memcpy(d + idx[i] * ps, s + idx[i] * ps, ps);
  return a.Ret(NowNs() - t0);
}

// memcpy(dst, src, len) -> ns
napi_value Memcpy(napi_env env, napi_callback_info info) {
  Call a(env, info);
  size_t dl, sl;
  char* d = Ptr(env, a.argv[0], &dl);
  char* s = Ptr(env, a.argv[1], &sl);
  size_t n = (size_t)a.Num(2);
  if (n > dl || n > sl) n = dl < sl ? dl : sl;
  double t0 = NowNs();
  memcpy(d, s, n);
  return a.Ret(NowNs() - t0);
}

}  // namespace

NAPI_MODULE_INIT(/* env, exports */) {
  const struct {
    const char* name;
    napi_callback cb;
  } fns[] = {{"markRandom", MarkRandom}, {"scanClear", ScanClear}, {"copyPages", CopyPages}, {"memcpy", Memcpy}};
  for (const auto& f : fns) {
    napi_value fn;
    napi_create_function(env, f.name, NAPI_AUTO_LENGTH, f.cb, nullptr, &fn);
    napi_set_named_property(env, exports, f.name, fn);
  }
  return exports;
}
