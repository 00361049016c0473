"""The reactor: one event loop per thread over the platform poller.

One iteration is four steps, each as few C calls as possible:

1. ``poll_read``: one C call waits for events and reads every readable socket
   into the read arena, returning flat ``(fd, flags, offset, length)`` records
   (connections with large reads are only reported ``READY``, and read by
   ``_read_direct`` into the bytes handed to ``on_data``);
2. dispatch: Python walks the records and runs the callbacks;
3. flush: every write queued during the iteration goes out in one C call;
4. close: connections closed during the iteration are closed for real.

Why the close step is last: the kernel hands a closed fd number to the next
``accept`` at once, so an fd closed mid-iteration could be reused while
records or queued writes of this iteration still name it.  Closing last, and
ignoring records for a connection accepted during the current batch
(``Conn._born``), keeps every byte with the connection it belongs to.
"""

import collections
import errno
import logging
import os
import socket
import threading
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from . import _sys
from ._sys.flags import EOF as _EOF, ERROR as _ERROR, MORE as _MORE, READ as _READ
from ._sys.flags import DIRECT_FDS, HUP as _HUP, READY as _READY
from ._sys.flags import SPECIAL as _SPECIAL, UNREAD as _UNREAD, WRITABLE as _WRITABLE
from .conn import CLOSED, CLOSING, OPEN, Conn
from .errors import ServerStateError
from .options import Options
from .timers import TimerHandle, Timers, monotonic
from .writes import SMALL_WRITE, WRITE_ARENA_SIZE, WRITE_MAX_ITEMS

logger = logging.getLogger("pulse")

ACCEPT_BURST = 64
# After EMFILE/ENFILE the listener is parked this long instead of spinning on
# a level-triggered event that accept cannot clear.
ACCEPT_BACKOFF = 0.1
# A connection whose arena read reaches DIRECT_READ_ON bytes and lands past
# the first DIRECT_AFTER bytes of the arena (which stay in cache) is read by
# _read_direct from then on, until one of those reads is under
# DIRECT_READ_OFF: large messages in busy batches skip a copy out of cold
# memory; small ones, and a lone connection, keep the one-call batch.
DIRECT_READ_ON = 16 * 1024
DIRECT_READ_OFF = 4 * 1024
DIRECT_AFTER = 256 * 1024

