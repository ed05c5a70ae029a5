/* loadgen: the small, efficient TCP load generator of the tcpmesh benchmark (bench/).
 *
 * One binary, six roles; every client prints exactly one JSON object on stdout:
 *   loadgen serve PORT                         echo server (epoll, one thread), runs until killed
 *   loadgen rr HOST PORT SECONDS SIZE          one connection, SIZE-byte ping-pong; round-trip times
 *   loadgen load HOST PORT SECONDS SIZE CONNS RATE
 *                                              CONNS connections of SIZE-byte ping-pong: RATE 0 closed
 *                                              loop (the most the path carries), else RATE requests/s
 *                                              open loop, RTT counted from when each was due
 *   loadgen crr HOST PORT SECONDS CONC SIZE WARMUP
 *                                              CONC connections in flight, each: connect, send SIZE
 *                                              bytes, read the echo, close; completions per second
 *   loadgen hold HOST PORT N                   open N connections (one 1-byte exchange each), print
 *                                              a JSON line, keep them until stdin closes, then close
 *   loadgen connect2 HOST_A PORT_A CGROUP_PROCS_A AFTER_A HOST_B PORT_B CGROUP_PROCS_B AFTER_B COUNT MAX_SECONDS
 *                                              the same, alternating two variants connect by connect,
 *                                              each socket created from its own cgroup (the process
 *                                              moves itself between the two cgroup.procs files)
 *   loadgen connect HOST PORT COUNT AFTER MAX_SECONDS
 *                                              up to COUNT sequential blocking connects (stopping
 *                                              after MAX_SECONDS), timing connect() only; AFTER=
 *                                              exchange (1-byte echo, then close) or eof (wait
 *                                              until the peer closes or resets it, at most 2 s)
 * Latencies are in microseconds. CPU time of the client itself is reported (getrusage) so the
 * harness can show that the generator is not the bottleneck. No allocation or syscall beyond the
 * socket calls sits in the measured loops; clock_gettime is vDSO.
 *
 * Built by bench/loadgen.py with `cc -O2`; IPv4 only, addresses as dotted quads.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 256
#define MAX_MSG 65536

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static struct sockaddr_in parse_addr(const char *host, const char *port) {
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)atoi(port));
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        fprintf(stderr, "loadgen: %s is not an IPv4 address\n", host);
        exit(2);
    }
    return sa;
}

static void nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* ---------------------------------------------------------------- samples and JSON output */

typedef struct {
    uint64_t *v;
    size_t n, cap;
} samples_t;

static void push(samples_t *s, uint64_t ns) {
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 65536;
        s->v = realloc(s->v, s->cap * sizeof *s->v);
        if (!s->v) die("realloc");
    }
    s->v[s->n++] = ns;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double pct_us(const samples_t *s, double p) {
    if (!s->n) return -1;
    size_t i = (size_t)(p * (double)(s->n - 1) + 0.5);
    return s->v[i] / 1000.0;
}

/* Prints `"name": {count, min, p50, p90, p99, p999, max, mean}` (sorts the samples). */
static void print_dist(const char *name, samples_t *s) {
    double sum = 0;
    for (size_t i = 0; i < s->n; i++) sum += (double)s->v[i];
    qsort(s->v, s->n, sizeof *s->v, cmp_u64);
    printf("\"%s\": {\"count\": %zu, \"min\": %.2f, \"p50\": %.2f, \"p90\": %.2f, \"p99\": %.2f, "
           "\"p999\": %.2f, \"max\": %.2f, \"mean\": %.2f}",
           name, s->n, s->n ? s->v[0] / 1000.0 : -1, pct_us(s, .5), pct_us(s, .9), pct_us(s, .99),
           pct_us(s, .999), s->n ? s->v[s->n - 1] / 1000.0 : -1, s->n ? sum / s->n / 1000.0 : -1);
}

static void print_cpu(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("\"cpu_user\": %.4f, \"cpu_sys\": %.4f",
           ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6, ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6);
}

/* ---------------------------------------------------------------- serve: epoll echo server */

typedef struct {
    int fd;
    size_t off, len; /* pending bytes in buf not yet written back */
    char *buf;
} conn_t;

