// The postcopy fault path off the JS threads: one native thread per side that never waits on an
// event loop or a garbage collector (the issue-14 tail came from sharing the main thread with
// the background stream, record parsing and hashing).
//
// Destination (FaultThread): owns the reading of every userfaultfd (ours and the back-ends') and
// the preempt connection (a plain socket fd). A fault on a missing page sends PAGE_REQUEST on the
// preempt connection; a page coming back on it is checked (CRC, every field) and placed with
// UFFDIO_COPY through our own userfaultfd. Pages the main thread places from the background
// stream meet these through the shared `present` bitmaps (one bit per page, atomic OR, set only
// after the page is mapped): a page present is never asked for or placed again, and EEXIST means
// the other path was first (wake only). Threads of another fault domain that wait on a page are
// marked in the shared `waiting` bitmaps, so whichever path places the page wakes them there.
//
// Source (RequestServer): owns the preempt connection; reads PAGE_REQUESTs and answers each from
// the shared guest mapping (copy into a send buffer, one write), ahead of anything else.
//
// Policy stays in TS: which pages exist, what is discarded (the DiscardMap bytes are read
// here), when to start and stop. Errors are kept as (code, message) for TS to raise typed.
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <poll.h>
#include <pthread.h>
#include <string.h>
#include <sys/eventfd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/sysinfo.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <linux/userfaultfd.h>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "args.h"
#include "hash.h"
#include "record.h"

namespace vmshift {
namespace {

constexpr uint64_t kPage = kStreamPage;
constexpr uint8_t kPages = kRecordPages, kPreemptEnd = 0x43, kPageRequest = 0x81;
constexpr size_t kMaxRecord = kMaxRecordPayload;
constexpr uint32_t kMaxRequestPages = 512;

double NowUs() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}
bool BitHas(uint8_t* b, size_t p) { return (__atomic_load_n(&b[p >> 3], __ATOMIC_SEQ_CST) >> (p & 7)) & 1; }
void BitSet(uint8_t* b, size_t p) { __atomic_fetch_or(&b[p >> 3], (uint8_t)(1u << (p & 7)), __ATOMIC_SEQ_CST); }
bool BitTake(uint8_t* b, size_t p) {
  uint8_t m = 1u << (p & 7);
  return __atomic_fetch_and(&b[p >> 3], (uint8_t)~m, __ATOMIC_SEQ_CST) & m;
}

// The fault path's threads sleep almost all the time and must run the moment a fault or a page
// comes in, while the background stream keeps the other threads busy: a higher CFS weight makes
// the scheduler preempt for them at once. Only this thread (Linux: nice is per thread). Needs
// CAP_SYS_NICE; without it nothing changes.
void Urgent() { setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), -10); }

// Writes all of `n` bytes to a non-blocking socket, waiting for room (or `stop`).
bool WriteAll(int fd, const uint8_t* p, size_t n, const std::atomic<bool>& stop, int* err) {
  while (n) {
    ssize_t w = write(fd, p, n);
    if (w > 0) {
      p += w;
      n -= (size_t)w;
      continue;
    }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno == EAGAIN) {
      if (stop.load()) return *err = ECANCELED, false;
      pollfd pf{fd, POLLOUT, 0};
      poll(&pf, 1, 100);
      continue;
    }
    *err = w < 0 ? errno : EPIPE;
    return false;
  }
  return true;
}

// A buffered record reader over a non-blocking socket: Fill() reads what is there, Next() hands
// out whole records (header checked, CRC checked) one at a time.
struct RecordIn {
  std::vector<uint8_t> buf = std::vector<uint8_t>(1 << 20);
  size_t head = 0, tail = 0;
  uint64_t offset = 0;  // stream offset of buf[head]
  // 1: data read, 0: would block, -1: EOF, -2: error (errno in *err)
  int Fill(int fd, int* err) {
    if (head == tail) head = tail = 0;
    if (tail == buf.size()) {
      if (head > 0) {
        memmove(buf.data(), buf.data() + head, tail - head);
        tail -= head;
        head = 0;
      } else {
        buf.resize(buf.size() * 2);
      }
    }
    ssize_t r = read(fd, buf.data() + tail, buf.size() - tail);
    if (r > 0) return tail += (size_t)r, 1;
    if (r == 0) return -1;
    if (errno == EAGAIN || errno == EINTR) return 0;
    *err = errno;
    return -2;
  }
  // 1: a record (type, payload), 0: need more, -1: bad (code, msg set)
  int Next(uint8_t* type, const uint8_t** payload, uint32_t* len, uint64_t* at, const char** code, std::string* msg) {
    size_t avail = tail - head;
    if (avail < 8) return 0;
    const uint8_t* h = buf.data() + head;
    uint32_t l = Le32(h + 4);
    *at = offset;
    if (h[1] != 0 || h[2] != 0 || h[3] != 0 || l > kMaxRecord) {
      *code = "CORRUPT";
      *msg = "preempt channel: bad record header";
      return -1;
    }
    size_t whole = 8 + (size_t)l + 4;
    if (avail < whole) {
      if (buf.size() - head < whole) {
        memmove(buf.data(), h, avail);
        head = 0;
        tail = avail;
        if (buf.size() < whole) buf.resize(whole);
      }
      return 0;
    }
    if (Crc32(h, 8 + l) != Le32(h + 8 + l)) {
      *code = "CORRUPT";
      *msg = "preempt channel: record checksum mismatch";
      return -1;
    }
    *type = h[0];
    *payload = h + 8;
    *len = l;
    head += whole;
    offset += whole;
    return 1;
  }
};

