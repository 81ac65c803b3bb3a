/*
 * Reference for bench/migrate.ts: postcopy fault round trips in C. Compiled at bench time
 * (gcc -O2 -pthread) into .tmp/; never committed as a binary.
 *
 *   uffd-resolver PAGES MODE        MODE = tcp | tcp-process | local
 *
 * A faulting thread reads one byte of each of PAGES pages of a memfd mapping registered with
 * userfaultfd (MISSING), in a random order. A resolver thread serves each fault with
 * UFFDIO_COPY. In "tcp" mode it first fetches the page from a page-server thread over a TCP
 * loopback connection (a 12-byte request, a 4096-byte reply, TCP_NODELAY), i.e. the same round
 * trip vmshift's destination makes to its source; "tcp-process" is the same with the page server in
 * a child process of its own (fork), as a migration's source is a process apart from its
 * destination: every round trip then switches between two address spaces, which on a
 * paravirtualized guest with shadow page tables costs more than the rest of the round trip; in
 * "local" mode it copies from memory.
 * Prints one JSON line: resolver-side latency (fault message read -> UFFDIO_COPY returned, the
 * span vmshift's destination reports) and faulting-thread latency (the access), median and p99, µs.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096

static size_t npages;
static char *guest;    /* registered, faulting */
static char *origin;   /* the "source" memory */
static int uffd;
static int tcp_mode;
static int server_process; /* tcp-process: the page server is a forked child */
static int req_fd = -1; /* resolver's end of the TCP connection */
static int srv_fd = -1; /* page server's end */
static pid_t srv_pid = -1;
static double *resolve_us;
static double *access_us;
static volatile int done;

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static void die(const char *what) {
  fprintf(stderr, "uffd-resolver: %s: %s\n", what, strerror(errno));
  exit(1);
}

static void full_read(int fd, void *buf, size_t n) {
  size_t o = 0;
  while (o < n) {
    ssize_t k = read(fd, (char *)buf + o, n - o);
    if (k <= 0) die("read");
    o += (size_t)k;
  }
}

static void full_write(int fd, const void *buf, size_t n) {
  size_t o = 0;
  while (o < n) {
    ssize_t k = write(fd, (const char *)buf + o, n - o);
    if (k <= 0) die("write");
    o += (size_t)k;
  }
}

static void *page_server(void *arg) {
  (void)arg;
  uint32_t req[3];
  for (;;) {
    ssize_t k = read(srv_fd, req, sizeof req);
    if (k == 0) return NULL;
    if (k != (ssize_t)sizeof req) die("server read");
    full_write(srv_fd, origin + (size_t)req[1] * PAGE, PAGE);
  }
}

