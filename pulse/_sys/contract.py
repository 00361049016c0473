"""The backend contract: what the reactor needs from a syscall backend.

A backend is a module under ``pulse/_sys/`` (``linux``, ``darwin``,
``portable``) registered in ``registry.py``.  It provides the four classes
and the module functions below, with one set of conventions for every call
(the ones asyncio's selector_events uses around each syscall): EINTR is
retried inside, EAGAIN returns ``None``, anything else raises ``OSError``
with the real errno.  File descriptors are plain ints; nothing here owns a
socket except ``close``.

What differs between backends is declared, not probed: ``CAPABILITIES``
names the optional behaviours a backend implements (today only
``DIRECT_READS``), and the reactor reads that set instead of looking for
attributes.  ``tests/test_backends.py`` checks every available backend
against these Protocols at run time, and mypy checks them statically (each
backend module assigns itself to ``Backend`` under ``TYPE_CHECKING``).

The records that ``Poller.poll_read`` writes are ``(fd, flags, offset,
length)`` int32 quadruples; the flags are in ``flags.py``.
"""

import errno
import os
from typing import Any, FrozenSet, List, Optional, Protocol, Sequence, Tuple, Union

Buffer = Union[bytes, bytearray, memoryview]
SockAddress = Union[Tuple[str, int], str]

#: The most events one poll may take: the bound of ``Poller(max_events)`` and
#: of the ``max_events`` option.  The loop sizes its poll records from it at
#: ``4 * max_events + 64`` int32 quadruples, 64 bytes per event (plus a carry
#: array of one int per record and the kernel's event array), and the C
#: helpers take the count as an ``int`` (``epoll_wait``'s ``maxevents``, the
#: record index ``4 * n``).  65536 keeps the records at 4 MiB, every index far
#: from ``INT_MAX``, and is already more events than one Python iteration
#: dispatches without stalling the rest (at ~1 us each, 65 ms a batch); an
#: unbounded value could ask for gigabytes or overflow an ``int`` in C.
MAX_EVENTS = 65536