// What both threads share: the channel's fd, the eventfds that wake JS (notify) and the thread
// (wake), the thread's lifetime and its one failure. A derived destructor calls Join() first (the
// thread uses the derived members); the fds close here, after it.
struct ChannelThread {
  int sock = -1, notify = -1, wake = -1;
  std::mutex mu;
  std::thread th;
  std::atomic<bool> stop{false};
  std::atomic<int> state{0};  // 0 serving, 1 ended (preempt end read / written), 2 failed
  std::string code, msg;      // set once, before state becomes 2
  RecordIn in;

  ChannelThread() = default;
  ChannelThread(const ChannelThread&) = delete;
  ChannelThread& operator=(const ChannelThread&) = delete;
  ~ChannelThread() {
    if (sock >= 0) close(sock);
    if (wake >= 0) close(wake);
  }
  void Join() {
    if (!th.joinable()) return;
    stop = true;
    SignalEventfd(wake);
    th.join();
  }
  void Notify() {
    SignalEventfd(notify);
  }
  void Fail(const char* c, std::string m) {
    if (state.load() == 2) return;
    code = c;
    msg = std::move(m);
    state = 2;
    Notify();
  }
};

// ---------------------------------------------------------------------------------------------
// Destination

struct Range {
  uint64_t gpa, size, host;
};
struct Domain {
  int fd;
  std::vector<Range> ranges;
};
struct Region {
  uint64_t gpa = 0, size = 0;
  size_t pages = 0;
  uint8_t* present = nullptr;
  uint8_t* waiting = nullptr;
  uint8_t* discard = nullptr;  // one byte per block, 1 = plugged (DiscardMap's layout)
  uint64_t block = 0;
};

enum Stat { kFaults, kRemote, kDiscardFaults, kFull, kZero, kPreemptPages, kWakes, kStatCount };
// Per fault domain, as FaultDomainStats: faults read, of those missing, wakes sent there.
enum DomainStat { kDFaults, kDMissing, kDWakes, kDomainStatCount };
constexpr size_t kMaxDomains = 64;

struct FaultThread : ChannelThread {
  std::vector<Region> regions;
  std::vector<Domain> domains;  // [0] is ours; guarded by mu, copied by the thread
  uint64_t gen = 0;
  std::vector<double> latencies;  // guarded by mu
  std::atomic<uint64_t> stats[kStatCount] = {};
  std::atomic<uint64_t> dstats[kMaxDomains][kDomainStatCount] = {};
  std::unordered_map<uint64_t, double> pending;  // thread only until joined
  uint8_t req[24];

  ~FaultThread() { Join(); }
  static const Range* RangeOfGpa(const Domain& d, uint64_t gpa) {
    for (const Range& r : d.ranges)
      if (gpa >= r.gpa && gpa < r.gpa + r.size) return &r;
    return nullptr;
  }
  int RegionOf(uint64_t gpa) const {
    for (size_t i = 0; i < regions.size(); i++)
      if (gpa >= regions[i].gpa && gpa < regions[i].gpa + regions[i].size) return (int)i;
    return -1;
  }
  void Wake(int fd, uint64_t addr) {
    uffdio_range r{addr, kPage};
    ioctl(fd, UFFDIO_WAKE, &r);
    stats[kWakes]++;
  }
  // A wake counted in domain k's stats.
  void WakeIn(const std::vector<Domain>& doms, size_t k, uint64_t addr) {
    Wake(doms[k].fd, addr);
    if (k < kMaxDomains) dstats[k][kDWakes]++;
  }
  // Wakes the threads of other domains that wait on this page (the `waiting` bit is theirs).
  void WakeOthers(const std::vector<Domain>& doms, Region& rg, size_t p) {
    if (doms.size() < 2 || !BitTake(rg.waiting, p)) return;
    uint64_t gpa = rg.gpa + p * kPage;
    for (size_t k = 1; k < doms.size(); k++)
      if (const Range* r = RangeOfGpa(doms[k], gpa)) WakeIn(doms, k, r->host + (gpa - r->gpa));
  }

  // UFFDIO_COPY (data) or ZEROPAGE (null) through our own userfaultfd; true when placed or
  // already there (woken then). False: failed (state set).
  bool Place(const Domain& own, uint64_t gpa, const uint8_t* data) {
    const Range* r = RangeOfGpa(own, gpa);
    if (!r) return Fail("BAD_PAGE", "page outside our own userfaultfd's ranges"), false;
    uint64_t host = r->host + (gpa - r->gpa);
    int rc;
    if (data) {
      uffdio_copy c{host, (uint64_t)(uintptr_t)data, kPage, 0, 0};
      rc = ioctl(own.fd, UFFDIO_COPY, &c);
    } else {
      uffdio_zeropage z{{host, kPage}, 0, 0};
      rc = ioctl(own.fd, UFFDIO_ZEROPAGE, &z);
    }
    if (rc == 0) return true;
    if (errno == EEXIST) return Wake(own.fd, host), true;
    Fail("BAD_RECORD", std::string(data ? "UFFDIO_COPY" : "UFFDIO_ZEROPAGE") + " failed: " + strerror(errno));
    return false;
  }

