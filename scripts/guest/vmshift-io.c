/*
 * vmshift-io: the rig guest's block I/O measuring tool (built static by scripts/build-guest.sh into
 * the initramfs as /bin/vmshift-io). Every access is O_DIRECT, so the guest's page cache is out of the
 * picture and each read()/write() is one trip through the virtio-blk queue.
 *
 *   vmshift-io seqread  DEV MiB BS    read MiB MiB from offset 0 in BS-byte requests
 *   vmshift-io seqwrite DEV MiB BS    write MiB MiB from offset 0 in BS-byte requests, then fdatasync
 *   vmshift-io randread DEV SECONDS   4 KiB reads at random 4 KiB-aligned offsets over the whole device,
 *                                     one at a time (queue depth 1), for SECONDS seconds
 *   vmshift-io memio DEV OFF MiB ROUNDS LO HI
 *                                     ROUNDS times: fresh buffers, MiB MiB of pseudo-random data written at OFF
 *                                     MiB and read back (O_DIRECT: the device reads and writes these very
 *                                     pages), compared; reports how many of the buffers' pages lie in the
 *                                     guest-physical range [LO, HI) (hex; /proc/self/pagemap), e.g. a
 *                                     virtio-mem device's memory:
 *   RIG-MEMIO round=1 ok=1 pages=512 inrange=512 sha=<fnv64 of the data>
 *   vmshift-io fsbench DIR MiB FILES  file-system figures in DIR: a MiB-MiB file written in 1 MiB writes + fsync,
 *                                     read back after dropping the page cache; FILES empty files created,
 *                                     stat'ed (dentry and inode caches dropped first) and unlinked:
 *   RIG-FSBENCH op=seqwrite dir=/mnt bytes=... secs=... mbps=...   /  op=create dir=/mnt ops=... secs=... opsps=...
 *
 * One result line on stdout, in the rig's record format (parseRigRecords):
 *   RIG-IO op=seqread dev=/dev/vda bytes=67108864 bs=1048576 secs=0.512 mbps=131.1
 *   RIG-IO op=randread dev=/dev/vda bs=4096 ios=12345 secs=3.000 iops=4115
 * MB/s is 10^6 bytes per second. Exit status 0 on success, 1 on an I/O error, 2 on bad arguments.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define ALIGN 4096
#define RAND_BS 4096

static double mono(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int usage(void) {
  fputs("usage: vmshift-io seqread|seqwrite DEV MiB BS\n"
        "       vmshift-io randread DEV SECONDS\n"
        "       vmshift-io memio DEV OFF MiB ROUNDS LO HI\n"
        "       vmshift-io fsbench DIR MiB FILES\n",
        stderr);
  return 2;
}

/* Parses a positive integer; 0 on anything else. */
static uint64_t number(const char *s) {
  char *end;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 10);
  if (errno || end == s || *end || s[0] == '-') return 0;
  return (uint64_t)v;
}

static uint64_t device_size(int fd) {
  uint64_t size = 0;
  if (ioctl(fd, BLKGETSIZE64, &size) == 0 && size > 0) return size;
  off_t end = lseek(fd, 0, SEEK_END); /* a regular file, for trying the tool on the host */
  return end > 0 ? (uint64_t)end : 0;
}

static void *aligned(size_t len, unsigned char fill) {
  void *p = NULL;
  if (posix_memalign(&p, ALIGN, len)) return NULL;
  memset(p, fill, len);
  return p;
}

static int sequential(const char *dev, int write, uint64_t mib, uint64_t bs) {
  uint64_t total = mib << 20;
  if (bs == 0 || bs % 512 || bs > (64u << 20) || total % bs) {
    fprintf(stderr, "vmshift-io: BS must be a multiple of 512 that divides MiB*2^20 (at most 64 MiB)\n");
    return 2;
  }
  int fd = open(dev, (write ? O_WRONLY : O_RDONLY) | O_DIRECT | O_CLOEXEC);
  if (fd < 0) {
    fprintf(stderr, "vmshift-io: open %s: %s\n", dev, strerror(errno));
    return 1;
  }
  uint64_t size = device_size(fd);
  if (size < total) {
    fprintf(stderr, "vmshift-io: %s holds %llu bytes, %llu asked for\n", dev, (unsigned long long)size,
            (unsigned long long)total);
    close(fd);
    return 2;
  }
  unsigned char *buf = aligned(bs, 0x5a);
  if (!buf) {
    fprintf(stderr, "vmshift-io: no memory for a %llu-byte buffer\n", (unsigned long long)bs);
    close(fd);
    return 1;
  }
  double t0 = mono();
  for (uint64_t off = 0; off < total; off += bs) {
    if (write) buf[0] = (unsigned char)(off >> 20); /* not all one pattern */
    ssize_t n = write ? pwrite(fd, buf, bs, (off_t)off) : pread(fd, buf, bs, (off_t)off);
    if (n != (ssize_t)bs) {
      fprintf(stderr, "vmshift-io: %s at %llu: %s\n", write ? "pwrite" : "pread", (unsigned long long)off,
              n < 0 ? strerror(errno) : "short transfer");
      free(buf);
      close(fd);
      return 1;
    }
  }
  if (write && fdatasync(fd) != 0) {
    fprintf(stderr, "vmshift-io: fdatasync: %s\n", strerror(errno));
    free(buf);
    close(fd);
    return 1;
  }
  double secs = mono() - t0;
  printf("RIG-IO op=%s dev=%s bytes=%llu bs=%llu secs=%.3f mbps=%.1f\n", write ? "seqwrite" : "seqread", dev,
         (unsigned long long)total, (unsigned long long)bs, secs, (double)total / 1e6 / secs);
  free(buf);
  close(fd);
  return 0;
}

