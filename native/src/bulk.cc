// Bulk memory primitives, kept because the `dirty` benchmark shows JS cannot reach the floor:
// per-page copies pay ~0.35 us of call and view overhead in JS, and a JS bitmap scan is several
// times slower than a C word loop. Each call handles a whole batch, so the per-call cost of
// Node-API does not show.
#include <string.h>

#include "args.h"

namespace vmshift {
namespace {

// copyPages(dst, dstPageIdx: Uint32Array|null, src, srcPageIdx: Uint32Array|null, count, pageSize)
// Copies `count` pages; a null index list means "consecutive from 0". Indices are checked.
napi_value CopyPages(napi_env env, napi_callback_info info) {
  Args a(env, info);
  char *dst, *src;
  uint32_t *dix, *six;
  size_t dlen, slen, dicount, sicount;
  int64_t count, ps;
  if (!ArgView(a, 0, &dst, &dlen) || !ArgU32ArrayOrNull(a, 1, &dix, &dicount, "dst index list must be a Uint32Array or null") ||
      !ArgView(a, 2, &src, &slen) || !ArgU32ArrayOrNull(a, 3, &six, &sicount, "src index list must be a Uint32Array or null") ||
      !ArgInt(a, 4, &count) || !ArgInt(a, 5, &ps))
    return nullptr;
  if (count < 0 || ps <= 0 || (dix && dicount < (size_t)count) || (six && sicount < (size_t)count))
    return ThrowType(env, "bad page count or page size");
  size_t dpages = dlen / (size_t)ps, spages = slen / (size_t)ps;
  for (int64_t i = 0; i < count; i++) {
    size_t d = dix ? dix[i] : (size_t)i, s = six ? six[i] : (size_t)i;
    if (d >= dpages || s >= spages) return ThrowType(env, "page index out of range");
    memcpy(dst + d * (size_t)ps, src + s * (size_t)ps, (size_t)ps);
  }
  return nullptr;
}

// memcpy(dst, src) -> bytes copied (src.byteLength). One memmove (the views may overlap when
// they share a buffer) at libc speed; TypedArray.set on a SharedArrayBuffer copies word by word
// with relaxed atomics at about half of that. dst must be at least as long as src.
napi_value MemCopy(napi_env env, napi_callback_info info) {
  Args a(env, info);
  char *dst, *src;
  size_t dlen, slen;
  if (!ArgView(a, 0, &dst, &dlen) || !ArgView(a, 1, &src, &slen)) return nullptr;
  if (slen > dlen) return ThrowType(env, "memcpy: destination shorter than source");
  if (slen) memmove(dst, src, slen);
  return Num(env, (double)slen);
}

// scanClear(bitmap: Uint32Array view, out: Uint32Array, startWord) -> [found, nextWord]
// Atomically takes (exchange with 0) every nonzero 32-bit word from startWord on and writes the
// bit numbers it held into `out`. Stops before a word whose bits would not fit, so no bit is ever
// taken without being reported; nextWord == words means the scan is complete. Uses the same
// 32-bit atomic words as Atomics.or in JS, so concurrent marks are never lost.
napi_value ScanClear(napi_env env, napi_callback_info info) {
  Args a(env, info);
  char *bm, *out;
  size_t blen, olen;
  int64_t start;
  if (!ArgView(a, 0, &bm, &blen) || !ArgView(a, 1, &out, &olen) || !ArgInt(a, 2, &start)) return nullptr;
  if (((uintptr_t)bm & 3) || ((uintptr_t)out & 3)) return ThrowType(env, "unaligned bitmap");
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
  return Pair(env, (double)found, (double)i);
}

// isZero(view) -> true when every byte is zero.
napi_value IsZero(napi_env env, napi_callback_info info) {
  Args a(env, info);
  char* p;
  size_t len;
  if (!ArgView(a, 0, &p, &len)) return nullptr;
  size_t i = 0;
  if (((uintptr_t)p & 7) == 0) {
    const uint64_t* q = reinterpret_cast<const uint64_t*>(p);
    for (; i + 64 <= len; i += 64, q += 8)
      if (q[0] | q[1] | q[2] | q[3] | q[4] | q[5] | q[6] | q[7]) return Bool(env, false);
  }
  for (; i < len; i++)
    if (p[i]) return Bool(env, false);
  return Bool(env, true);
}

}  // namespace

void RegisterBulk(napi_env env, napi_value exports) {
  SetFunction(env, exports, "copyPages", CopyPages);
  SetFunction(env, exports, "scanClear", ScanClear);
  SetFunction(env, exports, "isZero", IsZero);
  SetFunction(env, exports, "memcpy", MemCopy);
}

}  // namespace vmshift
