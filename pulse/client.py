"""Outgoing connections: dial an address, or adopt a connected socket.

A dialed connection is driven by the same handler callbacks and the same
``Conn`` as an accepted one (writes, backpressure, deadlines, task modes).
The connect is non-blocking: the socket is watched for writability as a
*special* fd, so the loop only checks ``SO_ERROR`` and never reads it before
the connect finished; then it becomes an ordinary connection.

How a failed connect is reported (our choice, documented in the README):
``on_open`` never runs and ``on_close(conn, err)`` runs once with the error
(``ConnectionRefusedError``, ``TimeoutError``, ...), so a proxy handles "the
upstream went away" and "the upstream never came" on one path;
``conn.opened`` tells them apart.  Bad arguments raise at once.
"""

import errno
import os
import socket
import threading
from typing import TYPE_CHECKING, Any, Optional, Tuple

from .address import Address, AddressLike, parse_address
from .conn import Conn
from .timers import TimerHandle
from .errors import ServerStateError
from .handler import HandlerProtocol, check_handler
from .options import check_seconds

if TYPE_CHECKING:  # pragma: no cover
    from ssl import SSLContext

    from .loop import EventLoop


def _resolve(family: int, sockaddr: Address) -> Tuple[int, Any]:
    """``(family, sockaddr)`` ready for connect; host names go through getaddrinfo.

    Resolution runs in the calling thread: IP literals skip it, and a dial
    made from a worker thread (pool mode) keeps DNS off the loop.
    """
    if isinstance(sockaddr, str):  # AF_UNIX: a path, nothing to resolve
        return family, sockaddr
    host, port = sockaddr
    try:
        socket.inet_pton(family, host)
        return family, (host, port)
    except OSError:
        pass
    infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM)
    # Prefer IPv4 when both exist: loopback services usually bind 127.0.0.1.
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return infos[0][0], infos[0][4]


class Connector:
    """One outgoing connect in progress: its socket is watched as a special
    (writability = the connect finished) and it has its own timeout, apart
    from the connection's deadlines (``Conn.set_write_deadline`` while
    dialing does not cancel it).  Loop thread only, after ``start``."""

    __slots__ = ("_loop", "_conn", "_address", "_timer")

    def __init__(self, loop: "EventLoop", conn: Conn, address: Any) -> None:
        self._loop = loop
        self._conn = conn
        self._address = address
        self._timer: Optional[TimerHandle] = None

    def start(self, timeout: Optional[float], error: Optional[BaseException]) -> None:
        """On the loop: watch the connecting socket, arm the timeout."""
        loop, conn = self._loop, self._conn
        if conn.fileno() < 0:
            return  # aborted before the loop got to it: already closed and reported
        loop._adopted(conn)
        if error is None and loop.stopping:
            error = ConnectionAbortedError("the event loop is stopping")
        if error is None:
            try:
                loop._add_special(conn.fileno(), self._finish, connecting=True)
            except OSError as exc:
                error = exc
        if error is not None:
            conn._fail(error)
            return
        if timeout is not None:
            self._timer = loop.call_later(timeout, self._timed_out, timeout)

    def _timed_out(self, timeout: float) -> None:
        self._timer = None
        if not self._conn.opened:
            self._conn._fail(TimeoutError("connect to {} timed out after {:g} s".format(
                self._address, timeout)))

    def _finish(self) -> None:
        """The connecting socket became writable: connected, or failed."""
        loop, conn = self._loop, self._conn
        fd = conn.fileno()
        if fd < 0 or conn.opened or conn._dropping():
            return  # closed, or failed in this iteration (it is being closed)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        code = loop.backend.getsockopt_int(fd, socket.SOL_SOCKET, socket.SO_ERROR)
        if code == 0:
            # A writable socket with no error can still be unconnected on some
            # systems (EPOLLHUP before the RST is processed): ask the kernel.
            try:
                loop.backend.sockaddr(fd, True)
            except OSError as exc:
                code = exc.errno or errno.ENOTCONN
        if code:
            conn._fail(OSError(code, "connect to {}: {}".format(
                self._address, os.strerror(code))))
            return
        try:
            loop._connected(conn)
        except OSError as exc:
            conn._fail(exc)
            return
        conn._opened()  # on_open; what was written (or closed) while dialing goes on now


