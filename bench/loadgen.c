/*
 * loadgen.c - epoll-based TCP echo load generator for the pulse benchmarks.
 *
 * bench/run.py compiles this file with `cc -O2` into a cache directory at run
 * time; no binary is committed. It drives an echo server on a loopback address
 * over N non-blocking connections, verifies every echoed byte, and prints one
 * JSON line with the request count, rate, latency percentiles and bytes.
 *
 * Modes:
 *   (default)       each connection keeps --pipeline messages of --size bytes
 *                   in flight (1 = ping-pong) and refills the window as each
 *                   full echo arrives; runs --warmup then --duration seconds.
 *   --connect-rate  --conns concurrent slots, each repeatedly: connect, send
 *                   one message, read and verify the echo, close.
 *   --idle          open --conns connections, echo one message on each, then
 *                   hold them open until stdin closes or --duration passes.
 *
 * --tls (echo and connect-rate modes) speaks TLS on every connection; it needs
 * a build with OpenSSL: cc -O2 -DLOADGEN_TLS loadgen.c -lssl -lcrypto. In the
 * echo modes all connections finish their handshake before the clock starts;
 * with --connect-rate every cycle is a full handshake (no session resumption).
 *
 * Message content is a window into a fixed pseudo-random pattern whose offset
 * depends on the connection and message sequence number, so every message
 * differs from its neighbours: lost, duplicated, reordered, cross-connection
 * or corrupted bytes are all detected.
 *
 * Exit status: 0 ok, 2 usage/setup error, 3 echoed data mismatch or excess
 * data, 4 connection closed or reset early, 5 stall/timeout, 1 other errors.
 * With --markers, "#start"/"#stop" (measurement window) and "#ready" (idle
 * mode) lines are written to stderr so a runner can sample the server.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifdef LOADGEN_TLS
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#endif

#define EXIT_USAGE 2
#define EXIT_MISMATCH 3
#define EXIT_CLOSED 4
#define EXIT_STALL 5

#define PATTERN_PRIME 4093u /* number of distinct message start offsets */
#define SCRATCH_SIZE (256 * 1024)
#define MAX_IOV 64
#define MAX_EVENTS 1024
#define MAX_SIZE (64u * 1024u * 1024u)
#define MAX_DEPTH 1024
#define MAX_CONNS 1000000
#define MAX_DURATION 3600.0

/* ------------------------------------------------------------------ options */

static struct {
    const char *host;
    int port;
    int conns;
    uint32_t size;
    double duration;
    int depth;
    double warmup;
    int connect_rate;
    int idle;
    int markers;
    uint64_t max_requests;
    double stall_timeout;
    double connect_timeout;
    int busy_poll;
    int tls;
    const char *cafile;
} opt = {"127.0.0.1", 0, 1, 64, 5.0, 1, 1.0, 0, 0, 0, 1000000000ull, 10.0, 10.0, 0, 0, NULL};

static struct sockaddr_in server_addr;
static uint8_t *pattern;
static uint8_t scratch[SCRATCH_SIZE];

static void die(int code, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));
static void die(int code, const char *fmt, ...)
{
    va_list ap;
    fflush(stdout);
    fputs("loadgen: error: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(code);
}

static void marker(const char *what)
{
    if (opt.markers) {
        fprintf(stderr, "#%s\n", what);
        fflush(stderr);
    }
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---------------------------------------------------------------- histogram */
/* Log-linear latency histogram in nanoseconds: exact below 128 ns, then 64
 * sub-buckets per power of two (about 1.5% resolution). */

#define HIST_SUB_BITS 6
#define HIST_SUB (1 << HIST_SUB_BITS)
#define HIST_BUCKETS (2 * HIST_SUB + 57 * HIST_SUB)

static uint64_t hist[HIST_BUCKETS];
static uint64_t hist_count;

static inline int hist_index(uint64_t v)
{
    if (v < 2 * HIST_SUB)
        return (int)v;
    int e = 63 - __builtin_clzll(v);
    int shift = e - HIST_SUB_BITS;
    return 2 * HIST_SUB + (e - HIST_SUB_BITS - 1) * HIST_SUB + (int)((v >> shift) & (HIST_SUB - 1));
}

static double hist_value(int idx)
{
    if (idx < 2 * HIST_SUB)
        return (double)idx;
    int k = idx - 2 * HIST_SUB;
    int e = k / HIST_SUB + HIST_SUB_BITS + 1;
    uint64_t sub = (uint64_t)(k % HIST_SUB);
    uint64_t low = (1ull << e) | (sub << (e - HIST_SUB_BITS));
    uint64_t width = 1ull << (e - HIST_SUB_BITS);
    return (double)low + (double)width / 2.0;
}

static inline void hist_add(uint64_t v)
{
    hist[hist_index(v)]++;
    hist_count++;
}

static void hist_reset(void)
{
    memset(hist, 0, sizeof hist);
    hist_count = 0;
}

/* Percentile p in [0,1], returned in microseconds. */
static double hist_percentile_us(double p)
{
    if (hist_count == 0)
        return 0.0;
    uint64_t target = (uint64_t)(p * (double)hist_count + 0.999999);
    if (target < 1)
        target = 1;
    uint64_t seen = 0;
    for (int i = 0; i < HIST_BUCKETS; i++) {
        seen += hist[i];
        if (seen >= target)
            return hist_value(i) / 1000.0;
    }
    return hist_value(HIST_BUCKETS - 1) / 1000.0;
}

/* ------------------------------------------------------------------ content */

static void pattern_init(void)
{
    size_t len = (size_t)opt.size + PATTERN_PRIME;
    pattern = malloc(len);
    if (!pattern)
        die(1, "out of memory for the %zu-byte pattern", len);
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < len; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        pattern[i] = (uint8_t)(x >> 24);
    }
}

/* Offset of message `seq` of connection `conn` in the pattern. Consecutive
 * messages differ by a constant non-zero step modulo a prime, so any window
 * of fewer than PATTERN_PRIME messages on one connection is all distinct. */
static inline uint32_t msg_offset(uint32_t conn, uint64_t seq)
{
    return (uint32_t)((seq * 2654435761ull + (uint64_t)conn * 40503ull + 17ull) % PATTERN_PRIME);
}

static inline const uint8_t *msg_ptr(uint32_t conn, uint64_t seq)
{
    return pattern + msg_offset(conn, seq);
}

static void report_mismatch(uint32_t conn, uint64_t seq, uint32_t msg_off, const uint8_t *got,
                            const uint8_t *exp, size_t n)
{
    size_t i = 0;
    while (i < n && got[i] == exp[i])
        i++;
    /* Try to say which message the bytes actually belong to (misordering). */
    int have = 0;
    long found = 0;
    for (long d = -64; d <= 64 && !have; d++) {
        if (d == 0 || (int64_t)seq + d < 0)
            continue;
        const uint8_t *alt = msg_ptr(conn, (uint64_t)((int64_t)seq + d)) + msg_off;
        if (memcmp(alt, got, n) == 0) {
            have = 1;
            found = d;
        }
    }
    fflush(stdout);
    fprintf(stderr,
            "loadgen: error: echoed data mismatch on connection %u, message %" PRIu64
            " (%u bytes each), byte offset %zu of the message: expected 0x%02x, got 0x%02x\n",
            conn, seq, opt.size, (size_t)msg_off + i, exp[i], got[i]);
    if (have)
        fprintf(stderr, "loadgen: error: the received bytes match message %" PRId64
                        " instead (reordered, duplicated or lost data)\n",
                (int64_t)seq + found);
    exit(EXIT_MISMATCH);
}

/* ------------------------------------------------------------------ sockets */

static void raise_nofile(int need)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return;
    rlim_t want = (rlim_t)need + 64;
    if (rl.rlim_cur >= want)
        return;
    rl.rlim_cur = want <= rl.rlim_max ? want : rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    if (rl.rlim_cur < want)
        fprintf(stderr, "loadgen: warning: RLIMIT_NOFILE hard limit %llu is below the %llu needed\n",
                (unsigned long long)rl.rlim_max, (unsigned long long)want);
}

