/* common.c: the socket calls and helpers every backend shares: reading a
 * socket into the arena, the send batch, send/writev without SIGPIPE, and
 * formatting a socket's address.  Declared in pulse.h and common.cdef.
 */
#include "pulse.h"

#include <errno.h>
#include <stddef.h>       /* offsetof */
#include <stdio.h>        /* snprintf */
#include <string.h>       /* memcpy, memset, strlen, strnlen */
#include <sys/types.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>       /* struct sockaddr_un */
#include <netinet/in.h>   /* struct sockaddr_in, sockaddr_in6, IPPROTO_TCP */
#include <netinet/tcp.h>  /* TCP_NODELAY */
#include <arpa/inet.h>    /* inet_ntop, ntohs */
#include <net/if.h>       /* if_indextoname */

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0  /* macOS: SO_NOSIGPIPE is set on every socket instead */
#endif

int pulse_errno(void) { return errno; }

void pulse_keep_addr(char *addrs, int *addrlens, int n, const struct sockaddr_storage *ss,
                     socklen_t len) {
    /* Python slices each slot to its length: an abstract Unix name ends
       where the kernel's length says, not at a NUL. */
    socklen_t keep = len < (socklen_t)PULSE_ADDR_SIZE ? len : (socklen_t)PULSE_ADDR_SIZE;
    memcpy(addrs + (size_t)n * PULSE_ADDR_SIZE, ss, keep);
    addrlens[n] = (int)keep;
}