/* xorshift64*: cheap, and good enough to spread offsets over the device. */
static uint64_t next(uint64_t *s) {
  uint64_t x = *s;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  *s = x;
  return x * 0x2545F4914F6CDD1DULL;
}

static int randread(const char *dev, uint64_t seconds) {
  int fd = open(dev, O_RDONLY | O_DIRECT | O_CLOEXEC);
  if (fd < 0) {
    fprintf(stderr, "vmshift-io: open %s: %s\n", dev, strerror(errno));
    return 1;
  }
  uint64_t blocks = device_size(fd) / RAND_BS;
  unsigned char *buf = aligned(RAND_BS, 0);
  if (blocks == 0 || !buf) {
    fprintf(stderr, "vmshift-io: %s: %s\n", dev, blocks == 0 ? "smaller than 4 KiB" : "no memory");
    free(buf);
    close(fd);
    return 1;
  }
  uint64_t seed = 0x9E3779B97F4A7C15ULL ^ (uint64_t)getpid();
  uint64_t ios = 0;
  double t0 = mono(), t = t0;
  while (t - t0 < (double)seconds) {
    for (int i = 0; i < 64; i++) { /* look at the clock every 64 reads */
      off_t off = (off_t)(next(&seed) % blocks) * RAND_BS;
      ssize_t n = pread(fd, buf, RAND_BS, off);
      if (n != RAND_BS) {
        fprintf(stderr, "vmshift-io: pread at %lld: %s\n", (long long)off, n < 0 ? strerror(errno) : "short read");
        free(buf);
        close(fd);
        return 1;
      }
      ios++;
    }
    t = mono();
  }
  double secs = t - t0;
  printf("RIG-IO op=randread dev=%s bs=%d ios=%llu secs=%.3f iops=%.0f\n", dev, RAND_BS, (unsigned long long)ios, secs,
         (double)ios / secs);
  free(buf);
  close(fd);
  return 0;
}

/* Guest-physical address of the page holding `p`, or 0 when unknown (/proc/self/pagemap, root only). */
static uint64_t phys(int pagemap, const void *p) {
  uint64_t e = 0;
  off_t at = (off_t)((uintptr_t)p / 4096) * 8;
  if (pagemap < 0 || pread(pagemap, &e, 8, at) != 8 || !(e & (1ULL << 63))) return 0;
  return (e & ((1ULL << 55) - 1)) * 4096;
}

static int memio(const char *dev, uint64_t offMiB, uint64_t mib, uint64_t rounds, uint64_t lo, uint64_t hi) {
  int fd = open(dev, O_RDWR | O_DIRECT | O_CLOEXEC);
  if (fd < 0) {
    fprintf(stderr, "vmshift-io: open %s: %s\n", dev, strerror(errno));
    return 1;
  }
  int pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  size_t len = (size_t)mib << 20;
  int rc = 0;
  for (uint64_t r = 1; r <= rounds; r++) {
    unsigned char *w = aligned(len, 0), *b = aligned(len, 0);
    if (!w || !b) {
      fprintf(stderr, "vmshift-io: no memory\n");
      free(w);
      free(b);
      rc = 1;
      break;
    }
    uint64_t seed = 0x9E3779B97F4A7C15ULL ^ ((uint64_t)getpid() << 20) ^ r, h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < len; i += 8) {
      uint64_t v = next(&seed);
      memcpy(w + i, &v, 8);
    }
    for (size_t i = 0; i < len; i++) h = (h ^ w[i]) * 0x100000001b3ULL;
    off_t off = (off_t)(offMiB << 20);
    int ok = pwrite(fd, w, len, off) == (ssize_t)len && fdatasync(fd) == 0 && pread(fd, b, len, off) == (ssize_t)len &&
             memcmp(w, b, len) == 0;
    uint64_t pages = 0, in = 0;
    for (size_t i = 0; i < len; i += 4096) {
      uint64_t pw = phys(pagemap, w + i), pb = phys(pagemap, b + i);
      pages += 2;
      in += (pw >= lo && pw < hi) + (pb >= lo && pb < hi);
    }
    printf("RIG-MEMIO round=%llu ok=%d pages=%llu inrange=%llu sha=%016llx\n", (unsigned long long)r, ok,
           (unsigned long long)pages, (unsigned long long)in, (unsigned long long)h);
    fflush(stdout);
    free(w);
    free(b);
    if (!ok) rc = 1;
  }
  if (pagemap >= 0) close(pagemap);
  close(fd);
  return rc;
}

