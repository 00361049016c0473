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
import threading
from typing import TYPE_CHECKING, List, Set, Tuple

from ._common import (  # noqa: F401  (re-exported: this module is the public API)
    CAPABILITIES, EOF, ERROR, HUP, MORE, READ, SPECIAL, UNREAD, WRITABLE, CompiledPoller,
    ReadArena, WriteBatch,
    accept_batch, close, getsockopt_int, raise_errno, recv, recv_into, send,
    setsockopt_int, shutdown, sockaddr, writev,
)
from ._pulse_ffi import lib

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


class Epoll(CompiledPoller):
    """An epoll instance.

    ``register``/``modify`` take an ``EPOLL*`` mask; ``special=True`` marks an
    fd (a listener, a waker) that ``poll_read`` must report rather than read.
    The higher-level ``watch`` speaks in reads/writes/edge so that the reactor
    reads the same against kqueue.
    """

    EVENT_TYPE = "struct epoll_event"
    WAIT_CALL = "epoll_wait"

    def __init__(self, max_events: int = 1024) -> None:
        super().__init__(max_events)
        self._idle: Set[int] = set()  # connection fds watched for nothing: out of the set

    def _create(self) -> int:
        fd = lib.epoll_create1(lib.EPOLL_CLOEXEC)
        if fd < 0:
            raise_errno(lib.pulse_errno(), "epoll_create1")
        return fd

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

    def forget(self, fd: int) -> None:
        """Drop what the poller keeps about an fd about to be closed (closing
        the last reference removes it from the epoll set)."""
        self._idle.discard(fd)

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
        """Change what a registered connection fd is watched for.

        Watched for nothing, the fd leaves the epoll set until it is watched
        again: epoll reports EPOLLHUP whatever the mask, so a paused socket
        whose both directions are shut would wake a level-triggered loop on
        every poll.
        """
        if not read and not write:
            if fd not in self._idle:
                self._ctl(lib.EPOLL_CTL_DEL, fd, 0, False)
                self._idle.add(fd)
        elif fd in self._idle:
            self._ctl(lib.EPOLL_CTL_ADD, fd, self.events_for(read, write, edge), False)
            self._idle.discard(fd)
        else:
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


Poller = Epoll


class Waker:
    """An eventfd that wakes the poller from another thread or a signal handler.

    ``ident``, the number poll records carry for it, is its fd.
    """

    def __init__(self) -> None:
        fd = lib.eventfd(0, lib.EFD_NONBLOCK | lib.EFD_CLOEXEC)
        if fd < 0:
            raise_errno(lib.pulse_errno(), "eventfd")
        self._fd = fd
        self.ident = fd
        self._one = (1).to_bytes(8, "little")
        self._buf = bytearray(8)
        # wake() runs on other threads while the loop's thread may be closing
        # the eventfd, and the kernel hands a closed number out again at once
        # (to a socket, a file): without the lock a wake that read the fd just
        # before close() would write 8 bytes into whatever got the number.  The
        # lock makes "read the fd, write to it" and "forget the fd" exclusive.
        # Re-entrant because a signal handler runs on the main thread between
        # two bytecodes, maybe while that thread holds the lock inside wake():
        # a plain Lock would deadlock there, while re-entered the handler's
        # wake sees the fd still open (its write is harmless) or -1.
        self._lock = threading.RLock()

    def fileno(self) -> int:
        """The fd to register with the poller (``Poller.add_special``)."""
        return self._fd

    def attach(self, poller: "Epoll") -> None:
        """Register with ``poller`` so that ``wake`` interrupts its wait."""
        poller.add_special(self._fd)

    def wake(self) -> None:
        """Make the next (or current) poll return; safe from any thread or signal
        handler, and a no-op once ``close`` began (never a write to a reused fd)."""
        with self._lock:
            fd = self._fd
            if fd >= 0:
                try:
                    os.write(fd, self._one)
                except OSError:
                    pass  # counter saturated: the loop is awake anyway

    def drain(self) -> None:
        """Reset the counter after the poller reported the waker (the loop's thread)."""
        fd = self._fd
        if fd >= 0:
            try:
                os.read(fd, 8)
            except (BlockingIOError, InterruptedError):
                pass

    def close(self) -> None:
        """Close the eventfd (idempotent; the loop's thread, not a signal handler)."""
        with self._lock:  # waits for a wake in flight; later ones see -1
            fd, self._fd = self._fd, -1
        # Outside the lock: no wake can reach the number any more.
        if fd >= 0:
            close(fd)


if TYPE_CHECKING:  # pragma: no cover
    # For mypy: this module follows the backend contract (a missing or
    # mistyped name fails the type check, not a server at run time).
    from . import linux as _this_module
    from .contract import Backend

    _contract_check: Backend = _this_module
