"""The reactor: one event loop per thread over the platform poller.

One iteration is four steps, each as few C calls as possible:

1. ``poll_read``: one C call waits for events and reads every readable socket
   into the read arena, returning flat ``(fd, flags, offset, length)`` records
   (connections with large reads are only reported ``READY``, and read by
   ``_read_direct`` into the bytes handed to ``on_data``);
2. dispatch: Python walks the records and runs the callbacks;
3. flush: every write queued during the iteration goes out in one C call;
4. settle: the closes and write shutdowns asked for during the iteration
   are carried out (``Conn._settle``).

Why settling is last: the kernel hands a closed fd number to the next
``accept`` at once, so an fd closed mid-iteration could be reused while
records or queued writes of this iteration still name it.  Closing last, and
ignoring records for a connection accepted during the current batch
(``Conn._born`` is the loop iteration it was accepted in), keeps every byte
with the connection it belongs to.

The connection's state belongs to ``Conn`` (``lifecycle.py``); the loop
reads a few of its fields on the hot path (``_state``, ``_born``,
``_user_pause``, ``_held``, ``_on_data``, ``_fd``, ``_tls``) and changes it only
through its methods.
"""

import collections
import logging
import socket
import threading
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Optional, Set, Tuple

from . import _sys
from ._sys.contract import DIRECT_READS
from ._sys.flags import DIRECT_FDS, EOF as _EOF, ERROR as _ERROR, HUP as _HUP, MORE as _MORE
from ._sys.flags import READ as _READ, READY as _READY, SPECIAL as _SPECIAL
from ._sys.flags import UNREAD as _UNREAD, WRITABLE as _WRITABLE
from .accept import Acceptor
from .address import AddressLike
from .conn import Conn
from .lifecycle import Lifecycle
from .errors import ServerStateError, os_error
from .handler import HandlerProtocol
from .options import Options, check_seconds
from .direct import DirectReads
from .shutdown import Stopping
from .stats import LoopStats, perf_counter
from .states import LINGERING, OPEN
from .timers import TimerHandle, Timers, monotonic
from .tuning import (ARENA_MIN, ARENA_READS, DIRECT_AFTER, DIRECT_READ_ON, RECORDS_PER_EVENT,
                     RECORDS_SPARE)
from .writes import WRITE_ARENA_SIZE, WRITE_MAX_ITEMS, Batch

if TYPE_CHECKING:  # pragma: no cover
    from ssl import SSLContext

logger = logging.getLogger("pulse")

_NO_FDS: List[int] = []  # the carry of a poll with nothing carried (never mutated)


