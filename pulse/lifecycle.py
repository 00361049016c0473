"""The state machine of a connection: every transition, in one place.

``Lifecycle`` is the base of ``Conn`` (``conn.py`` holds the public API) and
the one owner of a connection's state (``states.py`` names the states and
the pause reasons).  One method per transition: ``_opened`` (established),
``_pause``/``_resume`` (one bit per reason), ``_eof_received`` (the peer's
FIN: ``on_eof`` decides between half-open and closing), ``_want_eof`` (our
``write_eof``), ``_begin_close`` (graceful), ``_fail`` (abort), ``_settle``
(what must wait for the iteration's flush: shutting our write side, starting
the lingering close, closing) and ``_finalize``, the one place where the fd
is closed and ``on_close`` scheduled.  The loop, the write batch, the
runners and the connector call these methods; none of them sets a field.
"""

import errno
import logging
import socket
from typing import TYPE_CHECKING, Any, List, Optional, Tuple, Union

from .backlog import Backlog
from .deadlines import ConnTimers
from .outgoing import Outgoing
from .states import CLOSED, CLOSING, LINGERING, OPEN, OPENING, PAUSE_STOP
from .sockets import reset_on_close, unread_bytes
from .timers import monotonic

if TYPE_CHECKING:  # pragma: no cover
    from .handler import HandlerProtocol
    from .loop import EventLoop
    from .proxy_gate import ProxyGate
    from .tls import TLS

logger = logging.getLogger("pulse")