static void set_nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static void set_nonblocking(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        die(1, "fcntl(O_NONBLOCK): %s", strerror(errno));
}

/* Blocking connect with a timeout; returns a connected blocking socket. */
static int connect_blocking(int index)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die(1, "socket() for connection %d: %s (raise RLIMIT_NOFILE?)", index, strerror(errno));
    struct timeval tv;
    tv.tv_sec = (time_t)opt.connect_timeout;
    tv.tv_usec = (suseconds_t)((opt.connect_timeout - (double)tv.tv_sec) * 1e6);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    for (;;) {
        if (connect(fd, (struct sockaddr *)&server_addr, sizeof server_addr) == 0)
            break;
        if (errno == EINTR)
            continue;
        if (errno == EINPROGRESS || errno == EAGAIN)
            die(EXIT_STALL, "connection %d to %s:%d timed out after %.1f s", index, opt.host, opt.port,
                opt.connect_timeout);
        die(errno == ECONNREFUSED ? EXIT_CLOSED : 1, "connect() for connection %d to %s:%d: %s", index,
            opt.host, opt.port, strerror(errno));
    }
    set_nodelay(fd);
    return fd;
}

/* ---------------------------------------------------------------------- tls */
/* --tls: a non-blocking OpenSSL client on the same sockets. The server's
 * certificate is only verified with --cafile: this is a load tool talking to
 * a server on loopback that the runner started with a certificate it made
 * itself, and verification changes only the load generator's own CPU time.
 * Every connection gets a fresh SSL from a context without a session cache
 * or tickets, so every handshake is a full one.
 *
 * tls_read/tls_write/tls_connect return the bytes moved (> 0; 1 for a
 * finished handshake), TLS_WANT_READ or TLS_WANT_WRITE (the socket would
 * block: wait for its next event), or TLS_DEAD (closed or failed; tls_why
 * says how). Sockets are registered for EPOLLIN and EPOLLOUT edge-triggered,
 * so whichever of the two OpenSSL waits for raises the next event. */

enum { TLS_WANT_READ = -1, TLS_WANT_WRITE = -2, TLS_DEAD = -3 };
static char tls_why[256];

#ifdef LOADGEN_TLS
static SSL_CTX *tls_ctx;

static void tls_init(void)
{
    tls_ctx = SSL_CTX_new(TLS_client_method());
    if (!tls_ctx)
        die(1, "SSL_CTX_new failed: %s", ERR_error_string(ERR_get_error(), NULL));
    SSL_CTX_set_min_proto_version(tls_ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(tls_ctx, SSL_OP_NO_TICKET);
    SSL_CTX_set_session_cache_mode(tls_ctx, SSL_SESS_CACHE_OFF);
    /* A write may return after some records (like a short send), and a retry
     * after WANT_WRITE may pass a different pointer to the same bytes. */
    SSL_CTX_set_mode(tls_ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    if (opt.cafile) {
        if (SSL_CTX_load_verify_locations(tls_ctx, opt.cafile, NULL) != 1)
            die(EXIT_USAGE, "--cafile %s: %s", opt.cafile, ERR_error_string(ERR_get_error(), NULL));
        SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_PEER, NULL);
        X509_VERIFY_PARAM_set1_ip_asc(SSL_CTX_get0_param(tls_ctx), opt.host);
    } else {
        SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_NONE, NULL);
    }
}

