/*
 * linkemu: a user-space link emulator between two TUN devices.
 *
 * bench/linkemu.py compiles this with gcc into a temporary directory and
 * runs it as root.  It joins two network namespaces: it opens the TUN
 * device DEV_A inside namespace NS_A and DEV_B inside NS_B (both created
 * beforehand with `ip tuntap add ... mode tun`), then copies every IP packet
 * read from one device to the other, after:
 *
 *   1. random loss (probability LOSS, counted as loss drops),
 *   2. a bottleneck queue of QUEUE packets drained at RATE Mbit/s
 *      (serialisation delay; drop-tail when full, counted as queue drops;
 *      the packet being serialised counts as queued),
 *   3. a one-way propagation delay DELAY ms plus uniform jitter in
 *      [0, JITTER] ms (never reordering: a packet is not delivered before
 *      the one ahead of it).
 *
 * Each direction (a->b, b->a) has its own parameters and counters.
 *
 *   linkemu NS_A DEV_A NS_B DEV_B PARAMS_AB PARAMS_BA SEED
 *   PARAMS = rate_mbit:delay_ms:jitter_ms:loss:queue   (0 rate/queue = unlimited)
 *
 * Commands on stdin, one per line (answers on stdout, one line each):
 *   s                      print counters as one JSON object
 *   z                      zero the counters (prints "ok")
 *   p DIR PARAMS           set the parameters of DIR (ab or ba) (prints "ok")
 *   q                      exit
 * It prints "ready" once both devices are open, and exits on `q`, on EOF
 * of stdin (the parent went away), on SIGTERM/SIGINT or after --max-seconds
 * (argument 8, default 3600): it never outlives its bench.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define RING 8192
#define PKTMAX 2048
#define BATCH 64

typedef struct {
    int64_t dep;     /* time the last bit leaves the bottleneck */
    int64_t due;     /* delivery time at the far end */
    int len;
    unsigned char data[PKTMAX];
} slot_t;

typedef struct {
    double rate_bps, delay_ns, jitter_ns, loss;
    long queue;
} params_t;

typedef struct {
    const char *name;
    int in_fd, out_fd;
    params_t p;
    slot_t *ring;
    long head, qhead, tail; /* head: next to deliver; qhead: first still queued */
    int64_t last_dep, last_due;
    uint64_t rx_pkts, rx_bytes, loss_drops, queue_drops, tx_pkts, tx_bytes;
    uint64_t write_errors, max_queue;
} dir_t;

static volatile sig_atomic_t stop_flag = 0;
static uint64_t rng_state = 88172645463325252ULL;

static void on_signal(int sig) { (void)sig; stop_flag = 1; }