static int serve(const char *port) {
    struct sockaddr_in sa = parse_addr("0.0.0.0", port);
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    if (lfd < 0) die("socket");
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
    if (listen(lfd, 4096) < 0) die("listen");
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    printf("{\"listening\": %s, \"pid\": %d}\n", port, getpid());
    fflush(stdout);
    static char buf[MAX_MSG];
    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(ep, events, MAX_EVENTS, -1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            conn_t *c = events[i].data.ptr;
            if (c == NULL) { /* the listener */
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    nodelay(fd);
                    c = calloc(1, sizeof *c);
                    c->fd = fd;
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
                }
                continue;
            }
            if (c->len > c->off) { /* writable again: flush what is pending */
                ssize_t w = write(c->fd, c->buf + c->off, c->len - c->off);
                if (w < 0 && errno != EAGAIN) goto drop;
                if (w > 0) c->off += (size_t)w;
                if (c->off == c->len) {
                    c->off = c->len = 0;
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &cev);
                }
                continue;
            }
            ssize_t r = read(c->fd, buf, sizeof buf);
            if (r < 0 && errno == EAGAIN) continue;
            if (r <= 0) goto drop;
            ssize_t w = write(c->fd, buf, (size_t)r);
            if (w < 0 && errno != EAGAIN) goto drop;
            if (w < 0) w = 0;
            if (w < r) { /* keep the rest, wait until writable, stop reading meanwhile */
                if (!c->buf) c->buf = malloc(MAX_MSG);
                memcpy(c->buf, buf + w, (size_t)(r - w));
                c->off = 0;
                c->len = (size_t)(r - w);
                struct epoll_event cev = {.events = EPOLLOUT, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &cev);
            }
            continue;
        drop:
            epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
            close(c->fd);
            free(c->buf);
            free(c);
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- rr: ping-pong on one connection */

