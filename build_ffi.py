"""cffi builder for pulse's compiled module ``pulse._sys._pulse_ffi``.

API mode, out of line: ``pip install .`` compiles this into a C extension
(setuptools' ``cffi_modules``).  It exposes the raw syscalls the low-level
layer wraps (epoll or kqueue, accept4, recv, send, writev, ...) and a few small
C helpers that batch work.  The batching is the point: on CPython every cffi
call costs about as much as a syscall (it drops and re-takes the GIL), so the
reactor makes one call that polls *and* reads every ready socket into the read
arena, one call that accepts a burst of connections and registers them, and
one call that sends every write queued during a loop iteration.

Records handed back to Python are flat ``int32`` quadruples
``(fd, flags, offset, length)`` so Python can read them through a memoryview
without touching cffi per field.
"""

import sys

from cffi import FFI

ffibuilder = FFI()

IS_LINUX = sys.platform.startswith("linux")

# Declarations shared by every platform: sockets, iovecs, the batch helpers.
COMMON_CDEF = """
struct iovec { void *iov_base; size_t iov_len; ...; };
typedef unsigned int socklen_t;

#define EAGAIN ...
#define EWOULDBLOCK ...
#define EINTR ...
#define EMFILE ...
#define ENFILE ...
#define ENOBUFS ...
#define ENOMEM ...
#define ECONNABORTED ...
#define SHUT_RD ...
#define SHUT_WR ...
#define SHUT_RDWR ...
#define SOL_SOCKET ...
#define SO_ERROR ...
#define SO_KEEPALIVE ...
#define SO_RCVBUF ...
#define SO_SNDBUF ...
#define IPPROTO_TCP ...
#define TCP_NODELAY ...
#define MSG_PEEK ...

ssize_t recv(int fd, void *buf, size_t len, int flags);
ssize_t send(int fd, const void *buf, size_t len, int flags);
ssize_t writev(int fd, const struct iovec *iov, int iovcnt);
int close(int fd);
int shutdown(int fd, int how);
int setsockopt(int fd, int level, int name, const void *value, socklen_t len);
int getsockopt(int fd, int level, int name, void *value, socklen_t *len);

/* Record flags, see pulse/_sys/__init__.py for their meaning. */
#define PULSE_READ ...
#define PULSE_EOF ...
#define PULSE_ERROR ...
#define PULSE_WRITABLE ...
#define PULSE_MORE ...
#define PULSE_SPECIAL ...
#define PULSE_UNREAD ...
#define PULSE_HUP ...
#define PULSE_READY ...

int pulse_errno(void);
int pulse_accept_batch(int lfd, int pollfd, int nodelay, int edge, int *out, int max,
                       char *addrs);
#define PULSE_ADDR_SIZE ...
int pulse_send_batch(const int *items, int n, const char *arena,
                     char **pointers, int *results);
ssize_t pulse_send(int fd, const char *buf, size_t len);
ssize_t pulse_writev(int fd, const struct iovec *iov, int iovcnt);
int pulse_sockaddr(int fd, int peer, char *host, int hostlen, int *port);
"""