static SSL *tls_new(int fd)
{
    SSL *ssl = SSL_new(tls_ctx);
    if (!ssl || SSL_set_fd(ssl, fd) != 1)
        die(1, "SSL_new/SSL_set_fd failed: %s", ERR_error_string(ERR_get_error(), NULL));
    SSL_set_connect_state(ssl);
    return ssl;
}

static int tls_result(SSL *ssl, int rc)
{
    if (rc > 0)
        return rc;
    int err = SSL_get_error(ssl, rc);
    switch (err) {
    case SSL_ERROR_WANT_READ:
        return TLS_WANT_READ;
    case SSL_ERROR_WANT_WRITE:
        return TLS_WANT_WRITE;
    case SSL_ERROR_ZERO_RETURN:
        snprintf(tls_why, sizeof tls_why, "the server sent close_notify");
        break;
    default:
        if (err == SSL_ERROR_SYSCALL && ERR_peek_error() == 0) /* no OpenSSL reason queued */
            snprintf(tls_why, sizeof tls_why, "%s", errno ? strerror(errno) : "connection closed");
        else
            ERR_error_string_n(ERR_get_error(), tls_why, sizeof tls_why);
        break;
    }
    ERR_clear_error();
    return TLS_DEAD;
}

static int tls_connect(SSL *ssl)
{
    errno = 0;
    return tls_result(ssl, SSL_connect(ssl));
}

static int tls_read(SSL *ssl, void *buf, size_t len)
{
    errno = 0;
    return tls_result(ssl, SSL_read(ssl, buf, (int)len));
}

static int tls_write(SSL *ssl, const void *buf, size_t len)
{
    errno = 0;
    return tls_result(ssl, SSL_write(ssl, buf, (int)len));
}

/* Send close_notify (without waiting for the server's) and free. */
static void tls_close(SSL *ssl)
{
    SSL_shutdown(ssl);
    ERR_clear_error();
    SSL_free(ssl);
}
#else /* built without OpenSSL: main() refuses --tls, so only tls_init runs */
typedef struct ssl_st SSL;

static void tls_init(void)
{
    die(EXIT_USAGE, "--tls: this load generator was built without TLS support; rebuild it with "
                    "-DLOADGEN_TLS ... -lssl -lcrypto (needs the OpenSSL headers, e.g. libssl-dev)");
}

static SSL *tls_new(int fd)
{
    (void)fd;
    return NULL;
}

static int tls_connect(SSL *ssl)
{
    (void)ssl;
    return TLS_DEAD;
}

static int tls_read(SSL *ssl, void *buf, size_t len)
{
    (void)ssl, (void)buf, (void)len;
    return TLS_DEAD;
}

static int tls_write(SSL *ssl, const void *buf, size_t len)
{
    (void)ssl, (void)buf, (void)len;
    return TLS_DEAD;
}

static void tls_close(SSL *ssl)
{
    (void)ssl;
}
#endif

/* ---------------------------------------------------------- echo/ping-pong */

typedef struct {
    int fd;
    uint32_t id;
    uint64_t issued;     /* messages put in the window so far */
    uint64_t sent;       /* messages completely written */
    uint64_t recvd;      /* messages completely echoed */
    uint32_t send_off;   /* bytes of message `sent` already written */
    uint32_t recv_off;   /* bytes of message `recvd` already received */
    uint64_t bytes_out;
    uint64_t bytes_in;
    uint64_t *t_issue;   /* issue time per window slot (depth entries) */
    SSL *ssl;            /* --tls, else NULL */
    int read_wants_write; /* --tls: SSL_read waits for EPOLLOUT */
} conn_t;

static struct {
    int measuring;
    int stopping;
    uint64_t requests;     /* completed in the measured window */
    uint64_t completed;    /* completed overall */
    uint64_t issued_total; /* issued overall, bounded by max_requests */
    uint64_t last_progress;
} st;

static void conn_closed_early(conn_t *c, const char *how, int err)
{
    die(EXIT_CLOSED,
        "connection %u %s after %" PRIu64 " echoed messages (%" PRIu64 " bytes sent, %" PRIu64
        " received)%s%s",
        c->id, how, c->recvd, c->bytes_out, c->bytes_in, err ? ": " : "", err ? strerror(err) : "");
}

/* Fatal TLS error on connection c, in step `op` (the reason is in tls_why). */
static void conn_tls_dead(conn_t *c, const char *op)
{
    char how[320];
    snprintf(how, sizeof how, "failed on TLS %s (%s)", op, tls_why);
    conn_closed_early(c, how, 0);
}

static inline void conn_issue(conn_t *c, uint64_t now)
{
    c->t_issue[c->issued % (uint64_t)opt.depth] = now;
    c->issued++;
    st.issued_total++;
}

/* Account for w more bytes written: advance sent/send_off message by message. */
static void conn_wrote(conn_t *c, uint64_t w)
{
    c->bytes_out += w;
    while (w > 0) {
        uint32_t rem = opt.size - c->send_off;
        if (w >= rem) {
            w -= rem;
            c->sent++;
            c->send_off = 0;
        } else {
            c->send_off += (uint32_t)w;
            w = 0;
        }
    }
}

/* TLS: one SSL_write per message (its unsent rest); after WANT_WRITE the
 * next event retries the same write. */
static void conn_flush_tls(conn_t *c)
{
    while (c->sent < c->issued) {
        int w = tls_write(c->ssl, msg_ptr(c->id, c->sent) + c->send_off, opt.size - c->send_off);
        if (w == TLS_WANT_WRITE || w == TLS_WANT_READ)
            return;
        if (w == TLS_DEAD)
            conn_tls_dead(c, "write");
        conn_wrote(c, (uint64_t)w);
    }
}

