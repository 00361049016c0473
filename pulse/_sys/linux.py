"""The Linux backend: epoll and eventfd over the compiled cffi module.

This is the public low level for people who experiment with syscalls.
``Epoll`` is a thin poller (register / modify / unregister / poll) with the
raw ``EPOLL*`` masks; ``Epoll.poll_read`` is the batched fast path the reactor
uses: one C call waits for events *and* reads every readable socket into a
``ReadArena``.  Socket calls (``recv_into``, ``send``, ``writev``, ...) come
from ``_common`` and behave the same on every backend: EINTR is retried,
EAGAIN returns ``None``, other errors raise ``OSError``.
"""

import errno
import os
from typing import List, Sequence, Tuple

from ._common import (  # noqa: F401  (re-exported: this module is the public API)
    EOF, ERROR, HUP, MORE, READ, SPECIAL, UNREAD, WRITABLE, ReadArena, WriteBatch,
    accept_batch, close, getsockopt_int, raise_errno, recv, recv_into, send,
    setsockopt_int, shutdown, sockaddr, writev,
)
from ._pulse_ffi import ffi, lib

NAME = "epoll"

EPOLLIN = lib.EPOLLIN
EPOLLOUT = lib.EPOLLOUT
EPOLLERR = lib.EPOLLERR
EPOLLHUP = lib.EPOLLHUP
EPOLLRDHUP = lib.EPOLLRDHUP
EPOLLET = lib.EPOLLET
EPOLLONESHOT = lib.EPOLLONESHOT
SHUT_RD = lib.SHUT_RD
SHUT_WR = lib.SHUT_WR
SHUT_RDWR = lib.SHUT_RDWR


