// C reference loops for `npm run bench`, measured in the same run as the TypeScript code they
// are compared with. Bench-only: nothing in src/ loads this addon.
#include <node.h>
#include <v8.h>

#include <string.h>
#include <time.h>

using namespace v8;

namespace {

double NowNs() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e9 + t.tv_nsec;
}

char* Ptr(Local<Value> v, size_t* len) {
  if (v->IsSharedArrayBuffer()) {
    *len = v.As<SharedArrayBuffer>()->ByteLength();
    return (char*)v.As<SharedArrayBuffer>()->Data();
  }
  auto b = v.As<ArrayBufferView>();
  *len = b->ByteLength();
  return (char*)b->Buffer()->Data() + b->ByteOffset();
}

double Num(const FunctionCallbackInfo<Value>& a, int i) { return a[i].As<Number>()->Value(); }

// markRandom(bitmap, nops, seed) -> ns. The same xorshift32 stream the JS side uses.
void MarkRandom(const FunctionCallbackInfo<Value>& a) {
  size_t len;
  uint32_t* w = (uint32_t*)Ptr(a[0], &len);
  uint32_t nbits = (uint32_t)(len * 8);
  long n = (long)Num(a, 1);
  uint32_t x = (uint32_t)Num(a, 2);
  double t0 = NowNs();
  for (long i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    uint32_t b = x % nbits;
    __atomic_fetch_or(&w[b >> 5], 1u << (b & 31), __ATOMIC_SEQ_CST);
  }
  a.GetReturnValue().Set(NowNs() - t0);
}

// scanClear(bitmap, out) -> [ns, found]: the plain C loop (load, exchange nonzero, ctz).
void ScanClear(const FunctionCallbackInfo<Value>& a) {
  Isolate* iso = a.GetIsolate();
  size_t len, olen;
  uint64_t* w = (uint64_t*)Ptr(a[0], &len);
  uint32_t* o = (uint32_t*)Ptr(a[1], &olen);
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
  Local<Array> r = Array::New(iso, 2);
  r->Set(iso->GetCurrentContext(), 0, Number::New(iso, dt)).Check();
  r->Set(iso->GetCurrentContext(), 1, Number::New(iso, (double)found)).Check();
  a.GetReturnValue().Set(r);
}

// copyPages(dst, src, pageIdx: Uint32Array, count, pageSize) -> ns: memcpy per page.
void CopyPages(const FunctionCallbackInfo<Value>& a) {
  size_t dl, sl, il;
  char* d = Ptr(a[0], &dl);
  char* s = Ptr(a[1], &sl);
  uint32_t* idx = (uint32_t*)Ptr(a[2], &il);
  long n = (long)Num(a, 3);
  size_t ps = (size_t)Num(a, 4);
  double t0 = NowNs();
  for (long i = 0; i < n; i++) memcpy(d + idx[i] * ps, s + idx[i] * ps, ps);
  a.GetReturnValue().Set(NowNs() - t0);
}

// memcpy(dst, src, len) -> ns
void Memcpy(const FunctionCallbackInfo<Value>& a) {
  size_t dl, sl;
  char* d = Ptr(a[0], &dl);
  char* s = Ptr(a[1], &sl);
  size_t n = (size_t)Num(a, 2);
  if (n > dl || n > sl) n = dl < sl ? dl : sl;
  double t0 = NowNs();
  memcpy(d, s, n);
  a.GetReturnValue().Set(NowNs() - t0);
}

}  // namespace

NODE_MODULE_INIT(/* exports, module, context */) {
  Isolate* iso = context->GetIsolate();
  auto set = [&](const char* n, FunctionCallback f) {
    exports->Set(context, String::NewFromUtf8(iso, n).ToLocalChecked(),
                 FunctionTemplate::New(iso, f)->GetFunction(context).ToLocalChecked())
        .Check();
  };
  set("markRandom", MarkRandom);
  set("scanClear", ScanClear);
  set("copyPages", CopyPages);
  set("memcpy", Memcpy);
}
