/* pulse.h: what the C helpers of pulse's compiled module share.
 *
 * The module (pulse._sys._pulse_ffi, built by build_ffi.py) exposes the raw
 * syscalls the low-level layer wraps and a few C helpers that batch work.
 * The batching is the point: on CPython every cffi call costs about as much
 * as a syscall (it drops and re-takes the GIL), so the reactor makes one call
 * that polls *and* reads every ready socket into the read arena, one call that
 * accepts a burst of connections and registers them, and one call that sends
 * every write queued during a loop iteration.
 *
 * Records handed back to Python are flat int32 quadruples
 * (fd, flags, offset, length) so Python can read them through a memoryview
 * without touching cffi per field.
 *
 * This header declares the interface common.cdef describes to cffi (and
 * includes the system headers of what that cdef names), the record flags, and
 * the helpers the backends (epoll.c, kqueue.c) share with common.c.
 */
#ifndef PULSE_H
#define PULSE_H

#include <errno.h>        /* the E* constants of common.cdef */
#include <stddef.h>       /* size_t */
#include <stdint.h>       /* uint32_t */
#include <unistd.h>       /* close */
#include <sys/types.h>    /* ssize_t */
#include <sys/socket.h>   /* socklen_t, struct sockaddr_storage, SOL_SOCKET, SHUT_* */
#include <sys/uio.h>      /* struct iovec, writev */
#include <netinet/in.h>   /* IPPROTO_TCP */
#include <netinet/tcp.h>  /* TCP_NODELAY */
#include <sys/un.h>       /* struct sockaddr_un: the size of an address slot */
#include <net/if.h>       /* if_indextoname, IF_NAMESIZE */

/* Record flags: the same table as pulse/_sys/flags.py (the Python side checks
   that they agree when it loads the module). */
#define PULSE_READ      1   /* offset/length name bytes read into the arena */
#define PULSE_EOF       2   /* the peer closed its write side */
#define PULSE_ERROR     4   /* length is -errno of a failed read or SO_ERROR */
#define PULSE_WRITABLE  8   /* the socket accepts writes again */
#define PULSE_MORE     16   /* the read cap was reached: more data may wait */
#define PULSE_SPECIAL  32   /* listener or waker: not read, length = raw events */
#define PULSE_UNREAD   64   /* the arena was full: the socket was not read */
#define PULSE_HUP     128   /* the kernel reported hang-up */
#define PULSE_READY   256   /* readable, left for the caller to read (direct[fd] set) */

/* Each read into the arena starts on a multiple of this (the arena's base is
   aligned by ReadArena): the kernel copies into an unaligned destination at
   about half the speed. */
#define PULSE_READ_ALIGN 64

/* accept_batch keeps each peer's raw sockaddr, and its length, so that
   remote_address works even after the peer is gone.  A slot holds the largest
   address we format: a sockaddr_un (110 bytes on Linux), whose abstract names
   are as long as the kernel's length says, NULs included; a sockaddr_in6
   (28) fits too. */
#define PULSE_ADDR_SIZE ((int)sizeof(struct sockaddr_un))
_Static_assert(sizeof(struct sockaddr_un) >= sizeof(struct sockaddr_in6),
               "an address slot must hold a sockaddr_in6");

/* The module's interface shared by every backend (common.c, except
   pulse_accept_batch, which each backend defines around its own accept and
   registration calls). */
int pulse_errno(void);
int pulse_accept_batch(int lfd, int pollfd, int nodelay, int edge, int *out, int max,
                       char *addrs, int *addrlens, int *drops);
int pulse_send_batch(const int *items, int n, const char *arena, int *results);
ssize_t pulse_send(int fd, const char *buf, size_t len);
/* CRC32c (Castagnoli) of data: the PROXY protocol v2 checksum. */
uint32_t pulse_crc32c(const unsigned char *data, size_t len);
ssize_t pulse_writev(int fd, const struct iovec *iov, int iovcnt);
int pulse_sockaddr(int fd, int peer, char *host, int hostlen, int *port, int *used);

/* Helpers the C files share that are not part of the interface: hidden, so
   that they stay out of the module's symbol table and calls between the
   files are direct calls within the shared object. */
#if defined(__GNUC__)
#define PULSE_INTERNAL __attribute__((visibility("hidden")))
#else
#define PULSE_INTERNAL
#endif

/* The state of one pulse_poll_read call: where the next bytes go in the
   arena and where the next record goes in out. */
struct pulse_reads {
    char *arena;
    unsigned int arena_size;
    unsigned int pos;             /* first free byte of the arena */
    unsigned int read_size;       /* bytes asked of one recv */
    int max_reads;                /* recv calls per socket and call */
    const unsigned char *direct;  /* direct[fd] set: the caller reads fd itself */
    int ndirect;                  /* entries of direct */
    int *out;                     /* the records */
    int n;                        /* records written so far */
};

static inline void pulse_emit(struct pulse_reads *r, int fd, int flags, int off, int len) {
    int *rec = r->out + 4 * r->n;
    rec[0] = fd; rec[1] = flags; rec[2] = off; rec[3] = len;
    r->n++;
}

/* Read one socket into the arena (common.c), leaving r->n <= maxrecs. */
PULSE_INTERNAL void pulse_read_socket(struct pulse_reads *r, int fd, int hup, int maxrecs);

/* Copy a peer's address into slot n of accept_batch's addrs, its length
   (capped at the slot) into addrlens[n]. */
PULSE_INTERNAL void pulse_keep_addr(char *addrs, int *addrlens, int n,
                                    const struct sockaddr_storage *ss, socklen_t len);

/* An accepted socket accept_batch had to close because registering it with
   the poller failed: counted in drops[0], its errno kept in drops[1] (the
   last one wins), so that Python can report what C could only close. */
static inline void pulse_drop_accepted(int fd, int *drops) {
    drops[0]++;
    drops[1] = errno;
    close(fd);
}

/* TCP_NODELAY on an accepted socket; fails harmlessly on Unix sockets. */
PULSE_INTERNAL void pulse_set_nodelay(int fd);

/* The opening every backend's pulse_poll_read shares: read the sockets that
   the previous call carried over, then return how many events this call may
   take (<= 0: none, return at once).  carry lists sockets left with unread
   data by the previous call (edge-triggered mode): they are read first,
   without waiting for an edge that already fired.
   Records never pass maxrecs: each carried socket still to come keeps one
   slot for its UNREAD (a carried socket without a record is dropped from the
   carry and, in edge mode, never read again), each event taken keeps two
   (WRITABLE and a read), and no more events are taken than fit; the rest stay
   queued in the kernel for the next call. */
static inline int pulse_read_carried(struct pulse_reads *r, const int *carry, int ncarry,
                                     int maxrecs, int maxevents) {
    for (int i = 0; i < ncarry; i++) {
        /* ~fd: the kernel already reported the hang-up of this socket. */
        int fd = carry[i] < 0 ? ~carry[i] : carry[i];
        pulse_read_socket(r, fd, carry[i] < 0, maxrecs - (ncarry - 1 - i));
    }
    if ((maxrecs - r->n) / 2 < maxevents) { maxevents = (maxrecs - r->n) / 2; }
    return maxevents;
}

#endif /* PULSE_H */