COMMON_SOURCE = r"""
#include <errno.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0  /* macOS: SO_NOSIGPIPE is set on every socket instead */
#endif

#define PULSE_READ      1   /* offset/length name bytes read into the arena */
#define PULSE_EOF       2   /* the peer closed its write side */
#define PULSE_ERROR     4   /* length is -errno of a failed read or SO_ERROR */
#define PULSE_WRITABLE  8   /* the socket accepts writes again */
#define PULSE_MORE     16   /* the read cap was reached: more data may wait */
#define PULSE_SPECIAL  32   /* listener or waker: not read, length = raw events */
#define PULSE_UNREAD   64   /* the arena was full: the socket was not read */
#define PULSE_HUP     128   /* the kernel reported hang-up */
#define PULSE_READY   256   /* readable, left for the caller to read (direct[fd] set) */

/* accept_batch keeps each peer's raw sockaddr (sockaddr_in6 is the largest
   we format) so that remote_address works even after the peer is gone. */
#define PULSE_ADDR_SIZE 28

static void keep_addr(char *addrs, int n, const struct sockaddr_storage *ss, socklen_t len) {
    char *slot = addrs + (size_t)n * PULSE_ADDR_SIZE;
    memset(slot, 0, PULSE_ADDR_SIZE);
    memcpy(slot, ss, len < PULSE_ADDR_SIZE ? len : PULSE_ADDR_SIZE);
}

int pulse_errno(void) { return errno; }

static int emit(int *out, int n, int fd, int flags, int off, int len) {
    int *r = out + 4 * n;
    r[0] = fd; r[1] = flags; r[2] = off; r[3] = len;
    return n + 1;
}

/* Read one socket into the arena: up to max_reads chunks of read_size bytes.
   A short read says the kernel buffer is empty, which ends the drain and saves
   the EAGAIN round trip, unless the kernel also reported a hang-up: then we
   read on until recv returns 0 so that data sent with FIN is never stranded
   behind an edge that will not fire again. */
static int read_socket(int fd, int hup, char *arena, unsigned int arena_size,
                       unsigned int *pos, unsigned int read_size, int max_reads,
                       const unsigned char *direct, int ndirect,
                       int *out, int n, int maxrecs) {
    int reads = 0;
    /* MORE and UNREAD send the socket round again as a carry; HUP goes with
       them so that the next call still reads on to the FIN. */
    int again_flags = hup ? PULSE_HUP : 0;
    /* The caller reads this socket itself, straight into the object it hands
       on: for large messages that saves a copy out of a cold arena. */
    if (fd >= 0 && fd < ndirect && direct[fd]) {
        return emit(out, n, fd, PULSE_READY | again_flags, 0, 0);
    }
    for (;;) {
        if (n >= maxrecs - 1) { return emit(out, n, fd, PULSE_UNREAD | again_flags, 0, 0); }
        unsigned int room = arena_size - *pos;
        if (room < 4096 && room < read_size) {
            return emit(out, n, fd, PULSE_UNREAD | again_flags, 0, 0);
        }
        unsigned int want = read_size < room ? read_size : room;
        ssize_t got = recv(fd, arena + *pos, want, 0);
        if (got > 0) {
            n = emit(out, n, fd, PULSE_READ, (int)*pos, (int)got);
            *pos += (unsigned int)got;
            reads++;
            if ((size_t)got < want && !hup) { return n; }
            if (reads >= max_reads) {
                out[4 * (n - 1) + 1] |= PULSE_MORE | again_flags;
                return n;
            }
            continue;
        }
        if (got == 0) { return emit(out, n, fd, PULSE_EOF, 0, 0); }
        if (errno == EINTR) { continue; }
        if (errno == EAGAIN || errno == EWOULDBLOCK) { return n; }
        return emit(out, n, fd, PULSE_ERROR, 0, -errno);
    }
}

static void set_nodelay(int fd) {
    int one = 1;
    /* Fails harmlessly (EOPNOTSUPP) on Unix sockets. */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* Send every queued write of one loop iteration.  items holds (fd, offset,
   length) triples; offset >= 0 is a position in the write arena, offset < 0
   names pointers[-offset - 1] (large writes that were not copied).  Once a
   socket refuses bytes, later items for the same fd are skipped so that the
   caller can queue them in order.  results[i] is the number of bytes sent or
   -errno.  Returns how many items were not sent completely. */
int pulse_send_batch(const int *items, int n, const char *arena,
                     char **pointers, int *results) {
    int blocked[64];
    int nblocked = 0, incomplete = 0;
    for (int i = 0; i < n; i++) {
        int fd = items[3 * i], off = items[3 * i + 1], len = items[3 * i + 2];
        int skip = 0;
        for (int b = 0; b < nblocked; b++) { if (blocked[b] == fd) { skip = 1; break; } }
        if (skip) { results[i] = 0; incomplete++; continue; }
        const char *base = off >= 0 ? arena + off : pointers[-off - 1];
        int done = 0;
        while (done < len) {
            ssize_t sent = send(fd, base + done, (size_t)(len - done), MSG_NOSIGNAL);
            if (sent > 0) { done += (int)sent; continue; }
            if (sent < 0 && errno == EINTR) { continue; }
            if (sent < 0 && errno != EAGAIN && errno != EWOULDBLOCK) { done = -errno; }
            break;
        }
        results[i] = done;
        if (done != len) {
            incomplete++;
            if (nblocked < 64) {
                blocked[nblocked++] = fd;
            } else {
                /* Too many blocked sockets to track: stop here and report the
                   rest as unsent, which keeps the order per connection. */
                for (int j = i + 1; j < n; j++) { results[j] = 0; incomplete++; }
                return incomplete;
            }
        }
    }
    return incomplete;
}

ssize_t pulse_send(int fd, const char *buf, size_t len) {
    ssize_t sent;
    do { sent = send(fd, buf, len, MSG_NOSIGNAL); } while (sent < 0 && errno == EINTR);
    return sent;
}

ssize_t pulse_writev(int fd, const struct iovec *iov, int iovcnt) {
    ssize_t sent;
#if defined(__linux__)
    /* sendmsg carries MSG_NOSIGNAL where writev cannot. */
    struct msghdr msg;
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = (struct iovec *)iov;
    msg.msg_iovlen = (size_t)iovcnt;
    do { sent = sendmsg(fd, &msg, MSG_NOSIGNAL); } while (sent < 0 && errno == EINTR);
#else
    do { sent = writev(fd, iov, iovcnt); } while (sent < 0 && errno == EINTR);
#endif
    return sent;
}

/* Format the local (peer == 0) or remote address of a socket.  Returns the
   address family, 0 with host = path for AF_UNIX, or -errno. */
int pulse_sockaddr(int fd, int peer, char *host, int hostlen, int *port) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    memset(&ss, 0, sizeof(ss));
    int rc = peer ? getpeername(fd, (struct sockaddr *)&ss, &len)
                  : getsockname(fd, (struct sockaddr *)&ss, &len);
    if (rc < 0) { return -errno; }
    host[0] = 0;
    *port = 0;
    if (ss.ss_family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        inet_ntop(AF_INET, &a->sin_addr, host, (socklen_t)hostlen);
        *port = ntohs(a->sin_port);
    } else if (ss.ss_family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        inet_ntop(AF_INET6, &a->sin6_addr, host, (socklen_t)hostlen);
        *port = ntohs(a->sin6_port);
    } else if (ss.ss_family == AF_UNIX) {
        struct sockaddr_un *a = (struct sockaddr_un *)&ss;
        size_t plen = len > offsetof(struct sockaddr_un, sun_path)
                          ? len - offsetof(struct sockaddr_un, sun_path) : 0;
        if (plen >= (size_t)hostlen) { plen = (size_t)hostlen - 1; }
        memcpy(host, a->sun_path, plen);
        host[plen] = 0;
    }
    return ss.ss_family;
}
"""

