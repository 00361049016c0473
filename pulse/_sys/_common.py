"""What the compiled backends share: socket calls, the arena, the batch, the poller base.

Each wrapper follows one pattern (the one asyncio's selector_events uses
around every syscall): retry on EINTR, report EAGAIN by returning ``None``,
raise ``OSError`` with the real errno on anything else.  File descriptors are
plain ints; nothing here owns them.
"""

import errno
import os
import socket
from typing import Any, List, Optional, Sequence, Tuple, Union

from ._pulse_ffi import ffi, lib
from .contract import DIRECT_READS, check_max_events, registration_error
from .raw_sockaddr import parse_sockaddr  # noqa: F401  (re-exported)
from .flags import DIRECT_FDS, EOF, ERROR, HUP, MORE, READ, READY, SPECIAL, UNREAD, WRITABLE

Buffer = Union[bytes, bytearray, memoryview]

# The C helpers and the portable backend must agree on the record flags.
assert (READ, EOF, ERROR, WRITABLE, MORE, SPECIAL, UNREAD, HUP, READY) == (
    lib.PULSE_READ, lib.PULSE_EOF, lib.PULSE_ERROR, lib.PULSE_WRITABLE, lib.PULSE_MORE,
    lib.PULSE_SPECIAL, lib.PULSE_UNREAD, lib.PULSE_HUP, lib.PULSE_READY), \
    "csrc/pulse.h and flags.py disagree"

_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)

#: What the compiled backends implement beyond the contract's minimum.
CAPABILITIES = frozenset((DIRECT_READS,))


def raise_errno(code: int, what: str = "") -> None:
    """Raise the ``OSError`` subclass for a positive errno ``code``."""
    message = os.strerror(code)
    if what:
        message = "{}: {}".format(what, message)
    raise OSError(code, message)


def _result(value: int, what: str) -> Optional[int]:
    """Map a C return value to a result, ``None`` for EAGAIN, or raise."""
    if value >= 0:
        return value
    code = lib.pulse_errno()
    if code in _AGAIN:
        return None
    raise_errno(code, what)
    return None  # unreachable; keeps type checkers content


def recv_into(fd: int, buffer: Buffer, nbytes: int = 0) -> Optional[int]:
    """Read into a writable buffer; bytes read, 0 at EOF, ``None`` on EAGAIN."""
    size = nbytes or len(buffer)
    cbuf = ffi.from_buffer(buffer, require_writable=True)
    while True:
        got = lib.recv(fd, cbuf, size, 0)
        if got >= 0 or lib.pulse_errno() != errno.EINTR:
            return _result(got, "recv")


def recv(fd: int, nbytes: int) -> Optional[bytes]:
    """Read up to ``nbytes``; ``b""`` at EOF, ``None`` on EAGAIN."""
    buf = ffi.new("char[]", nbytes)
    while True:
        got = lib.recv(fd, buf, nbytes, 0)
        if got >= 0 or lib.pulse_errno() != errno.EINTR:
            break
    count = _result(got, "recv")
    return None if count is None else ffi.unpack(buf, count)


def send(fd: int, data: Buffer) -> Optional[int]:
    """Send without raising SIGPIPE; bytes sent, or ``None`` on EAGAIN."""
    # A bytes object is passed as it is: cffi hands C its characters for
    # the call.  On PyPy ffi.from_buffer would first move a young object
    # out of the nursery for good (a copy, and garbage for a major
    # collection); passed directly it is only pinned during the call.
    ptr = data if type(data) is bytes else ffi.from_buffer(data)
    return _result(lib.pulse_send(fd, ptr, len(data)), "send")


def writev(fd: int, buffers: Sequence[Buffer]) -> Optional[int]:
    """Gather-write ``buffers`` in one call; bytes sent, or ``None`` on EAGAIN."""
    count = len(buffers)
    iov = ffi.new("struct iovec[]", count)
    keep = []
    for i, data in enumerate(buffers):
        cdata = ffi.from_buffer(data)
        keep.append(cdata)
        iov[i].iov_base = cdata
        iov[i].iov_len = len(data)
    got = lib.pulse_writev(fd, iov, count)
    # Drop the exports before _result can raise: the OSError's traceback
    # keeps this frame, and a Conn keeps the OSError (it goes to on_close),
    # so the from_buffer exports would end up in a reference cycle with the
    # memoryviews they export from.  The garbage collector cannot clear a
    # memoryview that still has exports ("memoryview has 1 exported
    # buffer") and CPython then crashes in the collection (seen as a
    # segfault at exit in pool mode when hogs reset their connections).
    keep.clear()
    cdata = None
    return _result(got, "writev")


