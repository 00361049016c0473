/*
 * c_epoll_echo.c - the C reference echo server for the pulse benchmarks.
 *
 * Single-threaded, edge-triggered epoll, non-blocking sockets. Each readable
 * connection is drained to EAGAIN; data is written straight back, and only
 * what the socket does not take is buffered, with EPOLLOUT armed until that
 * buffer is flushed. Reading pauses while more than HIGH_WATER bytes are
 * buffered for a connection (backpressure). bench/run.py compiles it with
 * `cc -O2` at run time. Usage: c_epoll_echo --port P [--host 127.0.0.1]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define READ_SIZE (64 * 1024)
#define HIGH_WATER (1024 * 1024)
#define MAX_EVENTS 512
#define BACKLOG 4096

typedef struct {
    int fd;
    int want_out; /* EPOLLOUT currently armed */
    int paused;   /* stopped reading because of HIGH_WATER */
    char *buf;    /* unsent bytes are buf[off, len) */
    size_t off, len, cap;
} conn_t;

static int ep;
static char rbuf[READ_SIZE];

static void conn_close(conn_t *c)
{
    close(c->fd); /* also removes it from the epoll set */
    free(c->buf);
    free(c);
}

static int conn_arm(conn_t *c, int want_out)
{
    if (c->want_out == want_out)
        return 0;
    struct epoll_event ev;
    ev.events = EPOLLIN | EPOLLRDHUP | EPOLLET | (want_out ? EPOLLOUT : 0);
    ev.data.ptr = c;
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) < 0)
        return -1;
    c->want_out = want_out;
    return 0;
}

static int conn_buffer(conn_t *c, const char *data, size_t n)
{
    if (c->off > 0 && c->off == c->len)
        c->off = c->len = 0;
    if (c->len + n > c->cap) {
        if (c->off > 0) {
            memmove(c->buf, c->buf + c->off, c->len - c->off);
            c->len -= c->off;
            c->off = 0;
        }
        if (c->len + n > c->cap) {
            size_t cap = c->cap ? c->cap : 4096;
            while (cap < c->len + n)
                cap *= 2;
            char *nb = realloc(c->buf, cap);
            if (!nb)
                return -1;
            c->buf = nb;
            c->cap = cap;
        }
    }
    memcpy(c->buf + c->len, data, n);
    c->len += n;
    return 0;
}

/* Write directly if nothing is pending; buffer what the socket refuses.
 * Returns -1 if the connection failed (caller closes it). */
static int conn_send(conn_t *c, const char *data, size_t n)
{
    if (c->len == c->off) {
        while (n > 0) {
            ssize_t w = write(c->fd, data, n);
            if (w > 0) {
                data += w;
                n -= (size_t)w;
                continue;
            }
            if (w < 0 && errno == EINTR)
                continue;
            if (w < 0 && errno == EAGAIN)
                break;
            return -1;
        }
        if (n == 0)
            return 0;
    }
    if (conn_buffer(c, data, n) < 0)
        return -1;
    return conn_arm(c, 1);
}

/* Returns -1 if the connection failed, 0 otherwise. */
static int conn_flush(conn_t *c)
{
    while (c->off < c->len) {
        ssize_t w = write(c->fd, c->buf + c->off, c->len - c->off);
        if (w > 0) {
            c->off += (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno == EAGAIN)
            return 0;
        return -1;
    }
    c->off = c->len = 0;
    return conn_arm(c, 0);
}

/* Drain the socket to EAGAIN, echoing as we go. Returns -1 when the
 * connection should be closed (EOF or error). */
static int conn_read(conn_t *c)
{
    for (;;) {
        if (c->len - c->off > HIGH_WATER) {
            c->paused = 1;
            return 0;
        }
        ssize_t r = read(c->fd, rbuf, sizeof rbuf);
        if (r > 0) {
            if (conn_send(c, rbuf, (size_t)r) < 0)
                return -1;
            continue;
        }
        if (r == 0) {
            conn_flush(c); /* best effort for what is still buffered */
            return -1;
        }
        if (errno == EAGAIN)
            return 0;
        if (errno == EINTR)
            continue;
        return -1;
    }
}

static void accept_all(int lfd)
{
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno != EAGAIN)
                perror("accept4");
            return;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        conn_t *c = calloc(1, sizeof *c);
        if (!c) {
            close(fd);
            continue;
        }
        c->fd = fd;
        struct epoll_event ev;
        ev.events = EPOLLIN | EPOLLRDHUP | EPOLLET;
        ev.data.ptr = c;
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
            perror("epoll_ctl");
            conn_close(c);
        }
    }
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1";
    int port = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--port") && i + 1 < argc)
            port = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--host") && i + 1 < argc)
            host = argv[++i];
        else {
            fprintf(stderr, "usage: %s --port P [--host 127.0.0.1]\n", argv[0]);
            return 2;
        }
    }
    if (port <= 0 || port > 65535) {
        fprintf(stderr, "usage: %s --port P [--host 127.0.0.1]\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "bad --host %s\n", host);
        return 2;
    }
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, BACKLOG) < 0) {
        perror("bind/listen");
        return 1;
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev;
    lev.events = EPOLLIN | EPOLLET;
    lev.data.ptr = NULL; /* NULL marks the listening socket */
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);

    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(ep, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            conn_t *c = events[i].data.ptr;
            uint32_t e = events[i].events;
            if (c == NULL) {
                accept_all(lfd);
                continue;
            }
            if (e & EPOLLERR) {
                conn_close(c);
                continue;
            }
            if (e & EPOLLOUT) {
                if (conn_flush(c) < 0) {
                    conn_close(c);
                    continue;
                }
                if (c->paused && c->off == c->len) {
                    c->paused = 0;
                    e |= EPOLLIN; /* resume the drain we stopped at HIGH_WATER */
                }
            }
            if (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP)) {
                if (c->paused)
                    continue;
                if (conn_read(c) < 0)
                    conn_close(c);
            }
        }
    }
}
