"""The portable backend: the standard ``selectors`` and ``socket`` modules, no C.

For platforms with neither epoll nor kqueue (Windows), and selectable anywhere
(``PULSE_BACKEND=portable`` or ``backend="portable"``) to compare against the
native backends.  It offers the same surface as ``linux.py`` and ``darwin.py``
so the reactor cannot tell them apart: a ``Poller`` whose ``poll_read`` writes
the same ``(fd, flags, offset, length)`` records into a ``ReadArena``, a
``WriteBatch`` with the semantics of the C helper ``pulse_send_batch``, a
``Waker``, ``accept_batch`` and the socket calls with the usual conventions
(EINTR retried, ``None`` on EAGAIN, ``OSError`` with the real errno otherwise).

Why it is correct under an edge-triggered reactor although every selector is
level-triggered: a level-triggered poller reports a socket again for as long
as it is readable, so nothing the edge-mode loop leaves unread is stranded.
The records still carry ``MORE``/``UNREAD`` exactly like the C helper (the
loop then carries the fd to the next call, which reads it first and skips its
duplicate readiness report), so one busy peer cannot starve the others here
either.  ``edge`` is accepted and ignored.

Records never pass ``ReadArena.max_records`` (each carried fd still to come
and each event taken keep their slots), and on Windows ``select()`` takes at
most 512 sockets per loop (CPython's FD_SETSIZE there); a server that needs
more runs several worker processes.

The socket calls and the fd -> ``socket.socket`` cache they share with the
poller live in ``_portable_io``.
"""

import errno
import os
import selectors
import socket
import threading
from typing import TYPE_CHECKING, Any, Dict, FrozenSet, List, Optional, Sequence, Tuple, Type, Union

from ._portable_io import (  # noqa: F401  (re-exported: they are this backend's socket calls)
    _NOSIGNAL, _PYPY, WriteBatch, _cache, _code, _pollers, _pollers_lock, _sockets, _uncache,
    _wrap, accept_batch, close, getsockopt_int, parse_sockaddr, raise_errno, recv, recv_into,
    send, setsockopt_int, shutdown, sockaddr, writev,
)
from .contract import check_max_events
from .flags import EOF, ERROR, HUP, MORE, READ, SPECIAL, UNREAD, WRITABLE  # noqa: F401

NAME = "portable"
#: Reads always go through the arena: no ``DIRECT_READS`` (``ReadArena.direct`` is None).
CAPABILITIES: FrozenSet[str] = frozenset()

Buffer = Union[bytes, bytearray, memoryview]

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE
SHUT_RD = socket.SHUT_RD
SHUT_WR = socket.SHUT_WR
SHUT_RDWR = socket.SHUT_RDWR

# Like the C helpers: a read stops when less than this much arena is left.
_MIN_ROOM = 4096

#: Selector classes by name; ``PULSE_PORTABLE_SELECTOR`` (or ``Poller(selector=)``)
#: picks one, e.g. ``select`` to exercise the Windows code path on Linux.
SELECTORS: Dict[str, Type[selectors.BaseSelector]] = {"default": selectors.DefaultSelector,
                                                      "select": selectors.SelectSelector}
for _name, _attr in (("poll", "PollSelector"), ("epoll", "EpollSelector"),
                     ("kqueue", "KqueueSelector"), ("devpoll", "DevpollSelector")):
    if hasattr(selectors, _attr):
        SELECTORS[_name] = getattr(selectors, _attr)