void pulse_set_nodelay(int fd) {
    int one = 1;
    /* Fails harmlessly (EOPNOTSUPP) on Unix sockets. */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* Read one socket into the arena: up to max_reads chunks of read_size bytes.
   A short read says the kernel buffer is empty, which ends the drain and saves
   the EAGAIN round trip, unless the kernel also reported a hang-up: then we
   read on until recv returns 0 so that data sent with FIN is never stranded
   behind an edge that will not fire again. */
void pulse_read_socket(struct pulse_reads *r, int fd, int hup, int maxrecs) {
    int reads = 0;
    /* MORE and UNREAD send the socket round again as a carry; HUP goes with
       them so that the next call still reads on to the FIN. */
    int again_flags = hup ? PULSE_HUP : 0;
    /* The caller reads this socket itself, straight into the object it hands
       on: for large messages that saves a copy out of a cold arena. */
    if (fd >= 0 && fd < r->ndirect && r->direct[fd]) {
        pulse_emit(r, fd, PULSE_READY | again_flags, 0, 0);
        return;
    }
    for (;;) {
        unsigned int room = r->arena_size - r->pos;
        if (r->n >= maxrecs - 1 || (room < 4096 && room < r->read_size)) {
            pulse_emit(r, fd, PULSE_UNREAD | again_flags, 0, 0);
            return;
        }
        unsigned int want = r->read_size < room ? r->read_size : room;
        ssize_t got = recv(fd, r->arena + r->pos, want, 0);
        if (got > 0) {
            pulse_emit(r, fd, PULSE_READ, (int)r->pos, (int)got);
            /* The next read starts on a boundary (records never assume that
               one socket's reads are contiguous). */
            r->pos += ((unsigned int)got + PULSE_READ_ALIGN - 1) & ~(unsigned int)(PULSE_READ_ALIGN - 1);
            if (r->pos > r->arena_size) { r->pos = r->arena_size; }
            reads++;
            if ((size_t)got < want && !hup) { return; }
            if (reads >= r->max_reads) {
                r->out[4 * (r->n - 1) + 1] |= PULSE_MORE | again_flags;
                return;
            }
            continue;
        }
        if (got == 0) { pulse_emit(r, fd, PULSE_EOF, 0, 0); return; }
        if (errno == EINTR) { continue; }
        if (errno == EAGAIN || errno == EWOULDBLOCK) { return; }
        pulse_emit(r, fd, PULSE_ERROR, 0, -errno);
        return;
    }
}

/* Send every queued write of one loop iteration.  items holds (fd, offset,
   length) triples, offset a position in the write arena (large writes do not
   come here: the loop sends them at once).  Once a socket refuses bytes, later
   items for the same fd are skipped so that the caller can queue them in
   order.  results[i] is the number of bytes sent or -errno.  Returns how many
   items were not sent completely. */
int pulse_send_batch(const int *items, int n, const char *arena, int *results) {
    int blocked[64];
    int nblocked = 0, incomplete = 0;
    for (int i = 0; i < n; i++) {
        int fd = items[3 * i], off = items[3 * i + 1], len = items[3 * i + 2];
        int skip = 0;
        for (int b = 0; b < nblocked; b++) { if (blocked[b] == fd) { skip = 1; break; } }
        if (skip) { results[i] = 0; incomplete++; continue; }
        const char *base = arena + off;
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

uint32_t pulse_crc32c(const unsigned char *data, size_t len) {
    /* Four bits at a time through a 16-entry constant table (reflected
       Castagnoli polynomial 0x82F63B78; nothing to build or share between
       threads): a 4 KiB PROXY v2 header from any peer costs ~22 us to check,
       not the ~0.6 ms of the Python loop. */
    static const uint32_t nibble[16] = {
        0x00000000u, 0x105ec76fu, 0x20bd8edeu, 0x30e349b1u,
        0x417b1dbcu, 0x5125dad3u, 0x61c69362u, 0x7198540du,
        0x82f63b78u, 0x92a8fc17u, 0xa24bb5a6u, 0xb21572c9u,
        0xc38d26c4u, 0xd3d3e1abu, 0xe330a81au, 0xf36e6f75u,
    };
    uint32_t crc = 0xFFFFFFFFu;
    for (size_t i = 0; i < len; i++) {
        crc ^= data[i];
        crc = (crc >> 4) ^ nibble[crc & 0xFu];
        crc = (crc >> 4) ^ nibble[crc & 0xFu];
    }
    return crc ^ 0xFFFFFFFFu;
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

/* Format the local (peer == 0) or remote address of a socket into host
   (NUL-terminated, *used bytes before the NUL) and *port.  Returns the address
   family, or -errno.  The forms are those of pulse/_sys/raw_sockaddr.py, which
   formats the addresses accept_batch keeps:
   - IPv6 with a non-zero scope id: "fe80::1%lo" (RFC 4007's text form, the
     interface's name, or its number when it has none), which getaddrinfo and
     connect take back; without it a link-local address names no interface;
   - AF_UNIX: the path up to its NUL, or on Linux an abstract name: its
     leading NUL and every byte the kernel's length counts (NULs included),
     as Python's socket module reports it; "" for an unnamed socket. */
int pulse_sockaddr(int fd, int peer, char *host, int hostlen, int *port, int *used) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    memset(&ss, 0, sizeof(ss));
    int rc = peer ? getpeername(fd, (struct sockaddr *)&ss, &len)
                  : getsockname(fd, (struct sockaddr *)&ss, &len);
    if (rc < 0) { return -errno; }
    if (len > sizeof(ss)) { len = sizeof(ss); }  /* the kernel says how much it had */
    host[0] = 0;
    *port = 0;
    *used = 0;
    if (ss.ss_family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        if (inet_ntop(AF_INET, &a->sin_addr, host, (socklen_t)hostlen) == NULL) { host[0] = 0; }
        *port = ntohs(a->sin_port);
        *used = (int)strlen(host);
    } else if (ss.ss_family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        if (inet_ntop(AF_INET6, &a->sin6_addr, host, (socklen_t)hostlen) == NULL) { host[0] = 0; }
        *port = ntohs(a->sin6_port);
        size_t end = strlen(host);
        if (a->sin6_scope_id != 0 && end + 1 < (size_t)hostlen) {
            char name[IF_NAMESIZE];
            if (if_indextoname(a->sin6_scope_id, name) != NULL) {
                snprintf(host + end, (size_t)hostlen - end, "%%%s", name);
            } else {
                snprintf(host + end, (size_t)hostlen - end, "%%%u", (unsigned)a->sin6_scope_id);
            }
        }
        *used = (int)strlen(host);
    } else if (ss.ss_family == AF_UNIX) {
        struct sockaddr_un *a = (struct sockaddr_un *)&ss;
        size_t plen = len > offsetof(struct sockaddr_un, sun_path)
                          ? len - offsetof(struct sockaddr_un, sun_path) : 0;
        if (plen > sizeof(a->sun_path)) { plen = sizeof(a->sun_path); }
#if defined(__linux__)
        int abstract = plen > 0 && a->sun_path[0] == 0;
#else
        int abstract = 0;  /* no abstract namespace: a leading NUL is an unnamed socket */
#endif
        if (!abstract) { plen = strnlen(a->sun_path, plen); }
        if (plen >= (size_t)hostlen) { plen = (size_t)hostlen - 1; }
        memcpy(host, a->sun_path, plen);
        host[plen] = 0;
        *used = (int)plen;
    }
    return ss.ss_family;
}