def dial(loop: "EventLoop", address: AddressLike, handler: HandlerProtocol,
         timeout: Optional[float] = 10.0, ssl: Optional["SSLContext"] = None,
         server_hostname: Optional[str] = None) -> Conn:
    """Start connecting to ``address``; return the ``Conn`` at once (see ``EventLoop.dial``)."""
    check_handler(handler)
    timeout = check_seconds("timeout", timeout, allow_none=True, positive=True)
    family, target = parse_address(address)
    if ssl is not None:
        from .tls import check_context
        if server_hostname is None and not isinstance(target, str):
            server_hostname = target[0]  # the host as dialed, a name or an IP
        check_context(ssl, False, server_hostname, "dial() over TLS to {!r}".format(address))
    elif server_hostname is not None:
        raise ValueError("server_hostname is only for a TLS dial (pass ssl=)")
    family, sockaddr = _resolve(family, target)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if family != socket.AF_UNIX and loop.options.tcp_nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(sockaddr)
    except BaseException:
        sock.close()
        raise
    fd = sock.detach()  # the Conn owns the fd from here on
    conn = Conn(loop, fd, handler, -1, opening=True)
    conn._set_remote(sockaddr if isinstance(sockaddr, str) else sockaddr[:2])
    if ssl is not None:
        conn._use_tls(ssl, False, server_hostname)
    loop._joining_conn(conn)
    error = None
    if code not in (0, errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
        error = OSError(code, "connect to {}: {}".format(address, os.strerror(code)))
    loop.call_soon_threadsafe(Connector(loop, conn, address).start, timeout, error)
    return conn


def register(loop: "EventLoop", sock: Any, handler: HandlerProtocol) -> Conn:
    """Serve an already connected socket (object or fd); the loop takes ownership of it."""
    check_handler(handler)
    if isinstance(sock, socket.socket):
        if sock.type != socket.SOCK_STREAM:
            raise ValueError("register() needs a SOCK_STREAM socket, got {!r}".format(sock))
        try:
            sock.getpeername()
        except OSError as exc:
            raise ValueError("register() needs a connected socket: {}".format(exc)) from None
        sock.setblocking(False)
        if sock.family != socket.AF_UNIX and loop.options.tcp_nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        fd = sock.detach()
    elif isinstance(sock, int) and not isinstance(sock, bool) and sock >= 0:
        fd = sock
        os.set_blocking(fd, False)
    else:
        raise TypeError("register() takes a socket.socket or an fd, got {!r}".format(sock))
    # OPENING until the loop registered it: writes made meanwhile are queued.
    conn = Conn(loop, fd, handler, -1, opening=True)
    loop._joining_conn(conn)
    loop.call_soon_threadsafe(_adopt, loop, conn)
    return conn


def _adopt(loop: "EventLoop", conn: Conn) -> None:
    if conn.fileno() < 0:
        return  # aborted before the loop got to it
    loop._adopted(conn)
    if loop.stopping:
        conn._fail(ConnectionAbortedError("the event loop is stopping"))
        return
    try:
        loop._watch_new(conn.fileno())
    except OSError as exc:
        conn._fail(exc)
        return
    conn._opened()


class Client:
    """A client-side event loop: dial connections and serve them with handlers.

    ``run()`` blocks until ``stop()``; ``start()`` runs the loop in a
    background thread instead (``with pulse.Client() as client:`` starts and
    stops it).  Options are those of ``Server`` (``trigger``, ``task_type``,
    water marks, ...).
    """

    def __init__(self, **options: Any) -> None:
        from .loop import EventLoop
        from .options import Options
        self.loop = EventLoop(Options(**options))
        self._thread: Optional[threading.Thread] = None

    def dial(self, address: AddressLike, handler: HandlerProtocol,
             timeout: Optional[float] = 10.0, ssl: Optional["SSLContext"] = None,
             server_hostname: Optional[str] = None) -> Conn:
        """Open an outgoing connection, over TLS with ``ssl`` (see ``EventLoop.dial``);
        safe from any thread."""
        return self.loop.dial(address, handler, timeout, ssl, server_hostname)

    def register(self, sock: Any, handler: HandlerProtocol) -> Conn:
        """Serve an already connected socket, taking ownership of it."""
        return self.loop.register(sock, handler)

    def run(self) -> None:
        """Run the loop in this thread until ``stop()``; connections are closed on the way out."""
        self.loop.run()

    def start(self) -> "Client":
        """Run the loop in a background thread."""
        if self._thread is not None:
            raise ServerStateError("the client was already started")
        self._thread = threading.Thread(target=self.run, name="pulse-client", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop the loop (closing every connection) and join its thread if ``start()`` made one."""
        self.loop.stop()
        thread = self._thread
        if thread is None:
            if not self.loop.started:
                self.loop.close()  # never ran: nothing else will release its fds
        elif thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> "Client":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