static void conn_flush(conn_t *c)
{
    if (c->ssl) {
        conn_flush_tls(c);
        return;
    }
    while (c->sent < c->issued) {
        struct iovec iov[MAX_IOV];
        int n = 0;
        uint64_t s = c->sent;
        uint32_t off = c->send_off;
        while (s < c->issued && n < MAX_IOV) {
            iov[n].iov_base = (void *)(msg_ptr(c->id, s) + off);
            iov[n].iov_len = opt.size - off;
            n++;
            s++;
            off = 0;
        }
        ssize_t w = writev(c->fd, iov, n);
        if (w < 0) {
            if (errno == EAGAIN)
                return; /* EPOLLOUT (edge-triggered) tells us when to go on */
            if (errno == EINTR)
                continue;
            conn_closed_early(c, "failed on write", errno);
        }
        conn_wrote(c, (uint64_t)w);
    }
}

static void conn_consume(conn_t *c, const uint8_t *buf, size_t n)
{
    c->bytes_in += n;
    if (c->bytes_in > c->bytes_out) {
        fflush(stdout);
        fprintf(stderr,
                "loadgen: error: connection %u received %" PRIu64 " bytes but only %" PRIu64
                " were sent (server sent extra data)\n",
                c->id, c->bytes_in, c->bytes_out);
        exit(EXIT_MISMATCH);
    }
    while (n > 0) {
        uint32_t need = opt.size - c->recv_off;
        uint32_t take = n < need ? (uint32_t)n : need;
        const uint8_t *exp = msg_ptr(c->id, c->recvd) + c->recv_off;
        if (memcmp(buf, exp, take) != 0)
            report_mismatch(c->id, c->recvd, c->recv_off, buf, exp, take);
        buf += take;
        n -= take;
        c->recv_off += take;
        if (c->recv_off == opt.size) {
            uint64_t t = now_ns();
            if (st.measuring) {
                hist_add(t - c->t_issue[c->recvd % (uint64_t)opt.depth]);
                st.requests++;
            }
            st.completed++;
            st.last_progress = t;
            c->recvd++;
            c->recv_off = 0;
            if (!st.stopping && st.issued_total < opt.max_requests)
                conn_issue(c, t);
        }
    }
}

/* TLS: SSL_read returns at most one record, so read until OpenSSL says the
 * socket is drained (WANT_READ); the next EPOLLIN edge brings more. */
static void conn_readable_tls(conn_t *c)
{
    c->read_wants_write = 0;
    for (;;) {
        int r = tls_read(c->ssl, scratch, sizeof scratch);
        if (r > 0) {
            conn_consume(c, scratch, (size_t)r);
            continue;
        }
        if (r == TLS_WANT_READ)
            break;
        if (r == TLS_WANT_WRITE) {
            c->read_wants_write = 1;
            break;
        }
        conn_tls_dead(c, "read");
    }
    conn_flush(c);
}