static void drop_caches(void) {
  sync();
  int fd = open("/proc/sys/vm/drop_caches", O_WRONLY | O_CLOEXEC);
  if (fd >= 0) {
    if (write(fd, "3", 1) != 1) { /* not fatal: the figure then includes cached reads */
    }
    close(fd);
  }
}

static int fsbench(const char *dir, uint64_t mib, uint64_t files) {
  char path[4096];
  snprintf(path, sizeof path, "%s/fsbench.bin", dir);
  size_t bs = 1 << 20;
  unsigned char *buf = aligned(bs, 0x5a);
  if (!buf) return 1;
  for (size_t i = 0; i < bs; i += 4096) buf[i] = (unsigned char)i;
  int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
  if (fd < 0) {
    fprintf(stderr, "vmshift-io: open %s: %s\n", path, strerror(errno));
    free(buf);
    return 1;
  }
  double t0 = mono();
  for (uint64_t i = 0; i < mib; i++) {
    if (write(fd, buf, bs) != (ssize_t)bs) {
      fprintf(stderr, "vmshift-io: write %s: %s\n", path, strerror(errno));
      close(fd);
      free(buf);
      return 1;
    }
  }
  if (fsync(fd) != 0) fprintf(stderr, "vmshift-io: fsync: %s\n", strerror(errno));
  close(fd);
  double secs = mono() - t0;
  printf("RIG-FSBENCH op=seqwrite dir=%s bytes=%llu secs=%.3f mbps=%.1f\n", dir, (unsigned long long)(mib << 20), secs,
         (double)(mib << 20) / 1e6 / secs);
  drop_caches();
  fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    free(buf);
    return 1;
  }
  t0 = mono();
  uint64_t total = 0;
  for (;;) {
    ssize_t n = read(fd, buf, bs);
    if (n <= 0) break;
    total += (uint64_t)n;
  }
  secs = mono() - t0;
  close(fd);
  unlink(path);
  free(buf);
  printf("RIG-FSBENCH op=seqread dir=%s bytes=%llu secs=%.3f mbps=%.1f\n", dir, (unsigned long long)total, secs,
         (double)total / 1e6 / secs);
  if (total != mib << 20) return 1;
  const char *names[] = {"create", "stat", "unlink"};
  for (int phase = 0; phase < 3; phase++) {
    if (phase == 1) drop_caches();
    t0 = mono();
    for (uint64_t i = 0; i < files; i++) {
      snprintf(path, sizeof path, "%s/fsbench-%llu", dir, (unsigned long long)i);
      struct stat st;
      int ok = phase == 0   ? (fd = open(path, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0644)) >= 0 && close(fd) == 0
               : phase == 1 ? stat(path, &st) == 0
                            : unlink(path) == 0;
      if (!ok) {
        fprintf(stderr, "vmshift-io: %s %s: %s\n", names[phase], path, strerror(errno));
        return 1;
      }
    }
    secs = mono() - t0;
    printf("RIG-FSBENCH op=%s dir=%s ops=%llu secs=%.3f opsps=%.0f\n", names[phase], dir, (unsigned long long)files,
           secs, (double)files / secs);
  }
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 2) return usage();
  const char *op = argv[1];
  if ((!strcmp(op, "seqread") || !strcmp(op, "seqwrite")) && argc == 5) {
    uint64_t mib = number(argv[3]), bs = number(argv[4]);
    if (!mib || !bs) return usage();
    return sequential(argv[2], op[3] == 'w', mib, bs);
  }
  if (!strcmp(op, "randread") && argc == 4) {
    uint64_t secs = number(argv[3]);
    if (!secs) return usage();
    return randread(argv[2], secs);
  }
  if (!strcmp(op, "fsbench") && argc == 5) {
    uint64_t mib = number(argv[3]), files = number(argv[4]);
    if (!mib || !files) return usage();
    return fsbench(argv[2], mib, files);
  }
  if (!strcmp(op, "memio") && argc == 8) {
    uint64_t mib = number(argv[4]), rounds = number(argv[5]);
    if (!mib || !rounds) return usage();
    return memio(argv[2], strtoull(argv[3], NULL, 10), mib, rounds, strtoull(argv[6], NULL, 16),
                 strtoull(argv[7], NULL, 16));
  }
  return usage();
}