LINUX_CDEF = """
typedef union epoll_data { void *ptr; int fd; uint32_t u32; uint64_t u64; } epoll_data_t;
struct epoll_event { uint32_t events; epoll_data_t data; ...; };

#define EPOLLIN ...
#define EPOLLOUT ...
#define EPOLLERR ...
#define EPOLLHUP ...
#define EPOLLRDHUP ...
#define EPOLLET ...
#define EPOLLONESHOT ...
#define EPOLL_CTL_ADD ...
#define EPOLL_CTL_MOD ...
#define EPOLL_CTL_DEL ...
#define EPOLL_CLOEXEC ...
#define EFD_NONBLOCK ...
#define EFD_CLOEXEC ...
#define SOCK_NONBLOCK ...
#define SOCK_CLOEXEC ...

int epoll_create1(int flags);
int epoll_ctl(int epfd, int op, int fd, struct epoll_event *event);
int epoll_wait(int epfd, struct epoll_event *events, int maxevents, int timeout);
int accept4(int fd, void *addr, socklen_t *addrlen, int flags);
int eventfd(unsigned int initval, int flags);

int pulse_epoll_ctl(int epfd, int op, int fd, uint32_t events, int special);
int pulse_poll_read(int epfd, struct epoll_event *events, int maxevents,
                    int timeout_ms, const int *carry, int ncarry,
                    char *arena, unsigned int arena_size, unsigned int read_size,
                    int max_reads, const unsigned char *direct, int ndirect,
                    int *out, int maxrecs);
"""