_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class EventLoop:
    """An event loop: owns a poller, the connections it accepted, timers and
    the write batch.  ``run()`` blocks in the calling thread until ``stop()``.

    Most users never touch it directly: ``Server`` creates one.  Its
    thread-safe entry points are ``call_soon_threadsafe`` and ``stop``.
    """

    def __init__(self, options: Optional[Options] = None) -> None:
        opts = options or Options()
        self.options = opts
        self.edge = opts.edge
        self.zero_copy = opts.zero_copy
        self.write_buffer_high_water = opts.write_buffer_high_water
        self.write_buffer_low_water = opts.write_buffer_low_water
        self.write_buffer_limit = opts.write_buffer_limit
        self._read_size = opts.read_buffer_size
        # Edge mode drains a socket over several calls (carrying it to the
        # next one) so that one busy peer cannot starve the others; level
        # mode relies on the kernel reporting it again.
        self._max_reads = opts.max_reads_per_event
        #: The syscall backend module (``pulse._sys.linux``, ``darwin`` or ``portable``).
        self.backend = backend = _sys.load(opts.backend)
        self._poller = backend.Poller(opts.max_events)
        self._waker = backend.Waker()
        try:
            self._waker.attach(self._poller)
        except BaseException:
            self._poller.close()
            self._waker.close()
            raise
        arena_size = max(4 * 1024 * 1024, 4 * opts.read_buffer_size)
        self._arena = backend.ReadArena(arena_size, 4 * opts.max_events + 64)
        # Connections whose reads are large are read by _read_direct instead
        # (bytes payloads, with a backend that supports it).
        self._direct: Optional[memoryview] = None
        if not opts.zero_copy and getattr(self._arena, "ndirect", 0):
            self._direct = self._arena.direct
        self._wb = backend.WriteBatch(WRITE_ARENA_SIZE, WRITE_MAX_ITEMS)
        # Hot fields of the write batch, read by Conn.write's inlined fast path.
        self._warena = self._wb.arena
        self._witems = self._wb.items
        self._wcount = 0
        self._wpos = 0
        self._track_idle = opts.idle_timeout is not None
        self._wlast: Optional[Conn] = None
        self._wconns: List[Conn] = []
        self._conns: Dict[int, Conn] = {}
        self._specials: Dict[int, Callable[[], None]] = {}
        self._carry: List[Conn] = []
        self._parked: List[Tuple[socket.socket, Any, TimerHandle]] = []  # listeners out of fds
        self._close_queue: List[Conn] = []
        self._ready: Deque[Tuple[Callable[..., Any], Tuple[Any, ...]]] = collections.deque()
        self._timers = Timers()
        self._batch = 0
        self._now = monotonic()
        self._thread_id: Optional[int] = None
        self._stopping = False
        self._closed = False
        self._runner: Any = None
        #: Counters for stats: bytes received and sent by all connections.
        self.bytes_in = 0
        self.bytes_out = 0
        if self._waker.fileno() >= 0:
            self._specials[self._waker.fileno()] = self._waker.drain

    # -- public -----------------------------------------------------------

    @property
    def connections(self) -> int:
        """Number of open connections."""
        return len(self._conns)

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` on the loop's thread soon; callable from any thread."""
        self._ready.append((callback, args))
        if self._thread_id != threading.get_ident():
            self._waker.wake()

    call_soon = call_soon_threadsafe

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> TimerHandle:
        """Run ``callback(*args)`` after ``delay`` seconds; returns a cancellable handle.

        Call it on the loop's thread (from a callback); use
        ``call_soon_threadsafe`` to schedule from elsewhere.
        """
        if delay != delay or delay < 0:
            raise ValueError("delay must be >= 0 seconds, got {}".format(delay))
        return self._timers.add(monotonic() + delay, callback, args)

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> TimerHandle:
        """Run ``callback(*args)`` at ``time.monotonic()`` time ``when``."""
        return self._timers.add(when, callback, args)

    def stop(self) -> None:
        """Ask ``run()`` to return; safe from any thread and from signal handlers."""
        self._stopping = True
        self._waker.wake()

    def add_listener(self, sock: socket.socket, handler: Any) -> None:
        """Accept connections from the listening ``sock`` and serve them with ``handler``."""
        sock.setblocking(False)
        fd = sock.fileno()
        self._specials[fd] = lambda: self._accept(sock, handler)
        self._poller.add_special(fd)

    def remove_listener(self, sock: socket.socket) -> None:
        """Stop accepting from ``sock``; call it before closing the socket.

        epoll watches the open file description, not the fd: when another
        process (a launcher's worker) still holds the listener, closing our
        copy would leave it in our poller, waking us for connections that are
        not ours to take.
        """
        fd = sock.fileno()
        if fd >= 0 and self._specials.pop(fd, None) is not None:
            self._poller.unregister(fd)

    # -- the loop ---------------------------------------------------------

    def run(self, on_stop: Optional[Callable[[], None]] = None) -> None:
        """Run until ``stop()``, then close every connection gracefully and return.

        Connections get ``shutdown_timeout`` seconds to flush what was written
        to them; ``on_stop`` runs once accepting has stopped.
        """
        if self._closed:
            raise ServerStateError("the event loop is closed; create a new one")
        if self._thread_id is not None:
            raise ServerStateError("the event loop is already running")
        self._thread_id = threading.get_ident()
        try:
            if self.options.task_type != "loop" and self._runner is None:
                from .tasks import make_runner
                self._runner = make_runner(self, self.options)
            while not self._stopping:
                self._run_once()
            if on_stop is not None:
                on_stop()
            self._shutdown()
        finally:
            self._close()

    def _run_once(self) -> None:
        if self._ready or self._close_queue or self._wcount:
            timeout = 0
        elif self._timers._heap:
            timeout = self._timers.timeout_ms(monotonic())
        else:
            timeout = -1  # no timer: block until an event or a wake-up
        carry = self._carry
        if carry:
            self._carry = []
            # ~fd tells the C helper the hang-up was seen: read on to the FIN.
            fds = [~c._fd if c._hup else c._fd for c in carry
                   if c._state == OPEN and not c.reading_paused]
        else:
            fds = carry
        count = self._poller.poll_read(timeout, self._arena, fds, self._read_size, self._max_reads)
        self._batch += 1
        self._now = monotonic()
        if count:
            self._dispatch(count)
        if self._timers._heap:
            self._run_timers()
        if self._ready:
            self._run_ready()
        if self._wcount:
            self._flush()
        if self._close_queue:
            self._close_phase()

    def _dispatch(self, count: int) -> None:
        arena = self._arena
        records = arena.records[:4 * count].tolist()
        data = arena.data
        conns = self._conns
        batch = self._batch
        runner = self._runner
        zero_copy = self.zero_copy
        direct = self._direct
        edge = self.edge
        track_idle = self._track_idle
        now = self._now
        received = 0
        for k in range(0, 4 * count, 4):
            flags = records[k + 1]
            if flags & _SPECIAL:
                special = self._specials.get(records[k])
                if special is not None:
                    special()
                continue
            conn = conns.get(records[k])
            if conn is None or conn._born == batch:
                continue  # closed, or a new connection that reused a stale fd number
            if flags & _READ:
                if conn._state != OPEN:
                    continue  # closed by the user: no on_data after close()
                off = records[k + 2]
                size = records[k + 3]
                received += size
                if track_idle:
                    conn._active = now
                payload = data[off:off + size]
                if conn._user_paused and runner is None:
                    # Read in this batch before pause_reading() took effect:
                    # kept for resume_reading(), never dropped.
                    conn._hold(payload.tobytes())
                    continue
                if not zero_copy:
                    payload = payload.tobytes()
                if (size >= DIRECT_READ_ON and off + size > DIRECT_AFTER and direct is not None
                        and records[k] < DIRECT_FDS):
                    direct[records[k]] = 1  # large reads: _read_direct from now on
                if runner is None:
                    try:
                        conn._on_data(conn, payload)
                    except Exception as exc:  # noqa: BLE001 - a callback may raise anything
                        self._callback_failed(conn, "on_data", exc)
                else:
                    runner.data(conn, payload)
                if flags & _MORE and edge:
                    if flags & _HUP:
                        conn._hup = True
                    self._carry.append(conn)
            elif flags & _READY:
                self._read_direct(conn, flags)
            elif flags & _WRITABLE:
                conn._on_writable()
            elif flags & _EOF:
                self._on_eof(conn)
            elif flags & _ERROR:
                conn._fail(_os_error(-records[k + 3]))
            elif flags & _UNREAD and edge:
                if flags & _HUP:
                    conn._hup = True
                self._carry.append(conn)
        self.bytes_in += received

    def _read_direct(self, conn: Conn, flags: int) -> None:
        """Read a connection the poll helper left to us (``READY``) straight
        into the bytes that ``on_data`` receives.

        For large messages this replaces a copy out of the read arena, which
        is cold by the time Python gets to it when many sockets were read in
        one call: at 64 KiB x 500 connections it halved the server's
        user-space CPU per request.  The drain follows the C helper's rules:
        a short read ends it unless the peer hung up, ``max_reads_per_event``
        reads at most, then a carry to the next call (edge mode).  A paused
        connection is not read: resuming re-arms the poller, which reports
        what is still waiting in the kernel.
        """
        if conn._state != OPEN or conn.reading_paused:
            return
        fd = conn._fd
        hup = flags & _HUP
        size = self._read_size
        for _ in range(self._max_reads):
            try:
                data = os.read(fd, size)
            except BlockingIOError:
                return
            except OSError as exc:
                conn._fail(exc)
                return
            got = len(data)
            if not got:
                self._on_eof(conn)
                return
            self.bytes_in += got
            if self._track_idle:
                conn._active = self._now
            if got < DIRECT_READ_OFF:
                self._direct[fd] = 0  # small reads again: back to the batched arena
            self._deliver(conn, data)
            if conn._state != OPEN or conn.reading_paused:
                return
            if got < size and not hup:
                return
        if self.edge:
            if hup:
                conn._hup = True
            self._carry.append(conn)

    def _on_eof(self, conn: Conn) -> None:
        """The peer sent FIN (after every byte it sent was delivered or held)."""
        if conn._state != OPEN:
            if not conn._backlog:
                self._close_queue.append(conn)  # closing anyway: the peer is gone
        elif self._runner is None and (conn._user_paused or conn._held):
            conn._held_eof = True  # after the held data, at resume_reading()
        elif self._runner is None:
            conn._peer_closed()
        elif not conn._eof:
            # Close once the callbacks queued before the FIN have run (their
            # replies must still go out); stop reading meanwhile.
            conn._eof = True
            conn._update_interest()
            self._runner.eof(conn)

    def _deliver(self, conn: Conn, payload: bytes) -> None:
        """Hand one chunk to ``on_data`` (the dispatch loop inlines this)."""
        if self._runner is None:
            try:
                conn._on_data(conn, payload)
            except Exception as exc:  # noqa: BLE001
                self._callback_failed(conn, "on_data", exc)
        else:
            self._runner.data(conn, payload)

    def _run_timers(self) -> None:
        for handle in self._timers.pop_due(monotonic()):
            try:
                handle.callback(*handle.args)
            except Exception:  # noqa: BLE001
                logger.exception("pulse: timer callback %r raised", handle.callback)

    def _run_ready(self) -> None:
        ready = self._ready
        # Only what is queued now: callbacks that queue more wait a turn.
        for _ in range(len(ready)):
            callback, args = ready.popleft()
            try:
                callback(*args)
            except Exception:  # noqa: BLE001
                logger.exception("pulse: callback %r raised", callback)

    # -- writes -----------------------------------------------------------

    def _add_write(self, conn: Conn, data: Any) -> None:
        """Queue ``data`` for ``conn`` in this iteration's write batch.

        The slow path of ``Conn.write`` (which inlines the common case): type
        checks, mutable buffers, large writes, and a full batch.
        """
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
            self._write_large(conn, data, size)
            return
        if self._wcount >= WRITE_MAX_ITEMS or self._wpos + size > WRITE_ARENA_SIZE:
            self._flush()
            if conn._state != OPEN:
                return  # the flush found the connection dead; its on_close reports why
            if conn._backlog:
                conn._queue(bytes(data))
                return
        items = self._witems
        count = self._wcount
        pos = self._wpos
        self._warena[pos:pos + size] = data
        self._wpos = pos + size
        if self._wlast is conn:
            items[3 * count - 1] += size  # contiguous with its last write: one send
            return
        base = 3 * count
        items[base] = conn._fd
        items[base + 1] = pos
        items[base + 2] = size
        self._wconns.append(conn)
        self._wcount = count + 1
        self._wlast = conn

    def _write_large(self, conn: Conn, data: Any, size: int) -> None:
        """Send a large write at once, as uvloop does, instead of batching it.

        Batching would keep every large payload of the iteration alive until
        the flush; freeing megabytes at once makes the allocator return them
        to the kernel and fault them back in on the next round, which cost
        three times the CPU of the send itself at 64 KiB x 500 connections.
        Earlier writes of the batch are flushed first, so order holds.
        """
        if self._wcount:
            self._flush()
            if conn._state != OPEN:
                return
            if conn._backlog:
                conn._queue(bytes(data))
                return
        try:
            sent = self.backend.send(conn._fd, data) or 0
        except OSError as exc:
            conn._fail(exc)
            return
        self.bytes_out += sent
        if sent < size:
            rest = memoryview(data)[sent:] if type(data) is bytes else bytes(data[sent:])
            conn._queue(rest)

    def _flush(self) -> None:
        """Send the write batch; queue what the kernel did not take."""
        count = self._wcount
        if not count:
            return
        wb = self._wb
        conns = self._wconns
        self.bytes_out += self._wpos
        self._wcount = 0
        self._wpos = 0
        self._wlast = None
        self._wconns = []
        if not wb.send(count):
            return
        items = wb.items[:3 * count].tolist()
        results = wb.results[:count].tolist()
        for i in range(count):
            sent = results[i]
            size = items[3 * i + 2]
            if sent == size:
                continue
            conn = conns[i]
            if sent < 0:
                self.bytes_out -= size
                conn._fail(_os_error(-sent))
                continue
            self.bytes_out -= size - sent
            if conn._abort or conn._state == CLOSED:
                continue
            offset = items[3 * i + 1]
            conn._queue(wb.arena[offset + sent:offset + size].tobytes())

    # -- connections ------------------------------------------------------

    def _accept(self, sock: socket.socket, handler: Any) -> None:
        lfd = sock.fileno()
        if lfd < 0:
            return
        try:
            fds = self.backend.accept_batch(lfd, self._poller, self.options.tcp_nodelay,
                                    self.edge, ACCEPT_BURST)
        except OSError as exc:
            if exc.errno in _RESOURCE_ERRORS:
                self._park_listener(sock, handler, exc)
            else:
                logger.error("pulse: accept on fd %d failed: %s", lfd, exc)
            return
        batch = self._batch
        for fd, peer in fds:
            conn = Conn(self, fd, handler, batch)
            conn._raddr = peer  # raw or formatted: Conn.remote_address formats it lazily
            self._conns[fd] = conn
            self._opened(conn)

    def _park_listener(self, sock: socket.socket, handler: Any, exc: OSError) -> None:
        """Out of fds: stop watching the listener for a while instead of spinning."""
        logger.warning("pulse: accept failed (%s); pausing accepts for %.0f ms with %d "
                       "connections open", exc.strerror, ACCEPT_BACKOFF * 1000, len(self._conns))
        lfd = sock.fileno()
        self._poller.unregister(lfd)
        self._specials.pop(lfd, None)

        timer = self.call_later(ACCEPT_BACKOFF, self._unpark)
        self._parked.append((sock, handler, timer))

    def _unpark(self) -> None:
        """Watch parked listeners again: the back-off ended, or an fd came back."""
        parked, self._parked = self._parked, []
        for sock, handler, timer in parked:
            timer.cancel()
            if not self._stopping and sock.fileno() >= 0:
                self.add_listener(sock, handler)

    def adopt(self, fd: int, handler: Any) -> Conn:
        """Serve an already connected, registered, non-blocking socket ``fd``."""
        conn = Conn(self, fd, handler, self._batch)
        self._conns[fd] = conn
        self._opened(conn)
        return conn

    def dial(self, address: Any, handler: Any, timeout: Optional[float] = 10.0) -> Conn:
        """Open an outgoing connection served by ``handler``; returns its ``Conn`` at once.

        ``address`` takes the same forms as ``Server.listen`` (host names are
        resolved in the calling thread).  On success ``on_open`` runs; a
        failed or timed-out connect calls ``on_close(conn, err)`` without
        ``on_open``.  Writes made before the connect completes are queued.
        Safe from any thread.
        """
        from .client import dial
        return dial(self, address, handler, timeout)

    def register(self, sock: Any, handler: Any) -> Conn:
        """Serve an already connected socket (a ``socket.socket`` or fd), taking ownership."""
        from .client import register
        return register(self, sock, handler)

    def _opened(self, conn: Conn) -> None:
        conn.opened = True
        idle = self.options.idle_timeout
        if idle is not None:
            conn._active = monotonic()
            conn._idle_timer = self.call_later(idle, conn._idle_check, idle)
        if self.options.tcp_keepalive:
            try:
                self.backend.setsockopt_int(conn._fd, socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:
                pass  # Unix sockets have no keepalive
        if self._runner is not None:
            self._runner.open(conn)
            return
        try:
            conn._handler.on_open(conn)
        except Exception as exc:  # noqa: BLE001
            self._callback_failed(conn, "on_open", exc)

    def _notify(self, conn: Conn, name: str) -> None:
        """Call the optional handler method ``name(conn)`` (backpressure events)."""
        func = getattr(conn._handler, name, None)
        if func is None:
            return
        if self._runner is not None:
            self._runner.call(conn, func)
            return
        try:
            func(conn)
        except Exception as exc:  # noqa: BLE001
            self._callback_failed(conn, name, exc)

    def _callback_failed(self, conn: Conn, name: str, exc: BaseException) -> None:
        """A callback raised: log it and close that connection only."""
        logger.error("pulse: %s raised on %r; closing the connection", name, conn,
                     exc_info=(type(exc), exc, exc.__traceback__))
        conn._fail(exc)

    def _close_phase(self) -> None:
        while self._close_queue:
            queue = self._close_queue
            self._close_queue = []
            for conn in queue:
                if conn._state == CLOSED:
                    continue
                # An on_close that ran just before may have written to this
                # connection: send it before the fd goes.
                if self._wcount:
                    self._flush()
                if conn._backlog and not conn._abort and not conn._connecting:
                    if not conn._writing:
                        conn._update_interest()
                    continue  # _on_writable queues it again once drained
                self._finalize(conn)
        if self._wcount:
            self._flush()  # what on_close wrote to connections that stay open

    def _finalize(self, conn: Conn) -> None:
        conn._state = CLOSED
        fd = conn._fd
        if self._conns.get(fd) is conn:
            del self._conns[fd]
        if conn._connecting:
            self._specials.pop(fd, None)
        for timer in (conn._read_timer, conn._write_timer, conn._idle_timer):
            if timer is not None:
                timer.cancel()
        conn._read_timer = conn._write_timer = conn._idle_timer = None
        if conn._user_timers:
            for timer in conn._user_timers:
                timer.cancel()
            conn._user_timers = None
        conn._backlog = []
        conn._pending = 0
        if self._direct is not None and 0 <= fd < DIRECT_FDS:
            self._direct[fd] = 0  # the next socket with this number starts on the arena
        forget = getattr(self._poller, "forget", None)
        if forget is not None:
            forget(fd)
        try:
            self.backend.close(fd)
        except OSError as exc:
            logger.warning("pulse: close(fd=%d) failed: %s", fd, exc)
        if self._parked:
            self._unpark()  # an fd came back: accept now, not at the end of the back-off
        err = conn._close_err
        if self._runner is not None:
            self._runner.close(conn, err)
            return
        try:
            conn._handler.on_close(conn, err)
        except Exception:  # noqa: BLE001
            logger.exception("pulse: on_close raised on %r", conn)

    # -- shutdown ---------------------------------------------------------

    def _shutdown(self) -> None:
        """Close every connection: flush what was written, within shutdown_timeout."""
        for fd in list(self._specials):
            if fd != self._waker.fileno():
                self._poller.unregister(fd)
                del self._specials[fd]
        for conn in list(self._conns.values()):
            if conn._state == OPEN:
                conn._state = CLOSING
                self._close_queue.append(conn)
        deadline = monotonic() + self.options.shutdown_timeout

        def force() -> None:
            for conn in list(self._conns.values()):
                conn._fail(None)
        timer = self.call_at(deadline, force)
        while self._conns or self._close_queue or self._wcount:
            self._run_once()
        timer.cancel()
        while self._ready:
            self._run_ready()
        if self._runner is not None:
            self._runner.shutdown()

    def close(self) -> None:
        """Release the poller of a loop that will not run (``run()`` does this itself)."""
        if self._thread_id is not None and not self._closed:
            raise ServerStateError("close() of a running loop: call stop() instead")
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._poller.close()
        self._waker.close()


def _os_error(code: int) -> OSError:
    """An ``OSError`` of the right subclass (``ConnectionResetError``, ...) for ``code``."""
    return OSError(code, os.strerror(code))