def close(fd: int) -> None:
    """Close ``fd``; EINTR is not retried (on Linux the fd is gone anyway)."""
    if lib.close(fd) < 0:
        code = lib.pulse_errno()
        if code != errno.EINTR:
            raise_errno(code, "close")


def shutdown(fd: int, how: int) -> None:
    """Shut down one or both directions (``SHUT_RD``, ``SHUT_WR``, ``SHUT_RDWR``)."""
    if lib.shutdown(fd, how) < 0:
        raise_errno(lib.pulse_errno(), "shutdown")


def setsockopt_int(fd: int, level: int, name: int, value: int) -> None:
    """Set an integer socket option."""
    cvalue = ffi.new("int *", value)
    if lib.setsockopt(fd, level, name, cvalue, ffi.sizeof("int")) < 0:
        raise_errno(lib.pulse_errno(), "setsockopt")


def getsockopt_int(fd: int, level: int, name: int) -> int:
    """Read an integer socket option."""
    cvalue = ffi.new("int *")
    clen = ffi.new("socklen_t *", ffi.sizeof("int"))
    if lib.getsockopt(fd, level, name, cvalue, clen) < 0:
        raise_errno(lib.pulse_errno(), "getsockopt")
    return int(cvalue[0])


def sockaddr(fd: int, peer: bool) -> Union[Tuple[str, int], str]:
    """The socket's local or peer address: ``(host, port)`` (an IPv6 scope id as
    ``%zone``) or a Unix path or abstract name, in ``raw_sockaddr``'s forms."""
    host = ffi.new("char[]", 256)
    port = ffi.new("int *")
    used = ffi.new("int *")
    family = lib.pulse_sockaddr(fd, 1 if peer else 0, host, 256, port, used)
    if family < 0:
        raise_errno(-family, "getpeername" if peer else "getsockname")
    # By length, not up to a NUL: an abstract Unix name starts with one.
    text = ffi.unpack(host, used[0]).decode("utf-8", "surrogateescape")
    if family in (socket.AF_INET, socket.AF_INET6):
        return (text, int(port[0]))
    return text


def accept_batch(listen_fd: int, poller: Any, nodelay: bool, edge: bool,
                 maximum: int = 64,
                 errors: Optional[List[OSError]] = None) -> List[Tuple[int, bytes]]:
    """Accept up to ``maximum`` connections and register each for reading.

    Each new fd is non-blocking and close-on-exec, has TCP_NODELAY when asked,
    and is already watched for reads by ``poller`` (a ``Poller`` or its fd).
    Returns ``(fd, raw_peer_address)`` pairs (empty on EAGAIN); the raw
    address, as long as the kernel said, goes to ``parse_sockaddr``.  Raises
    ``OSError`` when the first accept fails (``EMFILE`` and ``ENFILE`` among
    them).  An accepted socket that cannot be registered is closed (it would
    never be read); when that happened and ``errors`` is a list, one
    ``OSError`` is appended to it for the call, with the errno of the last
    such failure and the number of connections closed in its message, so that
    the caller can log what it cannot otherwise see.
    """
    # One int array for the fds, the address lengths and the two drop counters,
    # and an address area left uncleared (C fills each slot before Python reads
    # its first lens[i] bytes): a call that accepts nothing, the common case
    # in a burst, costs two allocations, as before the lengths were kept.
    ints = ffi.new("int[]", 2 * maximum + 2)
    addrs = _uncleared("char[]", maximum * ADDR_SIZE)
    drops = 2 * maximum
    poll_fd = poller if isinstance(poller, int) else poller.fileno()
    count = lib.pulse_accept_batch(listen_fd, poll_fd, 1 if nodelay else 0, 1 if edge else 0,
                                   ints, maximum, addrs, ints + maximum, ints + drops)
    # Before a raise: sockets closed earlier in this call are news either way.
    if ints[drops] and errors is not None:
        errors.append(registration_error(ints[drops], ints[drops + 1]))
    if count < 0:
        raise_errno(-count, "accept")
    raw = ffi.buffer(addrs, count * ADDR_SIZE)[:]
    return [(ints[i], raw[i * ADDR_SIZE:i * ADDR_SIZE + ints[maximum + i]])
            for i in range(count)]


ADDR_SIZE = lib.PULSE_ADDR_SIZE
READ_ALIGN = lib.PULSE_READ_ALIGN
_uncleared = ffi.new_allocator(should_clear_after_alloc=False)


def aligned(size: int) -> Tuple[Any, Any]:
    """``size`` bytes that start on a ``READ_ALIGN`` boundary, as
    ``(owner, pointer)``: keep the owner alive as long as the pointer.  The
    kernel copies into an unaligned destination at about half the speed
    (an AMD EPYC, 64 KiB echo: 22 against 48 us of system time per
    request), and malloc only promises 16."""
    block = ffi.new("char[]", size + READ_ALIGN)
    return block, block + (-int(ffi.cast("uintptr_t", block)) % READ_ALIGN)


