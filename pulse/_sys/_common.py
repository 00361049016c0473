"""Socket calls shared by every backend, over the compiled cffi module.

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
from .addresses import parse_sockaddr  # noqa: F401  (re-exported)
from .flags import DIRECT_FDS, EOF, ERROR, HUP, MORE, READ, READY, SPECIAL, UNREAD, WRITABLE

Buffer = Union[bytes, bytearray, memoryview]

# The C helpers and the portable backend must agree on the record flags.
assert (READ, EOF, ERROR, WRITABLE, MORE, SPECIAL, UNREAD, HUP, READY) == (
    lib.PULSE_READ, lib.PULSE_EOF, lib.PULSE_ERROR, lib.PULSE_WRITABLE, lib.PULSE_MORE,
    lib.PULSE_SPECIAL, lib.PULSE_UNREAD, lib.PULSE_HUP, lib.PULSE_READY), "build_ffi.py and flags.py disagree"

_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)


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
    return _result(lib.pulse_send(fd, ffi.from_buffer(data), len(data)), "send")


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
    return _result(lib.pulse_writev(fd, iov, count), "writev")


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
    """The socket's local or peer address: ``(host, port)`` or a Unix path."""
    host = ffi.new("char[]", 256)
    port = ffi.new("int *")
    family = lib.pulse_sockaddr(fd, 1 if peer else 0, host, 256, port)
    if family < 0:
        raise_errno(-family, "getpeername" if peer else "getsockname")
    text = ffi.string(host).decode("utf-8", "surrogateescape")
    if family in (socket.AF_INET, socket.AF_INET6):
        return (text, int(port[0]))
    return text


def accept_batch(listen_fd: int, poller: Any, nodelay: bool, edge: bool,
                 maximum: int = 64) -> List[Tuple[int, bytes]]:
    """Accept up to ``maximum`` connections and register each for reading.

    Each new fd is non-blocking and close-on-exec, has TCP_NODELAY when asked,
    and is already watched for reads by ``poller`` (a ``Poller`` or its fd).
    Returns ``(fd, raw_peer_address)`` pairs (empty on EAGAIN); the raw
    address goes to ``parse_sockaddr``.  Raises ``OSError`` when the first
    accept fails (``EMFILE`` and ``ENFILE`` among them).
    """
    out = ffi.new("int[]", maximum)
    addrs = ffi.new("char[]", maximum * ADDR_SIZE)
    poll_fd = poller if isinstance(poller, int) else poller.fileno()
    count = lib.pulse_accept_batch(listen_fd, poll_fd, 1 if nodelay else 0,
                                   1 if edge else 0, out, maximum, addrs)
    if count < 0:
        raise_errno(-count, "accept")
    raw = ffi.buffer(addrs, count * ADDR_SIZE)[:]
    return [(out[i], raw[i * ADDR_SIZE:(i + 1) * ADDR_SIZE]) for i in range(count)]


ADDR_SIZE = lib.PULSE_ADDR_SIZE


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
        self.cbuf = ffi.new("char[]", size)
        self.crecords = ffi.new("int[]", 4 * max_records)
        self.data = memoryview(ffi.buffer(self.cbuf))
        self.records = memoryview(ffi.buffer(self.crecords)).cast("i")
        self.ccarry = ffi.new("int[]", max_records)
        self.ndirect = DIRECT_FDS
        self.cdirect = ffi.new("unsigned char[]", DIRECT_FDS)
        self.direct = memoryview(ffi.buffer(self.cdirect))


class WriteBatch:
    """Writes of one loop iteration, sent together by one C call.

    Small writes are copied into a reused arena; large ones are passed by
    pointer (kept alive here until sent).  ``items`` holds ``(fd, offset,
    length)`` triples, a negative offset naming ``pointers[-offset - 1]``.
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
        self.max_pointers = 256
        self.cpointers = ffi.new("char *[]", self.max_pointers)
        self.keep: List[object] = []

    def pointer(self, data: Buffer) -> int:
        """Register a large buffer; return its (negative) offset code."""
        index = len(self.keep)
        cdata = ffi.from_buffer(data)
        self.keep.append(cdata)
        self.cpointers[index] = cdata
        return -index - 1

    def send(self, count: int) -> int:
        """Send ``count`` items; results land in ``results``; returns how many were short."""
        incomplete = lib.pulse_send_batch(self.citems, count, self.carena,
                                          self.cpointers, self.cresults)
        self.keep.clear()
        return incomplete
