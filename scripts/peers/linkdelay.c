// linkdelay - a point-to-point link between two network namespaces with a fixed
// one-way delay and random loss, done in user space (for kernels without netem).
//
// It creates one tun device inside each namespace (entering it with setns), then
// moves every IP packet read from one device to the other once DELAY_MS has
// passed, dropping each packet with probability LOSS_PCT/100 on the way. Each
// direction is a FIFO of at most QUEUE packets: a full queue drops, as a router
// buffer does. Prints "ready" on stdout once both devices exist (the caller then
// gives them addresses); on SIGINT/SIGTERM it prints per-direction counters on
// stderr and exits, which removes both devices.
//
// Usage: linkdelay NETNS_A DEV_A NETNS_B DEV_B DELAY_MS LOSS_PCT [SEED [QUEUE]]
//   NETNS_* are names under /run/netns (ip netns add); SEED (default 1) makes the
//   loss pattern repeatable; QUEUE defaults to 16384 packets per direction.
// Build: gcc -O2 -Wall -o linkdelay linkdelay.c
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

enum { MAX_PACKET = 2048, READ_BURST = 512 };

struct packet {
  uint64_t due_ns;
  uint32_t len;
  unsigned char data[MAX_PACKET];
};

// One direction: packets read from `from`, written to `to` when due.
struct lane {
  const char *name;
  int from, to;
  struct packet *ring;
  size_t cap, first, count;
  unsigned long long read, sent, lost, overflow, write_errors;
};

static void die(const char *what) {
  fprintf(stderr, "linkdelay: %s: %s\n", what, strerror(errno));
  exit(1);
}

static void usage(void) {
  fprintf(stderr, "usage: linkdelay NETNS_A DEV_A NETNS_B DEV_B DELAY_MS LOSS_PCT [SEED [QUEUE]]\n");
  exit(2);
}

static double number(const char *s, double lo, double hi) {
  char *end;
  errno = 0;
  double v = strtod(s, &end);
  if (errno || end == s || *end || v < lo || v > hi) {
    fprintf(stderr, "linkdelay: '%s' is not a number in [%g, %g]\n", s, lo, hi);
    usage();
  }
  return v;
}

static uint64_t mono_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

// splitmix64: small, fast, good enough to decide which packets to lose.
static uint64_t rng_state;
static uint64_t rng_next(void) {
  uint64_t z = (rng_state += 0x9e3779b97f4a7c15u);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
  return z ^ (z >> 31);
}

// Opens a tun device named `dev` inside network namespace `netns`.
static int tun_in_netns(const char *netns, const char *dev) {
  char path[512];
  snprintf(path, sizeof path, "/run/netns/%s", netns);
  int ns = open(path, O_RDONLY | O_CLOEXEC);
  if (ns < 0) die(path);
  if (setns(ns, CLONE_NEWNET) < 0) die("setns");
  close(ns);
  int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) die("/dev/net/tun");
  struct ifreq req;
  memset(&req, 0, sizeof req);
  req.ifr_flags = IFF_TUN | IFF_NO_PI;
  if (strlen(dev) >= IFNAMSIZ) {
    fprintf(stderr, "linkdelay: device name '%s' is too long\n", dev);
    exit(2);
  }
  memcpy(req.ifr_name, dev, strlen(dev));
  if (ioctl(fd, TUNSETIFF, &req) < 0) die("TUNSETIFF");
  return fd;
}

// Reads what the device has (up to a burst) and queues it, or loses it.
static void take(struct lane *l, uint64_t delay_ns, uint64_t loss_threshold) {
  for (int i = 0; i < READ_BURST; i++) {
    struct packet *slot = NULL;
    unsigned char scratch[MAX_PACKET];
    unsigned char *buf = scratch;
    if (l->count < l->cap) {
      slot = &l->ring[(l->first + l->count) % l->cap];
      buf = slot->data;
    }
    ssize_t n = read(l->from, buf, MAX_PACKET);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;  // EAGAIN: drained
    }
    l->read++;
    if (!slot) {
      l->overflow++;
      continue;
    }
    if (loss_threshold && rng_next() < loss_threshold) {
      l->lost++;
      continue;
    }
    slot->len = (uint32_t)n;
    slot->due_ns = mono_ns() + delay_ns;
    l->count++;
  }
}