static double rnd(void) {
    uint64_t x = rng_state;
    x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
    rng_state = x;
    return (double)((x * 2685821657736338717ULL) >> 11) * (1.0 / 9007199254740992.0);
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int parse_params(const char *s, params_t *p) {
    double rate, delay, jitter, loss;
    long queue;
    if (sscanf(s, "%lf:%lf:%lf:%lf:%ld", &rate, &delay, &jitter, &loss, &queue) != 5)
        return -1;
    if (rate < 0 || delay < 0 || jitter < 0 || loss < 0 || loss > 1 || queue < 0)
        return -1;
    p->rate_bps = rate * 1e6;
    p->delay_ns = delay * 1e6;
    p->jitter_ns = jitter * 1e6;
    p->loss = loss;
    p->queue = queue;
    return 0;
}

static int open_tun(const char *ns_path, const char *dev) {
    int nsfd = open(ns_path, O_RDONLY | O_CLOEXEC);
    if (nsfd < 0) { perror(ns_path); return -1; }
    if (setns(nsfd, CLONE_NEWNET) < 0) { perror("setns"); close(nsfd); return -1; }
    close(nsfd);
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0) { perror("/dev/net/tun"); return -1; }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    strncpy(ifr.ifr_name, dev, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) { perror("TUNSETIFF"); close(fd); return -1; }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static void ingress(dir_t *d, const unsigned char *pkt, int len, int64_t now) {
    d->rx_pkts++;
    d->rx_bytes += (uint64_t)len;
    if (d->p.loss > 0 && rnd() < d->p.loss) { d->loss_drops++; return; }
    while (d->qhead < d->tail && d->ring[d->qhead % RING].dep <= now) d->qhead++;
    long queued = d->tail - d->qhead;
    if ((d->p.queue > 0 && queued >= d->p.queue) || d->tail - d->head >= RING) {
        d->queue_drops++;
        return;
    }
    int64_t start = d->last_dep > now ? d->last_dep : now;
    int64_t tx = d->p.rate_bps > 0 ? (int64_t)(len * 8.0 * 1e9 / d->p.rate_bps) : 0;
    int64_t dep = start + tx;
    int64_t due = dep + (int64_t)d->p.delay_ns;
    if (d->p.jitter_ns > 0) due += (int64_t)(rnd() * d->p.jitter_ns);
    if (due < d->last_due) due = d->last_due;
    d->last_dep = dep;
    d->last_due = due;
    slot_t *s = &d->ring[d->tail % RING];
    s->dep = dep;
    s->due = due;
    s->len = len;
    memcpy(s->data, pkt, (size_t)len);
    d->tail++;
    if ((uint64_t)(queued + 1) > d->max_queue) d->max_queue = (uint64_t)(queued + 1);
}

static void deliver(dir_t *d, int64_t now) {
    while (d->head < d->tail) {
        slot_t *s = &d->ring[d->head % RING];
        if (s->due > now) break;
        if (write(d->out_fd, s->data, (size_t)s->len) == s->len) {
            d->tx_pkts++;
            d->tx_bytes += (uint64_t)s->len;
        } else {
            d->write_errors++;
        }
        d->head++;
        if (d->qhead < d->head) d->qhead = d->head;
    }
}

static void read_side(dir_t *d, int64_t now) {
    unsigned char buf[PKTMAX];
    for (int i = 0; i < BATCH; i++) {
        ssize_t n = read(d->in_fd, buf, sizeof buf);
        if (n <= 0) break;
        ingress(d, buf, (int)n, now);
    }
}

static void print_dir(const dir_t *d) {
    printf("\"%s\":{\"rx_pkts\":%llu,\"rx_bytes\":%llu,\"loss_drops\":%llu,"
           "\"queue_drops\":%llu,\"tx_pkts\":%llu,\"tx_bytes\":%llu,"
           "\"write_errors\":%llu,\"max_queue\":%llu,\"in_flight\":%ld}",
           d->name, (unsigned long long)d->rx_pkts, (unsigned long long)d->rx_bytes,
           (unsigned long long)d->loss_drops, (unsigned long long)d->queue_drops,
           (unsigned long long)d->tx_pkts, (unsigned long long)d->tx_bytes,
           (unsigned long long)d->write_errors, (unsigned long long)d->max_queue,
           d->tail - d->head);
}

static void zero(dir_t *d) {
    d->rx_pkts = d->rx_bytes = d->loss_drops = d->queue_drops = 0;
    d->tx_pkts = d->tx_bytes = d->write_errors = d->max_queue = 0;
}

/* returns 1 to quit */
static int command(char *line, dir_t *ab, dir_t *ba) {
    char dir[8], params[128];
    switch (line[0]) {
    case 's':
        printf("{");
        print_dir(ab);
        printf(",");
        print_dir(ba);
        printf("}\n");
        break;
    case 'z':
        zero(ab);
        zero(ba);
        printf("ok\n");
        break;
    case 'p':
        if (sscanf(line + 1, "%7s %127s", dir, params) == 2) {
            dir_t *d = strcmp(dir, "ab") == 0 ? ab : strcmp(dir, "ba") == 0 ? ba : NULL;
            params_t p;
            if (d && parse_params(params, &p) == 0) {
                d->p = p;
                printf("ok\n");
                break;
            }
        }
        printf("error\n");
        break;
    case 'q':
        return 1;
    default:
        printf("error\n");
    }
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 8) {
        fprintf(stderr, "usage: %s NS_A DEV_A NS_B DEV_B RATE:DELAY:JITTER:LOSS:QUEUE(ab) "
                "RATE:DELAY:JITTER:LOSS:QUEUE(ba) SEED [MAX_SECONDS]\n", argv[0]);
        return 2;
    }
    static dir_t ab, ba;
    ab.name = "ab";
    ba.name = "ba";
    if (parse_params(argv[5], &ab.p) < 0 || parse_params(argv[6], &ba.p) < 0) {
        fprintf(stderr, "linkemu: bad parameters\n");
        return 2;
    }
    rng_state ^= strtoull(argv[7], NULL, 10) * 0x9E3779B97F4A7C15ULL;
    if (!rng_state) rng_state = 1;
    double max_seconds = argc > 8 ? atof(argv[8]) : 3600.0;
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    prctl(PR_SET_PDEATHSIG, SIGTERM, 0, 0, 0);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    signal(SIGPIPE, SIG_IGN);
    int fa = open_tun(argv[1], argv[2]);
    if (fa < 0) return 1;
    int fb = open_tun(argv[3], argv[4]);
    if (fb < 0) return 1;
    ab.in_fd = fa; ab.out_fd = fb;
    ba.in_fd = fb; ba.out_fd = fa;
    ab.ring = calloc(RING, sizeof(slot_t));
    ba.ring = calloc(RING, sizeof(slot_t));
    if (!ab.ring || !ba.ring) { fprintf(stderr, "linkemu: out of memory\n"); return 1; }
    printf("ready\n");
    fflush(stdout);

    int64_t deadline = now_ns() + (int64_t)(max_seconds * 1e9);
    char line[256];
    size_t line_len = 0;
    struct pollfd fds[3] = {{fa, POLLIN, 0}, {fb, POLLIN, 0}, {0, POLLIN, 0}};
    while (!stop_flag) {
        int64_t now = now_ns();
        if (now >= deadline) break;
        deliver(&ab, now);
        deliver(&ba, now);
        int64_t next = deadline;
        if (ab.head < ab.tail && ab.ring[ab.head % RING].due < next) next = ab.ring[ab.head % RING].due;
        if (ba.head < ba.tail && ba.ring[ba.head % RING].due < next) next = ba.ring[ba.head % RING].due;
        int64_t wait = next - now;
        if (wait < 0) wait = 0;
        struct timespec ts = {wait / 1000000000LL, wait % 1000000000LL};
        int r = ppoll(fds, 3, &ts, NULL);
        if (r < 0) {
            if (errno == EINTR) continue;
            perror("ppoll");
            return 1;
        }
        if (r == 0) continue;
        now = now_ns();
        if (fds[0].revents & POLLIN) read_side(&ab, now);
        if (fds[1].revents & POLLIN) read_side(&ba, now);
        if (fds[2].revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t n = read(0, line + line_len, sizeof line - 1 - line_len);
            if (n <= 0) break; /* parent gone */
            line_len += (size_t)n;
            line[line_len] = 0;
            char *nl;
            while ((nl = strchr(line, '\n')) != NULL) {
                *nl = 0;
                if (command(line, &ab, &ba)) stop_flag = 1;
                size_t rest = line_len - (size_t)(nl + 1 - line);
                memmove(line, nl + 1, rest);
                line_len = rest;
                line[line_len] = 0;
            }
            if (line_len >= sizeof line - 1) line_len = 0;
        }
    }
    return 0;
}