static int read_full(int fd, char *buf, size_t len) {
    size_t got = 0;
    while (got < len) {
        ssize_t r = read(fd, buf + got, len - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    return 0;
}

static int write_full(int fd, const char *buf, size_t len) {
    size_t put = 0;
    while (put < len) {
        ssize_t w = write(fd, buf + put, len - put);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        put += (size_t)w;
    }
    return 0;
}

/* The capture test binds its source ports explicitly, below the netns's ephemeral range (the harness
 * sets it to start at 10000): uncaptured sockets from [2000, 6000), captured ones from [6000, 10000).
 * Both variants then pick ports the same way, and an uncaptured socket never reuses the (address,
 * port) of an earlier captured connection: the capture's records outlive connections, and a reused
 * pair would find a stale one (see bench/README.md). */
#define STRAIGHT_PORTS 2000
#define CAPTURED_PORTS 6000
#define PORTS_PER_RANGE 4000

static void bind_private_port(int fd, int base) {
    static int next[2];
    int *n = &next[base == CAPTURED_PORTS];
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    for (int tries = 0; tries < 64; tries++) {
        struct sockaddr_in local = {.sin_family = AF_INET};
        local.sin_port = htons((uint16_t)(base + *n));
        *n = (*n + 1) % PORTS_PER_RANGE;
        if (bind(fd, (struct sockaddr *)&local, sizeof local) == 0) return;
    }
    die("bind to a private source port");
}

static int blocking_connect(struct sockaddr_in *sa) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    nodelay(fd);
    if (connect(fd, (struct sockaddr *)sa, sizeof *sa) < 0) die("connect");
    return fd;
}

static int rr(const char *host, const char *port, double seconds, size_t size) {
    struct sockaddr_in sa = parse_addr(host, port);
    static char buf[MAX_MSG];
    if (size < 1 || size > MAX_MSG) size = 1;
    memset(buf, 'x', size);
    int fd = blocking_connect(&sa);
    for (int i = 0; i < 200; i++) /* warm-up: caches, the tunnel's first-use work */
        if (write_full(fd, buf, size) || read_full(fd, buf, size)) die("warm-up exchange");
    samples_t s = {0};
    double t0 = now_s(), end = t0 + seconds;
    while (1) {
        uint64_t a = now_ns();
        if (write_full(fd, buf, size) || read_full(fd, buf, size)) die("exchange");
        uint64_t b = now_ns();
        push(&s, b - a);
        if ((s.n & 63) == 0 && now_s() >= end) break;
    }
    double elapsed = now_s() - t0;
    close(fd);
    printf("{\"mode\": \"rr\", \"seconds\": %.3f, \"size\": %zu, ", elapsed, size);
    print_dist("rtt_us", &s);
    printf(", ");
    print_cpu();
    printf("}\n");
    return 0;
}

/* ---------------------------------------------------------------- load: ping-pong on many connections at a rate
 *
 * `conns` connections, each carrying one `size`-byte request at a time, echoed back. rate 0: closed
 * loop (each connection sends again as soon as its answer is in): the most the path carries. rate R:
 * open loop: requests are due every 1/R s (timerfd, absolute times), handed round-robin to the
 * connections; a request due on a busy connection waits in its queue, and its latency counts from
 * when it was due, not when it could be sent (no coordinated omission). */

#define LOAD_QUEUE 4096

typedef struct {
    int fd;
    size_t got;
    int busy;
    uint64_t sent_due; /* due time of the request in flight */
    uint64_t queue[LOAD_QUEUE];
    size_t head, n;
} lconn_t;

static int load_send(lconn_t *c, const char *msg, size_t size, uint64_t due) {
    if (write(c->fd, msg, size) != (ssize_t)size) return -1; /* small: fits the send buffer */
    c->busy = 1;
    c->got = 0;
    c->sent_due = due;
    return 0;
}

static int load(const char *host, const char *port, double seconds, size_t size, int conns, double rate) {
    struct sockaddr_in sa = parse_addr(host, port);
    static char msg[MAX_MSG], buf[MAX_MSG];
    if (size < 1 || size > MAX_MSG) size = 1;
    memset(msg, 'l', size);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    lconn_t *c = calloc((size_t)conns, sizeof *c);
    for (int i = 0; i < conns; i++) {
        c[i].fd = blocking_connect(&sa);
        for (int k = 0; k < 50; k++) /* warm-up */
            if (write_full(c[i].fd, msg, size) || read_full(c[i].fd, buf, size)) die("warm-up exchange");
        fcntl(c[i].fd, F_SETFL, fcntl(c[i].fd, F_GETFL) | O_NONBLOCK); /* a read after epoll never blocks */
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, c[i].fd, &ev);
    }
    int tfd = -1;
    uint64_t interval = 0, next_due = 0;
    long overflow = 0, next_conn = 0;
    if (rate > 0) {
        tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        if (tfd < 0) die("timerfd_create");
        interval = (uint64_t)(1e9 / rate);
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)-1};
        epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &ev);
    }
    samples_t s = {0};
    uint64_t t0 = now_ns(), end = t0 + (uint64_t)(seconds * 1e9);
    if (rate > 0) {
        next_due = t0 + interval;
        struct itimerspec its = {.it_value = {.tv_sec = (time_t)(next_due / 1000000000ull),
                                               .tv_nsec = (long)(next_due % 1000000000ull)}};
        timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
    } else {
        for (int i = 0; i < conns; i++)
            if (load_send(&c[i], msg, size, now_ns())) die("send");
    }
    struct epoll_event events[MAX_EVENTS];
    uint64_t t = now_ns();
    while (t < end) {
        int n = epoll_wait(ep, events, MAX_EVENTS, 100);
        t = now_ns();
        for (int e = 0; e < n; e++) {
            if (events[e].data.u64 == (uint64_t)-1) { /* requests came due */
                uint64_t ticks;
                if (read(tfd, &ticks, sizeof ticks) < 0) continue;
                while (next_due <= t) {
                    lconn_t *q = &c[next_conn];
                    next_conn = (next_conn + 1) % conns;
                    if (!q->busy) {
                        if (load_send(q, msg, size, next_due)) die("send");
                    } else if (q->n < LOAD_QUEUE) {
                        q->queue[(q->head + q->n++) % LOAD_QUEUE] = next_due;
                    } else {
                        overflow++;
                    }
                    next_due += interval;
                }
                struct itimerspec its = {.it_value = {.tv_sec = (time_t)(next_due / 1000000000ull),
                                                       .tv_nsec = (long)(next_due % 1000000000ull)}};
                timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
                continue;
            }
            lconn_t *q = &c[events[e].data.u64];
            ssize_t r = read(q->fd, buf, sizeof buf);
            if (r < 0 && errno == EAGAIN) continue;
            if (r <= 0) die("exchange");
            q->got += (size_t)r;
            if (q->got < size) continue;
            uint64_t done = now_ns();
            push(&s, done - q->sent_due);
            q->busy = 0;
            if (rate <= 0) {
                if (done < end && load_send(q, msg, size, done)) die("send");
            } else if (q->n) {
                uint64_t due = q->queue[q->head];
                q->head = (q->head + 1) % LOAD_QUEUE;
                q->n--;
                if (load_send(q, msg, size, due)) die("send");
            }
        }
    }
    double elapsed = (double)(now_ns() - t0) / 1e9;
    long queued = 0;
    for (int i = 0; i < conns; i++) {
        queued += (long)c[i].n + c[i].busy;
        close(c[i].fd);
    }
    printf("{\"mode\": \"load\", \"seconds\": %.3f, \"size\": %zu, \"connections\": %d, \"rate\": %.1f, "
           "\"completed\": %zu, \"per_second\": %.1f, \"unfinished\": %ld, \"overflow\": %ld, ",
           elapsed, size, conns, rate, s.n, elapsed > 0 ? (double)s.n / elapsed : 0, queued, overflow);
    print_dist("rtt_us", &s);
    printf(", ");
    print_cpu();
    printf("}\n");
    return 0;
}