// Writes every packet whose time has come; returns the next due time (0: none).
static uint64_t deliver(struct lane *l, uint64_t now) {
  while (l->count) {
    struct packet *p = &l->ring[l->first];
    if (p->due_ns > now) return p->due_ns;
    if (write(l->to, p->data, p->len) < 0) l->write_errors++;
    else l->sent++;
    l->first = (l->first + 1) % l->cap;
    l->count--;
  }
  return 0;
}

static void arm(int timer, uint64_t due_ns) {
  struct itimerspec t;
  memset(&t, 0, sizeof t);
  if (due_ns) {
    t.it_value.tv_sec = (time_t)(due_ns / 1000000000u);
    t.it_value.tv_nsec = (long)(due_ns % 1000000000u);
  }
  if (timerfd_settime(timer, TFD_TIMER_ABSTIME, &t, NULL) < 0) die("timerfd_settime");
}

int main(int argc, char **argv) {
  if (argc < 7 || argc > 9) usage();
  double delay_ms = number(argv[5], 0, 10000);
  double loss_pct = number(argv[6], 0, 100);
  rng_state = argc > 7 ? (uint64_t)number(argv[7], 0, 1e18) : 1;
  size_t cap = argc > 8 ? (size_t)number(argv[8], 1, 1 << 20) : 16384;
  uint64_t delay_ns = (uint64_t)(delay_ms * 1e6);
  uint64_t loss_threshold =
      loss_pct >= 100 ? UINT64_MAX : (uint64_t)(loss_pct / 100.0 * 18446744073709551616.0);

  int a = tun_in_netns(argv[1], argv[2]);
  int b = tun_in_netns(argv[3], argv[4]);
  struct lane lanes[2] = {
      {.name = "a->b", .from = a, .to = b, .cap = cap},
      {.name = "b->a", .from = b, .to = a, .cap = cap},
  };
  for (int i = 0; i < 2; i++) {
    lanes[i].ring = calloc(cap, sizeof(struct packet));
    if (!lanes[i].ring) die("calloc");
  }

  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGTERM);
  if (sigprocmask(SIG_BLOCK, &stop, NULL) < 0) die("sigprocmask");
  int sig = signalfd(-1, &stop, SFD_CLOEXEC);
  int timer = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
  int ep = epoll_create1(EPOLL_CLOEXEC);
  if (sig < 0 || timer < 0 || ep < 0) die("signalfd/timerfd/epoll");
  int fds[4] = {a, b, timer, sig};
  for (int i = 0; i < 4; i++) {
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev) < 0) die("epoll_ctl");
  }

  printf("ready %s/%s <-> %s/%s, %.3f ms one way, %.2f %% loss, queue %zu\n", argv[1], argv[2],
         argv[3], argv[4], delay_ms, loss_pct, cap);
  fflush(stdout);

  int running = 1;
  while (running) {
    struct epoll_event evs[4];
    int n = epoll_wait(ep, evs, 4, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      die("epoll_wait");
    }
    for (int i = 0; i < n; i++) {
      uint32_t which = evs[i].data.u32;
      if (which < 2) take(&lanes[which], delay_ns, loss_threshold);
      else if (which == 2) {
        uint64_t ticks;
        (void)!read(timer, &ticks, sizeof ticks);
      } else running = 0;
    }
    uint64_t now = mono_ns(), next = 0;
    for (int i = 0; i < 2; i++) {
      uint64_t due = deliver(&lanes[i], now);
      if (due && (!next || due < next)) next = due;
    }
    arm(timer, next);
  }
  for (int i = 0; i < 2; i++) {
    struct lane *l = &lanes[i];
    fprintf(stderr, "%s: read %llu sent %llu lost %llu queue-full %llu write-errors %llu\n", l->name,
            l->read, l->sent, l->lost, l->overflow, l->write_errors);
  }
  return 0;
}