LINUX_SOURCE = COMMON_SOURCE + r"""
#include <stddef.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>

/* Special fds (listener, waker) carry bit 32 in their epoll data so the poll
   helper reports them instead of reading them. */
#define SPECIAL_BIT (1ULL << 32)

int pulse_epoll_ctl(int epfd, int op, int fd, uint32_t events, int special) {
    struct epoll_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.events = events;
    ev.data.u64 = (uint64_t)(uint32_t)fd | (special ? SPECIAL_BIT : 0);
    return epoll_ctl(epfd, op, fd, &ev);
}

/* Accept up to max connections, set TCP_NODELAY and register each one with the
   poller for reads (edge- or level-triggered).  Returns the number accepted, or
   -errno when the first accept failed with something other than EAGAIN. */
int pulse_accept_batch(int lfd, int pollfd, int nodelay, int edge, int *out, int max,
                       char *addrs) {
    int n = 0;
    uint32_t events = EPOLLIN | EPOLLRDHUP | (edge ? EPOLLET : 0);
    while (n < max) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof(ss);
        int fd = accept4(lfd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) { continue; }
            if (errno == EAGAIN || errno == EWOULDBLOCK) { break; }
            return n > 0 ? n : -errno;
        }
        if (nodelay) { set_nodelay(fd); }
        if (pulse_epoll_ctl(pollfd, EPOLL_CTL_ADD, fd, events, 0) < 0) {
            close(fd);
            continue;
        }
        keep_addr(addrs, n, &ss, len);
        out[n++] = fd;
    }
    return n;
}

/* Wait for events, then read every readable socket into the arena.  carry
   lists sockets left with unread data by the previous call (edge-triggered
   mode): they are read first, without waiting for an edge that already
   fired.  Returns the number of records in out, or -errno. */
int pulse_poll_read(int epfd, struct epoll_event *events, int maxevents,
                    int timeout_ms, const int *carry, int ncarry,
                    char *arena, unsigned int arena_size, unsigned int read_size,
                    int max_reads, const unsigned char *direct, int ndirect,
                    int *out, int maxrecs) {
    unsigned int pos = 0;
    int n = 0;
    /* Records never pass maxrecs: each carried socket still to come keeps one
       slot for its UNREAD (a carried socket without a record is dropped from
       the carry and, in edge mode, never read again), each event taken keeps
       two (WRITABLE and a read), and no more events are taken than fit; the
       rest stay queued in the kernel for the next call. */
    for (int i = 0; i < ncarry; i++) {
        /* ~fd: the kernel already reported the hang-up of this socket. */
        int fd = carry[i] < 0 ? ~carry[i] : carry[i];
        n = read_socket(fd, carry[i] < 0, arena, arena_size, &pos, read_size,
                        max_reads, direct, ndirect, out, n, maxrecs - (ncarry - 1 - i));
    }
    if ((maxrecs - n) / 2 < maxevents) { maxevents = (maxrecs - n) / 2; }
    if (maxevents <= 0) { return n; }
    int ready = epoll_wait(epfd, events, maxevents, ncarry ? 0 : timeout_ms);
    if (ready < 0) { return errno == EINTR ? n : -errno; }
    for (int i = 0; i < ready; i++) {
        int cap = maxrecs - 2 * (ready - 1 - i);  /* the later events' slots stay free */
        uint64_t data = events[i].data.u64;
        uint32_t ev = events[i].events;
        int fd = (int)(uint32_t)data;
        if (data & SPECIAL_BIT) { n = emit(out, n, fd, PULSE_SPECIAL, 0, (int)ev); continue; }
        if (ev & EPOLLOUT) { n = emit(out, n, fd, PULSE_WRITABLE, 0, 0); }
        if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
            int hup = (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0;
            n = read_socket(fd, hup, arena, arena_size, &pos, read_size,
                            max_reads, direct, ndirect, out, n, cap);
            if ((ev & EPOLLERR) && !(ev & EPOLLIN) && n < cap) {
                int err = 0;
                socklen_t len = sizeof(err);
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) { n = emit(out, n, fd, PULSE_ERROR, 0, -err); }
            }
        }
    }
    return n;
}
"""

