"""The macOS/BSD backend: kqueue and kevent over the compiled cffi module.

Symmetric with ``linux.py`` so the two read side by side: ``Kqueue`` offers the
same ``register``/``modify``/``unregister``/``poll`` surface (with kqueue's own
filters instead of epoll masks), the same ``watch``/``add_special`` used by the
reactor, and ``poll_read``, the batched wait-and-read fast path.  Edge mode is
``EV_CLEAR``; the waker is an ``EVFILT_USER`` event, so waking needs no fd.
"""

import errno
from typing import List, Optional, Sequence, Tuple

from ._common import (  # noqa: F401  (re-exported: this module is the public API)
    EOF, ERROR, HUP, MORE, READ, SPECIAL, UNREAD, WRITABLE, ReadArena, WriteBatch,
    accept_batch, close, getsockopt_int, raise_errno, recv, recv_into, send,
    setsockopt_int, shutdown, sockaddr, writev,
)
from ._pulse_ffi import ffi, lib

NAME = "kqueue"

EVFILT_READ = lib.EVFILT_READ
EVFILT_WRITE = lib.EVFILT_WRITE
EVFILT_USER = lib.EVFILT_USER
EV_ADD = lib.EV_ADD
EV_DELETE = lib.EV_DELETE
EV_CLEAR = lib.EV_CLEAR
EV_EOF = lib.EV_EOF
SHUT_RD = lib.SHUT_RD
SHUT_WR = lib.SHUT_WR
SHUT_RDWR = lib.SHUT_RDWR

#: The ident of the EVFILT_USER event used by ``Waker``: INT_MAX, a number no
#: fd reaches, so it never collides with a socket in the loop's special fds.
WAKER_IDENT = 0x7FFFFFFF


