"""The write side of a connection: the backlog, its water marks, writability.

``Outgoing`` is a base of ``Lifecycle`` (these are the connection's own
methods, over its own fields; ``lifecycle.py`` declares them).  What the
kernel does not take at once waits in the ``Backlog``; past
``write_buffer_high_water`` the connection stops being read (unless
``backpressure_reads`` is off) and ``on_pause_writing`` runs, and below the
low-water mark both are undone.  ``write_buffer_limit`` fails a connection
whose backlog passes it.  With TLS, plaintext goes through ``tls.TLS`` first
and what is queued here is ciphertext.
"""

from typing import TYPE_CHECKING, Any, Optional, Union

from .errors import WriteBufferFullError
from .states import CLOSED, OPEN, OPENING, PAUSE_BACKPRESSURE
from .timers import monotonic

if TYPE_CHECKING:  # pragma: no cover
    from .backlog import Backlog
    from .loop import EventLoop
    from .proxy_gate import ProxyGate
    from .tls import TLS
    from .writes import Batch


class Outgoing:
    """Queueing and sending what a connection writes (a base of ``Lifecycle``)."""

    __slots__ = ("_backlog", "_above_high", "_writing")

    _backlog: "Backlog"
    _above_high: bool  # the backlog passed the high-water mark, not yet drained
    _writing: bool  # write interest registered with the poller

    # Fields of Lifecycle.
    _loop: "EventLoop"
    _fd: int
    _state: int
    _abort: bool
    _eof_wanted: bool
    _writes: "Batch"
    _tls: Optional[Union["TLS", "ProxyGate"]]
    backpressure_reads: bool

    if TYPE_CHECKING:  # pragma: no cover - methods of Lifecycle
        def _update_interest(self) -> None: ...
        def _fail(self, err: Optional[BaseException], explicit: bool = False) -> None: ...
        def _pause(self, reason: int) -> None: ...
        def _resume(self, reason: int) -> None: ...
        def _call_optional(self, name: str) -> None: ...
        def _dropping(self) -> bool: ...
        def _touch(self, now: float) -> None: ...

    def _write_from_thread(self, data: bytes) -> None:
        """A write handed to the loop (from a worker, or while dialing)."""
        if self._abort or self._state == CLOSED:
            return  # aborted while the write was in flight: on_close says why
        tls = self._tls
        if tls is not None:
            tls.write(data)
        else:
            self._raw_write(data)

    def _raw_write(self, data: Any) -> None:
        """Send bytes as they are (plaintext, or the records of ``tls.TLS``)."""
        if self._dropping():
            return
        if self._backlog.pending or self._state == OPENING:
            self._queue(data)
        else:
            self._writes.add(self, data)  # type: ignore[arg-type] # a Lifecycle

    def _queue(self, data: Any) -> None:
        """Append to the backlog and apply the water marks."""
        self._backlog.append(data)
        if self._check_water():
            return
        if not self._writing:
            self._update_interest()

    def _queue_quiet(self, data: Any) -> None:
        """Append to the backlog without running callbacks (``Batch.flush``,
        which calls ``_check_water`` once every remainder is queued)."""
        self._backlog.append(data)

    def _check_water(self) -> bool:
        """Apply the high-water mark and the hard limit; True if the connection failed."""
        pending = self._backlog.pending
        loop = self._loop
        if pending > loop.write_buffer_high_water:
            limit = loop.write_buffer_limit
            if limit and pending > limit:
                self._fail(WriteBufferFullError(
                    "write buffer of {} bytes passed write_buffer_limit={}".format(
                        pending, limit)))
                return True
            if not self._above_high:
                self._above_high = True
                if self.backpressure_reads:
                    self._pause(PAUSE_BACKPRESSURE)
                self._call_optional("on_pause_writing")
        if not self._writing and self._state != CLOSED:
            self._update_interest()
        return False

    def _on_writable(self) -> None:
        """The socket accepts bytes again: send the backlog."""
        backlog = self._backlog
        if not backlog or self._state == CLOSED:
            return
        loop = self._loop
        try:
            sent = backlog.drain(self._fd, loop.backend)
        except OSError as exc:
            self._fail(exc)
            return
        if sent:
            loop.bytes_out += sent
            self._touch(monotonic())
        if self._above_high and backlog.pending <= loop.write_buffer_low_water:
            self._above_high = False
            self._resume(PAUSE_BACKPRESSURE)
            self._call_optional("on_resume_writing")
        if not backlog:
            self._update_interest()
            if self._state != OPEN or self._eof_wanted:
                loop._settle_later(self)  # type: ignore[arg-type] # a Lifecycle