/* ---------------------------------------------------------------- crr and hold: many connections */

enum { ST_CONNECTING, ST_READING, ST_HELD };

typedef struct {
    int fd, state;
    size_t got;
    uint64_t started;
} slot_t;

typedef struct {
    struct sockaddr_in sa;
    int ep;
    size_t size;
    char msg[MAX_MSG];
    long failed;
} pool_t;

static int open_slot(pool_t *p, slot_t *s) {
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s->fd < 0) die("socket");
    nodelay(s->fd);
    s->started = now_ns();
    s->state = ST_CONNECTING;
    s->got = 0;
    if (connect(s->fd, (struct sockaddr *)&p->sa, sizeof p->sa) < 0 && errno != EINPROGRESS) {
        close(s->fd);
        s->fd = -1;
        p->failed++;
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = s};
    epoll_ctl(p->ep, EPOLL_CTL_ADD, s->fd, &ev);
    return 0;
}

static void close_slot(pool_t *p, slot_t *s) {
    epoll_ctl(p->ep, EPOLL_CTL_DEL, s->fd, NULL);
    close(s->fd);
    s->fd = -1;
}

/* Advance one slot on an epoll event. Returns 1 when its exchange completed, -1 on failure, 0 otherwise. */
static int step_slot(pool_t *p, slot_t *s) {
    static char buf[MAX_MSG];
    if (s->state == ST_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) return -1;
        if (write(s->fd, p->msg, p->size) != (ssize_t)p->size) return -1; /* small: fits the send buffer */
        s->state = ST_READING;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
        epoll_ctl(p->ep, EPOLL_CTL_MOD, s->fd, &ev);
        return 0;
    }
    ssize_t r = read(s->fd, buf, sizeof buf);
    if (r < 0 && errno == EAGAIN) return 0;
    if (r <= 0) return -1;
    s->got += (size_t)r;
    return s->got >= p->size ? 1 : 0;
}

static int crr(const char *host, const char *port, double seconds, int conc, size_t size, double warmup) {
    pool_t *p = calloc(1, sizeof *p);
    p->sa = parse_addr(host, port);
    p->ep = epoll_create1(EPOLL_CLOEXEC);
    p->size = size < 1 || size > MAX_MSG ? 64 : size;
    memset(p->msg, 'q', p->size);
    slot_t *slots = calloc((size_t)conc, sizeof *slots);
    samples_t s = {0};
    double t0 = now_s(), measure_from = t0 + warmup, end = measure_from + seconds;
    long done = 0, done_all = 0, failed_measured = 0;
    for (int i = 0; i < conc; i++) open_slot(p, &slots[i]);
    struct epoll_event events[MAX_EVENTS];
    double t = now_s();
    while (t < end) {
        int n = epoll_wait(p->ep, events, MAX_EVENTS, 100);
        t = now_s();
        for (int i = 0; i < n; i++) {
            slot_t *sl = events[i].data.ptr;
            int rc = step_slot(p, sl);
            if (rc == 0) continue;
            if (rc > 0) done_all++;
            if (rc > 0 && t >= measure_from) {
                done++;
                push(&s, now_ns() - sl->started);
            } else if (rc < 0 && t >= measure_from) {
                failed_measured++;
            }
            close_slot(p, sl);
            if (t < end) open_slot(p, sl);
        }
    }
    double elapsed = t - measure_from;
    long in_flight = 0;
    for (int i = 0; i < conc; i++)
        if (slots[i].fd >= 0) {
            in_flight++;
            close_slot(p, &slots[i]);
        }
    printf("{\"mode\": \"crr\", \"seconds\": %.3f, \"concurrency\": %d, \"size\": %zu, \"completed\": %ld, "
           "\"completed_all\": %ld, \"failed\": %ld, \"connect_errors\": %ld, \"abandoned\": %ld, "
           "\"per_second\": %.1f, \"seconds_all\": %.3f, ",
           elapsed, conc, p->size, done, done_all, failed_measured, p->failed, in_flight, elapsed > 0 ? done / elapsed : 0, t - t0);
    print_dist("latency_us", &s);
    printf(", ");
    print_cpu();
    printf("}\n");
    return 0;
}