def check_max_events(value: Any) -> int:
    """``value`` if it is a valid ``max_events`` (an int in 1..``MAX_EVENTS``),
    else ``TypeError``/``ValueError`` naming ``max_events``: the one check the
    pollers and ``pulse.Options`` share, so they word it the same."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("max_events must be an int, got {!r}".format(value))
    if value <= 0:
        raise ValueError("max_events must be > 0, got {}".format(value))
    if value > MAX_EVENTS:
        raise ValueError("max_events must be <= {}, got {}".format(MAX_EVENTS, value))
    return value


def registration_error(count: int, code: int) -> OSError:
    """The ``OSError`` that ``accept_batch`` appends to its ``errors`` list when it
    closed ``count`` accepted connections because registering them with the
    poller failed, ``code`` the errno of the last failure: one wording for
    every backend."""
    code = code or errno.EIO  # a failure without an errno still reads as one
    return OSError(code, "accept: closed {} accepted connection{}: registering with the "
                         "poller failed: {}".format(count, "" if count == 1 else "s",
                                                   os.strerror(code)))


#: Capability: ``ReadArena.direct`` is honoured, so ``poll_read`` reports a
#: socket whose ``direct[fd]`` is 1 as ``READY`` instead of reading it, and
#: ``ReadArena.read(fd, nbytes)`` reads one as ``os.read`` does.
DIRECT_READS = "direct_reads"


class ReadArena(Protocol):
    """Reused memory that ``poll_read`` reads sockets into, and its records.

    ``data`` is a byte memoryview of the arena, ``records`` an ``int32``
    memoryview of ``max_records`` quadruples.  ``direct`` is a byte
    memoryview indexed by fd (fds below ``flags.DIRECT_FDS``), or ``None``
    when the backend lacks ``DIRECT_READS``.
    """

    size: int
    max_records: int
    data: memoryview
    records: memoryview
    direct: Optional[memoryview]


class WriteBatch(Protocol):
    """One loop iteration's small writes, sent by one call.

    ``arena`` holds the bytes, ``items`` ``(fd, offset, length)`` int32
    triples.  ``send(count)`` sends the first ``count`` items in order,
    writing each one's bytes sent (or -errno) into ``results``, skipping later
    items of an fd that refused bytes (result 0, so the caller can queue them
    in order); it returns how many items were not sent whole.
    """

    size: int
    max_items: int
    arena: memoryview
    items: memoryview
    results: memoryview

    def send(self, count: int) -> int: ...


class Poller(Protocol):
    """Readiness notification for many fds, and the batched wait-and-read.

    Connection fds are watched with ``add``/``watch`` in terms of reads,
    writes and the trigger; listeners, connecting sockets and the waker are
    "specials", reported (flag ``SPECIAL``) but never read.
    """

    max_events: int

    def fileno(self) -> int: ...

    def add(self, fd: int, read: bool, write: bool, edge: bool) -> None: ...

    def watch(self, fd: int, read: bool, write: bool, edge: bool) -> None: ...

    def add_special(self, fd: int) -> None: ...

    def add_connecting(self, fd: int) -> None: ...

    def connected(self, fd: int, edge: bool) -> None: ...

    def unregister(self, fd: int) -> None: ...

    def forget(self, fd: int) -> None:
        """Drop what the poller keeps about ``fd``; call it just before closing ``fd``."""

    def poll(self, timeout: float = -1) -> List[Tuple[int, int]]: ...

    def poll_read(self, timeout_ms: int, arena: Any, carry: Sequence[int],
                  read_size: int, max_reads: int) -> int:
        """Wait up to ``timeout_ms`` (-1 blocks), then read every ready
        connection into ``arena``; returns the number of records.  ``carry``
        fds (``~fd`` once their hang-up was seen) are read first, without
        blocking."""

    def close(self) -> None: ...


class Waker(Protocol):
    """Wakes a poller from another thread or a signal handler.

    ``ident`` is the number that ``poll_read`` records carry when the waker
    fired: an fd on epoll and the portable backend, the ``EVFILT_USER``
    ident on kqueue (not an fd: ``fileno()`` is -1 there).  ``wake`` is safe
    from any thread and from signal handlers, also while the loop's thread
    runs ``close`` (or, on kqueue, closes the poller): once ``close`` began, a
    wake never reaches the fd number, which the kernel may already have given
    to something else.  ``drain`` and ``close`` belong to the loop's thread.
    """

    ident: int

    def fileno(self) -> int: ...

    def attach(self, poller: Any) -> None: ...

    def wake(self) -> None: ...

    def drain(self) -> None: ...

    def close(self) -> None: ...


class Backend(Protocol):
    """A backend module: its name, capabilities, classes and socket calls."""

    NAME: str
    CAPABILITIES: FrozenSet[str]
    SHUT_RD: int
    SHUT_WR: int
    SHUT_RDWR: int

    # The classes, as constructors: Poller(max_events), Waker(),
    # ReadArena(size, max_records), WriteBatch(size, max_items).
    Poller: Any
    Waker: Any
    ReadArena: Any
    WriteBatch: Any

    def recv_into(self, fd: int, buffer: Buffer, nbytes: int = 0) -> Optional[int]: ...

    def recv(self, fd: int, nbytes: int) -> Optional[bytes]: ...

    def send(self, fd: int, data: Buffer) -> Optional[int]: ...

    def writev(self, fd: int, buffers: Sequence[Buffer]) -> Optional[int]: ...

    def close(self, fd: int) -> None: ...

    def shutdown(self, fd: int, how: int) -> None: ...

    def setsockopt_int(self, fd: int, level: int, name: int, value: int) -> None: ...

    def getsockopt_int(self, fd: int, level: int, name: int) -> int: ...

    def sockaddr(self, fd: int, peer: bool) -> SockAddress: ...

    def accept_batch(self, listen_fd: int, poller: Any, nodelay: bool, edge: bool,
                     maximum: int = 64,
                     errors: Optional[List[OSError]] = None) -> List[Tuple[int, Any]]:
        """Accept up to ``maximum`` connections, each registered for reads with
        ``poller``; ``(fd, peer)`` pairs, the peer raw bytes for
        ``parse_sockaddr`` or already an address.  An accepted socket that
        cannot be registered is closed; if any was and ``errors`` is a list,
        one ``OSError`` (``registration_error``: the last errno, the count in
        its message) is appended to it, also when the call then raises."""


#: Names every backend module must define (checked by the tests).
CLASS_NAMES = ("Poller", "Waker", "ReadArena", "WriteBatch")
FUNCTION_NAMES = ("recv_into", "recv", "send", "writev", "close", "shutdown",
                  "setsockopt_int", "getsockopt_int", "sockaddr", "accept_batch")
POLLER_METHODS = ("fileno", "add", "watch", "add_special", "add_connecting", "connected",
                  "unregister", "forget", "poll", "poll_read", "close")
WAKER_METHODS = ("fileno", "attach", "wake", "drain", "close")
