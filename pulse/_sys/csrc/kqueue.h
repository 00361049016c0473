/* kqueue.h: the kqueue backend's part of the module's interface (kqueue.c,
 * kqueue.cdef), with the system headers of what kqueue.cdef names.
 */
#ifndef PULSE_KQUEUE_H
#define PULSE_KQUEUE_H

#include <stdint.h>       /* uintptr_t, int16_t, ... of struct kevent */
#include <fcntl.h>        /* fcntl, F_SETFL, F_GETFL, O_NONBLOCK */
#include <sys/types.h>
#include <sys/socket.h>   /* accept */
#include <sys/event.h>
#include <sys/time.h>     /* struct timespec */

int pulse_kq_ctl(int kq, int fd, int filter, int flags, int special);
int pulse_kq_trigger(int kq, int ident);
int pulse_poll_read(int kq, struct kevent *events, int maxevents,
                    int timeout_ms, const int *carry, int ncarry,
                    char *arena, unsigned int arena_size, unsigned int read_size,
                    int max_reads, const unsigned char *direct, int ndirect,
                    int *out, int maxrecs);

#endif /* PULSE_KQUEUE_H */
