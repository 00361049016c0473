"""One TCP (or Unix) connection owned by an event loop: the handler's API.

A ``Conn`` is what the handler callbacks receive.  Its state and every
transition live in its base class, ``lifecycle.Lifecycle``; this module is
the public surface (write, write_eof, close, abort, pause/resume, timers,
deadlines, addresses) and says which of it is safe from other threads.  Writes
made on the loop's thread go into the loop's write batch (``writes.py``, sent
by one C call per iteration); what the socket refuses waits in the
connection's ``Backlog``, sent once the socket is writable again.  Past the
high-water mark the connection stops being read until the backlog drains
below the low-water mark, so a peer that does not read cannot grow our
memory.

Transitions that must wait for the iteration's writes to be flushed (closing,
shutting down our write side) are "settled" by the loop after its flush
(``_settle``): the fd number is reused by the kernel at once, so closing it
while writes or records of this iteration still name it would hand them to a
stranger.
"""

import errno
import socket
import threading
from typing import TYPE_CHECKING, Any, Optional, Tuple, Union

from ._sys.raw_sockaddr import parse_sockaddr
from .address import Address
from .deadlines import Deadline, deadline_time
from .errors import ConnClosedError
from .lifecycle import Lifecycle
from .proxy_gate import Proxied
from .states import CLOSED, NAMES, OPEN, OPENING
from .writes import SMALL_WRITE, WRITE_ARENA_SIZE, WRITE_MAX_ITEMS

if TYPE_CHECKING:  # pragma: no cover
    from ssl import SSLContext, SSLObject

    from .handler import HandlerProtocol
    from .loop import EventLoop
    from .proxy_gate import ProxyGate
    from .proxy_protocol import ProxyHeader
    from .timers import TimerHandle
    from .tls import TLS

_get_ident = threading.get_ident