class Epoll:
    """An epoll instance.

    ``register``/``modify`` take an ``EPOLL*`` mask; ``special=True`` marks an
    fd (a listener, a waker) that ``poll_read`` must report rather than read.
    The higher-level ``watch`` speaks in reads/writes/edge so that the reactor
    reads the same against kqueue.
    """

    def __init__(self, max_events: int = 1024) -> None:
        if max_events <= 0:
            raise ValueError("max_events must be > 0, got {}".format(max_events))
        fd = lib.epoll_create1(lib.EPOLL_CLOEXEC)
        if fd < 0:
            raise_errno(lib.pulse_errno(), "epoll_create1")
        self._fd = fd
        self.max_events = max_events
        self._events = ffi.new("struct epoll_event[]", max_events)

    def fileno(self) -> int:
        """The epoll file descriptor."""
        return self._fd

    def _ctl(self, op: int, fd: int, events: int, special: bool) -> None:
        if self._fd < 0:
            raise ValueError("the poller is closed")
        if lib.pulse_epoll_ctl(self._fd, op, fd, events & 0xFFFFFFFF, 1 if special else 0) < 0:
            raise_errno(lib.pulse_errno(), "epoll_ctl(fd={})".format(fd))

    def register(self, fd: int, events: int = EPOLLIN, special: bool = False) -> None:
        """Start watching ``fd`` for ``events`` (an ``EPOLL*`` mask)."""
        self._ctl(lib.EPOLL_CTL_ADD, fd, events, special)

    def modify(self, fd: int, events: int, special: bool = False) -> None:
        """Replace the event mask of a watched ``fd``."""
        self._ctl(lib.EPOLL_CTL_MOD, fd, events, special)

    def unregister(self, fd: int) -> None:
        """Stop watching ``fd``; an fd that is not watched (or closed) is ignored."""
        if self._fd < 0:
            return
        if lib.pulse_epoll_ctl(self._fd, lib.EPOLL_CTL_DEL, fd, 0, 0) < 0:
            code = lib.pulse_errno()
            if code not in (errno.ENOENT, errno.EBADF):
                raise_errno(code, "epoll_ctl(DEL, fd={})".format(fd))

    def events_for(self, read: bool, write: bool, edge: bool) -> int:
        """The epoll mask for a connection that wants reads and/or writes."""
        # RDHUP only with reads: a level-triggered RDHUP stays raised after
        # the peer's FIN, and a connection that only drains its backlog to a
        # half-closed peer would be woken for it forever.
        mask = 0
        if read:
            mask |= EPOLLIN | EPOLLRDHUP
        if write:
            mask |= EPOLLOUT
        if edge:
            mask |= EPOLLET
        return mask

    def watch(self, fd: int, read: bool, write: bool, edge: bool) -> None:
        """Change what a registered connection fd is watched for."""
        self.modify(fd, self.events_for(read, write, edge))

    def add(self, fd: int, read: bool, write: bool, edge: bool) -> None:
        """Start watching a connection fd for reads and/or writes."""
        self.register(fd, self.events_for(read, write, edge))

    def add_connecting(self, fd: int) -> None:
        """Watch a socket with a connect in progress; completion is reported as SPECIAL."""
        self.register(fd, EPOLLOUT, special=True)

    def connected(self, fd: int, edge: bool) -> None:
        """Turn a socket whose connect finished into an ordinary connection (reads)."""
        self.modify(fd, self.events_for(True, False, edge))

    def add_special(self, fd: int) -> None:
        """Watch a listener or waker fd (level-triggered, reported not read)."""
        self.register(fd, EPOLLIN, special=True)

    def poll(self, timeout: float = -1) -> List[Tuple[int, int]]:
        """Wait for events; ``(fd, events)`` pairs.  ``timeout`` in seconds, -1 blocks."""
        ms = -1 if timeout is None or timeout < 0 else int(timeout * 1000 + 0.999)
        while True:
            ready = lib.epoll_wait(self._fd, self._events, self.max_events, ms)
            if ready >= 0:
                break
            code = lib.pulse_errno()
            if code != errno.EINTR:
                raise_errno(code, "epoll_wait")
        events = self._events
        return [(events[i].data.u64 & 0xFFFFFFFF, events[i].events) for i in range(ready)]

    def poll_read(self, timeout_ms: int, arena: ReadArena, carry: Sequence[int],
                  read_size: int, max_reads: int) -> int:
        """Wait, then read every ready socket into ``arena``; number of records.

        ``carry`` lists fds that still had data after the last call (edge
        mode); they are read first and the wait does not block.
        """
        ncarry = len(carry)
        ccarry = arena.ccarry
        for i in range(ncarry):
            ccarry[i] = carry[i]
        count = lib.pulse_poll_read(self._fd, self._events, self.max_events, timeout_ms,
                                    ccarry, ncarry, arena.cbuf, arena.size, read_size,
                                    max_reads, arena.cdirect, arena.ndirect,
                                    arena.crecords, arena.max_records)
        if count < 0:
            raise_errno(-count, "epoll_wait")
        return count

    def close(self) -> None:
        """Close the epoll fd (idempotent)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            close(fd)


Poller = Epoll


class Waker:
    """An eventfd that wakes the poller from another thread or a signal handler."""

    def __init__(self) -> None:
        fd = lib.eventfd(0, lib.EFD_NONBLOCK | lib.EFD_CLOEXEC)
        if fd < 0:
            raise_errno(lib.pulse_errno(), "eventfd")
        self._fd = fd
        self._one = (1).to_bytes(8, "little")
        self._buf = bytearray(8)

    def fileno(self) -> int:
        """The fd to register with the poller (``Poller.add_special``)."""
        return self._fd

    def attach(self, poller: "Epoll") -> None:
        """Register with ``poller`` so that ``wake`` interrupts its wait."""
        poller.add_special(self._fd)

    def wake(self) -> None:
        """Make the next (or current) poll return; safe from any thread or signal handler."""
        fd = self._fd
        if fd >= 0:
            try:
                os.write(fd, self._one)
            except OSError:
                pass  # counter saturated or closed: the loop is awake anyway

    def drain(self) -> None:
        """Reset the counter after the poller reported the waker."""
        if self._fd >= 0:
            try:
                os.read(self._fd, 8)
            except (BlockingIOError, InterruptedError):
                pass

    def close(self) -> None:
        """Close the eventfd (idempotent)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            close(fd)

