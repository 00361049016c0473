"""Direct reads: large messages read straight into the bytes ``on_data`` gets.

``DirectReads`` is a base of ``EventLoop`` (these are the loop's own
methods).  The poll helper reports a connection marked in
``ReadArena.direct`` as ``READY`` instead of reading it into the arena; the
loop then reads it here (``os.read``; ``ReadArena.read`` on PyPy).  For
large messages this replaces a copy out of the read arena, which is cold by
the time Python gets to it when many sockets were read in one call: at
64 KiB x 500 connections it halved the server's user-space CPU per request.
``tuning.py`` holds the thresholds that switch a connection in and out.  Of
a ``Conn`` it reads ``_fd`` and ``_state`` (hot path) and calls its methods.
"""

import os
import sys
from typing import TYPE_CHECKING, Any

from ._sys.flags import HUP as _HUP
from .tuning import DIRECT_READ_OFF

# CPython reads with os.read, into the bytes it returns; PyPy through the
# arena's 64-byte aligned scratch (ReadArena.read) and one copy, which cost
# it less than os.read's unaligned destination and its 128 KiB allocation per
# read (bench/run.py 2026-12-04, us/req os.read -> ReadArena.read: PyPy
# 64 KiB x 50 34.5 -> 21.9, 16 KiB x 50 12.7 -> 9.5, 64 KiB x 1 47.9 -> 51.5;
# CPython 22.6 -> 25.2, 10.5 -> 11.0, 56.5 -> 58.7: the copy wins nothing).
_OS_READ = sys.implementation.name != "pypy"

if TYPE_CHECKING:  # pragma: no cover
    from .conn import Conn


class DirectReads:
    """``_read_direct`` of the event loop."""

    # Provided by EventLoop.
    _arena: Any
    _read_size: int
    _max_reads: int
    _track_idle: bool
    _now: float
    _direct: Any
    _carry: Any
    edge: bool
    bytes_in: int

    def _read_direct(self, conn: "Conn", flags: int) -> None:
        """Read a connection the poll helper left to us (``READY``) straight
        into the bytes that ``on_data`` receives.  The drain follows the C helper's rules:
        a short read ends it unless the peer hung up, ``max_reads_per_event``
        reads at most, then a carry to the next call (edge mode).  A paused
        connection is not read: resuming re-arms the poller, which reports
        what is still waiting in the kernel.
        """
        if not conn._wants_read():
            return
        fd = conn._fd
        hup = flags & _HUP
        size = self._read_size
        read = os.read if _OS_READ else self._arena.read
        for _ in range(self._max_reads):
            try:
                data = read(fd, size)
            except BlockingIOError:
                return
            except OSError as exc:
                conn._fail(exc)
                return
            got = len(data)
            if not got:
                conn._raw_eof()
                return
            self.bytes_in += got
            if self._track_idle:
                conn._touch(self._now)
            if got < DIRECT_READ_OFF and self._direct is not None:
                self._direct[fd] = 0  # small reads again: back to the batched arena
            conn._received(data)
            if not conn._wants_read():
                return
            if got < size and not hup:
                return
        if self.edge:
            self._carry[fd] = (conn, bool(hup))
