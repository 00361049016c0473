/* epoll.h: the epoll backend's part of the module's interface (epoll.c,
 * epoll.cdef), with the system headers of what epoll.cdef names.
 */
#ifndef PULSE_EPOLL_H
#define PULSE_EPOLL_H

#include <stdint.h>       /* uint32_t */
#include <sys/socket.h>   /* accept4, SOCK_NONBLOCK, SOCK_CLOEXEC */
#include <sys/epoll.h>
#include <sys/eventfd.h>

int pulse_epoll_ctl(int epfd, int op, int fd, uint32_t events, int special);
int pulse_poll_read(int epfd, struct epoll_event *events, int maxevents,
                    int timeout_ms, const int *carry, int ncarry,
                    char *arena, unsigned int arena_size, unsigned int read_size,
                    int max_reads, const unsigned char *direct, int ndirect,
                    int *out, int maxrecs);

#endif /* PULSE_EPOLL_H */