DARWIN_CDEF = """
/* "...": FreeBSD >= 12 appends uint64_t ext[4]; let the compiler lay it out. */
struct kevent { uintptr_t ident; int16_t filter; uint16_t flags; uint32_t fflags;
                intptr_t data; void *udata; ...; };
struct timespec { long tv_sec; long tv_nsec; ...; };

#define EVFILT_READ ...
#define EVFILT_WRITE ...
#define EVFILT_USER ...
#define EV_ADD ...
#define EV_DELETE ...
#define EV_ENABLE ...
#define EV_DISABLE ...
#define EV_CLEAR ...
#define EV_EOF ...
#define EV_ERROR ...
#define NOTE_TRIGGER ...
#define F_SETFL ...
#define F_GETFL ...
#define O_NONBLOCK ...

int kqueue(void);
int kevent(int kq, const struct kevent *changes, int nchanges, struct kevent *events,
           int nevents, const struct timespec *timeout);
int accept(int fd, void *addr, socklen_t *addrlen);
int fcntl(int fd, int cmd, ...);

int pulse_kq_ctl(int kq, int fd, int filter, int flags, int special);
int pulse_kq_trigger(int kq, int ident);
int pulse_poll_read(int kq, struct kevent *events, int maxevents,
                    int timeout_ms, const int *carry, int ncarry,
                    char *arena, unsigned int arena_size, unsigned int read_size,
                    int max_reads, const unsigned char *direct, int ndirect,
                    int *out, int maxrecs);
"""

