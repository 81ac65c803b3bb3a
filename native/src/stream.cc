// The receiving half of a migration stream off the JS thread (precopy, plain sockets). One native
// thread reads whole records from the socket straight into slots of a ring that JS shares (a
// SharedArrayBuffer): the 8-byte header first, then payload + trailer into the same slot, so a
// record is never assembled from socket chunks (no per-read allocation, no join copy). It checks
// the header and the CRC there, and, for PAGES records when asked, hashes every full page (XXH64,
// the digest's per-page hash) into the slot's hash area: the main thread is left with applying
// the pages. With 2 cores that is the split: kernel copy out of the socket + CRC + hashes on
// this thread, the copy into guest memory + bookkeeping on the main thread.
//
// Policy stays in TS: JS decides what a record means and whether it is applied. A record whose
// header or CRC is bad is still handed over (marked), and the thread stops there: TS raises the
// same typed error the JS reader would, at the same offset, with nothing after it read.
//
// Ordering: the thread fills slot produced % slots, writes its meta, then publishes with a
// seq-cst store of `produced` in ctl[0] (JS reads it with Atomics.load) and rings the eventfd.
// JS gives a slot back with recvThreadRelease (a condition variable wakes the thread).
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "args.h"
#include "hash.h"
#include "record.h"


namespace vmshift {
namespace {

constexpr uint8_t kPagesType = kRecordPages;
constexpr size_t kMaxPayload = kMaxRecordPayload;
constexpr size_t kPage = kStreamPage;

// Per-slot meta (Float64Array, kMeta doubles per slot), then one double: bytes read from the socket.
enum Meta { kLen, kType, kFlags, kStatus, kBig, kOffset, kHashes, kMeta };
// kStatus: 0 whole and checked; 1 bad header (only the 8 header bytes are there); 2 CRC mismatch.
// kHashes: number of full pages hashed into the slot's hash area, or -1 (not hashed).
// ctl (Int32Array): [0] produced, [1] state: 0 running, 1 ended (EOF), 2 I/O error, 3 stopped
// after a bad record.
enum Ctl { kProduced, kState, kCtl };

uint32_t crc_table[256];
void CrcTableInit() {
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++) c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
    crc_table[i] = c;
  }
}

// The CRC register (pre- and post-inversion left to the caller) over bytes, one at a time.
uint32_t CrcBytes(uint32_t r, const uint8_t* p, size_t n) {
  while (n--) r = crc_table[(r ^ *p++) & 0xff] ^ (r >> 8);
  return r;
}

#if defined(__x86_64__)
// CRC-32 (ISO-HDLC, reflected) by carry-less multiplication, folding 64 bytes per step (Intel's
// "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ"). Each 128-bit lane is moved
// forward by 512 bits (x^(512+64) and x^512 mod P, for its two halves) and combined with the
// next block; the lanes are then folded into one by 128 bits at a time, and the last 16 bytes
// plus the tail go through the byte table (no Barrett reduction needed). The register's value
// is XORed into the first 4 bytes, which is what starting a table CRC with it means.
#define VMSHIFT_CLMUL __attribute__((target("pclmul,sse4.1")))
VMSHIFT_CLMUL inline __m128i fold(__m128i x, __m128i k) {
  return _mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11));
}
VMSHIFT_CLMUL inline __m128i load(const uint8_t* q) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(q)); }

VMSHIFT_CLMUL uint32_t CrcFold(uint32_t r, const uint8_t* p, size_t n) {
  const __m128i k512 = _mm_set_epi64x(0x1c6e41596, 0x154442bd4);
  const __m128i k128 = _mm_set_epi64x(0x0ccaa009e, 0x1751997d0);
  __m128i x0 = _mm_xor_si128(load(p), _mm_cvtsi32_si128((int)r)), x1 = load(p + 16), x2 = load(p + 32),
          x3 = load(p + 48);
  p += 64;
  n -= 64;
  for (; n >= 64; p += 64, n -= 64) {
    x0 = _mm_xor_si128(fold(x0, k512), load(p));
    x1 = _mm_xor_si128(fold(x1, k512), load(p + 16));
    x2 = _mm_xor_si128(fold(x2, k512), load(p + 32));
    x3 = _mm_xor_si128(fold(x3, k512), load(p + 48));
  }
  __m128i x = _mm_xor_si128(fold(x0, k128), x1);
  x = _mm_xor_si128(fold(x, k128), x2);
  x = _mm_xor_si128(fold(x, k128), x3);
  for (; n >= 16; p += 16, n -= 16) x = _mm_xor_si128(fold(x, k128), load(p));
  alignas(16) uint8_t last[16];
  _mm_store_si128(reinterpret_cast<__m128i*>(last), x);
  return CrcBytes(CrcBytes(0, last, 16), p, n);
}