class ReadArena:
    """Reused memory that ``poll_read`` reads sockets into, plus its records.

    ``records`` is an ``int32`` memoryview of ``(fd, flags, offset, length)``
    quadruples and ``data`` a byte memoryview of the arena: Python slices the
    arena instead of calling into cffi once per field.  ``direct[fd] = 1``
    makes ``poll_read`` report that socket as ``READY`` instead of reading it,
    so the caller can read it straight into the object it hands on.
    """

    def __init__(self, size: int, max_records: int) -> None:
        self.size = size
        self.max_records = max_records
        # Every read lands on a 64-byte boundary (the C helper rounds its
        # position up too): see aligned().
        self._block, self.cbuf = aligned(size)
        self.crecords = ffi.new("int[]", 4 * max_records)
        self.data = memoryview(ffi.buffer(self.cbuf, size))
        self.records = memoryview(ffi.buffer(self.crecords)).cast("i")
        self.ccarry = ffi.new("int[]", max_records)
        self.ndirect = DIRECT_FDS
        self.cdirect = ffi.new("unsigned char[]", DIRECT_FDS)
        self.direct: Optional[memoryview] = memoryview(ffi.buffer(self.cdirect))
        self._scratch_size = 0
        self._scratch: Any = None

    def read(self, fd: int, nbytes: int) -> bytes:
        """Read up to ``nbytes`` of a socket the caller reads itself
        (``direct``), as ``os.read`` does: ``b""`` at EOF, ``BlockingIOError``
        when nothing waits, ``OSError`` on failure.  The kernel writes into
        an aligned scratch buffer (see ``aligned``), then one copy makes the
        bytes."""
        if nbytes > self._scratch_size:
            self._scratch = aligned(nbytes)
            self._scratch_size = nbytes
        buf = self._scratch[1]
        while True:
            got = lib.recv(fd, buf, nbytes, 0)
            if got >= 0:
                return ffi.unpack(buf, got)
            code = lib.pulse_errno()
            if code != errno.EINTR:
                raise_errno(code, "recv")


class WriteBatch:
    """Writes of one loop iteration, sent together by one C call.

    Writes are copied into a reused arena (large ones are sent at once by
    the loop instead).  ``items`` holds ``(fd, offset, length)`` triples,
    ``offset`` a position in ``arena``.
    """

    def __init__(self, size: int, max_items: int) -> None:
        self.size = size
        self.max_items = max_items
        self.carena = ffi.new("char[]", size)
        self.arena = memoryview(ffi.buffer(self.carena))
        self.citems = ffi.new("int[]", 3 * max_items)
        self.items = memoryview(ffi.buffer(self.citems)).cast("i")
        self.cresults = ffi.new("int[]", max_items)
        self.results = memoryview(ffi.buffer(self.cresults)).cast("i")

    def send(self, count: int) -> int:
        """Send ``count`` items; results land in ``results``; returns how many were short."""
        return lib.pulse_send_batch(self.citems, count, self.carena, self.cresults)


class CompiledPoller:
    """The part of the epoll and kqueue pollers that is the same: the poller
    fd and its event array, ``poll_read`` (the C helper ``pulse_poll_read``
    has one signature on both), ``forget`` and ``close``.

    A subclass names its event type and wait call and creates the fd.
    """

    EVENT_TYPE = ""   # the cffi type of one event: "struct epoll_event", "struct kevent"
    WAIT_CALL = ""    # the syscall named in errors

    def __init__(self, max_events: int = 1024) -> None:
        # Checked before the fd exists: a refused value leaks nothing.
        self.max_events = check_max_events(max_events)
        self._fd = self._create()
        self._events = ffi.new(self.EVENT_TYPE + "[]", max_events)

    def _create(self) -> int:
        raise NotImplementedError

    def fileno(self) -> int:
        """The poller's file descriptor (-1 once closed)."""
        return self._fd

    def forget(self, fd: int) -> None:
        """Drop bookkeeping for an fd about to be closed (closing it removes its events)."""

    def poll_read(self, timeout_ms: int, arena: ReadArena, carry: Sequence[int],
                  read_size: int, max_reads: int) -> int:
        """Wait, then read every ready socket into ``arena``; number of records.

        ``carry`` lists fds that still had data after the last call (edge
        mode; ``~fd`` once the hang-up was seen); they are read first and the
        wait does not block.
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
            raise_errno(-count, self.WAIT_CALL)
        return count

    def close(self) -> None:
        """Close the poller fd (idempotent)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            close(fd)
