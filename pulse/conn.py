"""One TCP (or Unix) connection owned by an event loop.

A ``Conn`` is what the handler callbacks receive.  Writes made on the loop's
thread go into the loop's write batch (sent by one C call per iteration);
when the socket refuses bytes the rest is kept in the connection's backlog and
sent with ``writev`` once the socket is writable again.  Past the high-water
mark the connection stops being read until the backlog drains below the
low-water mark, so a peer that does not read cannot grow our memory.

Closing is always deferred to the end of the loop iteration: the fd number is
reused by the kernel at once, so closing it while writes or records of this
iteration still name it would hand them to a stranger.
"""

import datetime
import errno
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, List, Optional, Tuple, Union

from ._sys.addresses import parse_sockaddr
from .errors import ConnClosedError, WriteBufferFullError
from .timers import monotonic
from .writes import SMALL_WRITE, WRITE_ARENA_SIZE, WRITE_MAX_ITEMS

if TYPE_CHECKING:  # pragma: no cover
    from .loop import EventLoop
    from .timers import TimerHandle

Address = Union[Tuple[str, int], str]
Deadline = Union[None, int, float, datetime.datetime]

OPEN = 0
CLOSING = 1
CLOSED = 2

_get_ident = threading.get_ident


class Conn:
    """A connection: ``write``, ``close``, a session slot, addresses, deadlines.

    Created by the loop, never by users.  Every method may be called from the
    loop's thread; ``write`` and ``close`` may also be called from any other
    thread (they are handed to the loop, in order).
    """

    __slots__ = (
        "_loop", "_fd", "_handler", "session", "_state", "_born", "_backlog",
        "_pending", "_above_high", "backpressure_reads", "_read_paused", "_user_paused", "_input_paused", "_writing", "_close_err",
        "_abort", "_close_called", "_eof", "_read_timer", "_write_timer", "_idle_timer",
        "_user_timers", "_active", "_laddr", "_raddr", "_task", "_on_data", "_connecting",
        "_hup", "_held", "_held_eof", "opened",
        "__weakref__",
    )

    def __init__(self, loop: "EventLoop", fd: int, handler: Any, born: int) -> None:
        self._loop = loop
        self._fd = fd
        self._handler = handler
        self._on_data = handler.on_data  # bound once: the loop calls it per read
        self._connecting = False  # a dial in progress: writes wait in the backlog
        self._hup = False  # the kernel reported the peer's FIN while data was still queued
        self._held: Optional[List[bytes]] = None  # read before pause_reading() took effect
        self._held_eof = False  # the FIN came while paused: report it after the held data
        #: True once ``on_open`` ran (False for a dial that failed to connect).
        self.opened = False
        #: Free slot for the handler's per-connection state (the Go ``Session``).
        self.session: Any = None
        self._state = OPEN
        self._born = born
        self._backlog: List[Any] = []
        self._pending = 0
        self._above_high = False  # the backlog passed the high-water mark, not yet drained
        #: Stop reading this connection while its write backlog is above the
        #: high-water mark (right for request/response servers).  A proxy turns
        #: it off and pauses the *other* side from on_pause_writing instead.
        self.backpressure_reads = True
        self._read_paused = False  # paused by the write high-water mark
        self._user_paused = False  # paused by pause_reading()
        self._input_paused = False  # paused: the task runner has too much queued input
        self._writing = False      # write interest registered with the poller
        self._close_err: Optional[BaseException] = None
        self._abort = False
        self._close_called = False  # close()/abort() was called, from any thread
        self._eof = False  # the peer closed its side; waiting for queued callbacks
        self._read_timer: Optional["TimerHandle"] = None
        self._write_timer: Optional["TimerHandle"] = None
        self._idle_timer: Optional["TimerHandle"] = None
        self._user_timers: Optional[List["TimerHandle"]] = None
        self._active = 0.0  # monotonic time of the last read or write (idle timeout)
        self._laddr: Optional[Address] = None
        self._raddr: Any = None  # an Address, or raw sockaddr bytes from accept
        self._task: Any = None  # the task-mode runner's per-connection state

    # -- public API -------------------------------------------------------

    def fileno(self) -> int:
        """The socket's file descriptor (-1 once closed)."""
        return self._fd if self._state != CLOSED else -1

    @property
    def loop(self) -> "EventLoop":
        """The event loop that owns this connection."""
        return self._loop

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called or the connection ended."""
        return self._state != OPEN or self._close_called

    @property
    def local_address(self) -> Address:
        """The local address: ``(host, port)``, or a path for Unix sockets.

        Read it while the connection is open (in ``on_close`` it is known
        only if it was read before); ``ConnClosedError`` otherwise.
        """
        if self._laddr is None:
            self._laddr = self._sockaddr(False)
        return self._laddr

    @property
    def remote_address(self) -> Address:
        """The peer's address: ``(host, port)``, or a path (often ``""``) for Unix sockets.

        Kept from ``accept``/``dial``, so it still answers in ``on_close``
        after the peer reset the connection.
        """
        raddr = self._raddr
        if raddr is None or type(raddr) is bytes:
            parsed = parse_sockaddr(raddr) if raddr else None
            self._raddr = raddr = parsed if parsed is not None else self._sockaddr(True)
        return raddr

    def _sockaddr(self, peer: bool) -> Address:
        if self._state == CLOSED:
            raise ConnClosedError("the {} address of a closed connection was not read while "
                                  "it was open".format("remote" if peer else "local"))
        return self._loop.backend.sockaddr(self._fd, peer)

    def set_session(self, session: Any) -> None:
        """Store per-connection state (same as assigning ``conn.session``)."""
        self.session = session

    def get_session(self) -> Any:
        """Return the per-connection state stored with ``set_session``."""
        return self.session

    @property
    def write_buffer_size(self) -> int:
        """Bytes accepted by ``write`` and not yet handed to the kernel."""
        return self._pending

    @property
    def reading_paused(self) -> bool:
        """True while the connection is not read (backpressure or ``pause_reading``)."""
        return self._read_paused or self._user_paused or self._input_paused

    def write(self, data: Union[bytes, bytearray, memoryview]) -> None:
        """Queue ``data`` for sending; never blocks.

        ``bytes`` are kept by reference, ``bytearray`` and ``memoryview`` are
        copied, so the caller may reuse its buffer at once.  Raises
        ``ConnClosedError`` once the connection is closed or closing, and
        ``TypeError`` for anything that is not a bytes-like object.
        """
        if self._state or self._close_called:
            raise ConnClosedError("write on a closed connection (fd was {})".format(self._fd))
        loop = self._loop
        if loop._thread_id != _get_ident():
            loop.call_soon_threadsafe(self._write_from_thread, _owned_bytes(data))
            return
        if self._backlog or self._connecting:
            self._queue(_owned_bytes(data))
            return
        if loop._track_idle:
            self._active = loop._now
        # The hot path, inlined from EventLoop._add_write: a small bytes
        # object is copied into the write arena, merged with this
        # connection's previous write when that was the batch's last one.
        if type(data) is bytes:
            size = len(data)
            pos = loop._wpos
            end = pos + size
            if size <= SMALL_WRITE and end <= WRITE_ARENA_SIZE and size:
                count = loop._wcount
                if loop._wlast is self:
                    loop._warena[pos:end] = data
                    loop._wpos = end
                    loop._witems[3 * count - 1] += size
                    return
                if count < WRITE_MAX_ITEMS:
                    loop._warena[pos:end] = data
                    loop._wpos = end
                    items = loop._witems
                    k = 3 * count
                    items[k] = self._fd
                    items[k + 1] = pos
                    items[k + 2] = size
                    loop._wconns.append(self)
                    loop._wcount = count + 1
                    loop._wlast = self
                    return
        loop._add_write(self, data)

    def close(self) -> None:
        """Close after sending what was written; ``on_close`` follows with ``err=None``.

        Idempotent, and safe from any thread.  No ``on_data`` is delivered
        after ``close()`` returns on the loop's thread.
        """
        self._close_called = True
        loop = self._loop
        if loop._thread_id != _get_ident():
            if self._task is not None:
                self._task.cancelled = True  # no on_data queued behind this call runs
            loop.call_soon_threadsafe(self.close)
            return
        if self._state == OPEN:
            self._state = CLOSING
            loop._close_queue.append(self)

    def abort(self, err: Optional[BaseException] = None) -> None:
        """Close at once, dropping unsent data; ``on_close`` gets ``err``."""
        self._close_called = True
        loop = self._loop
        if loop._thread_id != _get_ident():
            if self._task is not None:
                self._task.cancelled = True
            loop.call_soon_threadsafe(self.abort, err)
            return
        self._fail(err)

    def pause_reading(self) -> None:
        """Stop delivering ``on_data`` until ``resume_reading()``; safe from any thread.

        Data (and a FIN) that was already read is held, in order, and
        delivered after ``resume_reading()``; in the threaded task modes that
        includes what is queued for the handler when the pause is made.
        """
        if self._user_paused or self._state != OPEN:
            return
        tasks = self._task
        if tasks is not None:
            with tasks.lock:  # the workers check the flag under this lock
                self._user_paused = True
        else:
            self._user_paused = True
        if self._loop._thread_id != _get_ident():
            self._loop.call_soon_threadsafe(self._update_interest)
        else:
            self._update_interest()

    def resume_reading(self) -> None:
        """Undo ``pause_reading()``: held data comes first; safe from any thread."""
        loop = self._loop
        if loop._thread_id != _get_ident():
            loop.call_soon_threadsafe(self.resume_reading)
            return
        if not self._user_paused or self._state != OPEN:
            return
        if loop._runner is not None and self._task is not None:
            loop._runner.resume(self)  # clears the flag and requeues held callbacks first
        else:
            self._user_paused = False
        self._update_interest()
        if self._held or self._held_eof:
            loop.call_soon(self._release_held)

    def call_later(self, delay: float, callback: Any, *args: Any) -> "TimerHandle":
        """Run ``callback(*args)`` on the loop after ``delay`` seconds, unless the
        connection closed first (the timer is cancelled with the connection).

        Call it on the loop's thread (in loop mode, from a callback).
        """
        self._check_open("call_later")
        handle = self._loop.call_later(delay, self._timer_fired, callback, args)
        timers = self._user_timers
        if timers is None:
            timers = self._user_timers = []
        elif len(timers) >= 32:
            # Forget handles that already ran or were cancelled: a long-lived
            # connection that keeps scheduling must not grow this list.
            timers[:] = [t for t in timers if t._timers is not None]
        timers.append(handle)
        return handle

    def set_deadline(self, deadline: Deadline) -> None:
        """Set both the read and the write deadline (see ``set_read_deadline``)."""
        self.set_read_deadline(deadline)
        self.set_write_deadline(deadline)

    def set_read_deadline(self, deadline: Deadline) -> None:
        """Close the connection with ``TimeoutError`` at ``deadline`` unless reset.

        ``deadline`` is a timeout in seconds from now, an absolute
        ``datetime``, or ``None`` to clear.  As in Go, a deadline is absolute:
        receiving data does not extend it; set a new one to extend it.
        Raises ``ConnClosedError`` on a closed connection.
        """
        self._set_deadline(deadline, True)

    def set_write_deadline(self, deadline: Deadline) -> None:
        """Close the connection with ``TimeoutError`` if data written before
        ``deadline`` is still unsent at ``deadline`` (same forms as
        ``set_read_deadline``)."""
        self._set_deadline(deadline, False)

    def set_nodelay(self, enabled: bool = True) -> None:
        """Switch TCP_NODELAY (on by default); a no-op on Unix sockets.  Safe from any thread."""
        self._check_open("set_nodelay")
        if self._loop._thread_id != _get_ident():
            # On the loop, where the fd cannot be closed (and reused) under us.
            self._loop.call_soon_threadsafe(self._if_open, self.set_nodelay, enabled)
            return
        try:
            self._loop.backend.setsockopt_int(self._fd, socket.IPPROTO_TCP, socket.TCP_NODELAY,
                                1 if enabled else 0)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOPROTOOPT, errno.EINVAL):
                raise

    def set_keepalive(self, enabled: bool = True) -> None:
        """Switch SO_KEEPALIVE for this connection.  Safe from any thread."""
        self._check_open("set_keepalive")
        if self._loop._thread_id != _get_ident():
            self._loop.call_soon_threadsafe(self._if_open, self.set_keepalive, enabled)
            return
        self._loop.backend.setsockopt_int(self._fd, socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1 if enabled else 0)

    def _if_open(self, method: Any, *args: Any) -> None:
        if self._state == OPEN:
            method(*args)

    def _check_open(self, what: str) -> None:
        if self._state != OPEN or self._close_called:
            raise ConnClosedError("{} on a closed connection".format(what))

    def _set_deadline(self, deadline: Deadline, read: bool) -> None:
        self._check_open("set_read_deadline" if read else "set_write_deadline")
        when = _deadline_time(deadline)
        loop = self._loop
        if loop._thread_id != _get_ident():
            loop.call_soon_threadsafe(self._arm_deadline, when, read)
        else:
            self._arm_deadline(when, read)

    def _arm_deadline(self, when: Optional[float], read: bool) -> None:
        old = self._read_timer if read else self._write_timer
        if old is not None:
            old.cancel()
        handle = None
        if when is not None and self._state != CLOSED:
            handle = self._loop.call_at(when, self._deadline_expired, read)
        if read:
            self._read_timer = handle
        else:
            self._write_timer = handle

    def _deadline_expired(self, read: bool) -> None:
        if read:
            self._read_timer = None
            self._fail(TimeoutError("read deadline exceeded"))
        else:
            self._write_timer = None
            if self._backlog:
                self._fail(TimeoutError("write deadline exceeded with {} bytes unsent".format(
                    self._pending)))

    def _idle_check(self, timeout: float) -> None:
        """The idle timer fired: close if idle long enough, else re-arm for the rest."""
        if self._state == CLOSED:
            return
        due = self._active + timeout
        if due <= monotonic() + 0.001:
            self._idle_timer = None
            self._fail(TimeoutError("idle for {:g} s".format(timeout)))
        else:
            self._idle_timer = self._loop.call_at(due, self._idle_check, timeout)

    def __repr__(self) -> str:
        state = ("open", "closing", "closed")[self._state]
        return "<pulse.Conn fd={} {}>".format(self._fd, state)

    # -- loop side --------------------------------------------------------

    def _timer_fired(self, callback: Any, args: Tuple[Any, ...]) -> None:
        if self._state == OPEN:
            callback(*args)

    def _write_from_thread(self, data: bytes) -> None:
        if self._abort or self._state == CLOSED:
            return  # aborted while the write was in flight: on_close says why
        if self._backlog or self._connecting:
            self._queue(data)
        else:
            self._loop._add_write(self, data)

    def _queue(self, data: Any) -> None:
        """Append to the backlog and apply the water marks."""
        self._backlog.append(data)
        self._pending += len(data)
        loop = self._loop
        if self._pending > loop.write_buffer_high_water:
            limit = loop.write_buffer_limit
            if limit and self._pending > limit:
                self._fail(WriteBufferFullError(
                    "write buffer of {} bytes passed write_buffer_limit={}".format(
                        self._pending, limit)))
                return
            if not self._above_high:
                self._above_high = True
                if self.backpressure_reads:
                    self._read_paused = True
                    self._update_interest()
                loop._notify(self, "on_pause_writing")
        if not self._writing:
            self._update_interest()

    def _update_interest(self) -> None:
        """Tell the poller what this connection waits for now."""
        if self._state == CLOSED or self._connecting:
            return  # a dial in progress is watched by the connect logic
        write = bool(self._backlog)
        read = self._state == OPEN and not (
            self._read_paused or self._user_paused or self._input_paused or self._eof)
        self._writing = write
        loop = self._loop
        try:
            loop._poller.watch(self._fd, read, write, loop.edge)
        except OSError as exc:
            self._fail(exc)

    def _on_writable(self) -> None:
        """The socket accepts bytes again: send the backlog with writev."""
        backlog = self._backlog
        if not backlog:
            return
        while backlog:
            chunk = backlog[:64]  # IOV_MAX is 1024; 64 keeps each call cheap
            try:
                backend = self._loop.backend
                sent = backend.writev(self._fd, chunk) if len(chunk) > 1 else backend.send(
                    self._fd, chunk[0])
            except OSError as exc:
                self._fail(exc)
                return
            if sent is None:
                break
            self._loop.bytes_out += sent
            self._pending -= sent
            self._active = monotonic()
            done = 0
            for item in chunk:
                size = len(item)
                if sent >= size:
                    sent -= size
                    done += 1
                else:
                    if sent:
                        chunk_rest = memoryview(item)[sent:]
                        backlog[done] = chunk_rest
                    break
            del backlog[:done]
            if done < len(chunk):
                break  # short write: the socket is full again
        loop = self._loop
        if self._above_high and self._pending <= loop.write_buffer_low_water:
            self._above_high = False
            self._read_paused = False
            self._update_interest()
            loop._notify(self, "on_resume_writing")
        elif not backlog:
            self._update_interest()
        if not backlog and self._state == CLOSING:
            loop._close_queue.append(self)

    def _hold(self, payload: bytes) -> None:
        if self._held is None:
            self._held = []
        self._held.append(payload)

    def _release_held(self) -> None:
        """After resume_reading(): deliver what was held, in order, then a held FIN."""
        loop = self._loop
        held = self._held
        while held and not self._user_paused and self._state == OPEN:
            loop._deliver(self, held.pop(0))
        if not held and self._held_eof and not self._user_paused:
            self._held_eof = False
            loop._on_eof(self)

    def _peer_closed(self) -> None:
        """The peer sent FIN and every callback queued before it has run: close."""
        if self._state == OPEN:
            self._state = CLOSING
            self._loop._close_queue.append(self)

    def _fail(self, err: Optional[BaseException]) -> None:
        """Abort: drop unsent data and close with ``err`` at the end of this iteration."""
        if self._state == CLOSED:
            return
        if self._close_err is None:
            self._close_err = err
        self._abort = True
        if self._state == OPEN:
            self._state = CLOSING
        self._loop._close_queue.append(self)


def _owned_bytes(data: Any) -> bytes:
    """``data`` as bytes the caller cannot mutate afterwards (copied unless ``bytes``)."""
    if type(data) is bytes:
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError("write() takes bytes, bytearray or memoryview, got {}".format(
        type(data).__name__))


def _deadline_time(deadline: Deadline) -> Optional[float]:
    """A deadline as ``time.monotonic()`` time (``None`` stays ``None``)."""
    if deadline is None:
        return None
    if isinstance(deadline, datetime.datetime):
        wall = deadline.timestamp()  # naive datetimes are local time, as in datetime
        return monotonic() + (wall - time.time())
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)):
        raise TypeError("deadline must be seconds, a datetime or None, got {!r}".format(deadline))
    if deadline != deadline or deadline < 0:
        raise ValueError("deadline must be >= 0 seconds, got {}".format(deadline))
    return monotonic() + deadline