bool HasPclmul() {
  static const bool has = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
  return has;
}
#else
// Elsewhere the byte table only (the addon ships for x86-64).
bool HasPclmul() { return false; }
uint32_t CrcFold(uint32_t r, const uint8_t* p, size_t n) { return CrcBytes(r, p, n); }
#endif

std::once_flag crc_once;

}  // namespace

// The stream's CRC-32 (zlib's crc32: ISO-HDLC); `crc` continues a previous one (hash.h).
uint32_t Crc32(const uint8_t* p, size_t n, uint32_t crc) {
  std::call_once(crc_once, CrcTableInit);
  uint32_t r = ~crc;
  if (n >= 64 && HasPclmul()) r = CrcFold(r, p, n);
  else r = CrcBytes(r, p, n);
  return ~r;
}

namespace {

struct Receiver {
  int sock = -1, notify = -1, wake = -1;
  uint8_t* ring = nullptr;
  size_t slotSize = 0, slots = 0, hashCap = 0;
  double* meta = nullptr;
  int32_t* ctl = nullptr;
  uint32_t* hashes = nullptr;
  bool hash = false;
  std::vector<uint8_t> prefix;
  size_t prefixPos = 0;
  std::vector<std::vector<uint8_t>> big;  // per slot: a record longer than a slot
  uint64_t offset = 0;                    // stream offset of the next record
  uint64_t bytesRead = 0;                 // read from the socket (not counting the prefix)
  uint64_t produced = 0, consumed = 0;    // consumed: guarded by mu
  std::mutex mu;
  std::condition_variable cv;
  std::atomic<bool> stop{false};
  std::thread th;
  // Why reading ended (state 1 or 2): set before the state is published.
  std::string what;
  uint64_t at = 0, had = 0, needed = 0;
  int err = 0;

  ~Receiver() {
    Join();
    if (sock >= 0) close(sock);
    if (wake >= 0) close(wake);
  }
  void Join() {
    if (!th.joinable()) return;
    {
      std::lock_guard<std::mutex> g(mu);
      stop = true;
    }
    cv.notify_all();
    SignalEventfd(wake);
    th.join();
  }
  void Notify() {
    SignalEventfd(notify);
  }
  void End(int state) {
    __atomic_store_n(&ctl[kState], state, __ATOMIC_SEQ_CST);
    Notify();
  }

  // Reads exactly n bytes (the prefix first). 1: done; 0: EOF; -1: error (err); -2: stopped.
  int ReadExact(uint8_t* p, size_t n, size_t* got) {
    *got = 0;
    while (*got < n) {
      if (prefixPos < prefix.size()) {
        size_t k = std::min(n - *got, prefix.size() - prefixPos);
        memcpy(p + *got, prefix.data() + prefixPos, k);
        prefixPos += k;
        *got += k;
        if (prefixPos == prefix.size()) std::vector<uint8_t>().swap(prefix);
        continue;
      }
      ssize_t r = read(sock, p + *got, n - *got);
      if (r > 0) {
        *got += (size_t)r;
        bytesRead += (uint64_t)r;
        // A progress counter for JS (an aligned double: one plain store on x86-64).
        meta[slots * kMeta] = (double)bytesRead;
        continue;
      }
      if (r == 0) return 0;
      if (errno == EINTR) continue;
      if (errno != EAGAIN) return err = errno, -1;
      pollfd pf[2] = {{sock, POLLIN, 0}, {wake, POLLIN, 0}};
      poll(pf, 2, -1);
      if (stop.load()) return -2;
    }
    return 1;
  }

  // The full pages of a PAGES payload hashed into `out`, when its layout is right; otherwise
  // -1, and TS rejects the record with its own message.
  int HashPages(const uint8_t* payload, size_t len, uint32_t* out) {
    PagesLayout l;
    if (ParsePages(payload, len, &l) || l.count > hashCap) return -1;
    for (size_t i = 0; i < l.full; i++) {
      uint64_t h = Xxh64Stripes(reinterpret_cast<const char*>(l.data + i * kPage), kPage);
      memcpy(out + 2 * i, &h, 8);
    }
    return (int)l.full;
  }

