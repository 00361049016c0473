"""The macOS/BSD backend: kqueue and kevent over the compiled cffi module.

Symmetric with ``linux.py`` so the two read side by side: ``Kqueue`` offers the
same ``register``/``modify``/``unregister``/``poll`` surface (with kqueue's own
filters instead of epoll masks), the same ``watch``/``add_special`` used by the
reactor, and ``poll_read``, the batched wait-and-read fast path.  Edge mode is
``EV_CLEAR``; the waker is an ``EVFILT_USER`` event, so waking needs no fd.
"""

import errno
import threading
from typing import TYPE_CHECKING, List, Optional, Set, Tuple

from ._common import (  # noqa: F401  (re-exported: this module is the public API)
    CAPABILITIES, EOF, ERROR, HUP, MORE, READ, SPECIAL, UNREAD, WRITABLE, CompiledPoller,
    ReadArena, WriteBatch,
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


class Kqueue(CompiledPoller):
    """A kqueue instance.

    ``register(fd, filter, flags)`` adds one filter (``EVFILT_READ`` or
    ``EVFILT_WRITE``); ``special=True`` marks an fd that ``poll_read`` must
    report rather than read.
    """

    EVENT_TYPE = "struct kevent"
    WAIT_CALL = "kevent"

    def __init__(self, max_events: int = 1024) -> None:
        super().__init__(max_events)
        self._writing: Set[int] = set()  # fds with an EVFILT_WRITE filter installed
        self._wakers: List["Waker"] = []  # closed before this kqueue's fd (closes_with)

    def _create(self) -> int:
        fd = lib.kqueue()
        if fd < 0:
            raise_errno(lib.pulse_errno(), "kqueue")
        return fd

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

    def closes_with(self, waker: "Waker") -> None:
        """Have ``close`` close ``waker`` first: it triggers its event on this
        kqueue's fd from other threads, and the fd must not be given back to
        the kernel while a trigger could still reach the number."""
        self._wakers.append(waker)

    def close(self) -> None:
        """Close the kqueue (idempotent), after the wakers attached to it.

        Whatever order the caller closes the two in (the loop closes its
        poller first), a wake from another thread then finds its waker closed
        instead of triggering a number the kernel may have reused.
        """
        wakers, self._wakers = self._wakers, []
        for waker in wakers:
            waker.close()
        super().close()

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


Poller = Kqueue


class Waker:
    """An EVFILT_USER event that wakes the poller from another thread."""

    #: The number poll records carry for the waker: an ident, not an fd.
    ident = WAKER_IDENT

    def __init__(self) -> None:
        self._kq = -1
        # As in linux.Waker, with the kqueue's fd as the number at risk: a
        # trigger that read ``_kq`` just before the kqueue was closed would
        # reach whatever reused the number (another loop's kqueue: a stray
        # wake-up).  The lock makes "read the fd, trigger" and "forget the fd"
        # exclusive, and Kqueue.close closes its wakers first; re-entrant for
        # a signal handler that interrupts the main thread inside wake().
        self._lock = threading.RLock()

    def fileno(self) -> int:
        """-1: an EVFILT_USER event has no fd (``ident`` names it in poll records)."""
        return -1

    def attach(self, poller: Kqueue) -> None:
        """Install the user event on ``poller`` (closing ``poller`` closes this waker)."""
        kq = poller.fileno()
        if lib.pulse_kq_ctl(kq, WAKER_IDENT, EVFILT_USER, EV_ADD | EV_CLEAR, 1) < 0:
            raise_errno(lib.pulse_errno(), "kevent(EVFILT_USER)")
        with self._lock:
            self._kq = kq
        poller.closes_with(self)

    def wake(self) -> None:
        """Make the next (or current) poll return; safe from any thread or signal
        handler, and a no-op once ``close`` began (never a trigger on a reused fd)."""
        with self._lock:
            kq = self._kq
            if kq >= 0:
                lib.pulse_kq_trigger(kq, WAKER_IDENT)

    def drain(self) -> None:
        """Nothing to reset: EV_CLEAR re-arms the user event."""

    def close(self) -> None:
        """Forget the poller (idempotent; the event goes with the kqueue)."""
        with self._lock:  # waits for a trigger in flight; later ones see -1
            self._kq = -1


if TYPE_CHECKING:  # pragma: no cover
    # For mypy: this module follows the backend contract (a missing or
    # mistyped name fails the type check, not a server at run time).
    from . import darwin as _this_module
    from .contract import Backend

    _contract_check: Backend = _this_module