static void *resolver(void *arg) {
  (void)arg;
  char *buf = aligned_alloc(PAGE, PAGE);
  size_t served = 0;
  struct pollfd p = {.fd = uffd, .events = POLLIN};
  while (served < npages) {
    if (poll(&p, 1, 1000) < 0) die("poll");
    if (done) break;
    struct uffd_msg m;
    ssize_t k = read(uffd, &m, sizeof m);
    if (k < 0 && errno == EAGAIN) continue;
    if (k != (ssize_t)sizeof m) die("uffd read");
    if (m.event != UFFD_EVENT_PAGEFAULT) continue;
    double t0 = now_us();
    uint64_t addr = m.arg.pagefault.address & ~(uint64_t)(PAGE - 1);
    size_t page = (addr - (uint64_t)guest) / PAGE;
    const char *from = origin + page * PAGE;
    if (tcp_mode) {
      uint32_t req[3] = {0, (uint32_t)page, 1};
      full_write(req_fd, req, sizeof req);
      full_read(req_fd, buf, PAGE);
      from = buf;
    }
    struct uffdio_copy c = {.dst = addr, .src = (uint64_t)from, .len = PAGE, .mode = 0};
    if (ioctl(uffd, UFFDIO_COPY, &c) < 0 && errno != EEXIST) die("UFFDIO_COPY");
    resolve_us[served++] = now_us() - t0;
  }
  free(buf);
  return NULL;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static double pct(double *v, size_t n, double p) {
  qsort(v, n, sizeof *v, cmp);
  size_t i = (size_t)(p / 100.0 * n + 0.999999);
  if (i < 1) i = 1;
  if (i > n) i = n;
  return v[i - 1];
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: uffd-resolver PAGES tcp|tcp-process|local\n");
    return 2;
  }
  npages = strtoul(argv[1], NULL, 10);
  server_process = strcmp(argv[2], "tcp-process") == 0;
  tcp_mode = strcmp(argv[2], "tcp") == 0 || server_process;
  if (npages == 0) return 2;
  size_t len = npages * PAGE;
  int mfd = memfd_create("uffd-ref", MFD_CLOEXEC);
  if (mfd < 0 || ftruncate(mfd, (off_t)len) < 0) die("memfd");
  guest = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
  origin = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (guest == MAP_FAILED || origin == MAP_FAILED) die("mmap");
  for (size_t i = 0; i < len; i += 8) *(uint64_t *)(origin + i) = i | 1;
  resolve_us = calloc(npages, sizeof(double));
  access_us = calloc(npages, sizeof(double));

  uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (uffd < 0) die("userfaultfd");
  struct uffdio_api api = {.api = UFFD_API};
  if (ioctl(uffd, UFFDIO_API, &api) < 0) die("UFFDIO_API");
  struct uffdio_register reg = {.range = {(uint64_t)guest, len}, .mode = UFFDIO_REGISTER_MODE_MISSING};
  if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) die("UFFDIO_REGISTER");

  pthread_t srv, res;
  if (tcp_mode) {
    int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK), .sin_port = 0};
    socklen_t al = sizeof a;
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 1) < 0 ||
        getsockname(l, (struct sockaddr *)&a, &al) < 0)
      die("listen");
    req_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (connect(req_fd, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
    srv_fd = accept(l, NULL, NULL);
    if (srv_fd < 0) die("accept");
    close(l);
    int one = 1;
    setsockopt(req_fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(srv_fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (server_process) {
      pid_t pid = fork();
      if (pid < 0) die("fork");
      if (pid == 0) {
        close(req_fd);
        page_server(NULL);
        _exit(0);
      }
      close(srv_fd);
      srv_pid = pid;
    } else {
      pthread_create(&srv, NULL, page_server, NULL);
    }
  }
  pthread_create(&res, NULL, resolver, NULL);

  /* Random order (xorshift Fisher-Yates), one access per page. */
  uint32_t *order = malloc(npages * sizeof *order);
  for (size_t i = 0; i < npages; i++) order[i] = (uint32_t)i;
  uint32_t x = 2463534242u;
  for (size_t i = npages - 1; i > 0; i--) {
    x ^= x << 13; x ^= x >> 17; x ^= x << 5;
    size_t j = x % (i + 1);
    uint32_t t = order[i]; order[i] = order[j]; order[j] = t;
  }
  unsigned sink = 0;
  for (size_t i = 0; i < npages; i++) {
    double t0 = now_us();
    sink += *(volatile unsigned char *)(guest + (size_t)order[i] * PAGE + 64);
    access_us[i] = now_us() - t0;
  }
  done = 1;
  pthread_join(res, NULL);
  if (tcp_mode) {
    shutdown(req_fd, SHUT_WR);
    if (server_process) {
      int st;
      waitpid(srv_pid, &st, 0);
    } else {
      pthread_join(srv, NULL);
    }
  }
  printf("{\"pages\":%zu,\"mode\":\"%s\",\"resolverMedianUs\":%.2f,\"resolverP99Us\":%.2f,"
         "\"accessMedianUs\":%.2f,\"accessP99Us\":%.2f,\"sink\":%u}\n",
         npages, argv[2], pct(resolve_us, npages, 50), pct(resolve_us, npages, 99), pct(access_us, npages, 50),
         pct(access_us, npages, 99), sink & 1);
  return 0;
}