  void OnFault(const std::vector<Domain>& doms, size_t d, uint64_t addr) {
    const Domain& dom = doms[d];
    uint64_t gpa = 0;
    bool found = false;
    for (const Range& r : dom.ranges)
      if (addr >= r.host && addr < r.host + r.size) {
        gpa = r.gpa + (addr - r.host);
        found = true;
        break;
      }
    int ri = found ? RegionOf(gpa) : -1;
    if (ri < 0) {
      char b[96];
      snprintf(b, sizeof b, "fault at 0x%llx outside the guest memory this fault domain was given",
               (unsigned long long)addr);
      return Fail("BAD_PAGE", b);
    }
    Region& rg = regions[ri];
    uint64_t off = gpa - rg.gpa;
    size_t p = off / kPage;
    stats[kFaults]++;
    if (d < kMaxDomains) dstats[d][kDFaults]++;
    if (BitHas(rg.present, p)) return WakeIn(doms, d, addr);
    if (rg.discard && rg.discard[off / rg.block] == 0) {
      // A discarded block has no content anywhere: a zero page, at once, without asking.
      stats[kDiscardFaults]++;
      if (!Place(doms[0], rg.gpa + p * kPage, nullptr)) return;
      if (d != 0) WakeIn(doms, d, addr);
      return;
    }
    if (d < kMaxDomains) dstats[d][kDMissing]++;
    if (d != 0) {
      // Seen by whichever path places the page (it sets present, then takes this bit).
      BitSet(rg.waiting, p);
      if (BitHas(rg.present, p)) return WakeIn(doms, d, addr);
    }
    // After PREEMPT_END every page is here or on its way on the main connection.
    if (state.load() != 0) return;
    uint64_t key = (uint64_t)ri << 32 | p;
    if (pending.count(key)) return;
    pending[key] = NowUs();
    stats[kRemote]++;
    Put32(req + 8, (uint32_t)ri);
    Put32(req + 12, (uint32_t)p);
    Put32(req + 16, 1);
    Put32(req + 20, Crc32(req, 20));
    int err = 0;
    if (!WriteAll(sock, req, 24, stop, &err) && err != ECANCELED)
      Fail("CONNECTION_LOST", std::string("the postcopy preempt channel failed: ") + strerror(err));
  }

  // A PAGES record: every field checked before any page is placed.
  void OnPages(const std::vector<Domain>& doms, const uint8_t* pl, uint32_t len, uint64_t at) {
    char b[160];
    auto bad = [&](const char* c, const char* m) {
      snprintf(b, sizeof b, "preempt channel: %s (at stream offset %llu)", m, (unsigned long long)at);
      Fail(c, b);
    };
    PagesLayout l;
    if (const char* why = ParsePages(pl, len, &l)) return bad("BAD_RECORD", why);
    uint32_t ri = l.region, count = l.count;
    if (ri >= regions.size()) return bad("BAD_PAGE", "PAGES for an unknown region");
    Region& rg = regions[ri];
    for (uint32_t k = 0; k < count; k++) {
      uint32_t p = l.Page(k);
      if (p >= rg.pages) return bad("BAD_PAGE", "page outside its region");
      if (rg.discard && rg.discard[(uint64_t)p * kPage / rg.block] == 0) return bad("BAD_PAGE", "page in a discarded block");
    }
    const uint8_t* d = l.data;
    for (uint32_t k = 0; k < count; k++) {
      uint32_t p = l.Page(k);
      const uint8_t* src = l.flags[k] == 0 ? d : nullptr;
      if (src) d += kPage;
      stats[kPreemptPages]++;
      if (!BitHas(rg.present, p)) {
        if (!Place(doms[0], rg.gpa + (uint64_t)p * kPage, src)) return;
        BitSet(rg.present, p);
        stats[src ? kFull : kZero]++;
      }
      WakeOthers(doms, rg, p);
      auto it = pending.find((uint64_t)ri << 32 | p);
      if (it != pending.end()) {
        double us = NowUs() - it->second;
        pending.erase(it);
        std::lock_guard<std::mutex> g(mu);
        latencies.push_back(us);
      }
    }
  }