DARWIN_SOURCE = COMMON_SOURCE + r"""
#include <stddef.h>
#include <stdint.h>
#include <sys/event.h>
#include <sys/time.h>

/* Special idents (listener, waker) carry udata = 1 so the poll helper reports
   them instead of reading them. */
int pulse_kq_ctl(int kq, int fd, int filter, int flags, int special) {
    struct kevent ch;
    EV_SET(&ch, (uintptr_t)fd, (int16_t)filter, (uint16_t)flags, 0, 0,
           (void *)(intptr_t)(special ? 1 : 0));
    int rc;
    do { rc = kevent(kq, &ch, 1, NULL, 0, NULL); } while (rc < 0 && errno == EINTR);
    return rc;
}

int pulse_kq_trigger(int kq, int ident) {
    struct kevent ch;
    EV_SET(&ch, (uintptr_t)ident, EVFILT_USER, 0, NOTE_TRIGGER, 0, (void *)1);
    return kevent(kq, &ch, 1, NULL, 0, NULL);
}

static void set_nosigpipe_nonblock(int fd) {
    int one = 1;
#ifdef SO_NOSIGPIPE
    setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof(one));
#endif
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    fcntl(fd, F_SETFD, FD_CLOEXEC);
}

int pulse_accept_batch(int lfd, int kq, int nodelay, int edge, int *out, int max,
                       char *addrs) {
    int n = 0;
    while (n < max) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof(ss);
        int fd = accept(lfd, (struct sockaddr *)&ss, &len);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) { continue; }
            if (errno == EAGAIN || errno == EWOULDBLOCK) { break; }
            return n > 0 ? n : -errno;
        }
        set_nosigpipe_nonblock(fd);
        if (nodelay) { set_nodelay(fd); }
        if (pulse_kq_ctl(kq, fd, EVFILT_READ, EV_ADD | (edge ? EV_CLEAR : 0), 0) < 0) {
            close(fd);
            continue;
        }
        keep_addr(addrs, n, &ss, len);
        out[n++] = fd;
    }
    return n;
}

int pulse_poll_read(int kq, struct kevent *events, int maxevents,
                    int timeout_ms, const int *carry, int ncarry,
                    char *arena, unsigned int arena_size, unsigned int read_size,
                    int max_reads, const unsigned char *direct, int ndirect,
                    int *out, int maxrecs) {
    unsigned int pos = 0;
    int n = 0;
    /* Records never pass maxrecs: each carried socket still to come keeps one
       slot for its UNREAD (a carried socket without a record is dropped from
       the carry and, in edge mode, never read again), each event taken keeps
       two (WRITABLE and a read), and no more events are taken than fit; the
       rest stay queued in the kernel for the next call. */
    for (int i = 0; i < ncarry; i++) {
        /* ~fd: the kernel already reported the hang-up of this socket. */
        int fd = carry[i] < 0 ? ~carry[i] : carry[i];
        n = read_socket(fd, carry[i] < 0, arena, arena_size, &pos, read_size,
                        max_reads, direct, ndirect, out, n, maxrecs - (ncarry - 1 - i));
    }
    if ((maxrecs - n) / 2 < maxevents) { maxevents = (maxrecs - n) / 2; }
    if (maxevents <= 0) { return n; }
    struct timespec ts, *tsp = NULL;
    if (ncarry) { timeout_ms = 0; }
    if (timeout_ms >= 0) {
        ts.tv_sec = timeout_ms / 1000;
        ts.tv_nsec = (long)(timeout_ms % 1000) * 1000000L;
        tsp = &ts;
    }
    int ready = kevent(kq, NULL, 0, events, maxevents, tsp);
    if (ready < 0) { return errno == EINTR ? n : -errno; }
    for (int i = 0; i < ready; i++) {
        int cap = maxrecs - 2 * (ready - 1 - i);  /* the later events' slots stay free */
        struct kevent *e = &events[i];
        int fd = (int)e->ident;
        if (e->udata) { n = emit(out, n, fd, PULSE_SPECIAL, 0, e->filter); continue; }
        if (e->filter == EVFILT_WRITE) { n = emit(out, n, fd, PULSE_WRITABLE, 0, 0); continue; }
        if (e->filter == EVFILT_READ) {
            int hup = (e->flags & EV_EOF) != 0;
            /* With EV_EOF, fflags holds the socket error, but read_socket (hup)
               reads on until recv reports that same error, or EOF, itself; a
               second record here would follow EOF (turning a clean close into
               an error) or fail a socket whose data is still being carried. */
            n = read_socket(fd, hup, arena, arena_size, &pos, read_size,
                            max_reads, direct, ndirect, out, n, cap);
        }
    }
    return n;
}
"""

if IS_LINUX:
    ffibuilder.cdef(COMMON_CDEF + LINUX_CDEF)
    ffibuilder.set_source("pulse._sys._pulse_ffi", LINUX_SOURCE,
                          extra_compile_args=["-O2", "-std=gnu99"])
else:
    ffibuilder.cdef(COMMON_CDEF + DARWIN_CDEF)
    ffibuilder.set_source("pulse._sys._pulse_ffi", DARWIN_SOURCE,
                          extra_compile_args=["-O2", "-std=gnu99"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