static int hold(const char *host, const char *port, int count) {
    pool_t *p = calloc(1, sizeof *p);
    p->sa = parse_addr(host, port);
    p->ep = epoll_create1(EPOLL_CLOEXEC);
    p->size = 1;
    p->msg[0] = 'h';
    slot_t *slots = calloc((size_t)count, sizeof *slots);
    const int window = 64; /* connections being set up at once */
    int next = 0, pending = 0, held = 0;
    long failed = 0;
    double t0 = now_s(), deadline = t0 + 120;
    struct epoll_event events[MAX_EVENTS];
    while ((next < count || pending > 0) && now_s() < deadline) {
        while (next < count && pending < window) {
            if (open_slot(p, &slots[next]) == 0) pending++;
            else failed++;
            next++;
        }
        int n = epoll_wait(p->ep, events, MAX_EVENTS, 200);
        for (int i = 0; i < n; i++) {
            slot_t *sl = events[i].data.ptr;
            int rc = step_slot(p, sl);
            if (rc == 0) continue;
            pending--;
            if (rc > 0) {
                held++;
                sl->state = ST_HELD;
                epoll_ctl(p->ep, EPOLL_CTL_DEL, sl->fd, NULL);
            } else {
                failed++;
                close_slot(p, sl);
            }
        }
    }
    printf("{\"mode\": \"hold\", \"requested\": %d, \"held\": %d, \"failed\": %ld, \"seconds\": %.3f, ",
           count, held, failed + pending, now_s() - t0);
    print_cpu();
    printf("}\n");
    fflush(stdout);
    char c;
    while (read(0, &c, 1) > 0) /* hold until the harness closes our stdin */
        ;
    for (int i = 0; i < count; i++)
        if (slots[i].fd > 0) close(slots[i].fd);
    return 0;
}

/* ---------------------------------------------------------------- connect: connect() latency only */

static int connect_lat(const char *host, const char *port, int count, const char *after, double max_seconds) {
    struct sockaddr_in sa = parse_addr(host, port);
    int exchange = strcmp(after, "exchange") == 0;
    samples_t s = {0};
    long failed = 0, lingered = 0;
    char c = 'c';
    struct timeval tv = {.tv_sec = 2}; /* a peer that neither answers nor closes costs at most this */
    double t0 = now_s();
    for (int i = 0; i < count && now_s() - t0 < max_seconds; i++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) die("socket");
        nodelay(fd);
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        if (!exchange) bind_private_port(fd, STRAIGHT_PORTS);
        uint64_t a = now_ns();
        int rc = connect(fd, (struct sockaddr *)&sa, sizeof sa);
        uint64_t b = now_ns();
        if (rc < 0) {
            failed++;
            close(fd);
            continue;
        }
        push(&s, b - a);
        if (exchange) {
            if (write_full(fd, &c, 1) || read_full(fd, &c, 1)) failed++;
        } else {
            char sink[256];
            ssize_t r;
            while ((r = read(fd, sink, sizeof sink)) > 0) /* until the proxy closes or resets it */
                ;
            if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) lingered++;
        }
        close(fd);
    }
    printf("{\"mode\": \"connect\", \"after\": \"%s\", \"requested\": %d, \"failed\": %ld, \"lingered\": %ld, "
           "\"seconds\": %.3f, ", after, count, failed, lingered, now_s() - t0);
    print_dist("connect_us", &s);
    printf(", ");
    print_cpu();
    printf("}\n");
    return 0;
}