  void Run() {
    Urgent();
    std::vector<Domain> doms;
    uint64_t seen = ~0ull;
    std::vector<pollfd> pfd;
    uint8_t msgs[sizeof(uffd_msg) * 16];
    while (!stop.load()) {
      {
        std::lock_guard<std::mutex> g(mu);
        if (gen != seen) {
          doms = domains;
          seen = gen;
        }
      }
      bool reading = state.load() == 0;
      pfd.clear();
      pfd.push_back({wake, POLLIN, 0});
      pfd.push_back({reading ? sock : -1, POLLIN, 0});
      for (const Domain& d : doms) pfd.push_back({d.fd, POLLIN, 0});
      if (poll(pfd.data(), pfd.size(), -1) < 0) {
        if (errno == EINTR) continue;
        return Fail("BAD_RECORD", std::string("poll: ") + strerror(errno));
      }
      if (pfd[0].revents) {
        uint64_t v;
        ssize_t r = read(wake, &v, 8);
        (void)r;
      }
      for (size_t k = 0; k < doms.size(); k++) {
        if (!(pfd[k + 2].revents & POLLIN)) continue;
        ssize_t n = read(doms[k].fd, msgs, sizeof msgs);
        if (n <= 0) continue;
        for (size_t i = 0; i + sizeof(uffd_msg) <= (size_t)n; i += sizeof(uffd_msg)) {
          uffd_msg m;
          memcpy(&m, msgs + i, sizeof m);
          if (m.event != UFFD_EVENT_PAGEFAULT) continue;
          OnFault(doms, k, m.arg.pagefault.address & ~(kPage - 1));
          if (state.load() == 2) return;
        }
      }
      if (reading && pfd[1].revents) {
        int err = 0;
        int f = in.Fill(sock, &err);
        if (f == -1) return Fail("CONNECTION_LOST", "the postcopy preempt channel closed");
        if (f == -2) return Fail("CONNECTION_LOST", std::string("the postcopy preempt channel failed: ") + strerror(err));
        for (;;) {
          uint8_t type;
          const uint8_t* pl;
          uint32_t len;
          uint64_t at;
          const char* c;
          std::string m;
          int r = in.Next(&type, &pl, &len, &at, &c, &m);
          if (r == 0) break;
          if (r < 0) return Fail(c, m + " (at stream offset " + std::to_string(at) + ")");
          if (type == kPreemptEnd) {
            if (len != 0) return Fail("BAD_RECORD", "PREEMPT_END with a payload");
            state = 1;
            Notify();
            break;
          }
          if (type != kPages) {
            char b[96];
            snprintf(b, sizeof b, "preempt channel: unexpected record 0x%02x (at stream offset %llu)", type,
                     (unsigned long long)at);
            return Fail("BAD_RECORD", b);
          }
          OnPages(doms, pl, len, at);
          if (state.load() == 2) return;
        }
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Source

struct SRegion {
  uint8_t* mem = nullptr;
  // A page that is not resident reads as zeros (memfd or anonymous memory, no swap): such a page
  // is sent as a zero page without touching it, which would fault a fresh zeroed page in.
  bool absentIsZero = false;
  size_t pages = 0;
  uint8_t* sent = nullptr;
  uint8_t* discard = nullptr;
  uint64_t block = 0;
  std::vector<uint8_t> requested;
};

enum SStat { kRequests, kQueued, kDuplicates, kResent, kRefused, kAbsentZero, kSStatCount };

// Whether the page at `p` (page-aligned) is in memory nowhere: not in the page cache of its
// memfd, never written, so it reads as zeros. Only where no swap exists: a swapped-out page is
// not resident either. Rechecked on every call, as swap can be turned on at any time. A failed
// call says "present" (the page is read then).
bool Absent(const uint8_t* p) {
  unsigned char v = 1;
  if (mincore(const_cast<uint8_t*>(p), kPage, &v) != 0 || (v & 1)) return false;
  struct sysinfo si;
  return sysinfo(&si) == 0 && si.totalswap == 0;
}

struct RequestServer : ChannelThread {
  std::vector<SRegion> regions;
  std::vector<uint64_t> queue;  // from TS (requests read on the main connection); guarded by mu
  bool finish = false;          // guarded by mu
  std::atomic<uint64_t> stats[kSStatCount] = {};
  std::vector<uint8_t> out = std::vector<uint8_t>(8 + 16 + kPage + 4);

  ~RequestServer() { Join(); }
  bool Send(const uint8_t* p, size_t n) {
    int err = 0;
    if (WriteAll(sock, p, n, stop, &err) || err == ECANCELED) return true;
    Fail("CONNECTION_LOST", std::string("the postcopy preempt channel failed: ") + strerror(err));
    return false;
  }
  // One page as a PAGES record of one page, straight from the mapping.
  // `checked`: TS already checked and counted it (a request read on the main connection).
  bool Serve(uint32_t ri, uint32_t p, bool checked = false) {
    SRegion& rg = regions[ri];
    if (!checked) {
      if (rg.discard && rg.discard[(uint64_t)p * kPage / rg.block] == 0) return true;
      if (rg.requested[p >> 3] & (1u << (p & 7))) return stats[kDuplicates]++, true;
      if (BitHas(rg.sent, p)) stats[kResent]++;
      stats[kQueued]++;
    }
    rg.requested[p >> 3] |= 1u << (p & 7);
    BitSet(rg.sent, p);
    uint8_t* o = out.data();
    const uint8_t* src = rg.mem + (uint64_t)p * kPage;
    bool zero = rg.absentIsZero && Absent(src);
    if (zero) {
      stats[kAbsentZero]++;
    } else {
      zero = true;
      const uint64_t* q = reinterpret_cast<const uint64_t*>(src);
      for (size_t i = 0; i < kPage / 8 && zero; i++) zero = __atomic_load_n(&q[i], __ATOMIC_RELAXED) == 0;
    }
    uint32_t len = 16 + (zero ? 0 : (uint32_t)kPage);
    o[0] = kPages;
    o[1] = o[2] = o[3] = 0;
    Put32(o + 4, len);
    Put32(o + 8, ri);
    Put32(o + 12, 1);
    Put32(o + 16, p);
    o[20] = zero ? 1 : 0;
    o[21] = o[22] = o[23] = 0;
    // The guest may be writing this page (postcopy: the source's copy is frozen, but be exact
    // anyway): the bytes hashed are the bytes sent.
    if (!zero) memcpy(o + 24, src, kPage);
    Put32(o + 8 + len, Crc32(o, 8 + len));
    return Send(o, 8 + len + 4);
  }
  void Run() {
    Urgent();
    pollfd pfd[2];
    while (!stop.load()) {
      pfd[0] = {wake, POLLIN, 0};
      pfd[1] = {state.load() == 0 ? sock : -1, POLLIN, 0};
      if (poll(pfd, 2, -1) < 0) {
        if (errno == EINTR) continue;
        return Fail("CONNECTION_LOST", std::string("poll: ") + strerror(errno));
      }
      if (pfd[0].revents) {
        uint64_t v;
        ssize_t r = read(wake, &v, 8);
        (void)r;
        std::vector<uint64_t> q;
        bool fin;
        {
          std::lock_guard<std::mutex> g(mu);
          q.swap(queue);
          fin = finish;
        }
        for (uint64_t k : q)
          if (!Serve((uint32_t)(k >> 32), (uint32_t)k, true)) return;
        if (fin && state.load() == 0) {
          uint8_t end[12] = {kPreemptEnd, 0, 0, 0, 0, 0, 0, 0};
          Put32(end + 8, Crc32(end, 8));
          if (!Send(end, 12)) return;
          state = 1;
          Notify();
        }
      }
      if (pfd[1].revents && state.load() == 0) {
        int err = 0;
        int f = in.Fill(sock, &err);
        if (f == -1) return Fail("CONNECTION_LOST", "the postcopy preempt channel closed");
        if (f == -2) return Fail("CONNECTION_LOST", std::string("the postcopy preempt channel failed: ") + strerror(err));
        for (;;) {
          uint8_t type;
          const uint8_t* pl;
          uint32_t len;
          uint64_t at;
          const char* c;
          std::string m;
          int r = in.Next(&type, &pl, &len, &at, &c, &m);
          if (r == 0) break;
          if (r < 0) return Fail(c, m);
          if (type != kPageRequest || len != 12) {
            char b[96];
            snprintf(b, sizeof b, "unexpected record 0x%02x on the preempt channel's return path", type);
            return Fail("BAD_RECORD", b);
          }
          uint32_t ri = Le32(pl), page = Le32(pl + 4), count = Le32(pl + 8);
          stats[kRequests]++;
          if (ri >= regions.size() || count == 0 || (uint64_t)page + count > regions[ri].pages) {
            char b[96];
            snprintf(b, sizeof b, "request for pages [%u, +%u) of region %u", page, count, ri);
            return Fail("BAD_RECORD", b);
          }
          if (count > kMaxRequestPages) {
            stats[kRefused]++;
            continue;
          }
          for (uint32_t p = page; p < page + count; p++)
            if (!Serve(ri, p)) return;
        }
      }
    }
  }
};

// A request or a page is one small write that must leave at once: no Nagle delay behind an
// unacknowledged one (fails harmlessly on a unix socket).
void NoDelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

// Handles live in a table: JS holds an index, never a pointer.
std::mutex table_mu;
std::vector<FaultThread*> faults;
std::vector<RequestServer*> servers;

template <class T>
T* Get(napi_env env, std::vector<T*>& v, napi_value a) {
  int64_t id;
  if (napi_get_value_int64(env, a, &id) != napi_ok || id < 0 || (size_t)id >= v.size() || !v[id]) {
    ThrowType(env, "not a live postcopy thread handle");
    return nullptr;
  }
  return v[id];
}
template <class T>
size_t Put(std::vector<T*>& v, T* t) {
  for (size_t i = 0; i < v.size(); i++)
    if (!v[i]) return v[i] = t, i;
  v.push_back(t);
  return v.size() - 1;
}

// The status of either thread: its counters into args[1] (a Float64Array), and
// [state, code, message] (code and message empty unless failed).
napi_value Status(napi_env env, Args& a, ChannelThread* t, const std::atomic<uint64_t>* stats, size_t n) {
  char* o;
  size_t ol;
  if (!ArgView(a, 1, &o, &ol)) return nullptr;
  double* out = reinterpret_cast<double*>(o);
  for (size_t i = 0; i < n && i < ol / 8; i++) out[i] = (double)stats[i].load();
  int st = t->state.load();
  napi_value arr, v;
  napi_create_array_with_length(env, 3, &arr);
  napi_set_element(env, arr, 0, Num(env, st));
  napi_create_string_utf8(env, st == 2 ? t->code.c_str() : "", NAPI_AUTO_LENGTH, &v);
  napi_set_element(env, arr, 1, v);
  napi_create_string_utf8(env, st == 2 ? t->msg.c_str() : "", NAPI_AUTO_LENGTH, &v);
  napi_set_element(env, arr, 2, v);
  return arr;
}

// faultThreadCreate(sockFd, notifyFd, regions: Float64Array [gpa, size]*n, streamOffset) -> id.
// Takes a dup of sockFd (the caller closes its own).
napi_value FaultCreate(napi_env env, napi_callback_info info) {
  Args a(env, info);
  int sock, notify;
  char* rv;
  size_t rlen;
  int64_t offset;
  if (!ArgFd(a, 0, &sock) || !ArgFd(a, 1, &notify) || !ArgView(a, 2, &rv, &rlen) || !ArgInt(a, 3, &offset))
    return nullptr;
  int s = fcntl(sock, F_DUPFD_CLOEXEC, 0);
  if (s < 0) return ThrowSys(env, "dup", errno);
  int w = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (w < 0) {
    close(s);
    return ThrowSys(env, "eventfd", errno);
  }
  int fl = fcntl(s, F_GETFL);
  fcntl(s, F_SETFL, fl | O_NONBLOCK);
  NoDelay(s);
  auto* t = new FaultThread();
  t->sock = s;
  t->wake = w;
  t->notify = notify;
  t->in.offset = (uint64_t)offset;
  const double* r = reinterpret_cast<const double*>(rv);
  for (size_t i = 0; i + 1 < rlen / 8; i += 2) {
    Region g;
    g.gpa = (uint64_t)r[i];
    g.size = (uint64_t)r[i + 1];
    g.pages = g.size / kPage;
    t->regions.push_back(g);
  }
  memcpy(t->req, "\x81\0\0\0\x0c\0\0\0", 8);
  std::lock_guard<std::mutex> g(table_mu);
  return Num(env, (double)Put(faults, t));
}

// faultThreadRegion(id, i, present, waiting, discard|null, blockSize): the shared bitmaps of
// region i (SharedArrayBuffer views that stay alive while the thread runs: TS keeps them).
napi_value FaultRegion(napi_env env, napi_callback_info info) {
  Args a(env, info);
  std::lock_guard<std::mutex> g(table_mu);
  FaultThread* t = Get(env, faults, a[0]);
  if (!t) return nullptr;
  int64_t i, block;
  char *present, *waiting, *discard = nullptr;
  size_t pl, wl, dl = 0;
  if (!ArgInt(a, 1, &i) || !ArgView(a, 2, &present, &pl) || !ArgView(a, 3, &waiting, &wl)) return nullptr;
  if (!IsNull(env, a[4]) && !ArgView(a, 4, &discard, &dl)) return nullptr;
  if (!ArgInt(a, 5, &block)) return nullptr;
  if (i < 0 || (size_t)i >= t->regions.size()) return ThrowType(env, "region index");
  Region& r = t->regions[i];
  if (pl * 8 < r.pages || wl * 8 < r.pages) return ThrowType(env, "bitmap shorter than the region");
  if (discard && (block <= 0 || dl * (uint64_t)block < r.size)) return ThrowType(env, "discard map shorter than the region");
  if (t->th.joinable()) return ThrowType(env, "region after start");
  r.present = (uint8_t*)present;
  r.waiting = (uint8_t*)waiting;
  r.discard = (uint8_t*)discard;
  r.block = (uint64_t)block;
  return nullptr;
}

// faultThreadAddDomain(id, uffdFd, ranges: Float64Array [gpa, size, host]*n): the first is ours.
// Allowed while running. The fd stays the caller's and must stay open until stop.
napi_value FaultAddDomain(napi_env env, napi_callback_info info) {
  Args a(env, info);
  std::lock_guard<std::mutex> g(table_mu);
  FaultThread* t = Get(env, faults, a[0]);
  if (!t) return nullptr;
  int fd;
  char* rv;
  size_t rlen;
  if (!ArgFd(a, 1, &fd) || !ArgView(a, 2, &rv, &rlen)) return nullptr;
  {
    std::lock_guard<std::mutex> m(t->mu);
    if (t->domains.size() >= kMaxDomains) return ThrowType(env, "too many fault domains");
  }
  Domain d{fd, {}};
  const double* r = reinterpret_cast<const double*>(rv);
  for (size_t i = 0; i + 2 < rlen / 8; i += 3) d.ranges.push_back({(uint64_t)r[i], (uint64_t)r[i + 1], (uint64_t)r[i + 2]});
  {
    std::lock_guard<std::mutex> m(t->mu);
    t->domains.push_back(std::move(d));
    t->gen++;
  }
  SignalEventfd(t->wake);
  return nullptr;
}

napi_value FaultStart(napi_env env, napi_callback_info info) {
  Args a(env, info);
  std::lock_guard<std::mutex> g(table_mu);
  FaultThread* t = Get(env, faults, a[0]);
  if (!t) return nullptr;
  for (const Region& r : t->regions)
    if (!r.present) return ThrowType(env, "a region without its bitmaps");
  if (t->domains.empty()) return ThrowType(env, "no userfaultfd");
  if (t->th.joinable()) return ThrowType(env, "already started");
  t->th = std::thread([t] {
    pthread_setname_np(pthread_self(), "vmshift-fault");  // what top -H, ps and perf show
    t->Run();
  });
  return nullptr;
}

// faultThreadStatus(id, out: Float64Array(kStatCount)) -> [state, code, message] (code and
// message empty unless failed).
napi_value FaultStatus(napi_env env, napi_callback_info info) {
  Args a(env, info);
  std::lock_guard<std::mutex> g(table_mu);
  FaultThread* t = Get(env, faults, a[0]);
  if (!t) return nullptr;
  return Status(env, a, t, t->stats, kStatCount);
}

// faultThreadDomainStats(id, k, out: Float64Array(3)): faults, missing, wakes of domain k.
napi_value FaultDomainStats(napi_env env, napi_callback_info info) {
  Args a(env, info);
  std::lock_guard<std::mutex> g(table_mu);
  FaultThread* t = Get(env, faults, a[0]);
  if (!t) return nullptr;
  int64_t k;
  char* o;
  size_t ol;
  if (!ArgInt(a, 1, &k) || !ArgView(a, 2, &o, &ol)) return nullptr;
  if (k < 0 || (size_t)k >= kMaxDomains || ol < 8 * kDomainStatCount) return ThrowType(env, "domain index");
  double* out = reinterpret_cast<double*>(o);
  for (size_t i = 0; i < kDomainStatCount; i++) out[i] = (double)t->dstats[k][i].load();
  return nullptr;
}

// faultThreadTakeLatencies(id) -> Float64Array of the latencies (us) recorded since last taken.
napi_value FaultLatencies(napi_env env, napi_callback_info info) {
  Args a(env, info);
  std::vector<double> l;
  {
    std::lock_guard<std::mutex> g(table_mu);
    FaultThread* t = Get(env, faults, a[0]);
    if (!t) return nullptr;
    std::lock_guard<std::mutex> m(t->mu);
    l.swap(t->latencies);
  }
  napi_value ab, arr;
  void* data;
  napi_create_arraybuffer(env, l.size() * 8, &data, &ab);
  if (!l.empty()) memcpy(data, l.data(), l.size() * 8);
  napi_create_typedarray(env, napi_float64_array, l.size(), ab, 0, &arr);
  return arr;
}

// faultThreadStop(id) -> [pending, domainStats, stats, latencies]: Float64Arrays of the pages
// still asked for (region * 2^32 + page), the domains' counters (3 each, in order), the thread's
// counters and the latencies not taken yet, all as of the join. Joins the thread and frees everything; the handle is gone.
napi_value FaultStop(napi_env env, napi_callback_info info) {
  Args a(env, info);
  FaultThread* t;
  {
    std::lock_guard<std::mutex> g(table_mu);
    t = Get(env, faults, a[0]);
    if (!t) return nullptr;
  }
  t->Join();
  std::vector<double> keys, doms, st;
  for (auto& kv : t->pending) keys.push_back((double)(kv.first >> 32) * 4294967296.0 + (double)(kv.first & 0xffffffffu));
  for (size_t k = 0; k < t->domains.size() && k < kMaxDomains; k++)
    for (size_t i = 0; i < kDomainStatCount; i++) doms.push_back((double)t->dstats[k][i].load());
  for (size_t i = 0; i < kStatCount; i++) st.push_back((double)t->stats[i].load());
  std::vector<double> lat;
  lat.swap(t->latencies);
  {
    std::lock_guard<std::mutex> g(table_mu);
    int64_t id;
    napi_get_value_int64(env, a[0], &id);
    faults[id] = nullptr;
  }
  delete t;
  napi_value out;
  napi_create_array_with_length(env, 4, &out);
  const std::vector<double>* parts[4] = {&keys, &doms, &st, &lat};
  for (uint32_t i = 0; i < 4; i++) {
    napi_value ab, arr;
    void* data;
    napi_create_arraybuffer(env, parts[i]->size() * 8, &data, &ab);
    if (!parts[i]->empty()) memcpy(data, parts[i]->data(), parts[i]->size() * 8);
    napi_create_typedarray(env, napi_float64_array, parts[i]->size(), ab, 0, &arr);
    napi_set_element(env, out, i, arr);
  }
  return out;
}

// requestServerCreate(sockFd, notifyFd, streamOffset) -> id (a dup of sockFd is taken).
napi_value ServerCreate(napi_env env, napi_callback_info info) {
  Args a(env, info);
  int sock, notify;
  int64_t offset;
  if (!ArgFd(a, 0, &sock) || !ArgFd(a, 1, &notify) || !ArgInt(a, 2, &offset)) return nullptr;
  int s = fcntl(sock, F_DUPFD_CLOEXEC, 0);
  if (s < 0) return ThrowSys(env, "dup", errno);
  int w = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (w < 0) {
    close(s);
    return ThrowSys(env, "eventfd", errno);
  }
  int fl = fcntl(s, F_GETFL);
  fcntl(s, F_SETFL, fl | O_NONBLOCK);
  NoDelay(s);
  auto* t = new RequestServer();
  t->sock = s;
  t->wake = w;
  t->notify = notify;
  t->in.offset = (uint64_t)offset;
  std::lock_guard<std::mutex> g(table_mu);
  return Num(env, (double)Put(servers, t));
}

// requestServerRegion(id, memory view, sent bitmap, discard|null, blockSize): in region order.
napi_value ServerRegion(napi_env env, napi_callback_info info) {
  Args a(env, info);
  std::lock_guard<std::mutex> g(table_mu);
  RequestServer* t = Get(env, servers, a[0]);
  if (!t) return nullptr;
  char *mem, *sent, *discard = nullptr;
  size_t ml, sl, dl = 0;
  int64_t block;
  if (!ArgView(a, 1, &mem, &ml) || !ArgView(a, 2, &sent, &sl)) return nullptr;
  if (!IsNull(env, a[3]) && !ArgView(a, 3, &discard, &dl)) return nullptr;
  if (!ArgInt(a, 4, &block)) return nullptr;
  bool absentIsZero = false;
  if (a.argc > 5 && napi_get_value_bool(env, a[5], &absentIsZero) != napi_ok) return ThrowType(env, "absentIsZero: a boolean");
  if (t->th.joinable()) return ThrowType(env, "region after start");
  if (absentIsZero && ((uintptr_t)mem % kPage != 0)) return ThrowType(env, "absentIsZero needs page-aligned memory");
  SRegion r;
  r.mem = (uint8_t*)mem;
  r.absentIsZero = absentIsZero;
  r.pages = ml / kPage;
  if (sl * 8 < r.pages) return ThrowType(env, "sent bitmap shorter than the region");
  if (discard && (block <= 0 || dl * (uint64_t)block < ml)) return ThrowType(env, "discard map shorter than the region");
  r.sent = (uint8_t*)sent;
  r.discard = (uint8_t*)discard;
  r.block = (uint64_t)block;
  r.requested.assign((r.pages + 7) / 8, 0);
  t->regions.push_back(std::move(r));
  return nullptr;
}

napi_value ServerStart(napi_env env, napi_callback_info info) {
  Args a(env, info);
  std::lock_guard<std::mutex> g(table_mu);
  RequestServer* t = Get(env, servers, a[0]);
  if (!t) return nullptr;
  if (t->th.joinable()) return ThrowType(env, "already started");
  t->th = std::thread([t] {
    pthread_setname_np(pthread_self(), "vmshift-pserve");
    t->Run();
  });
  return nullptr;
}

// requestServerQueue(id, region, page): a page asked for on another connection, served here.
napi_value ServerQueue(napi_env env, napi_callback_info info) {
  Args a(env, info);
  std::lock_guard<std::mutex> g(table_mu);
  RequestServer* t = Get(env, servers, a[0]);
  if (!t) return nullptr;
  int64_t ri, p;
  if (!ArgInt(a, 1, &ri) || !ArgInt(a, 2, &p)) return nullptr;
  if (ri < 0 || (size_t)ri >= t->regions.size() || p < 0 || (size_t)p >= t->regions[ri].pages)
    return ThrowType(env, "page outside the regions");
  {
    std::lock_guard<std::mutex> m(t->mu);
    t->queue.push_back((uint64_t)ri << 32 | (uint64_t)p);
  }
  SignalEventfd(t->wake);
  return nullptr;
}

// requestServerFinish(id): after what is queued, PREEMPT_END (state 1 once written).
napi_value ServerFinish(napi_env env, napi_callback_info info) {
  Args a(env, info);
  std::lock_guard<std::mutex> g(table_mu);
  RequestServer* t = Get(env, servers, a[0]);
  if (!t) return nullptr;
  {
    std::lock_guard<std::mutex> m(t->mu);
    t->finish = true;
  }
  SignalEventfd(t->wake);
  return nullptr;
}

napi_value ServerStatus(napi_env env, napi_callback_info info) {
  Args a(env, info);
  std::lock_guard<std::mutex> g(table_mu);
  RequestServer* t = Get(env, servers, a[0]);
  if (!t) return nullptr;
  return Status(env, a, t, t->stats, kSStatCount);
}

napi_value ServerStop(napi_env env, napi_callback_info info) {
  Args a(env, info);
  RequestServer* t;
  int64_t id;
  {
    std::lock_guard<std::mutex> g(table_mu);
    t = Get(env, servers, a[0]);
    if (!t) return nullptr;
    napi_get_value_int64(env, a[0], &id);
    servers[id] = nullptr;
  }
  delete t;  // joins
  return nullptr;
}

}  // namespace

void RegisterPostcopy(napi_env env, napi_value exports) {
  SetFunction(env, exports, "faultThreadCreate", FaultCreate);
  SetFunction(env, exports, "faultThreadRegion", FaultRegion);
  SetFunction(env, exports, "faultThreadAddDomain", FaultAddDomain);
  SetFunction(env, exports, "faultThreadStart", FaultStart);
  SetFunction(env, exports, "faultThreadStatus", FaultStatus);
  SetFunction(env, exports, "faultThreadTakeLatencies", FaultLatencies);
  SetFunction(env, exports, "faultThreadDomainStats", FaultDomainStats);
  SetFunction(env, exports, "faultThreadStop", FaultStop);
  SetFunction(env, exports, "requestServerCreate", ServerCreate);
  SetFunction(env, exports, "requestServerRegion", ServerRegion);
  SetFunction(env, exports, "requestServerStart", ServerStart);
  SetFunction(env, exports, "requestServerQueue", ServerQueue);
  SetFunction(env, exports, "requestServerFinish", ServerFinish);
  SetFunction(env, exports, "requestServerStatus", ServerStatus);
  SetFunction(env, exports, "requestServerStop", ServerStop);
}

}  // namespace vmshift
