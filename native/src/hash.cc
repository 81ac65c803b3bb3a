// hashPages(src, srcPageIdx: Uint32Array|null, count, pageSize, out: Uint32Array)
// XXH64 (seed 0) of `count` pages of `src` (a null index list means consecutive from 0), as two
// u32 words per page (low, high) in out[2i], out[2i+1]. Page size must be a multiple of 32.
// Exists because per-page digests of every page sent (migration verification off the downtime
// path) cost too much per call from JS, and SHA-256 over all memory is ~8x slower.
#include <string.h>

#include "args.h"
#include "hash.h"

namespace vmshift {
namespace {

constexpr uint64_t P1 = 0x9E3779B185EBCA87ULL, P2 = 0xC2B2AE3D27D4EB4FULL, P3 = 0x165667B19E3779F9ULL,
                   P4 = 0x85EBCA77C2B2AE63ULL;
inline uint64_t Rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
inline uint64_t Round(uint64_t acc, uint64_t in) { return Rotl(acc + in * P2, 31) * P1; }
inline uint64_t Merge(uint64_t acc, uint64_t v) { return (acc ^ Round(0, v)) * P1 + P4; }
inline uint64_t Load(const char* p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return v;
}

// Whole 32-byte stripes only (len % 32 == 0, len >= 32).
uint64_t Xxh64(const char* p, size_t len) {
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

napi_value HashPages(napi_env env, napi_callback_info info) {
  Args a(env, info);
  char* src;
  uint32_t *six, *out;
  size_t slen, sicount, ocount;
  int64_t count, ps;
  if (!ArgView(a, 0, &src, &slen) ||
      !ArgU32ArrayOrNull(a, 1, &six, &sicount, "src index list must be a Uint32Array or null") ||
      !ArgInt(a, 2, &count) || !ArgInt(a, 3, &ps) ||
      !ArgU32ArrayOrNull(a, 4, &out, &ocount, "out must be a Uint32Array"))
    return nullptr;
  if (!out) return ThrowType(env, "out must be a Uint32Array");
  if (count < 0 || ps < 32 || ps % 32 != 0 || (six && sicount < (size_t)count) || ocount / 2 < (size_t)count)
    return ThrowType(env, "bad page count, page size or output length");
  size_t spages = slen / (size_t)ps;
  for (int64_t i = 0; i < count; i++) {
    size_t s = six ? six[i] : (size_t)i;
    if (s >= spages) return ThrowType(env, "page index out of range");
    uint64_t h = Xxh64(src + s * (size_t)ps, (size_t)ps);
    memcpy(out + (size_t)i * 2, &h, 8);
  }
  return nullptr;
}

}  // namespace

uint64_t Xxh64Stripes(const char* p, size_t len) { return Xxh64(p, len); }

void RegisterHash(napi_env env, napi_value exports) { SetFunction(env, exports, "hashPages", HashPages); }

}  // namespace vmshift