static void conn_readable(conn_t *c, uint32_t events)
{
    if (c->ssl) {
        conn_readable_tls(c);
        return;
    }
    for (;;) {
        ssize_t r = read(c->fd, scratch, sizeof scratch);
        if (r > 0) {
            conn_consume(c, scratch, (size_t)r);
            /* A short read drained the socket; with edge triggering any later
             * data (or a FIN, flagged as EPOLLRDHUP) raises a new event. */
            if ((size_t)r < sizeof scratch && !(events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
                break;
            continue;
        }
        if (r == 0)
            conn_closed_early(c, "was closed by the server", 0);
        if (errno == EAGAIN)
            break;
        if (errno == EINTR)
            continue;
        conn_closed_early(c, "failed on read", errno);
    }
    conn_flush(c);
}

static void print_result(const char *mode, uint64_t requests, double seconds, uint64_t bytes,
                         const char *extra)
{
    double rate = seconds > 0 ? (double)requests / seconds : 0.0;
    printf("{\"mode\":\"%s\",\"requests\":%" PRIu64 ",\"seconds\":%.6f,\"rps\":%.1f,"
           "\"p50_us\":%.2f,\"p99_us\":%.2f,\"bytes\":%" PRIu64 ",\"conns\":%d,\"size\":%u,"
           "\"pipeline\":%d,\"tls\":%d%s}\n",
           mode, requests, seconds, rate, hist_percentile_us(0.50), hist_percentile_us(0.99), bytes,
           opt.conns, opt.size, opt.depth, opt.tls, extra ? extra : "");
    fflush(stdout);
}

static int epoll_timeout_ms(uint64_t now, uint64_t deadline)
{
    if (opt.busy_poll || deadline <= now)
        return 0;
    uint64_t ms = (deadline - now + 999999ull) / 1000000ull;
    return ms > 100 ? 100 : (int)ms;
}

/* The run's clock: warm-up ends at warm_end, the measured window runs from
   m_start to end. */
typedef struct {
    uint64_t t0, warm_end, end, m_start;
} window_t;

/* Start the clock (and the measured window at once when there is no warm-up). */
static window_t window_begin(void)
{
    window_t w;
    w.t0 = now_ns();
    w.warm_end = w.t0 + (uint64_t)(opt.warmup * 1e9);
    w.end = w.warm_end + (uint64_t)(opt.duration * 1e9);
    w.m_start = w.t0;
    st.last_progress = w.t0;
    if (opt.warmup <= 0) {
        st.measuring = 1;
        marker("start");
    }
    return w;
}

/* Switch to the measured window after warm-up, and say when the run is over
   (window ended, request cap reached). */
static int window_tick(window_t *w, uint64_t now)
{
    if (!st.measuring && now >= w->warm_end) {
        st.measuring = 1;
        st.requests = 0;
        hist_reset();
        w->m_start = now;
        marker("start");
    }
    if (st.measuring && now >= w->end)
        return 1;
    return st.completed >= opt.max_requests;
}

static void check_stall(uint64_t now)
{
    if ((double)(now - st.last_progress) / 1e9 > opt.stall_timeout)
        die(EXIT_STALL, "no echo completed for %.1f s (server stalled or lost data)", opt.stall_timeout);
}

/* Per-connection check: the oldest message still in flight on any connection
 * must not be older than the stall timeout (catches one lost echo among many
 * healthy connections). */
static void check_conns_stall(void *items, uint64_t now)
{
    conn_t *conns = items;
    uint64_t limit = (uint64_t)(opt.stall_timeout * 1e9);
    for (int i = 0; i < opt.conns; i++) {
        conn_t *c = &conns[i];
        if (c->recvd < c->issued && now - c->t_issue[c->recvd % (uint64_t)opt.depth] > limit)
            die(EXIT_STALL,
                "connection %u: message %" PRIu64 " not fully echoed within %.1f s (%u of %u bytes "
                "received; server lost or withheld data)",
                c->id, c->recvd, opt.stall_timeout, c->recv_off, opt.size);
    }
}

/* What the shared run loop needs from a mode (ping-pong or connect rate):
   its epoll fd, its array of connections or slots, what to do with an event
   and how to find one that stalled. */
typedef struct {
    int ep;
    void *items;
    void (*on_event)(void *ptr, uint32_t events);
    void (*scan_stalls)(void *items, uint64_t now);
} run_mode_t;

/* Wait up to timeout_ms and hand every event to the mode. */
static void poll_events(const run_mode_t *m, struct epoll_event *events, int timeout_ms)
{
    int n = epoll_wait(m->ep, events, MAX_EVENTS, timeout_ms);
    if (n < 0) {
        if (errno == EINTR)
            return;
        die(1, "epoll_wait: %s", strerror(errno));
    }
    for (int i = 0; i < n; i++)
        m->on_event(events[i].data.ptr, events[i].events);
}

/* Run warm-up and the measured window (#start/#stop markers), then drain:
   issue nothing new and wait until everything in flight was echoed and
   verified, so no sent byte goes unchecked.  Returns the measured seconds
   and requests through the pointers. */
static void run_loop(const run_mode_t *m, window_t *w, double *seconds, uint64_t *reqs)
{
    struct epoll_event events[MAX_EVENTS];
    uint64_t now;
    uint64_t last_scan = w->t0;
    for (;;) {
        now = now_ns();
        if (window_tick(w, now))
            break;
        check_stall(now);
        if (now - last_scan > 100000000ull) {
            m->scan_stalls(m->items, now);
            last_scan = now;
        }
        poll_events(m, events, epoll_timeout_ms(now, st.measuring ? w->end : w->warm_end));
    }
    now = now_ns();
    st.stopping = 1;
    marker("stop");
    *seconds = st.measuring ? (double)(now - w->m_start) / 1e9 : 0.0;
    *reqs = st.measuring ? st.requests : 0;
    int measuring = st.measuring;
    st.measuring = 0;
    while (st.completed < st.issued_total) {
        m->scan_stalls(m->items, now_ns());
        poll_events(m, events, 100);
    }
    st.measuring = measuring;
}

static void conn_event(void *ptr, uint32_t e)
{
    conn_t *c = ptr;
    if (e & EPOLLOUT)
        conn_flush(c);
    if ((e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) || (c->read_wants_write && (e & EPOLLOUT)))
        conn_readable(c, e);
}

/* One step of connection c's TLS handshake: 1 once it is done, 0 while it
 * waits for the socket. */
static int conn_handshake(conn_t *c)
{
    int r = tls_connect(c->ssl);
    if (r == TLS_WANT_READ || r == TLS_WANT_WRITE)
        return 0;
    if (r == TLS_DEAD)
        conn_tls_dead(c, "handshake");
    return 1;
}

/* --tls: handshake every connection, all at once, before the clock starts. */
static void conn_handshake_all(int ep, conn_t *conns)
{
    int pending = 0;
    char *done = calloc((size_t)opt.conns, 1);
    if (!done)
        die(1, "out of memory");
    for (int i = 0; i < opt.conns; i++) {
        conns[i].ssl = tls_new(conns[i].fd);
        done[i] = (char)conn_handshake(&conns[i]);
        pending += !done[i];
    }
    uint64_t deadline = now_ns() + (uint64_t)(opt.connect_timeout * 1e9);
    struct epoll_event events[MAX_EVENTS];
    while (pending > 0) {
        if (now_ns() > deadline)
            die(EXIT_STALL, "%d of %d TLS handshakes not done within %.1f s", pending, opt.conns,
                opt.connect_timeout);
        int n = epoll_wait(ep, events, MAX_EVENTS, 100);
        if (n < 0 && errno != EINTR)
            die(1, "epoll_wait: %s", strerror(errno));
        for (int i = 0; i < n; i++) {
            conn_t *c = events[i].data.ptr;
            if (!done[c->id] && conn_handshake(c)) {
                done[c->id] = 1;
                pending--;
            }
        }
    }
    free(done);
}

static void run_echo(void)
{
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die(1, "epoll_create1: %s", strerror(errno));
    conn_t *conns = calloc((size_t)opt.conns, sizeof *conns);
    uint64_t *times = calloc((size_t)opt.conns * (size_t)opt.depth, sizeof *times);
    if (!conns || !times)
        die(1, "out of memory for %d connections", opt.conns);
    for (int i = 0; i < opt.conns; i++) {
        conn_t *c = &conns[i];
        c->fd = connect_blocking(i);
        c->id = (uint32_t)i;
        c->t_issue = times + (size_t)i * (size_t)opt.depth;
        set_nonblocking(c->fd);
        struct epoll_event ev;
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
        ev.data.ptr = c;
        if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0)
            die(1, "epoll_ctl: %s", strerror(errno));
    }
    if (opt.tls)
        conn_handshake_all(ep, conns);

    window_t w = window_begin();
    for (int i = 0; i < opt.conns; i++) {
        for (int d = 0; d < opt.depth && st.issued_total < opt.max_requests; d++)
            conn_issue(&conns[i], w.t0);
        conn_flush(&conns[i]);
    }
    run_mode_t mode = {ep, conns, conn_event, check_conns_stall};
    double seconds;
    uint64_t reqs;
    run_loop(&mode, &w, &seconds, &reqs);
    print_result(opt.depth > 1 ? "pipeline" : "pingpong", reqs, seconds, reqs * (uint64_t)opt.size, NULL);
    for (int i = 0; i < opt.conns; i++) {
        if (conns[i].ssl)
            tls_close(conns[i].ssl);
        close(conns[i].fd);
    }
    close(ep);
    free(times);
    free(conns);
}

/* ------------------------------------------------------------- connect rate */

enum { SLOT_IDLE, SLOT_CONNECTING, SLOT_HANDSHAKING, SLOT_ECHOING };
static const char *const slot_state_names[] = {"idle", "connect", "TLS handshake", "echo"};

typedef struct {
    int fd;
    SSL *ssl; /* --tls, else NULL */
    int state;
    uint32_t id;
    uint64_t seq;
    uint64_t t0;
    uint32_t send_off;
    uint32_t recv_off;
} slot_t;

static int cr_ep;

static void slot_start(slot_t *s)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die(1, "socket(): %s", strerror(errno));
    set_nodelay(fd);
    s->fd = fd;
    s->t0 = now_ns();
    s->send_off = 0;
    s->recv_off = 0;
    s->state = SLOT_CONNECTING;
    st.issued_total++;
    if (connect(fd, (struct sockaddr *)&server_addr, sizeof server_addr) < 0 && errno != EINPROGRESS) {
        if (errno == EADDRNOTAVAIL)
            die(1, "connect(): %s - out of local ports (TIME_WAIT); set net.ipv4.tcp_tw_reuse=1 or "
                   "shorten --duration", strerror(errno));
        die(errno == ECONNREFUSED ? EXIT_CLOSED : 1, "connect() to %s:%d: %s", opt.host, opt.port,
            strerror(errno));
    }
    struct epoll_event ev;
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.ptr = s;
    if (epoll_ctl(cr_ep, EPOLL_CTL_ADD, fd, &ev) < 0)
        die(1, "epoll_ctl: %s", strerror(errno));
}

