"""The write batch: every small write of one loop iteration, sent by one C call.

On CPython a cffi call costs about as much as a syscall, so the writes that
callbacks make during an iteration are not sent one by one: small ``bytes``
are copied into the backend's write arena (a memcpy is cheaper than pinning
the object for cffi) with one ``(fd, offset, length)`` item per connection
run, and ``flush`` hands the whole batch to ``WriteBatch.send`` once, at the
end of the iteration.  What the kernel refuses goes to the connection's
backlog, in order.  Large writes skip the batch (see ``Batch.send_large``).

``Batch`` owns the arena position, the items, the item count and the last
connection written.  ``Conn.write`` inlines the common case of ``add`` for
speed: it is the one other place that reads and advances these fields.  Of a
``Conn`` this module reads ``_fd`` and ``_state`` (hot path), and changes it
only through its methods.

A flush runs callbacks (``on_pause_writing``, when a remainder pushes a
backlog past the high-water mark) that may write again, into this same
arena.  So ``flush`` copies every remainder out of the arena first, queues
them all, and only then lets the water marks call back.
"""

from typing import TYPE_CHECKING, Any, List, Optional, Tuple

from .errors import os_error
from .states import CLOSED

if TYPE_CHECKING:  # pragma: no cover
    from ._sys.contract import WriteBatch
    from .conn import Conn
    from .loop import EventLoop

# Writes up to this size are copied into the write arena; larger ones are
# sent at once (see Batch.send_large).
SMALL_WRITE = 16 * 1024
# One iteration's copied writes; when full, the batch is sent early.
WRITE_ARENA_SIZE = 1024 * 1024
WRITE_MAX_ITEMS = 4096


class Batch:
    """This iteration's small writes over a backend ``WriteBatch``.

    Loop thread only.  ``count`` is the number of items (0: nothing to send),
    ``pos`` the bytes used in ``arena``, ``last`` the connection of the last
    item (its next write extends that item), ``conns[i]`` the connection of
    item ``i``.
    """

    __slots__ = ("_loop", "_wb", "arena", "items", "count", "pos", "last", "conns", "dropped")

    def __init__(self, loop: "EventLoop", wb: "WriteBatch") -> None:
        self._loop = loop
        self._wb = wb
        self.arena = wb.arena
        self.items = wb.items
        self.count = 0
        self.pos = 0
        self.last: Optional["Conn"] = None
        self.conns: List["Conn"] = []
        self.dropped = 0  # bytes of items zeroed by drop()

    def add(self, conn: "Conn", data: Any) -> None:
        """Queue ``data`` for ``conn``: the slow path of ``Conn.write`` (type
        checks, mutable buffers, large writes, a full batch)."""
        kind = type(data)
        if kind is not bytes and kind is not bytearray:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError("write() takes bytes, bytearray or memoryview, got {}".format(
                    kind.__name__))
            view = memoryview(data)
            data = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        size = len(data)
        if not size:
            return
        if size > SMALL_WRITE:
            self.send_large(conn, data, size)
            return
        if self.count >= WRITE_MAX_ITEMS or self.pos + size > WRITE_ARENA_SIZE:
            self.flush()
            if conn._dropping():
                return  # the flush found the connection dead; its on_close reports why
            if conn.write_buffer_size:
                conn._queue(bytes(data))
                return
        items = self.items
        count = self.count
        pos = self.pos
        self.arena[pos:pos + size] = data
        self.pos = pos + size
        if self.last is conn:
            items[3 * count - 1] += size  # contiguous with its last write: one send
            return
        base = 3 * count
        items[base] = conn._fd
        items[base + 1] = pos
        items[base + 2] = size
        self.conns.append(conn)
        self.count = count + 1
        self.last = conn

    def send_large(self, conn: "Conn", data: Any, size: int) -> None:
        """Send a large write at once, as uvloop does, instead of batching it.

        Batching would keep every large payload of the iteration alive until
        the flush; freeing megabytes at once makes the allocator return them
        to the kernel and fault them back in on the next round, which cost
        three times the CPU of the send itself at 64 KiB x 500 connections.
        Earlier writes of the batch are flushed first, so order holds.
        """
        loop = self._loop
        if self.count:
            self.flush()
            if conn._dropping():
                return
            if conn.write_buffer_size:
                conn._queue(bytes(data))
                return
        try:
            sent = loop.backend.send(conn._fd, data) or 0
        except OSError as exc:
            conn._fail(exc)
            return
        loop.bytes_out += sent
        if sent < size:
            rest = memoryview(data)[sent:] if type(data) is bytes else bytes(data[sent:])
            conn._queue(rest)

    def flush(self) -> None:
        """Send the batch; queue what the kernel did not take."""
        count = self.count
        if not count:
            return
        wb = self._wb
        conns = self.conns
        loop = self._loop
        loop.bytes_out += self.pos - self.dropped
        self.dropped = 0
        self.count = 0
        self.pos = 0
        self.last = None
        self.conns = []
        if not wb.send(count):
            return
        items = wb.items[:3 * count].tolist()
        results = wb.results[:count].tolist()
        arena = wb.arena
        # First copy every remainder out of the arena (a callback below may
        # write into it again), and queue them all in order...
        short: List[Tuple["Conn", Any]] = []
        for i in range(count):
            sent = results[i]
            size = items[3 * i + 2]
            if sent == size:
                continue
            conn = conns[i]
            if sent < 0:
                loop.bytes_out -= size
                short.append((conn, os_error(-sent)))
                continue
            loop.bytes_out -= size - sent
            if conn._state == CLOSED:
                continue
            offset = items[3 * i + 1]
            short.append((conn, arena[offset + sent:offset + size].tobytes()))
        for conn, rest in short:
            if isinstance(rest, OSError):
                conn._fail(rest)
            else:
                conn._queue_quiet(rest)
        # ...then apply the water marks, which may call on_pause_writing.
        for conn, rest in short:
            if not isinstance(rest, OSError):
                conn._check_water()

    def drop(self, conn: "Conn") -> None:
        """Forget every byte batched for ``conn`` (it is aborted): its items
        are sent as zero bytes."""
        if self.last is conn:
            self.last = None
        items = self.items
        for i, other in enumerate(self.conns):
            if other is conn:
                self.dropped += items[3 * i + 2]
                items[3 * i + 2] = 0