  void Run() {
    for (;;) {
      {
        std::unique_lock<std::mutex> l(mu);
        cv.wait(l, [&] { return stop.load() || produced - consumed < slots; });
        if (stop.load()) return;
      }
      size_t s = produced % slots;
      uint8_t* slot = ring + s * slotSize;
      double* m = meta + s * kMeta;
      std::vector<uint8_t>().swap(big[s]);
      size_t got;
      int rc = ReadExact(slot, 8, &got);
      if (rc != 1) return Stop(rc, "a record header", offset, 8, got);
      uint32_t len = Le32(slot + 4);
      m[kType] = slot[0];
      m[kFlags] = slot[1];
      m[kLen] = len;
      m[kOffset] = (double)offset;
      m[kBig] = 0;
      m[kHashes] = -1;
      if (slot[2] != 0 || slot[3] != 0 || len > kMaxPayload) {
        m[kStatus] = 1;
        Publish();
        return End(3);
      }
      size_t whole = 8 + (size_t)len + 4;
      uint8_t* rec = slot;
      if (whole > slotSize) {
        big[s].resize(whole);
        rec = big[s].data();
        memcpy(rec, slot, 8);
        m[kBig] = 1;
      }
      rc = ReadExact(rec + 8, len + 4, &got);
      if (rc != 1) return Stop(rc, "a record", offset, len + 4, got);
      if (Crc32(rec, 8 + len) != Le32(rec + 8 + len)) {
        m[kStatus] = 2;
        Publish();
        return End(3);
      }
      m[kStatus] = 0;
      if (hash && rec[0] == kPagesType && rec == slot) m[kHashes] = HashPages(rec + 8, len, hashes + s * hashCap * 2);
      offset += whole;
      Publish();
    }
  }
  void Publish() {
    produced++;
    __atomic_store_n(&ctl[kProduced], (int32_t)(uint32_t)produced, __ATOMIC_SEQ_CST);
    Notify();
  }
  void Stop(int rc, const char* w, uint64_t recordAt, size_t n, size_t got) {
    if (rc == -2) return;
    what = w;
    at = recordAt;
    needed = n;
    had = got;
    End(rc == 0 ? 1 : 2);
  }
};

std::mutex table_mu;
std::vector<Receiver*> table;

Receiver* Get(napi_env env, napi_value a) {
  int64_t id;
  if (napi_get_value_int64(env, a, &id) != napi_ok || id < 0 || (size_t)id >= table.size() || !table[id]) {
    ThrowType(env, "not a live record receiver handle");
    return nullptr;
  }
  return table[id];
}

// recvThreadCreate(sockFd, notifyFd, ring, meta: Float64Array, ctl: Int32Array, hashes: Uint32Array,
//                  prefix, config: Float64Array [slotSize, slots, streamOffset, hash]) -> id
// Takes a dup of sockFd; ring, meta, ctl and hashes must stay alive until recvThreadStop (TS
// keeps them). `prefix`: bytes already read from the socket, consumed first.
napi_value Create(napi_env env, napi_callback_info info) {
  Args a(env, info);
  int sock, notify;
  char *ring, *meta, *ctl, *hashes, *prefix, *cfg;
  size_t rl, ml, cl, hl, pl, fl;
  if (!ArgFd(a, 0, &sock) || !ArgFd(a, 1, &notify) || !ArgView(a, 2, &ring, &rl) || !ArgView(a, 3, &meta, &ml) ||
      !ArgView(a, 4, &ctl, &cl) || !ArgView(a, 5, &hashes, &hl) || !ArgView(a, 6, &prefix, &pl) ||
      !ArgView(a, 7, &cfg, &fl))
    return nullptr;
  if (fl < 4 * 8) return ThrowType(env, "config: [slotSize, slots, streamOffset, hash]");
  const double* c = reinterpret_cast<const double*>(cfg);
  size_t slotSize = (size_t)c[0], slots = (size_t)c[1];
  if (slotSize < 4096 || slotSize % 8 != 0 || slots < 1 || rl < slotSize * slots || ml < (slots * kMeta + 1) * 8 ||
      cl < kCtl * 4 || ((uintptr_t)ctl & 3) || ((uintptr_t)meta & 7) || ((uintptr_t)hashes & 3))
    return ThrowType(env, "bad ring, meta or control sizes");
  size_t hashCap = slotSize / kPage;
  if (hl < slots * hashCap * 8) return ThrowType(env, "hash area shorter than slots * slotSize / 4096 * 8");
  int s = fcntl(sock, F_DUPFD_CLOEXEC, 0);
  if (s < 0) return ThrowSys(env, "dup", errno);
  int w = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (w < 0) {
    close(s);
    return ThrowSys(env, "eventfd", errno);
  }
  // The dup shares the file description: libuv made it non-blocking already; poll() waits.
  fcntl(s, F_SETFL, fcntl(s, F_GETFL) | O_NONBLOCK);
  auto* r = new Receiver();
  r->sock = s;
  r->wake = w;
  r->notify = notify;
  r->ring = reinterpret_cast<uint8_t*>(ring);
  r->meta = reinterpret_cast<double*>(meta);
  r->ctl = reinterpret_cast<int32_t*>(ctl);
  r->hashes = reinterpret_cast<uint32_t*>(hashes);
  r->slotSize = slotSize;
  r->slots = slots;
  r->hashCap = hashCap;
  r->offset = (uint64_t)c[2];
  r->hash = c[3] != 0;
  r->prefix.assign(prefix, prefix + pl);
  r->big.resize(slots);
  __atomic_store_n(&r->ctl[kProduced], 0, __ATOMIC_SEQ_CST);
  __atomic_store_n(&r->ctl[kState], 0, __ATOMIC_SEQ_CST);
  r->th = std::thread([r] {
    pthread_setname_np(pthread_self(), "vmshift-recv");
    r->Run();
  });
  std::lock_guard<std::mutex> g(table_mu);
  for (size_t i = 0; i < table.size(); i++)
    if (!table[i]) return table[i] = r, Num(env, (double)i);
  table.push_back(r);
  return Num(env, (double)(table.size() - 1));
}

// recvThreadRelease(id): JS is done with the oldest slot it was handed.
napi_value Release(napi_env env, napi_callback_info info) {
  Args a(env, info);
  std::lock_guard<std::mutex> g(table_mu);
  Receiver* r = Get(env, a[0]);
  if (!r) return nullptr;
  {
    std::lock_guard<std::mutex> l(r->mu);
    if (r->consumed < r->produced) r->consumed++;
  }
  r->cv.notify_one();
  return nullptr;
}

// recvThreadTakeBig(id, slot, dst): copies the record held for `slot` (longer than a slot) into
// dst (header, payload, trailer) and frees it; returns its length.
napi_value TakeBig(napi_env env, napi_callback_info info) {
  Args a(env, info);
  std::lock_guard<std::mutex> g(table_mu);
  Receiver* r = Get(env, a[0]);
  if (!r) return nullptr;
  int64_t s;
  char* dst;
  size_t dl;
  if (!ArgInt(a, 1, &s) || !ArgView(a, 2, &dst, &dl)) return nullptr;
  if (s < 0 || (size_t)s >= r->slots) return ThrowType(env, "slot index");
  // The thread does not touch a published slot until it is released.
  std::vector<uint8_t>& b = r->big[s];
  if (dl < b.size()) return ThrowType(env, "destination shorter than the record");
  size_t n = b.size();
  memcpy(dst, b.data(), n);
  std::vector<uint8_t>().swap(b);
  return Num(env, (double)n);
}

// recvThreadStatus(id) -> [what, at, had, needed, errno] of the end of reading (state 1 or 2).
napi_value Status(napi_env env, napi_callback_info info) {
  Args a(env, info);
  std::lock_guard<std::mutex> g(table_mu);
  Receiver* r = Get(env, a[0]);
  if (!r) return nullptr;
  napi_value arr, v;
  napi_create_array_with_length(env, 5, &arr);
  napi_create_string_utf8(env, r->what.c_str(), NAPI_AUTO_LENGTH, &v);
  napi_set_element(env, arr, 0, v);
  napi_set_element(env, arr, 1, Num(env, (double)r->at));
  napi_set_element(env, arr, 2, Num(env, (double)r->had));
  napi_set_element(env, arr, 3, Num(env, (double)r->needed));
  napi_set_element(env, arr, 4, Num(env, r->err));
  return arr;
}

// recvThreadStop(id): stops and joins the thread, closes its fds (not the caller's socket).
napi_value Stop(napi_env env, napi_callback_info info) {
  Args a(env, info);
  Receiver* r;
  {
    std::lock_guard<std::mutex> g(table_mu);
    r = Get(env, a[0]);
    if (!r) return nullptr;
    int64_t id;
    napi_get_value_int64(env, a[0], &id);
    table[id] = nullptr;
  }
  delete r;
  return nullptr;
}

// crc32(view, seed) -> the stream's CRC-32 of the view's bytes, continuing `seed`.
napi_value Crc(napi_env env, napi_callback_info info) {
  Args a(env, info);
  char* p;
  size_t n;
  int64_t seed;
  if (!ArgView(a, 0, &p, &n) || !ArgInt(a, 1, &seed)) return nullptr;
  return Num(env, (double)Crc32(reinterpret_cast<const uint8_t*>(p), n, (uint32_t)seed));
}

}  // namespace

void RegisterStream(napi_env env, napi_value exports) {
  SetFunction(env, exports, "recvThreadCreate", Create);
  SetFunction(env, exports, "recvThreadRelease", Release);
  SetFunction(env, exports, "recvThreadTakeBig", TakeBig);
  SetFunction(env, exports, "recvThreadStatus", Status);
  SetFunction(env, exports, "recvThreadStop", Stop);
  SetFunction(env, exports, "crc32", Crc);
}

}  // namespace vmshift