static void slot_fail(slot_t *s, const char *what, int err)
{
    die(EXIT_CLOSED, "connect-rate connection (slot %u, cycle %" PRIu64 ") %s%s%s", s->id, s->seq, what,
        err ? ": " : "", err ? strerror(err) : "");
}

static void slot_tls_dead(slot_t *s, const char *op)
{
    char how[320];
    snprintf(how, sizeof how, "failed on TLS %s (%s)", op, tls_why);
    slot_fail(s, how, 0);
}

static void slot_send(slot_t *s)
{
    while (s->send_off < opt.size) {
        const uint8_t *m = msg_ptr(s->id, s->seq) + s->send_off;
        if (s->ssl) {
            int w = tls_write(s->ssl, m, opt.size - s->send_off);
            if (w == TLS_WANT_WRITE || w == TLS_WANT_READ)
                return;
            if (w == TLS_DEAD)
                slot_tls_dead(s, "write");
            s->send_off += (uint32_t)w;
            continue;
        }
        ssize_t w = send(s->fd, m, opt.size - s->send_off, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN)
                return;
            if (errno == EINTR)
                continue;
            slot_fail(s, "failed on send", errno);
        }
        s->send_off += (uint32_t)w;
    }
}

/* Read what the socket has into scratch: the byte count, or 0 when it
 * would block; a close or an error before the echo completed is fatal. */
static size_t slot_recv(slot_t *s)
{
    for (;;) {
        if (s->ssl) {
            int r = tls_read(s->ssl, scratch, sizeof scratch);
            if (r > 0)
                return (size_t)r;
            if (r == TLS_WANT_READ || r == TLS_WANT_WRITE)
                return 0;
            slot_tls_dead(s, "read");
        }
        ssize_t r = read(s->fd, scratch, sizeof scratch);
        if (r > 0)
            return (size_t)r;
        if (r == 0)
            slot_fail(s, "was closed by the server before the echo completed", 0);
        if (errno == EAGAIN)
            return 0;
        if (errno != EINTR)
            slot_fail(s, "failed on read", errno);
    }
}

