"""A connection's write backlog: bytes accepted by ``write`` that the kernel
has not taken yet, in order, sent with ``writev`` when the socket is writable.

Two properties matter under load.  Draining is linear: items sit in a deque
with an offset into the first one, so sending the head costs the bytes sent,
never a shift of the whole list (``del backlog[:64]`` per ``writev`` made 800k
small items block the loop for 0.69 s).  Small items are merged: a write
shorter than ``MERGE_BELOW`` is appended to a ``bytearray`` tail instead of
becoming an item of its own, so a peer that reads slowly while the handler
answers with many tiny writes costs one iovec per 64 KiB, not per write.
Large ``bytes`` stay by reference (no copy).
"""

import collections
from typing import Any, Deque, List, Optional, Tuple, Union

Buffer = Union[bytes, bytearray, memoryview]

# Items shorter than this are copied into a merged tail (a memcpy of a few
# hundred bytes is cheaper than an iovec and a deque slot per write).
MERGE_BELOW = 4096
# A merged tail grows to at most this before a new one starts: large enough
# to fill a socket buffer in a few iovecs, small enough to stay cache-warm.
MERGE_SIZE = 64 * 1024
# Iovecs per writev: IOV_MAX is 1024; 64 x up to 64 KiB fills any socket
# buffer while each call stays cheap to set up.
IOVECS_PER_SEND = 64


class Backlog:
    """The unsent bytes of one connection (loop thread only).

    ``pending`` is the number of bytes not yet sent; ``bool(backlog)`` says
    whether anything is left.  ``append`` queues, ``drain`` hands the head to
    the kernel, ``clear`` drops everything (abort).
    """

    __slots__ = ("_items", "_head", "_tail", "pending")

    def __init__(self) -> None:
        self._items: Deque[Buffer] = collections.deque()
        self._head = 0  # bytes of _items[0] already sent
        self._tail: Optional[bytearray] = None  # the merge target, if it is _items[-1]
        self.pending = 0

    def __bool__(self) -> bool:
        return self.pending > 0

    def __len__(self) -> int:
        return self.pending

    def append(self, data: Buffer) -> None:
        """Queue ``data`` after everything queued before (``bytes`` by reference;
        other buffers must not change afterwards: pass an owned copy)."""
        size = len(data)
        if not size:
            return
        self.pending += size
        if size < MERGE_BELOW:
            tail = self._tail
            if tail is not None and len(tail) + size <= MERGE_SIZE:
                tail += data
                return
            tail = self._tail = bytearray(data)
            self._items.append(tail)
            return
        self._tail = None
        self._items.append(data)

    def drain(self, fd: int, backend: Any) -> int:
        """Send until the backlog is empty or the socket is full; bytes sent.
        ``OSError`` on a real error (what was sent before it stays sent)."""
        total = 0
        while self._items:
            offered, sent = self._send_head(fd, backend)
            if sent is None:
                break
            total += sent
            if sent < offered:
                break  # a short write: the socket is full again
        return total

    def _send_head(self, fd: int, backend: Any) -> Tuple[int, Optional[int]]:
        """One ``send``/``writev`` of the head: (bytes offered, bytes sent or None)."""
        items = self._items
        head = self._head
        if len(items) == 1:
            first = items[0]
            offered = len(first) - head
            sent = backend.send(fd, memoryview(first)[head:] if head else first)
        else:
            chunk: List[Buffer] = []
            offered = -head
            for item in items:
                chunk.append(item)
                offered += len(item)
                if len(chunk) == IOVECS_PER_SEND:
                    break
            if head:
                chunk[0] = memoryview(chunk[0])[head:]
            sent = backend.writev(fd, chunk)
        # Whatever was handed to the kernel is frozen: resizing a bytearray
        # that a memoryview or a cffi buffer still exports raises BufferError
        # (on PyPy the export lives until the next collection).
        self._tail = None
        if sent:
            self._consume(sent)
        return offered, sent

    def _consume(self, sent: int) -> None:
        """Drop ``sent`` bytes from the head."""
        self.pending -= sent
        items = self._items
        sent += self._head
        while items:
            size = len(items[0])
            if sent < size:
                break
            sent -= size
            items.popleft()
        self._head = sent if items else 0

    def clear(self) -> None:
        """Drop every unsent byte."""
        self._items.clear()
        self._head = 0
        self._tail = None
        self.pending = 0
