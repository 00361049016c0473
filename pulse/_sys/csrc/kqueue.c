/* kqueue.c: the macOS/BSD backend: registration, the waker's trigger, the
 * accept burst and the poll-and-read call over kqueue.
 */
#include "pulse.h"
#include "kqueue.h"

#include <errno.h>
#include <stddef.h>       /* NULL */
#include <stdint.h>
#include <fcntl.h>
#include <unistd.h>       /* close */
#include <sys/types.h>
#include <sys/socket.h>
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

/* accept() has no flags argument here: set what accept4 sets on Linux, and
   SO_NOSIGPIPE where the system has it (macOS has no MSG_NOSIGNAL). */
static void set_nosigpipe_nonblock(int fd) {
#ifdef SO_NOSIGPIPE
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof(one));
#endif
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    fcntl(fd, F_SETFD, FD_CLOEXEC);
}

/* As the epoll backend's: accept up to max connections, set TCP_NODELAY and
   register each one for reads (EV_CLEAR: edge-triggered), keeping each peer's
   address and length in addrs/addrlens and counting in drops ({count, last
   errno}) the sockets closed because registering them failed.  Returns the
   number accepted, or -errno when the first accept failed with something
   other than EAGAIN. */
int pulse_accept_batch(int lfd, int kq, int nodelay, int edge, int *out, int max,
                       char *addrs, int *addrlens, int *drops) {
    int n = 0;
    drops[0] = drops[1] = 0;
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
        if (nodelay) { pulse_set_nodelay(fd); }
        if (pulse_kq_ctl(kq, fd, EVFILT_READ, EV_ADD | (edge ? EV_CLEAR : 0), 0) < 0) {
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
int pulse_poll_read(int kq, struct kevent *events, int maxevents,
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
    struct timespec ts, *tsp = NULL;
    if (ncarry) { timeout_ms = 0; }
    if (timeout_ms >= 0) {
        ts.tv_sec = timeout_ms / 1000;
        ts.tv_nsec = (long)(timeout_ms % 1000) * 1000000L;
        tsp = &ts;
    }
    int ready = kevent(kq, NULL, 0, events, maxevents, tsp);
    if (ready < 0) { return errno == EINTR ? r.n : -errno; }
    for (int i = 0; i < ready; i++) {
        int cap = maxrecs - 2 * (ready - 1 - i);  /* the later events' slots stay free */
        struct kevent *e = &events[i];
        int fd = (int)e->ident;
        if (e->udata) { pulse_emit(&r, fd, PULSE_SPECIAL, 0, e->filter); continue; }
        if (e->filter == EVFILT_WRITE) { pulse_emit(&r, fd, PULSE_WRITABLE, 0, 0); continue; }
        if (e->filter == EVFILT_READ) {
            int hup = (e->flags & EV_EOF) != 0;
            /* With EV_EOF, fflags holds the socket error, but read_socket (hup)
               reads on until recv reports that same error, or EOF, itself; a
               second record here would follow EOF (turning a clean close into
               an error) or fail a socket whose data is still being carried. */
            pulse_read_socket(&r, fd, hup, cap);
        }
    }
    return r.n;
}