class SelectorPoller:
    """A poller over a ``selectors`` selector.

    ``register``/``modify`` take a mask of ``EVENT_READ``/``EVENT_WRITE``;
    ``special=True`` marks an fd (a listener, a waker, a connect in progress)
    that ``poll_read`` reports rather than reads.  ``watch`` speaks in
    reads/writes/edge like the other backends; an fd watched for nothing stays
    known here but leaves the selector, which cannot hold an empty mask.
    """

    def __init__(self, max_events: int = 1024, selector: Optional[str] = None) -> None:
        check_max_events(max_events)  # the compiled pollers' bound and wording
        name = selector or os.environ.get("PULSE_PORTABLE_SELECTOR") or "default"
        if name not in SELECTORS:
            raise ValueError("PULSE_PORTABLE_SELECTOR must be one of {}, got {!r}".format(
                ", ".join(sorted(SELECTORS)), name))
        self.selector_name = name
        self._selector: Optional[selectors.BaseSelector] = SELECTORS[name]()
        self.max_events = max_events
        # fd -> (mask, special): what each known fd is watched for.
        self._interest: Dict[int, Tuple[int, bool]] = {}
        with _pollers_lock:
            _pollers[id(self)] = self

    def fileno(self) -> int:
        """The selector's fd, or -1 for one that has none (``select``)."""
        selector = self._selector
        if selector is None:
            return -1
        fileno = getattr(selector, "fileno", None)
        return fileno() if fileno is not None else -1

    def _apply(self, fd: int, mask: int, special: bool, fresh: bool = False) -> None:
        """Make the selector watch ``fd`` for ``mask`` (0 keeps it known but out).

        ``fresh`` is a new registration: any entry left for the same number
        is stale (closed behind the poller's back, the number reused), so it
        is dropped rather than modified -- epoll and kqueue forget such fds
        by themselves.  Failures raise ``OSError`` (the selectors' own
        ``KeyError``/``ValueError`` included, as the reactor handles
        ``OSError``) and leave the fd unknown rather than half-registered.
        """
        selector = self._selector
        if selector is None:
            raise ValueError("the poller is closed")
        old = self._interest.get(fd)
        if fresh and old is not None:
            if old[0]:
                try:
                    selector.unregister(fd)
                except (KeyError, ValueError, OSError):
                    pass
            old = None
        try:
            if old is not None and old[0]:
                if not mask:
                    selector.unregister(fd)
                elif old != (mask, special):
                    selector.modify(fd, mask, special)
            elif mask:
                selector.register(fd, mask, special)
        except (KeyError, ValueError, OSError) as exc:
            self._interest.pop(fd, None)
            if old is not None and old[0]:
                try:
                    selector.unregister(fd)
                except (KeyError, ValueError, OSError):
                    pass
            if isinstance(exc, OSError):
                raise
            raise OSError(errno.EBADF, "selector: fd {}: {}".format(fd, exc)) from exc
        self._interest[fd] = (mask, special)

    def register(self, fd: int, events: int = EVENT_READ, special: bool = False) -> None:
        """Start watching ``fd`` for ``events``; an fd known already is replaced.

        Replacing (instead of failing like epoll's EEXIST) because a number
        closed behind the poller's back and reused is indistinguishable here.
        """
        if events & ~(EVENT_READ | EVENT_WRITE):
            raise ValueError("events must be a mask of EVENT_READ and EVENT_WRITE, got {}".format(
                events))
        self._apply(fd, events, special, fresh=True)

    def modify(self, fd: int, events: int, special: bool = False) -> None:
        """Replace the mask of a watched ``fd`` (``FileNotFoundError`` when unknown)."""
        if fd not in self._interest:
            raise_errno(errno.ENOENT, "modify(fd={})".format(fd))
        self._apply(fd, events, special)

    def unregister(self, fd: int) -> None:
        """Stop watching ``fd``; an fd that is not watched is ignored."""
        old = self._interest.pop(fd, None)
        if old is not None and old[0] and self._selector is not None:
            try:
                self._selector.unregister(fd)
            except (KeyError, ValueError, OSError):
                pass
        if old is not None and not old[1]:
            _uncache(fd)

    forget = unregister

    def events_for(self, read: bool, write: bool, edge: bool) -> int:
        """The selector mask for a connection that wants reads and/or writes."""
        return (EVENT_READ if read else 0) | (EVENT_WRITE if write else 0)

    def watch(self, fd: int, read: bool, write: bool, edge: bool) -> None:
        """Change what a registered connection fd is watched for (``edge`` is emulated)."""
        mask = (EVENT_READ if read else 0) | (EVENT_WRITE if write else 0)
        old = self._interest.get(fd)
        if old is None:
            raise_errno(errno.ENOENT, "watch(fd={})".format(fd))
        if old != (mask, False):
            self._apply(fd, mask, False)

    def add(self, fd: int, read: bool, write: bool, edge: bool) -> None:
        """Start watching a connection fd for reads and/or writes."""
        self._apply(fd, self.events_for(read, write, edge), False, fresh=True)
        _cache(fd)

    def add_connecting(self, fd: int) -> None:
        """Watch a socket with a connect in progress; completion is reported as SPECIAL."""
        self._apply(fd, EVENT_WRITE, True, fresh=True)
        _cache(fd)

    def connected(self, fd: int, edge: bool) -> None:
        """Turn a socket whose connect finished into an ordinary connection (reads)."""
        self.modify(fd, EVENT_READ)

    def add_special(self, fd: int) -> None:
        """Watch a listener or waker fd (reported, not read)."""
        self._apply(fd, EVENT_READ, True, fresh=True)

    def poll(self, timeout: Optional[float] = -1) -> List[Tuple[int, int]]:
        """Wait for events; ``(fd, events)`` pairs.  ``timeout`` in seconds, -1 blocks."""
        selector = self._selector
        if selector is None:
            raise ValueError("the poller is closed")
        wait = None if timeout is None or timeout < 0 else timeout
        return [(key.fd, events) for key, events in selector.select(wait)]

    def poll_read(self, timeout_ms: int, arena: "ReadArena", carry: Sequence[int],
                  read_size: int, max_reads: int) -> int:
        """Wait, then read every ready socket into ``arena``; number of records.

        The records are those of the C helper ``pulse_poll_read``: ``carry``
        fds are read first and the wait does not block (``~fd`` in ``carry``
        says the hang-up was seen: read on past a short read to the FIN); a
        special fd is reported (length = its event mask); a writable one gets
        ``WRITABLE`` before its reads.  A selector does not say hang-up, so
        this backend never sets ``HUP`` itself: it needs no hint, the
        selector reports a socket with a pending FIN again.  Records never pass
        ``arena.max_records``: each carried fd still to come keeps one slot
        for its ``UNREAD``, each event taken keeps two, and no more events
        are taken than fit (the selector reports the rest again).  A short
        read ends an event's turn; a FIN behind it is reported by the next
        call, since the selector reports the socket again, so data sent with
        FIN always comes before ``EOF``.
        """
        selector = self._selector
        if selector is None:
            raise ValueError("the poller is closed")
        records = arena.records
        maxrecs = arena.max_records
        n = 0
        pos = 0
        carried: Any = ()
        if carry:
            carried = set()
            last = len(carry) - 1
            for i, fd in enumerate(carry):
                hup = fd < 0
                if hup:
                    fd = ~fd
                carried.add(fd)
                n, pos = _read_socket(fd, hup, arena, records, n, maxrecs - (last - i), pos,
                                      read_size, max_reads)
        room = min(self.max_events, (maxrecs - n) // 2)
        if room <= 0:
            return n  # full: what is ready stays ready for the next call
        if carry:
            wait: Optional[float] = 0
        elif timeout_ms < 0:
            wait = None
        else:
            wait = timeout_ms / 1000.0
        try:
            ready = selector.select(wait)
        except (OSError, ValueError) as exc:
            if isinstance(exc, OSError) and exc.errno == errno.EINTR:
                return n  # like EINTR from epoll_wait: the caller polls again
            return self._purge(records, n, maxrecs, exc)
        if carried:
            # A carried fd was just read: its readiness is the same news
            # (an edge-triggered poller would not report it again).
            ready = [(key, events & ~EVENT_READ if key.fd in carried else events)
                     for key, events in ready]
            ready = [item for item in ready if item[1]]
        if len(ready) > room:
            del ready[room:]  # level-triggered: the rest are reported again
        last = len(ready) - 1
        for j, (key, events) in enumerate(ready):
            fd = key.fd
            k = 4 * n
            if key.data:
                records[k] = fd
                records[k + 1] = SPECIAL
                records[k + 2] = 0
                records[k + 3] = events
                n += 1
                continue
            if events & EVENT_WRITE:
                records[k] = fd
                records[k + 1] = WRITABLE
                records[k + 2] = 0
                records[k + 3] = 0
                n += 1
            if events & EVENT_READ:
                n, pos = _read_socket(fd, False, arena, records, n, maxrecs - 2 * (last - j),
                                      pos, read_size, max_reads)
        return n

    def _purge(self, records: memoryview, n: int, maxrecs: int, exc: BaseException) -> int:
        """The selector failed on an fd closed behind its back: drop it, report it.

        ``select()`` fails as a whole on one closed fd (epoll just forgets
        it); each dead connection fd gets an ``ERROR(-EBADF)`` record so its
        connection closes instead of hanging.
        """
        dead = [fd for fd in self._interest if not _alive(fd)]
        if not dead:
            raise exc
        for fd in dead:
            special = self._interest[fd][1]
            self.unregister(fd)
            if not special and n < maxrecs:
                k = 4 * n
                records[k] = fd
                records[k + 1] = ERROR
                records[k + 2] = 0
                records[k + 3] = -errno.EBADF
                n += 1
        return n

    def close(self) -> None:
        """Close the selector (idempotent); cached wrappers of its fds are dropped."""
        selector, self._selector = self._selector, None
        if selector is None:
            return
        with _pollers_lock:
            _pollers.pop(id(self), None)
        for fd, (_mask, special) in self._interest.items():
            if not special:
                _uncache(fd)
        self._interest.clear()
        selector.close()


Poller = SelectorPoller


def _alive(fd: int) -> bool:
    """Whether ``fd`` is still open (for ``SelectorPoller._purge``)."""
    try:
        if os.name == "posix":
            os.fstat(fd)
        else:
            import select
            select.select([fd], [], [], 0)
    except (OSError, ValueError):
        return False
    return True


def _read_socket(fd: int, hup: bool, arena: "ReadArena", records: memoryview, n: int,
                 cap: int, pos: int, read_size: int, max_reads: int) -> Tuple[int, int]:
    """Read one socket into the arena: ``read_socket`` of build_ffi.py.

    Up to ``max_reads`` chunks of ``read_size`` bytes.  A short read says the
    kernel buffer is empty and ends the turn unless ``hup`` (the hang-up was
    seen, so a FIN sits behind the data): then it reads on to EAGAIN or EOF,
    and ``HUP`` rides on ``MORE``/``UNREAD`` so the next turn does too.
    Records stay below ``cap``; the last slot is kept for ``UNREAD``.
    Returns ``(records, arena position)``.
    """
    sock = _sockets.get(fd)
    if sock is None:
        try:
            sock = _cache(fd)
        except OSError as exc:
            k = 4 * n
            records[k] = fd
            records[k + 1] = ERROR
            records[k + 2] = 0
            records[k + 3] = -_code(exc)
            return n + 1, pos
    data = arena.data
    size = arena.size
    again = HUP if hup else 0
    reads = 0
    while True:
        k = 4 * n
        room = size - pos
        if n >= cap - 1 or (room < _MIN_ROOM and room < read_size):
            records[k] = fd
            records[k + 1] = UNREAD | again
            records[k + 2] = 0
            records[k + 3] = 0
            return n + 1, pos
        want = read_size if read_size < room else room
        try:
            got = sock.recv_into(data[pos:pos + want], want)
        except (BlockingIOError, InterruptedError):
            return n, pos
        except OSError as exc:
            records[k] = fd
            records[k + 1] = ERROR
            records[k + 2] = 0
            records[k + 3] = -_code(exc)
            return n + 1, pos
        if not got:
            records[k] = fd
            records[k + 1] = EOF
            records[k + 2] = 0
            records[k + 3] = 0
            return n + 1, pos
        records[k] = fd
        records[k + 1] = READ
        records[k + 2] = pos
        records[k + 3] = got
        n += 1
        pos += got
        reads += 1
        if got < want and not hup:
            return n, pos
        if reads >= max_reads:
            records[k + 1] = READ | MORE | again
            return n, pos


class Waker:
    """A socket pair that wakes the poller from another thread or a signal handler.

    ``wake`` sends one byte (a full pair means a wake-up is pending anyway);
    the loop calls ``drain`` when the poller reports the read end.
    """

    def __init__(self) -> None:
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self._reader: Optional[socket.socket] = reader
        self._writer: Optional[socket.socket] = writer
        self._fd = reader.fileno()
        #: The number poll records carry for the waker: its read end's fd.
        self.ident = self._fd
        # As in linux.Waker: ``socket.send`` reads the object's fd with the
        # GIL released, so a close() on the loop's thread meanwhile would let
        # the byte land in whatever reused the number.  The lock makes "take
        # the writer, send" and "forget the pair" exclusive; re-entrant for a
        # signal handler that interrupts the main thread inside wake().
        self._lock = threading.RLock()

    def fileno(self) -> int:
        """The fd to register with the poller (``Poller.add_special``)."""
        return self._fd

    def attach(self, poller: SelectorPoller) -> None:
        """Register with ``poller`` so that ``wake`` interrupts its wait."""
        poller.add_special(self._fd)

    def wake(self) -> None:
        """Make the next (or current) poll return; safe from any thread or signal
        handler, and a no-op once ``close`` began (never a write to a reused fd)."""
        with self._lock:
            writer = self._writer
            if writer is not None:
                try:
                    writer.send(b"\0")
                except OSError:
                    pass  # the pair is full: the loop is awake anyway

    def drain(self) -> None:
        """Empty the pair after the poller reported it (bounded: wakes keep coming)."""
        reader = self._reader
        if reader is None:
            return
        try:
            for _ in range(16):
                if len(reader.recv(4096)) < 4096:
                    break
        except OSError:
            pass  # empty (EAGAIN) or closed

    def close(self) -> None:
        """Close both ends (idempotent; the loop's thread); a later ``wake`` is a no-op."""
        with self._lock:  # waits for a wake in flight; later ones see None
            reader, writer = self._reader, self._writer
            self._reader = self._writer = None
            self._fd = -1
        for sock in (writer, reader):
            if sock is not None:
                sock.close()


class ReadArena:
    """Reused memory that ``poll_read`` reads sockets into, plus its records.

    ``records`` is an ``int32`` memoryview of ``(fd, flags, offset, length)``
    quadruples and ``data`` a writable byte memoryview of the arena, exactly
    as in the compiled backends.
    """

    def __init__(self, size: int, max_records: int) -> None:
        if size <= 0 or max_records <= 2:
            raise ValueError("ReadArena needs size > 0 and max_records > 2, got {}, {}".format(
                size, max_records))
        self.size = size
        self.max_records = max_records
        self.data = memoryview(bytearray(size))
        self.records = memoryview(bytearray(16 * max_records)).cast("i")
        self.direct: Optional[memoryview] = None


if TYPE_CHECKING:  # pragma: no cover
    # For mypy: this module follows the backend contract (a missing or
    # mistyped name fails the type check, not a server at run time).
    from . import portable as _this_module
    from .contract import Backend

    _contract_check: Backend = _this_module