/* ---------------------------------------------------------------- connect2: two variants, interleaved */

static void join_cgroup(const char *procs_path) {
    int fd = open(procs_path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, "0", 1) != 1) die(procs_path); /* "0": the writing process itself */
    close(fd);
}

typedef struct {
    struct sockaddr_in sa;
    const char *procs; /* cgroup.procs the socket is created from */
    int exchange;
    samples_t s;
    long failed, lingered;
} variant_t;

static void one_connect(variant_t *v) {
    struct timeval tv = {.tv_sec = 2};
    char c = 'c';
    join_cgroup(v->procs); /* a socket belongs to the cgroup of the process that creates it */
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    nodelay(fd);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    bind_private_port(fd, v->exchange ? CAPTURED_PORTS : STRAIGHT_PORTS);
    uint64_t a = now_ns();
    int rc = connect(fd, (struct sockaddr *)&v->sa, sizeof v->sa);
    uint64_t b = now_ns();
    if (rc < 0) {
        v->failed++;
        close(fd);
        return;
    }
    push(&v->s, b - a);
    if (v->exchange) {
        if (write_full(fd, &c, 1) || read_full(fd, &c, 1)) v->failed++;
    } else {
        char sink[256];
        ssize_t r;
        while ((r = read(fd, sink, sizeof sink)) > 0)
            ;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) v->lingered++;
    }
    close(fd);
}

static void print_variant(const char *name, variant_t *v) {
    printf("\"%s\": {\"failed\": %ld, \"lingered\": %ld, ", name, v->failed, v->lingered);
    print_dist("connect_us", &v->s);
    printf("}");
}

/* Alternates one connect of variant A (from cgroup A) with one of variant B (from cgroup B), so any
 * drift in the machine's load hits both alike. */
static int connect2(char **argv, int count, double max_seconds) {
    variant_t v[2];
    memset(v, 0, sizeof v);
    for (int k = 0; k < 2; k++) {
        v[k].sa = parse_addr(argv[k * 4], argv[k * 4 + 1]);
        v[k].procs = argv[k * 4 + 2];
        v[k].exchange = strcmp(argv[k * 4 + 3], "exchange") == 0;
    }
    double t0 = now_s();
    for (int i = 0; i < count && now_s() - t0 < max_seconds; i++) {
        one_connect(&v[i & 1]);
        one_connect(&v[!(i & 1)]);
    }
    printf("{\"mode\": \"connect2\", \"seconds\": %.3f, ", now_s() - t0);
    print_variant("a", &v[0]);
    printf(", ");
    print_variant("b", &v[1]);
    printf(", ");
    print_cpu();
    printf("}\n");
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOFBF, 1 << 16);
    if (argc >= 3 && !strcmp(argv[1], "serve")) return serve(argv[2]);
    if (argc >= 6 && !strcmp(argv[1], "rr")) return rr(argv[2], argv[3], atof(argv[4]), (size_t)atol(argv[5]));
    if (argc >= 8 && !strcmp(argv[1], "load"))
        return load(argv[2], argv[3], atof(argv[4]), (size_t)atol(argv[5]), atoi(argv[6]), atof(argv[7]));
    if (argc >= 8 && !strcmp(argv[1], "crr"))
        return crr(argv[2], argv[3], atof(argv[4]), atoi(argv[5]), (size_t)atol(argv[6]), atof(argv[7]));
    if (argc >= 5 && !strcmp(argv[1], "hold")) return hold(argv[2], argv[3], atoi(argv[4]));
    if (argc >= 12 && !strcmp(argv[1], "connect2")) return connect2(argv + 2, atoi(argv[10]), atof(argv[11]));
    if (argc >= 7 && !strcmp(argv[1], "connect"))
        return connect_lat(argv[2], argv[3], atoi(argv[4]), argv[5], atof(argv[6]));
    fprintf(stderr, "usage: loadgen serve PORT | rr HOST PORT SECONDS SIZE | crr HOST PORT SECONDS CONC SIZE WARMUP"
                    " | hold HOST PORT N | connect HOST PORT COUNT exchange|eof MAX_SECONDS"
                    " | connect2 A_HOST A_PORT A_PROCS A_AFTER B_HOST B_PORT B_PROCS B_AFTER COUNT MAX_SECONDS\n");
    return 2;
}