class Conn(Lifecycle, Proxied):
    """A connection: ``write``, ``close``, a session slot, addresses, deadlines.

    Created by the loop, never by users.  Every method may be called on the
    loop's thread (from a callback).  Safe from any thread as well: ``write``,
    ``write_eof``, ``close``, ``abort``, ``pause_reading``,
    ``resume_reading``, ``call_later``, the ``set_*deadline`` methods,
    ``set_nodelay`` and ``set_keepalive`` (each is handed to the loop, in
    order), and the read-only properties.
    """

    __slots__ = ("session", "_laddr", "_raddr", "_proxy", "__weakref__")

    def __init__(self, loop: "EventLoop", fd: int, handler: "HandlerProtocol", born: int,
                 opening: bool = False) -> None:
        super().__init__(loop, fd, handler, born, opening)
        #: Free slot for the handler's per-connection state (the Go ``Session``).
        self.session: Any = None
        self._laddr: Optional[Address] = None
        self._raddr: Any = None  # an Address, or raw sockaddr bytes from accept
        # (the real peer, the PROXY header) once one was read (proxy_gate.py)
        self._proxy: Optional[Tuple[Address, "ProxyHeader"]] = None

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
        """True once ``close()`` or ``abort()`` was called or the connection ended."""
        return self._state not in (OPEN, OPENING) or self._close_called

    @property
    def peer_eof(self) -> bool:
        """True once the peer's FIN arrived (the connection may still be written:
        see ``on_eof``)."""
        return self._peer_eof

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

    def _set_remote(self, address: Any) -> None:
        """The peer's address: as dialed, or raw from accept (formatted lazily)."""
        self._raddr = address

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
        return self._backlog.pending

    @property
    def reading_paused(self) -> bool:
        """True while the connection is not read (backpressure, ``pause_reading``, ...)."""
        return bool(self._paused) or self._user_pause

    @property
    def handler(self) -> "HandlerProtocol":
        """The handler whose callbacks serve this connection."""
        return self._handler

    @property
    def ssl_object(self) -> Optional["SSLObject"]:
        """The ``ssl.SSLObject`` of a TLS connection once its handshake completed
        (``getpeercert()``, ``selected_alpn_protocol()``, ``version()``,
        ``cipher()``), else ``None``.  Read it on the loop's thread or after
        ``on_open``: an ``SSLObject`` is not thread-safe."""
        tls = self._tls
        return tls.obj if tls is not None and not tls.handshaking else None

    @property
    def tls_truncated(self) -> bool:
        """True if the peer ended this TLS connection with a FIN and no
        close_notify (``on_close`` gets ``ssl.SSLEOFError`` only when that
        FIN cut a record short; see ``pulse/tls.py``)."""
        tls = self._tls
        return tls is not None and tls.truncated

    def write(self, data: Any) -> None:
        """Queue ``data`` (bytes, bytearray or memoryview) for sending; never blocks.

        ``bytes`` are kept by reference, ``bytearray`` and ``memoryview`` are
        copied, so the caller may reuse its buffer at once.  Raises
        ``ConnClosedError`` once the connection is closed or closing or after
        ``write_eof()``, and ``TypeError`` for anything that is not a
        bytes-like object.
        """
        if self._state or self._close_called or self._write_closed:
            self._write_not_open(data)
            return
        # Hot path: the loop's _thread_id, _track_idle and _now are read here
        # and in no other module.
        loop = self._loop
        if loop._thread_id != _get_ident():
            loop.call_soon_threadsafe(self._write_from_thread, _owned_bytes(data))
            return
        if self._tls is not None:
            self._tls.write(data)
            return
        if self._backlog.pending:
            self._queue(_owned_bytes(data))
            return
        if loop._track_idle:
            self._active = loop._now
        # The hot path, inlined from writes.Batch.add: a small bytes object
        # is copied into the write arena, merged with this connection's
        # previous write when that was the batch's last one.
        batch = self._writes
        if type(data) is bytes:
            size = len(data)
            pos = batch.pos
            end = pos + size
            if size <= SMALL_WRITE and end <= WRITE_ARENA_SIZE and size:
                count = batch.count
                if batch.last is self:
                    batch.arena[pos:end] = data
                    batch.pos = end
                    batch.items[3 * count - 1] += size
                    return
                if count < WRITE_MAX_ITEMS:
                    batch.arena[pos:end] = data
                    batch.pos = end
                    items = batch.items
                    k = 3 * count
                    items[k] = self._fd
                    items[k + 1] = pos
                    items[k + 2] = size
                    batch.conns.append(self)
                    batch.count = count + 1
                    batch.last = self
                    return
        batch.add(self, data)

    def _write_not_open(self, data: Any) -> None:
        """``write`` on a connection that is not plainly open: queue it while
        dialing, else raise."""
        if self._state == OPENING and not (self._close_called or self._write_closed):
            owned = _owned_bytes(data)
            if self._loop._thread_id != _get_ident():
                self._loop.call_soon_threadsafe(self._write_from_thread, owned)
            else:
                self._write_from_thread(owned)  # sent once the connect completes
            return
        why = "after write_eof()" if self._write_closed and not self._close_called else \
            "on a closed connection"
        raise ConnClosedError("write {} (fd was {})".format(why, self._fd))

    def write_eof(self) -> None:
        """Shut down our write side once everything written is sent; keep reading.

        The peer reads EOF after the last byte (with TLS: our close_notify,
        then our FIN); ``on_data`` goes on until its own FIN (or
        close_notify).  Later writes raise ``ConnClosedError``.  Idempotent;
        safe from any thread.  If the peer's FIN already arrived (see
        ``on_eof``), the connection then closes by itself.
        """
        if self._write_closed or self._close_called:
            return
        self._write_closed = True
        loop = self._loop
        if loop._thread_id != _get_ident():
            loop.call_soon_threadsafe(self._want_eof)
        else:
            self._want_eof()

    def close(self) -> None:
        """Close after sending what was written; ``on_close`` follows with ``err=None``.

        A lingering close (``linger_timeout``): after the backlog our write
        side is shut down and the peer's late data is read and discarded
        until its EOF, so that it receives the whole reply.  Idempotent, and
        safe from any thread.  No ``on_data`` is delivered after ``close()``
        returns on the loop's thread.
        """
        self._close_called = True
        loop = self._loop
        if loop._thread_id != _get_ident():
            if self._task is not None:
                self._task.cancelled = True  # no on_data queued behind this call runs
            loop.call_soon_threadsafe(self._begin_close)
            return
        self._begin_close()

    def abort(self, err: Optional[BaseException] = None) -> None:
        """Close at once with a reset, dropping every unsent byte (also those
        written earlier in this callback); ``on_close`` gets ``err``.  Safe
        from any thread."""
        self._close_called = True
        loop = self._loop
        if loop._thread_id != _get_ident():
            if self._task is not None:
                self._task.cancelled = True
            loop.call_soon_threadsafe(self.abort, err)
            return
        if self._state != CLOSED:
            self._reset = True
            self._fail(err, explicit=True)

    def start_tls(self, context: "SSLContext", server_side: bool = False,
                  server_hostname: Optional[str] = None, buffered: bytes = b"") -> None:
        """Upgrade this plain connection to TLS (STARTTLS); safe from any thread.

        What was written before the call goes out in plaintext, what is
        written after it is encrypted once the handshake completes.  Every
        byte read after the call's point in the stream is fed to TLS, none
        is lost: the rest of the chunk in hand (pass it as ``buffered``:
        the bytes of this ``on_data`` after the upgrade command), later
        chunks already read, held by ``pause_reading()`` or queued for the
        workers.  A pause stays in force (the handshake reads through it).
        The handler's optional ``on_start_tls(conn)`` runs after the
        handshake; a failed one closes the connection and ``on_close`` gets
        the error.  Raises ``ValueError`` if the connection already speaks
        TLS, ``ConnClosedError`` if it is closed.
        """
        from .tls import check_context, upgrade
        check_context(context, server_side, server_hostname, "start_tls()")
        self._check_open("start_tls")
        if type(buffered) is not bytes:
            buffered = _owned_bytes(buffered)
        if self._tls is not None or self._state != OPEN:
            raise ValueError("start_tls() on a connection that {}".format(
                "already speaks TLS" if self._tls is not None else "is not open yet"))
        if self._loop._thread_id != _get_ident():
            runner = self._loop.runner
            if runner is not None and not runner.divert(self):
                raise ValueError("start_tls() was already called on this connection")
            self._loop.call_soon_threadsafe(upgrade, self, context, server_side,
                                            server_hostname, buffered)
            return
        upgrade(self, context, server_side, server_hostname, buffered)

    def _use_tls(self, context: "SSLContext", server_side: bool, server_hostname: Optional[str],
                 quiet: bool = False) -> None:
        """Speak TLS (``quiet``: an accepted connection, no callback until its handshake)."""
        from .tls import TLS
        self._set_layer(TLS(self, context, server_side, server_hostname), quiet)

    def _set_layer(self, layer: Optional[Union["TLS", "ProxyGate"]], quiet: bool) -> None:
        """What the bytes read go through before the handler: TLS, a pending
        PROXY header (``proxy_gate.py``) or nothing; ``quiet`` until on_open."""
        self._tls = layer
        self._quiet = quiet

    def _header_read(self, header: "ProxyHeader", ssl: Optional["SSLContext"]) -> Optional["TLS"]:
        """The PROXY header was read: its addresses stand for the socket's
        (``proxy_address`` keeps the real peer), and TLS follows with ``ssl``
        (returned, to be started; ``None`` without)."""
        self._proxy = (self.remote_address, header)
        if header.source is not None:  # not LOCAL, UNKNOWN or UNSPEC
            self._raddr = header.source
            self._laddr = header.destination
        self._set_layer(None, self._quiet)
        if ssl is None:
            return None
        self._use_tls(ssl, True, None, quiet=True)
        return self._tls  # type: ignore[return-value] # the TLS just set

    def pause_reading(self) -> None:
        """Stop delivering ``on_data`` until ``resume_reading()``; safe from any thread.

        Data (and a FIN) that was already read is held, in order, and
        delivered after ``resume_reading()``; in the threaded task modes that
        includes what is queued for the handler when the pause is made.
        Calls from other threads take effect in the order they were made.
        """
        if self._state == CLOSED:
            return
        if self._loop._thread_id != _get_ident():
            # Set at once, so that a worker holds what is queued behind this
            # call; and in order on the loop, after a resume made before it.
            self._set_user_pause()
            self._loop.call_soon_threadsafe(self._pause_on_loop)
            return
        self._pause_on_loop()

    def _set_user_pause(self) -> None:
        tasks = self._task
        if tasks is not None:
            with tasks.lock:  # the workers check the flag under this lock
                self._user_pause = True
        else:
            self._user_pause = True

    def _pause_on_loop(self) -> None:
        if self._state != CLOSED:
            self._set_user_pause()
            self._update_interest()

    def resume_reading(self) -> None:
        """Undo ``pause_reading()``: held data comes first; safe from any thread."""
        loop = self._loop
        if loop._thread_id != _get_ident():
            loop.call_soon_threadsafe(self.resume_reading)
            return
        if not self._user_pause or self._state == CLOSED:
            return
        runner = loop.runner
        if runner is not None and self._task is not None:
            runner.resume(self)  # clears the flag and requeues held callbacks first
        else:
            self._user_pause = False
        self._update_interest()
        if self._held or self._held_eof:
            # After this dispatch: records of the same poll still to come are
            # appended to the held chunks (see EventLoop._dispatch), not
            # delivered before them.
            loop.call_soon(self._release_held)

    def call_later(self, delay: float, callback: Any, *args: Any) -> "TimerHandle":
        """Run ``callback(*args)`` on the loop after ``delay`` seconds, unless the
        connection closed first (the timer is cancelled with the connection).
        Safe from any thread."""
        self._check_open("call_later")
        handle = self._loop.call_later(delay, self._timer_fired, callback, args)
        loop = self._loop
        if loop._thread_id != _get_ident():
            loop.call_soon_threadsafe(self._keep_timer, handle)
        else:
            self._timers.add_user(handle)
        return handle

    def _keep_timer(self, handle: "TimerHandle") -> None:
        if self._state == CLOSED:
            handle.cancel()
        else:
            self._timers.add_user(handle)

    def _timer_fired(self, callback: Any, args: Tuple[Any, ...]) -> None:
        if self._state == OPEN or self._state == OPENING:
            callback(*args)

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

    def _set_deadline(self, deadline: Deadline, read: bool) -> None:
        self._check_open("set_read_deadline" if read else "set_write_deadline")
        when = deadline_time(deadline)
        loop = self._loop
        if loop._thread_id != _get_ident():
            loop.call_soon_threadsafe(self._if_open, self._timers.arm_deadline, when, read)
        else:
            self._timers.arm_deadline(when, read)

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
        self._loop.backend.setsockopt_int(self._fd, socket.SOL_SOCKET, socket.SO_KEEPALIVE,
                                          1 if enabled else 0)

    def _if_open(self, method: Any, *args: Any) -> None:
        if self._state != CLOSED:
            method(*args)

    def _check_open(self, what: str) -> None:
        if self._state not in (OPEN, OPENING) or self._close_called:
            raise ConnClosedError("{} on a closed connection".format(what))

    def __repr__(self) -> str:
        return "<pulse.Conn fd={} {}>".format(self._fd, NAMES[self._state])


def _owned_bytes(data: Any) -> bytes:
    """``data`` as bytes the caller cannot mutate afterwards (copied unless ``bytes``)."""
    if type(data) is bytes:
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError("write() takes bytes, bytearray or memoryview, got {}".format(
        type(data).__name__))