class EventLoop(Stopping, DirectReads, LoopStats):
    """An event loop: owns a poller, the connections it accepted, timers and
    the write batch.  ``run()`` blocks in the calling thread until ``stop()``.

    Most users never touch it directly: ``Server`` creates one.  Safe from
    any thread: ``call_soon_threadsafe``, ``call_later``, ``call_at``, ``stop``,
    ``dial``, ``register`` and ``stats`` (``LoopStats``, ``stats.py``); the rest
    belongs to the loop's thread.
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
        self._arena = backend.ReadArena(
            max(ARENA_MIN, ARENA_READS * opts.read_buffer_size),
            RECORDS_PER_EVENT * opts.max_events + RECORDS_SPARE)
        # Connections whose reads are large are read by _read_direct instead
        # (bytes payloads, with a backend that declares it can).
        self._direct: Optional[memoryview] = None
        if not opts.zero_copy and DIRECT_READS in backend.CAPABILITIES:
            self._direct = self._arena.direct
        #: This iteration's writes (``writes.Batch`` owns them; ``Conn.write``
        #: inlines its fast path).
        self._writes = Batch(self, backend.WriteBatch(WRITE_ARENA_SIZE, WRITE_MAX_ITEMS))
        self._track_idle = opts.idle_timeout is not None
        self._conns: Dict[int, Conn] = {}
        self._specials: Dict[int, Callable[[], None]] = {}
        # Edge mode: fd -> (conn, hang-up seen) of sockets to read first in the
        # next poll; a dict, so a busy socket is carried once however many
        # records said MORE.
        self._carry: Dict[int, Tuple[Conn, bool]] = {}
        self._settle_queue: List[Lifecycle] = []
        self._ready: Deque[Tuple[Callable[..., Any], Tuple[Any, ...]]] = collections.deque()
        self._timers = Timers(self)
        self._acceptor = Acceptor(self, opts.max_connections)
        self._closing_in_runner = 0
        # Dialed or registered, not yet taken in on the loop (its call is in
        # _ready): closed by _abandon if the loop dies before.
        self._joining: Set[Conn] = set()
        self._iteration = 0
        self._now = monotonic()
        self._thread_id: Optional[int] = None
        self._stopping = False
        self._closed = False
        #: The task-mode runner (``tasks.py``) in "pool"/"thread" mode, else None.
        self.runner: Any = None
        self._init_stats()
        # The waker is not an fd on every backend (kqueue reports an ident):
        # it is recognised by its ident, apart from the fds in _specials.
        self._waker_ident = self._waker.ident

    # -- public -----------------------------------------------------------

    @property
    def started(self) -> bool:
        """True once ``run()`` was called (it may have returned since)."""
        return self._thread_id is not None

    @property
    def closed(self) -> bool:
        """True once the loop released its poller (after ``run()`` or ``close()``)."""
        return self._closed

    @property
    def stopping(self) -> bool:
        """True once ``stop()`` was called."""
        return self._stopping

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` on the loop's thread soon; callable from any thread."""
        self._ready.append((callback, args))
        if self._thread_id != threading.get_ident():
            self._waker.wake()

    call_soon = call_soon_threadsafe

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> TimerHandle:
        """Run ``callback(*args)`` on the loop after ``delay`` seconds; returns a
        cancellable handle.  Safe from any thread (a worker's timer is handed
        to the loop); ``delay`` must be finite and >= 0."""
        check_seconds("delay", delay)
        return self._timers.add(monotonic() + delay, callback, args)

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> TimerHandle:
        """Run ``callback(*args)`` at ``time.monotonic()`` time ``when``; safe from any thread."""
        return self._timers.add(when, callback, args)

    def stop(self) -> None:
        """Ask ``run()`` to return; safe from any thread and from signal handlers."""
        self._stopping = True
        self._waker.wake()

    def add_listener(self, sock: socket.socket, handler: HandlerProtocol,
                     ssl: Optional["SSLContext"] = None) -> None:
        """Accept connections from the listening ``sock`` and serve them with
        ``handler``, over TLS with ``ssl`` (a server-side ``ssl.SSLContext``)."""
        if ssl is not None:
            from .tls import check_context  # ssl is imported only where TLS is used
            check_context(ssl, server_side=True)
        self._acceptor.add(sock, handler, ssl)

    def remove_listener(self, sock: socket.socket) -> None:
        """Stop accepting from ``sock``; call it before closing the socket.

        epoll watches the open file description, not the fd: when another
        process (a launcher's worker) still holds the listener, closing our
        copy would leave it in our poller, waking us for connections that are
        not ours to take.
        """
        if sock.fileno() >= 0:
            self._acceptor.remove(sock)

    def dial(self, address: AddressLike, handler: HandlerProtocol,
             timeout: Optional[float] = 10.0, ssl: Optional["SSLContext"] = None,
             server_hostname: Optional[str] = None) -> Conn:
        """Open an outgoing connection served by ``handler``; returns its ``Conn`` at once.

        ``address`` takes the same forms as ``Server.listen`` (host names are
        resolved in the calling thread).  On success ``on_open`` runs; a
        failed or timed-out connect calls ``on_close(conn, err)`` without
        ``on_open``.  Writes, ``write_eof`` and ``close`` made before the
        connect completes wait for it.  With ``ssl`` (a client-side
        ``ssl.SSLContext``) it speaks TLS, checking ``server_hostname``
        (default: the host dialed); a failed handshake is a failed connect.
        Safe from any thread.
        """
        from .client import dial
        return dial(self, address, handler, timeout, ssl, server_hostname)

    def register(self, sock: Any, handler: HandlerProtocol) -> Conn:
        """Serve an already connected socket (a ``socket.socket`` or fd), taking ownership."""
        from .client import register
        return register(self, sock, handler)

    # -- the loop ---------------------------------------------------------

    def run(self, on_stop: Optional[Callable[[], None]] = None) -> None:
        """Run until ``stop()``, then close every connection gracefully and return.

        Connections get ``shutdown_timeout`` seconds to flush what was written
        to them; ``on_stop`` runs once accepting has stopped.  If anything
        raises out of the loop (``KeyboardInterrupt`` or ``SystemExit`` from
        a callback, say), every connection is closed first and its
        ``on_close`` gets the exception, then it propagates.
        """
        if self._closed:
            raise ServerStateError("the event loop is closed; create a new one")
        if self._thread_id is not None:
            raise ServerStateError("the event loop is already running")
        self._thread_id = threading.get_ident()
        try:
            with self._signal_wakeup():
                if self.options.task_type != "loop" and self.runner is None:
                    from .tasks import make_runner
                    self.runner = make_runner(self, self.options)
                self._start_clock()
                while not self._stopping:
                    self._run_once()
                if on_stop is not None:
                    on_stop()
                self._graceful_stop()
        except BaseException as exc:
            self._abandon(exc)
            raise
        finally:
            self._stop_clock()
            self._close()

    def _run_once(self) -> None:
        if self._ready or self._settle_queue or self._writes.count:
            timeout = 0
        elif self._timers.heap:
            timeout = self._timers.timeout_ms(monotonic())
        else:
            timeout = -1  # no timer: block until an event or a wake-up
        carry = self._carry
        fds: List[int] = _NO_FDS
        if carry:
            self._carry = {}
            # ~fd tells the C helper the hang-up was seen: read on to the FIN.
            fds = [~fd if hup else fd for fd, (conn, hup) in carry.items()
                   if conn._wants_read()]
        # Time in the poller (stats.py: negative while polling): two clock reads.
        self._poll_seconds -= perf_counter()
        count = self._poller.poll_read(timeout, self._arena, fds, self._read_size, self._max_reads)
        self._poll_seconds += perf_counter()
        self._iteration += 1
        self._now = monotonic()
        if count:
            self._dispatch(count)
        if self._timers.heap:
            self._run_timers()
        if self._ready:
            self._run_ready()
        if self._writes.count:
            self._writes.flush()
        if self._settle_queue:
            self._settle_phase()

    def _dispatch(self, count: int) -> None:
        arena = self._arena
        records = arena.records[:4 * count].tolist()
        data = arena.data
        conns = self._conns
        iteration = self._iteration
        runner = self.runner
        zero_copy = self.zero_copy
        direct = self._direct
        edge = self.edge
        track_idle = self._track_idle
        now = self._now
        received = 0
        for k in range(0, 4 * count, 4):
            flags = records[k + 1]
            fd = records[k]
            if flags & _SPECIAL:
                if fd == self._waker_ident:
                    self._waker.drain()
                    continue
                special = self._specials.get(fd)
                if special is not None:
                    special()
                continue
            conn = conns.get(fd)
            if conn is None or conn._born == iteration:
                continue  # closed, or a new connection that reused a stale fd number
            if flags & _READ:
                size = records[k + 3]
                received += size
                off = records[k + 2]
                if conn._state != OPEN:
                    # Closed by the user: no on_data after close().  A
                    # lingering close reads on (and discards) to the EOF.
                    if conn._state == LINGERING:
                        conn._received(data[off:off + size])  # TLS: watch for close_notify
                        if flags & _MORE and edge:
                            self._carry[fd] = (conn, bool(flags & _HUP))
                    continue
                if track_idle:
                    conn._touch(now)
                payload = data[off:off + size]
                tls = conn._tls
                if tls is not None:
                    tls.feed(payload)  # the plaintext goes to conn._deliver
                elif runner is None and (conn._held is not None or conn._user_pause):
                    # Read before pause_reading() took effect, or behind
                    # chunks still held: kept in order, never dropped.
                    conn._hold(payload.tobytes())
                elif runner is None:
                    if (size >= DIRECT_READ_ON and off + size > DIRECT_AFTER
                            and direct is not None and fd < DIRECT_FDS):
                        direct[fd] = 1  # large reads: _read_direct from now on
                    try:
                        conn._on_data(conn, payload if zero_copy else payload.tobytes())
                    except Exception as exc:  # noqa: BLE001 - a callback may raise anything
                        conn._callback_failed("on_data", exc)
                else:
                    if (size >= DIRECT_READ_ON and off + size > DIRECT_AFTER
                            and direct is not None and fd < DIRECT_FDS):
                        direct[fd] = 1
                    runner.data(conn, payload.tobytes())
                if flags & _MORE and edge:
                    self._carry[fd] = (conn, bool(flags & _HUP))
            elif flags & _READY:
                self._read_direct(conn, flags)
            elif flags & _WRITABLE:
                conn._on_writable()
            elif flags & _EOF:
                conn._raw_eof()
            elif flags & _ERROR:
                conn._fail(os_error(-records[k + 3]))
            elif flags & _UNREAD and edge:
                self._carry[fd] = (conn, bool(flags & _HUP))
        self.bytes_in += received

    def _run_timers(self) -> None:
        for handle in self._timers.pop_due(monotonic()):
            if handle.cancelled:
                continue  # cancelled by an earlier callback of this batch
            try:
                handle.callback(*handle.args)
            except Exception:  # noqa: BLE001
                self._callback_errors += 1
                logger.exception("pulse: timer callback %r raised", handle.callback)

    def _run_ready(self) -> None:
        ready = self._ready
        # Only what is queued now: callbacks that queue more wait a turn.
        for _ in range(len(ready)):
            callback, args = ready.popleft()
            try:
                callback(*args)
            except Exception:  # noqa: BLE001
                self._callback_errors += 1
                logger.exception("pulse: callback %r raised", callback)

    def _settle_phase(self) -> None:
        while self._settle_queue:
            queue = self._settle_queue
            self._settle_queue = []
            for conn in queue:
                # An on_close that ran just before may have written to this
                # connection: send it before the fd goes.
                if self._writes.count:
                    self._writes.flush()
                conn._settle()
        if self._writes.count:
            self._writes.flush()  # what on_close wrote to connections that stay open

    # -- what Conn, Acceptor, the connector and the runners call ---------------

    def _settle_later(self, conn: Lifecycle) -> None:
        """Have ``conn._settle()`` run after this iteration's flush."""
        self._settle_queue.append(conn)

    def _watch(self, fd: int, read: bool, write: bool) -> None:
        self._poller.watch(fd, read, write, self.edge)

    def _accept_poller(self) -> Any:
        """What ``accept_batch`` registers new sockets with."""
        return self._poller

    def _add_special(self, fd: int, callback: Callable[[], None],
                     connecting: bool = False) -> None:
        """Watch a listener (or, with ``connecting``, a dial in progress)."""
        self._specials[fd] = callback
        if connecting:
            self._poller.add_connecting(fd)
        else:
            self._poller.add_special(fd)

    def _remove_special(self, fd: int) -> None:
        if self._specials.pop(fd, None) is not None:
            self._poller.unregister(fd)

    def _watch_new(self, fd: int) -> None:
        """Start watching a registered connection's fd for reads."""
        self._poller.add(fd, True, False, self.edge)

    def _connected(self, conn: Conn) -> None:
        """A dial finished: watch its socket as a connection (the connector calls it)."""
        self._specials.pop(conn._fd, None)
        self._poller.connected(conn._fd, self.edge)

    def _joining_conn(self, conn: Conn) -> None:
        """A dial or register made ``conn``; the loop takes it in soon (any thread)."""
        self._joining.add(conn)

    def _take_joining(self) -> List[Conn]:
        joining, self._joining = list(self._joining), set()
        return joining

    def _adopted(self, conn: Conn) -> None:
        """Take in a connection made elsewhere (dial, register), on the loop."""
        self._joining.discard(conn)
        self._conns[conn._fd] = conn
        conn._joined(self._iteration)

    def _accepted(self, fd: int, peer: Any, handler: HandlerProtocol,
                  ssl: Optional["SSLContext"]) -> None:
        conn = Conn(self, fd, handler, self._iteration)
        conn._set_remote(peer)  # raw or formatted: Conn.remote_address formats it lazily
        self._conns[fd] = conn
        if ssl is not None or self.options.proxy_protocol:
            conn._accept_layers(ssl)  # a PROXY header (proxy_gate.py), TLS, or both
        conn._opened()

    def _close_stray(self, fd: int) -> None:
        """Close an accepted socket that never became a connection."""
        self._poller.forget(fd)
        try:
            self.backend.close(fd)
        except OSError:
            pass

    def _forget(self, conn: Lifecycle, announced: bool = True) -> None:
        """A connection is closing for good: drop it and close its fd
        (``announced``: its ``on_close`` will run)."""
        fd = conn._fd
        self._joining.discard(conn)
        if self._conns.get(fd) is conn:
            del self._conns[fd]
            self._closed_count += 1
        self._specials.pop(fd, None)  # a dial that never finished
        self._carry.pop(fd, None)
        if self._direct is not None and 0 <= fd < DIRECT_FDS:
            self._direct[fd] = 0  # the next socket with this number starts on the arena
        self._poller.forget(fd)
        try:
            self.backend.close(fd)
        except OSError as exc:
            logger.warning("pulse: close(fd=%d) failed: %s", fd, exc)
        if self.runner is not None and announced:
            self._closing_in_runner += 1  # until the worker ran on_close
        self._acceptor.connection_closed()

    def _on_close_ran(self) -> None:
        """A worker ran an ``on_close`` (the runner calls this through the loop)."""
        self._closing_in_runner -= 1
        self._acceptor.connection_closed()

    # -- closing ----------------------------------------------------------

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