static void slot_event(void *ptr, uint32_t e)
{
    slot_t *s = ptr;
    if (s->state == SLOT_CONNECTING) {
        if (!(e & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
            return;
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            if (err == EADDRNOTAVAIL)
                die(1, "connect(): out of local ports (TIME_WAIT); set net.ipv4.tcp_tw_reuse=1");
            slot_fail(s, "failed to connect", err);
        }
        if (!opt.tls) {
            s->state = SLOT_ECHOING;
            slot_send(s);
            return; /* the echo arrives as a later EPOLLIN edge */
        }
        s->ssl = tls_new(s->fd);
        s->state = SLOT_HANDSHAKING;
    }
    if (s->state == SLOT_HANDSHAKING) {
        int r = tls_connect(s->ssl);
        if (r == TLS_WANT_READ || r == TLS_WANT_WRITE)
            return; /* retried on the socket's next event */
        if (r == TLS_DEAD)
            slot_tls_dead(s, "handshake");
        s->state = SLOT_ECHOING;
        slot_send(s);
        return;
    }
    if (e & EPOLLOUT)
        slot_send(s);
    /* With TLS, any event may be the one a read waiting on WANT_WRITE needs. */
    if (!(e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) && !s->ssl)
        return;
    for (;;) {
        size_t r = slot_recv(s);
        if (r == 0)
            return;
        if ((uint32_t)r + s->recv_off > s->send_off) {
            fflush(stdout);
            fprintf(stderr, "loadgen: error: connect-rate slot %u received more bytes than it sent\n", s->id);
            exit(EXIT_MISMATCH);
        }
        const uint8_t *exp = msg_ptr(s->id, s->seq) + s->recv_off;
        if (memcmp(scratch, exp, r) != 0)
            report_mismatch(s->id, s->seq, s->recv_off, scratch, exp, r);
        s->recv_off += (uint32_t)r;
        if (s->recv_off == opt.size)
            break;
    }
    /* Full echo: count it, close, and start the next cycle. */
    uint64_t t = now_ns();
    if (st.measuring) {
        hist_add(t - s->t0);
        st.requests++;
    }
    st.completed++;
    st.last_progress = t;
    if (s->ssl) {
        tls_close(s->ssl);
        s->ssl = NULL;
    }
    close(s->fd);
    s->fd = -1;
    s->state = SLOT_IDLE;
    s->seq++;
    if (!st.stopping && st.issued_total < opt.max_requests)
        slot_start(s);
}

static void check_slots_stall(void *items, uint64_t now)
{
    slot_t *slots = items;
    uint64_t limit = (uint64_t)(opt.stall_timeout * 1e9);
    for (int i = 0; i < opt.conns; i++) {
        slot_t *s = &slots[i];
        if (s->state != SLOT_IDLE && now - s->t0 > limit)
            die(EXIT_STALL, "connect-rate slot %u, cycle %" PRIu64 ": %s not done within %.1f s (%u of %u bytes echoed)",
                s->id, s->seq, slot_state_names[s->state], opt.stall_timeout,
                s->recv_off, opt.size);
    }
}

static void run_connect_rate(void)
{
    cr_ep = epoll_create1(EPOLL_CLOEXEC);
    if (cr_ep < 0)
        die(1, "epoll_create1: %s", strerror(errno));
    slot_t *slots = calloc((size_t)opt.conns, sizeof *slots);
    if (!slots)
        die(1, "out of memory");
    window_t w = window_begin();
    for (int i = 0; i < opt.conns; i++) {
        slots[i].id = (uint32_t)i;
        slots[i].fd = -1;
        slot_start(&slots[i]);
    }
    run_mode_t mode = {cr_ep, slots, slot_event, check_slots_stall};
    double seconds;
    uint64_t reqs;
    run_loop(&mode, &w, &seconds, &reqs);
    char extra[96];
    snprintf(extra, sizeof extra, ",\"connections\":%" PRIu64 ",\"cps\":%.1f", reqs,
             seconds > 0 ? (double)reqs / seconds : 0.0);
    print_result("connect", reqs, seconds, reqs * (uint64_t)opt.size, extra);
    for (int i = 0; i < opt.conns; i++) {
        if (slots[i].ssl)
            tls_close(slots[i].ssl);
        if (slots[i].fd >= 0)
            close(slots[i].fd);
    }
    close(cr_ep);
    free(slots);
}

/* --------------------------------------------------------------- idle conns */

static void run_idle(void)
{
    int *fds = calloc((size_t)opt.conns, sizeof *fds);
    if (!fds)
        die(1, "out of memory");
    uint64_t t0 = now_ns();
    for (int i = 0; i < opt.conns; i++)
        fds[i] = connect_blocking(i);
    /* One echo per connection proves the server accepted and serviced it. */
    for (int i = 0; i < opt.conns; i++) {
        const uint8_t *m = msg_ptr((uint32_t)i, 0);
        uint32_t off = 0;
        while (off < opt.size) {
            ssize_t w = send(fds[i], m + off, opt.size - off, MSG_NOSIGNAL);
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                die(EXIT_CLOSED, "idle connection %d failed on send: %s", i, strerror(errno));
            }
            off += (uint32_t)w;
        }
    }
    for (int i = 0; i < opt.conns; i++) {
        const uint8_t *m = msg_ptr((uint32_t)i, 0);
        uint32_t off = 0;
        while (off < opt.size) {
            size_t want = opt.size - off < SCRATCH_SIZE ? opt.size - off : SCRATCH_SIZE;
            ssize_t r = recv(fds[i], scratch, want, 0);
            if (r > 0) {
                if (memcmp(scratch, m + off, (size_t)r) != 0)
                    report_mismatch((uint32_t)i, 0, off, scratch, m + off, (size_t)r);
                off += (uint32_t)r;
                continue;
            }
            if (r == 0)
                die(EXIT_CLOSED, "idle connection %d was closed by the server before its echo", i);
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                die(EXIT_STALL, "idle connection %d: no echo within %.1f s", i, opt.connect_timeout);
            die(EXIT_CLOSED, "idle connection %d failed on recv: %s", i, strerror(errno));
        }
    }
    double setup = (double)(now_ns() - t0) / 1e9;
    marker("ready");
    /* Hold the connections until stdin reaches EOF (or has data) or the
     * duration passes, whichever comes first. */
    struct pollfd p;
    p.fd = 0;
    p.events = POLLIN;
    uint64_t end = now_ns() + (uint64_t)(opt.duration * 1e9);
    for (;;) {
        uint64_t now = now_ns();
        if (now >= end)
            break;
        int ms = (int)((end - now) / 1000000ull) + 1;
        int rc = poll(&p, 1, ms);
        if (rc > 0 || (rc < 0 && errno != EINTR))
            break;
    }
    char extra[96];
    snprintf(extra, sizeof extra, ",\"connections\":%d,\"setup_seconds\":%.3f", opt.conns, setup);
    print_result("idle", (uint64_t)opt.conns, setup, (uint64_t)opt.conns * opt.size, extra);
    for (int i = 0; i < opt.conns; i++)
        close(fds[i]);
    free(fds);
}