class Kqueue:
    """A kqueue instance.

    ``register(fd, filter, flags)`` adds one filter (``EVFILT_READ`` or
    ``EVFILT_WRITE``); ``special=True`` marks an fd that ``poll_read`` must
    report rather than read.
    """

    def __init__(self, max_events: int = 1024) -> None:
        if max_events <= 0:
            raise ValueError("max_events must be > 0, got {}".format(max_events))
        fd = lib.kqueue()
        if fd < 0:
            raise_errno(lib.pulse_errno(), "kqueue")
        self._fd = fd
        self.max_events = max_events
        self._events = ffi.new("struct kevent[]", max_events)
        self._writing = set()  # fds with an EVFILT_WRITE filter installed

    def fileno(self) -> int:
        """The kqueue file descriptor."""
        return self._fd

    def _ctl(self, fd: int, filt: int, flags: int, special: bool) -> None:
        if self._fd < 0:
            raise ValueError("the poller is closed")
        if lib.pulse_kq_ctl(self._fd, fd, filt, flags, 1 if special else 0) < 0:
            raise_errno(lib.pulse_errno(), "kevent(fd={})".format(fd))

    def register(self, fd: int, filt: int = EVFILT_READ, flags: int = 0,
                 special: bool = False) -> None:
        """Add filter ``filt`` for ``fd`` with extra ``EV_*`` flags."""
        self._ctl(fd, filt, EV_ADD | flags, special)

    def modify(self, fd: int, filt: int, flags: int, special: bool = False) -> None:
        """Re-add a filter with new flags (kqueue replaces it in place)."""
        self._ctl(fd, filt, EV_ADD | flags, special)

    def unregister(self, fd: int, filt: Optional[int] = None) -> None:
        """Remove one filter of ``fd``, or both (as epoll's unregister does) when
        ``filt`` is None; a missing filter or closed fd is ignored."""
        if self._fd < 0:
            return
        # Both by default: the loop unregisters specials by fd alone, and a
        # dial in progress is an EVFILT_WRITE special; left behind it keeps
        # firing (level-triggered) until the socket is closed.
        for one in (EVFILT_READ, EVFILT_WRITE) if filt is None else (filt,):
            if lib.pulse_kq_ctl(self._fd, fd, one, EV_DELETE, 0) < 0:
                code = lib.pulse_errno()
                if code not in (errno.ENOENT, errno.EBADF):
                    raise_errno(code, "kevent(EV_DELETE, fd={})".format(fd))
        if filt is None or filt == EVFILT_WRITE:
            self._writing.discard(fd)

    def watch(self, fd: int, read: bool, write: bool, edge: bool) -> None:
        """Change what a registered connection fd is watched for."""
        clear = EV_CLEAR if edge else 0
        if read:
            self._ctl(fd, EVFILT_READ, EV_ADD | lib.EV_ENABLE | clear, False)
        else:
            self._ctl(fd, EVFILT_READ, EV_ADD | lib.EV_DISABLE | clear, False)
        if write and fd not in self._writing:
            self._ctl(fd, EVFILT_WRITE, EV_ADD | clear, False)
            self._writing.add(fd)
        elif not write and fd in self._writing:
            self.unregister(fd, EVFILT_WRITE)
            self._writing.discard(fd)

    def add(self, fd: int, read: bool, write: bool, edge: bool) -> None:
        """Start watching a connection fd for reads and/or writes."""
        self.watch(fd, read, write, edge)

    def add_connecting(self, fd: int) -> None:
        """Watch a socket with a connect in progress; completion is reported as SPECIAL."""
        self._ctl(fd, EVFILT_WRITE, EV_ADD, True)

    def connected(self, fd: int, edge: bool) -> None:
        """Turn a socket whose connect finished into an ordinary connection (reads)."""
        self.unregister(fd, EVFILT_WRITE)
        self._writing.discard(fd)
        self.watch(fd, True, False, edge)

    def forget(self, fd: int) -> None:
        """Drop bookkeeping for an fd about to be closed (closing removes its filters)."""
        self._writing.discard(fd)

    def add_special(self, fd: int) -> None:
        """Watch a listener fd (level-triggered, reported not read)."""
        self.register(fd, EVFILT_READ, 0, special=True)

    def poll(self, timeout: float = -1) -> List[Tuple[int, int]]:
        """Wait for events; ``(ident, filter)`` pairs.  ``timeout`` in seconds, -1 blocks."""
        tsp = ffi.NULL
        if timeout is not None and timeout >= 0:
            tsp = ffi.new("struct timespec *")
            tsp.tv_sec = int(timeout)
            tsp.tv_nsec = int((timeout - int(timeout)) * 1e9)
        while True:
            ready = lib.kevent(self._fd, ffi.NULL, 0, self._events, self.max_events, tsp)
            if ready >= 0:
                break
            code = lib.pulse_errno()
            if code != errno.EINTR:
                raise_errno(code, "kevent")
        events = self._events
        return [(int(events[i].ident), int(events[i].filter)) for i in range(ready)]

    def poll_read(self, timeout_ms: int, arena: ReadArena, carry: Sequence[int],
                  read_size: int, max_reads: int) -> int:
        """Wait, then read every ready socket into ``arena``; number of records."""
        ncarry = len(carry)
        ccarry = arena.ccarry
        for i in range(ncarry):
            ccarry[i] = carry[i]
        count = lib.pulse_poll_read(self._fd, self._events, self.max_events, timeout_ms,
                                    ccarry, ncarry, arena.cbuf, arena.size, read_size,
                                    max_reads, arena.cdirect, arena.ndirect,
                                    arena.crecords, arena.max_records)
        if count < 0:
            raise_errno(-count, "kevent")
        return count

    def close(self) -> None:
        """Close the kqueue fd (idempotent)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            close(fd)


Poller = Kqueue


class Waker:
    """An EVFILT_USER event that wakes the poller from another thread."""

    def __init__(self) -> None:
        self._kq = -1

    def fileno(self) -> int:
        """The EVFILT_USER ident (not an fd)."""
        return WAKER_IDENT

    def attach(self, poller: Kqueue) -> None:
        """Install the user event on ``poller``."""
        self._kq = poller.fileno()
        if lib.pulse_kq_ctl(self._kq, WAKER_IDENT, EVFILT_USER, EV_ADD | EV_CLEAR, 1) < 0:
            raise_errno(lib.pulse_errno(), "kevent(EVFILT_USER)")

    def wake(self) -> None:
        """Make the next (or current) poll return; safe from any thread."""
        if self._kq >= 0:
            lib.pulse_kq_trigger(self._kq, WAKER_IDENT)

    def drain(self) -> None:
        """Nothing to reset: EV_CLEAR re-arms the user event."""

    def close(self) -> None:
        """Forget the poller (the event goes with it)."""
        self._kq = -1