class Lifecycle(Outgoing):
    """A connection's state and its transitions (the base of ``Conn``)."""

    __slots__ = (
        "opened", "backpressure_reads", "_loop", "_fd", "_handler", "_on_data", "_writes",
        "_state", "_born", "_paused", "_close_called", "_write_closed", "_held",
        "_user_pause", "_peer_eof", "_eof_wanted", "_eof_sent", "_abort", "_reset", "_close_err",
        "_held_eof", "_timers", "_active", "_task", "_tls", "_quiet", "_close_deferred",
    )

    def __init__(self, loop: "EventLoop", fd: int, handler: "HandlerProtocol", born: int,
                 opening: bool) -> None:
        self._loop = loop
        self._fd = fd
        # Typed loosely: the callbacks get the Conn that this base becomes.
        self._handler: Any = handler
        self._on_data: Any = handler.on_data  # bound once: the loop calls it per read
        self._writes = loop._writes  # the loop's write batch, for write()'s fast path
        #: True once ``on_open`` ran (False for a dial that failed to connect).
        self.opened = False
        #: Stop reading this connection while its write backlog is above the
        #: high-water mark (right for request/response servers).  A proxy turns
        #: it off and pauses the *other* side from on_pause_writing instead.
        self.backpressure_reads = True
        self._state = OPENING if opening else OPEN
        self._born = born  # the loop iteration it joined: older records are a stranger's
        self._paused = 0  # PAUSE_* bits: why the loop does not read it
        self._user_pause = False  # pause_reading() (set under the runner's lock there)
        self._peer_eof = False  # the peer's FIN arrived: nothing more to read
        self._eof_wanted = False  # write_eof() was called: shut our side once drained
        self._eof_sent = False  # shutdown(SHUT_WR) was done
        self._abort = False  # closing drops unsent data
        self._reset = False  # closing resets the connection (abort())
        self._close_err: Optional[BaseException] = None
        self._close_called = False  # close()/abort() was called, from any thread
        self._close_deferred = False  # _begin_close ran while dialing/handshaking (loop side)
        self._write_closed = False  # write_eof() was called, from any thread
        self._backlog = Backlog()
        self._above_high = False  # the backlog passed the high-water mark, not yet drained
        self._writing = False  # write interest registered with the poller
        self._held: Optional[List[bytes]] = None  # read while paused, or behind held data
        self._held_eof = False  # the FIN came while paused: report it after the held data
        self._timers = ConnTimers(self, loop)
        self._active = 0.0  # monotonic time of the last read or write (idle timeout)
        self._task: Any = None  # the task-mode runner's per-connection state (tasks.py)
        self._tls: Optional[Union["TLS", "ProxyGate"]] = None  # TLS, or a pending PROXY header
        # Unseen by the handler (in its TLS handshake, before its PROXY header): no callbacks.
        self._quiet = False

    def _want_eof(self) -> None:
        if self._state in (OPEN, OPENING) and not self._eof_wanted:
            self._eof_wanted = True
            if self._tls is not None:
                self._tls.send_close_notify()  # behind what was written
            self._loop._settle_later(self)

    @property
    def _user_paused(self) -> bool:
        """``pause_reading()`` is in force (the task runner checks it under its lock)."""
        return self._user_pause

    def _clear_user_pause(self) -> None:
        """For the task runner's ``resume``, under its lock."""
        self._user_pause = False

    def _last_active(self) -> float:
        return self._active

    def _touch(self, now: float) -> None:
        """Traffic at ``now`` (the idle clock; only with ``idle_timeout``)."""
        self._active = now

    def _unsent(self) -> int:
        return self._backlog.pending

    def _opened(self) -> None:
        """The connection is established and on the loop: run ``on_open``
        (with TLS, once the handshake completed)."""
        loop = self._loop
        if self._state == OPENING:
            self._state = OPEN
        idle = loop.options.idle_timeout
        if idle is not None:
            self._active = monotonic()
            self._timers.start_idle(idle)
        if loop.options.tcp_keepalive:
            try:
                loop.backend.setsockopt_int(self._fd, socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:
                pass  # Unix sockets have no keepalive
        if self._tls is not None:
            self._tls.start(loop.options.ssl_handshake_timeout)  # it calls _announce
            return
        self._announce()

    def _announce(self) -> None:
        """Established, TLS handshake included: run ``on_open`` (``on_start_tls``
        after an upgrade) and carry out what was asked meanwhile."""
        loop = self._loop
        upgraded = self.opened
        self.opened = True
        self._quiet = False
        if self._backlog.pending or self._eof_wanted:
            self._update_interest()  # what was written while dialing goes out now
            if self._eof_wanted:
                loop._settle_later(self)
        # (Not _close_called: close() from a thread sets it before its queued writes ran.)
        if self._close_deferred and not self._abort:
            self._begin_close()  # closed while dialing: drain what was written, then close
        if upgraded:
            self._call_optional("on_start_tls")
            return
        runner = loop.runner
        if runner is not None:
            runner.open(self)
            return
        try:
            self._handler.on_open(self)
        except Exception as exc:  # noqa: BLE001 - a callback may raise anything
            self._callback_failed("on_open", exc)

    def _deliver(self, payload: Any) -> None:
        """Hand one chunk to ``on_data`` (the dispatch loop inlines this)."""
        runner = self._loop.runner
        if runner is None:
            if self._held is not None or self._user_pause:
                self._hold(payload)  # behind what is held: order first
                return
            try:
                self._on_data(self, payload)
            except Exception as exc:  # noqa: BLE001
                self._callback_failed("on_data", exc)
        else:
            runner.data(self, payload)

    def _hold(self, payload: Any) -> None:
        if type(payload) is not bytes:
            payload = bytes(payload)  # a zero-copy view dies with the arena
        if self._held is None:
            self._held = []
        self._held.append(payload)

    def _release_held(self) -> None:
        """After resume_reading(): deliver what was held, in order, then a held FIN."""
        held = self._held
        while held and not self._user_pause and self._state == OPEN:
            payload = held.pop(0)
            try:
                self._on_data(self, payload)
            except Exception as exc:  # noqa: BLE001
                self._callback_failed("on_data", exc)
        if not held:
            self._held = None
            if self._held_eof and not self._user_pause:
                self._held_eof = False
                self._eof_received()

    def _raw_eof(self) -> None:
        """The socket read EOF: the end of the stream, or (TLS) of the ciphertext."""
        tls = self._tls
        if tls is not None and self._state == OPEN:
            tls.raw_eof()  # it calls _eof_received, or fails the handshake
        else:
            self._eof_received()

    def _received(self, data: Any) -> None:
        """Bytes read outside the arena (``direct.py``): deliver, decrypt, or
        (lingering) discard."""
        tls = self._tls
        if self._state == OPEN:
            if tls is not None:
                tls.feed(data)
            else:
                self._deliver(data)
        elif self._state == LINGERING and tls is not None:
            tls.feed_lingering(data)

    def _take_input(self) -> Tuple[List[bytes], bool]:
        """For ``start_tls``: the chunks read and not delivered yet (held, or
        queued for the workers), in order, and whether the FIN followed them."""
        chunks = self._held or []
        eof = self._held_eof
        self._held = None
        self._held_eof = False
        runner = self._loop.runner
        if runner is not None and self._task is not None:
            taken, taken_eof = runner.take_input(self)  # and the diversion ends
            chunks.extend(taken)
            eof = eof or taken_eof
        return chunks, eof

    def _note_error(self, err: BaseException) -> None:
        """``on_close`` will get ``err`` (unless another error came first)."""
        if self._close_err is None:
            self._close_err = err

    def _eof_received(self) -> None:
        """The peer sent FIN, after every byte it sent was delivered or held."""
        if self._state == LINGERING:
            self._peer_eof = True  # the peer is done: the lingering close ends
            self._loop._settle_later(self)
            return
        if self._state != OPEN or self._peer_eof:
            if self._state == CLOSING:
                self._peer_eof = True  # closing anyway: no lingering for a peer that is done
                if not self._backlog.pending:
                    self._loop._settle_later(self)
            return
        runner = self._loop.runner
        if runner is None and (self._user_pause or self._held is not None):
            self._held_eof = True  # after the held data, at resume_reading()
            return
        self._peer_eof = True
        self._update_interest()  # nothing more to read
        if runner is not None:
            # on_eof runs (or the close happens) after the callbacks queued
            # before the FIN; their replies must still go out.
            runner.eof(self)
            return
        self._after_eof(self._ask_on_eof())

    def _ask_on_eof(self) -> bool:
        """Call the handler's optional ``on_eof``; True keeps the connection open."""
        on_eof = getattr(self._handler, "on_eof", None)
        if on_eof is None:
            return False
        try:
            return bool(on_eof(self))
        except Exception as exc:  # noqa: BLE001
            self._callback_failed("on_eof", exc)
            return False

    def _after_eof(self, keep_open: bool) -> None:
        """On the loop, after ``on_eof``: stay half-open, or close gracefully."""
        if self._state != OPEN:
            return
        if not keep_open or self._eof_sent:
            self._begin_close()
        # else: half-closed; write_eof() or close() ends it

    def _begin_close(self) -> None:
        """A graceful close: send the backlog, then (linger and) close."""
        self._close_called = True
        self._cancel_queued_data()
        tls = self._tls
        self._close_deferred = self._state == OPENING or (tls is not None and tls.handshaking)
        if tls is not None and self._state == OPEN:
            if tls.handshaking:
                if self._loop.stopping:
                    self._fail(ConnectionAbortedError("the event loop stopped during the "
                                                      "TLS handshake or PROXY header"))
                # else: the handshake's end (_announce) closes it
                return
            tls.send_close_notify()  # behind everything written
        if self._state in (OPEN, OPENING):
            self._state = CLOSING if self._state == OPEN else OPENING
            self._update_interest()  # no more reads (lingering reads start after the backlog)
            self._loop._settle_later(self)
            linger = self._loop.options.linger_timeout
            if linger > 0 and self._state == CLOSING and self._backlog.pending:
                # A peer that stops reading must not hold the fd for ever:
                # the drain may not stall for longer than linger_timeout.
                self._timers.start_linger(linger, self._drain_check, self._backlog.pending)

    def _drain_check(self, pending: int) -> None:
        """The drain timer of a closing connection: fail it if no byte left since."""
        if self._state != CLOSING or not self._backlog.pending:
            return
        now = self._backlog.pending
        if now >= pending:
            self._fail(TimeoutError("closing: the peer took none of {} unsent bytes in {:g} s"
                                    .format(now, self._loop.options.linger_timeout)))
        else:
            self._timers.start_linger(self._loop.options.linger_timeout, self._drain_check, now)

    def _cancel_queued_data(self) -> None:
        """Closing: no ``on_data`` queued for the workers runs any more."""
        tasks = self._task
        if tasks is not None:
            tasks.cancelled = True

    def _dropping(self) -> bool:
        """True once nothing more is sent: aborted, failed or closed."""
        return self._abort or self._state == CLOSED

    def _fail(self, err: Optional[BaseException], explicit: bool = False) -> None:
        """Drop unsent data and close with ``err`` at the end of this iteration
        (``explicit``: the user's ``abort(err)``)."""
        if self._state == CLOSED:
            return
        if not self._abort:
            # Not even this iteration's batched writes go out.
            self._writes.drop(self)  # type: ignore[arg-type] # self is a Conn
        self._cancel_queued_data()
        if self._close_err is None and (explicit or self._state != LINGERING):
            # (A lingering connection has already closed cleanly on our side:
            # the peer's reset or the linger timeout does not make it an error.)
            self._close_err = err
        self._abort = True
        self._close_called = True
        if self._state in (OPEN, OPENING, LINGERING):
            self._state = CLOSING
        self._loop._settle_later(self)

    def _fail_threadsafe(self, err: BaseException) -> None:
        """``_fail`` from a worker (a callback raised there): no more writes now,
        the rest on the loop."""
        self._close_called = True
        self._loop.call_soon_threadsafe(self._fail, err)

    def _settle(self) -> None:
        """After the iteration's flush: carry out a pending close or write_eof."""
        state = self._state
        if state == CLOSED:
            return
        if self._abort:
            self._finalize()
            return
        if state == OPENING:
            return  # the connector settles it once the connect finished
        if self._tls is not None and self._tls.handshaking:
            return  # its end (_announce) settles it again
        if self._backlog.pending:
            if not self._writing:
                self._update_interest()
            return  # _on_writable settles it again once drained
        if self._eof_wanted and not self._eof_sent and state == OPEN:
            self._shutdown_write()
            if self._peer_eof:
                self._begin_close()  # both directions are done
            return
        if state == LINGERING:
            if self._peer_eof:
                self._finalize()
            return
        if state != CLOSING:
            return
        loop = self._loop
        # A TLS session waits for the peer's close_notify; a failed handshake
        # had no session and lingers as plain TCP does.
        tls = self._tls
        linger = loop.options.linger_timeout if tls is None or tls.failed else \
            loop.options.ssl_shutdown_timeout
        # A stopping server does not wait on idle peers: it lingers only
        # where unread input shows the peer was still sending.
        if linger > 0 and not self._peer_eof and (not loop.stopping or
                                                  unread_bytes(self._fd) > 0):
            if not self._eof_sent:
                self._shutdown_write()  # an error here fails the close, as it should
            if self._abort:
                return
            self._state = LINGERING
            self._timers.start_linger(linger, self._linger_expired)
            self._update_interest()  # read (and discard) until the peer's EOF
            return
        self._finalize()

    def _linger_expired(self) -> None:
        self._fail(None)

    def _shutdown_write(self) -> None:
        self._eof_sent = True
        try:
            self._loop.backend.shutdown(self._fd, socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:  # the peer reset first: nothing to shut down
                self._fail(exc)

    def _finalize(self) -> None:
        """The end: cancel the timers, close the fd, schedule ``on_close`` (the one place)."""
        if self._state == CLOSED:
            return
        self._state = CLOSED
        self._timers.cancel_all()
        if self._tls is not None:
            self._tls.cancel()
        if self._abort:
            self._backlog.clear()
        if self._reset:
            reset_on_close(self._fd)
        self._held = None
        self._loop._forget(self, announced=not self._quiet)
        if self._quiet:
            return  # an accepted connection whose TLS handshake failed: no callback
        runner = self._loop.runner
        if runner is not None:
            runner.close(self, self._close_err)
        else:
            self._run_on_close(self._close_err)

    def _run_on_close(self, err: Optional[BaseException]) -> None:
        """Call ``on_close`` here and now (the loop's thread, or a runner's worker)."""
        try:
            self._handler.on_close(self, err)
        except Exception as exc:  # noqa: BLE001
            self._loop._callback_raised(exc, "pulse: on_close raised on %r", self)

    def _callback_failed(self, name: str, exc: BaseException) -> None:
        """A callback raised: log it (and count it) and close this connection only."""
        self._loop._callback_raised(exc, "pulse: %s raised on %r; closing the connection", name,
                                    self)
        self._fail(exc)

    def _call_optional(self, name: str) -> None:
        """Call the optional handler method ``name(conn)`` (backpressure events)."""
        func = getattr(self._handler, name, None)
        if func is None:
            return
        runner = self._loop.runner
        if runner is not None:
            runner.call(self, func)
            return
        try:
            func(self)
        except Exception as exc:  # noqa: BLE001
            self._callback_failed(name, exc)

    def _pause(self, reason: int) -> None:
        if not self._paused & reason:
            self._paused |= reason
            self._update_interest()

    def _resume(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            self._update_interest()

    def _update_interest(self) -> None:
        """Tell the poller what this connection waits for now."""
        state = self._state
        if state == CLOSED or state == OPENING:
            return  # a dial in progress is watched by its connector
        write = self._backlog.pending > 0
        read = self._wants_read()
        self._writing = write
        try:
            self._loop._watch(self._fd, read, write)
        except OSError as exc:
            self._fail(exc)

    def _joined(self, iteration: int) -> None:
        """The loop took the connection in during ``iteration`` (dial, register)."""
        self._born = iteration

    def _wants_read(self) -> bool:
        """Whether the poller should read this connection now."""
        if self._peer_eof:
            return False
        if self._state == OPEN:
            if not self._paused and not self._user_pause:
                return True
            tls = self._tls  # a TLS handshake reads through a pause
            return tls is not None and tls.handshaking
        return self._state == LINGERING

    def _runner_state(self) -> Any:
        """The task runner's per-connection state (``tasks.ConnTasks``), or None."""
        return self._task

    def _set_runner_state(self, tasks: Any) -> None:
        self._task = tasks

    def _start_stop(self) -> None:
        """The server is stopping: read no more requests."""
        self._pause(PAUSE_STOP)