/* --------------------------------------------------------------------- main */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: loadgen --port P [--host 127.0.0.1] [--conns N] [--size BYTES]\n"
            "               [--duration SECONDS] [--warmup SECONDS] [--pipeline DEPTH]\n"
            "               [--connect-rate | --idle] [--markers] [--max-requests N]\n"
            "               [--stall-timeout SECONDS] [--connect-timeout SECONDS] [--busy-poll]\n"
            "               [--tls [--cafile PEM]]\n"
            "Prints one JSON line: requests, seconds, rps, p50_us, p99_us, bytes.\n");
}

static double parse_double(const char *name, const char *s, double lo, double hi)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || end == s || v < lo || v > hi) {
        fprintf(stderr, "loadgen: error: --%s must be a number in [%g, %g], got '%s'\n", name, lo, hi, s);
        exit(EXIT_USAGE);
    }
    return v;
}

static long long parse_int(const char *name, const char *s, long long lo, long long hi)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi) {
        fprintf(stderr, "loadgen: error: --%s must be an integer in [%lld, %lld], got '%s'\n", name, lo, hi, s);
        exit(EXIT_USAGE);
    }
    return v;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"host", required_argument, 0, 'h'},
        {"port", required_argument, 0, 'p'},
        {"conns", required_argument, 0, 'c'},
        {"size", required_argument, 0, 's'},
        {"duration", required_argument, 0, 'd'},
        {"pipeline", required_argument, 0, 'P'},
        {"warmup", required_argument, 0, 'w'},
        {"connect-rate", no_argument, 0, 'C'},
        {"idle", no_argument, 0, 'I'},
        {"markers", no_argument, 0, 'm'},
        {"max-requests", required_argument, 0, 'n'},
        {"stall-timeout", required_argument, 0, 'S'},
        {"connect-timeout", required_argument, 0, 'T'},
        {"busy-poll", no_argument, 0, 'B'},
        {"tls", no_argument, 0, 't'},
        {"cafile", required_argument, 0, 'A'},
        {"help", no_argument, 0, 'H'},
        {0, 0, 0, 0},
    };
    int ch;
    while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (ch) {
        case 'h': opt.host = optarg; break;
        case 'p': opt.port = (int)parse_int("port", optarg, 1, 65535); break;
        case 'c': opt.conns = (int)parse_int("conns", optarg, 1, MAX_CONNS); break;
        case 's': opt.size = (uint32_t)parse_int("size", optarg, 1, MAX_SIZE); break;
        case 'd': opt.duration = parse_double("duration", optarg, 0.001, MAX_DURATION); break;
        case 'P': opt.depth = (int)parse_int("pipeline", optarg, 1, MAX_DEPTH); break;
        case 'w': opt.warmup = parse_double("warmup", optarg, 0, MAX_DURATION); break;
        case 'C': opt.connect_rate = 1; break;
        case 'I': opt.idle = 1; break;
        case 'm': opt.markers = 1; break;
        case 'B': opt.busy_poll = 1; break;
        case 't': opt.tls = 1; break;
        case 'A': opt.cafile = optarg; break;
        case 'n': opt.max_requests = (uint64_t)parse_int("max-requests", optarg, 1, (long long)4e18); break;
        case 'S': opt.stall_timeout = parse_double("stall-timeout", optarg, 0.1, MAX_DURATION); break;
        case 'T': opt.connect_timeout = parse_double("connect-timeout", optarg, 0.1, 600); break;
        case 'H': usage(stdout); return 0;
        default: usage(stderr); return EXIT_USAGE;
        }
    }
    if (optind != argc || opt.port == 0) {
        usage(stderr);
        return EXIT_USAGE;
    }
    if (opt.connect_rate && opt.idle)
        die(EXIT_USAGE, "--connect-rate and --idle are exclusive");
    if (opt.tls && opt.idle)
        die(EXIT_USAGE, "--tls works with the echo and --connect-rate modes, not --idle");
    if (opt.cafile && !opt.tls)
        die(EXIT_USAGE, "--cafile needs --tls");
    memset(&server_addr, 0, sizeof server_addr);
    server_addr.sin_family = AF_INET;
    server_addr.sin_port = htons((uint16_t)opt.port);
    if (inet_pton(AF_INET, opt.host, &server_addr.sin_addr) != 1)
        die(EXIT_USAGE, "--host must be an IPv4 address, got '%s'", opt.host);
    if ((ntohl(server_addr.sin_addr.s_addr) >> 24) != 127)
        die(EXIT_USAGE, "--host must be a loopback address (127.x.x.x), got '%s'", opt.host);
    if (opt.connect_rate && opt.size > 65536)
        die(EXIT_USAGE, "--connect-rate uses one small message: --size must be <= 65536");

    signal(SIGPIPE, SIG_IGN);
    raise_nofile(opt.conns + 16);
    pattern_init();
    if (opt.tls)
        tls_init();
    if (opt.connect_rate)
        run_connect_rate();
    else if (opt.idle)
        run_idle();
    else
        run_echo();
    return 0;
}
