/* epoll.c: the Linux backend: registration, the accept burst and the
 * poll-and-read call over epoll.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1     /* accept4 */
#endif

#include "pulse.h"
#include "epoll.h"

#include <errno.h>
#include <stdint.h>
#include <string.h>       /* memset */
#include <unistd.h>       /* close */
#include <sys/socket.h>
#include <sys/epoll.h>

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
   poller for reads (edge- or level-triggered).  Each peer's address goes to
   its slot of addrs, its length to addrlens.  A socket that cannot be
   registered is closed and counted in drops ({count, last errno}, both set on
   every return).  Returns the number accepted, or -errno when the first
   accept failed with something other than EAGAIN. */
int pulse_accept_batch(int lfd, int pollfd, int nodelay, int edge, int *out, int max,
                       char *addrs, int *addrlens, int *drops) {
    int n = 0;
    drops[0] = drops[1] = 0;
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
        if (nodelay) { pulse_set_nodelay(fd); }
        if (pulse_epoll_ctl(pollfd, EPOLL_CTL_ADD, fd, events, 0) < 0) {
            /* Not watched, it would never be read: close it, but say so
               (drops), or the peer's connection vanishes without a trace. */
            pulse_drop_accepted(fd, drops);
            continue;
        }
        pulse_keep_addr(addrs, addrlens, n, &ss, len);
        out[n++] = fd;
    }
    return n;
}

/* Read the carried sockets (pulse_read_carried in pulse.h), wait for events,
   then read every readable socket into the arena.  Returns the number of
   records in out, or -errno. */
int pulse_poll_read(int epfd, struct epoll_event *events, int maxevents,
                    int timeout_ms, const int *carry, int ncarry,
                    char *arena, unsigned int arena_size, unsigned int read_size,
                    int max_reads, const unsigned char *direct, int ndirect,
                    int *out, int maxrecs) {
    struct pulse_reads r = {
        .arena = arena, .arena_size = arena_size, .pos = 0, .read_size = read_size,
        .max_reads = max_reads, .direct = direct, .ndirect = ndirect, .out = out, .n = 0,
    };
    maxevents = pulse_read_carried(&r, carry, ncarry, maxrecs, maxevents);
    if (maxevents <= 0) { return r.n; }
    int ready = epoll_wait(epfd, events, maxevents, ncarry ? 0 : timeout_ms);
    if (ready < 0) { return errno == EINTR ? r.n : -errno; }
    for (int i = 0; i < ready; i++) {
        int cap = maxrecs - 2 * (ready - 1 - i);  /* the later events' slots stay free */
        uint64_t data = events[i].data.u64;
        uint32_t ev = events[i].events;
        int fd = (int)(uint32_t)data;
        if (data & SPECIAL_BIT) { pulse_emit(&r, fd, PULSE_SPECIAL, 0, (int)ev); continue; }
        if (ev & EPOLLOUT) { pulse_emit(&r, fd, PULSE_WRITABLE, 0, 0); }
        if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
            int hup = (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0;
            pulse_read_socket(&r, fd, hup, cap);
            if ((ev & EPOLLERR) && !(ev & EPOLLIN) && r.n < cap) {
                int err = 0;
                socklen_t len = sizeof(err);
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) { pulse_emit(&r, fd, PULSE_ERROR, 0, -err); }
            }
        }
    }
    return r.n;
}
