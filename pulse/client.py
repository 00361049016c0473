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
from typing import TYPE_CHECKING, Any, Optional

from .address import parse_address
from .conn import OPEN, Conn
from .errors import ServerStateError
from .handler import check_handler

if TYPE_CHECKING:  # pragma: no cover
    from .loop import EventLoop


def _resolve(family: int, sockaddr: Any) -> Any:
    """``(family, sockaddr)`` ready for connect; host names go through getaddrinfo.

    Resolution runs in the calling thread: IP literals skip it, and a dial
    made from a worker thread (pool mode) keeps DNS off the loop.
    """
    if family == socket.AF_UNIX:
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


def dial(loop: "EventLoop", address: Any, handler: Any, timeout: Optional[float] = 10.0) -> Conn:
    """Start connecting to ``address``; return the ``Conn`` at once (see ``EventLoop.dial``)."""
    check_handler(handler)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or timeout != timeout or timeout <= 0):
        raise ValueError("timeout must be > 0 seconds or None, got {!r}".format(timeout))
    family, sockaddr = _resolve(*parse_address(address))
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
    conn = Conn(loop, fd, handler, loop._batch)
    conn._connecting = True
    conn._raddr = sockaddr[:2] if isinstance(sockaddr, tuple) else sockaddr
    error = None
    if code not in (0, errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
        error = OSError(code, "connect to {}: {}".format(address, os.strerror(code)))
    loop.call_soon_threadsafe(_start, loop, conn, timeout, address, error)
    return conn


def _start(loop: "EventLoop", conn: Conn, timeout: Optional[float], address: Any,
           error: Optional[BaseException]) -> None:
    """On the loop: register the connecting socket, arm its timeout."""
    fd = conn._fd
    conn._born = loop._batch
    loop._conns[fd] = conn
    if error is None and loop._stopping:
        error = ConnectionAbortedError("the event loop is stopping")
    if error is None:
        loop._specials[fd] = lambda: _finish(loop, conn, address)
        try:
            loop._poller.add_connecting(fd)
        except OSError as exc:
            error = exc
    if error is not None:
        conn._fail(error)
        return
    if timeout is not None:
        conn._write_timer = loop.call_later(timeout, _timed_out, conn, address, timeout)


def _timed_out(conn: Conn, address: Any, timeout: float) -> None:
    conn._write_timer = None
    if conn._connecting:
        conn._fail(TimeoutError("connect to {} timed out after {:g} s".format(address, timeout)))


def _finish(loop: "EventLoop", conn: Conn, address: Any) -> None:
    """The connecting socket became writable: connected, or failed."""
    fd = conn._fd
    if not conn._connecting or conn._state != OPEN:
        return
    code = loop.backend.getsockopt_int(fd, socket.SOL_SOCKET, socket.SO_ERROR)
    if code == 0:
        # A writable socket with no error can still be unconnected on some
        # systems (EPOLLHUP before the RST is processed): ask the kernel.
        try:
            loop.backend.sockaddr(fd, True)
        except OSError as exc:
            code = exc.errno or errno.ENOTCONN
    loop._specials.pop(fd, None)
    conn._connecting = False
    if conn._write_timer is not None:
        conn._write_timer.cancel()
        conn._write_timer = None
    if code:
        conn._fail(OSError(code, "connect to {}: {}".format(address, os.strerror(code))))
        return
    try:
        loop._poller.connected(fd, loop.edge)
    except OSError as exc:
        conn._fail(exc)
        return
    if conn._backlog:
        conn._update_interest()
    loop._opened(conn)


def register(loop: "EventLoop", sock: Any, handler: Any) -> Conn:
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
    conn = Conn(loop, fd, handler, loop._batch)
    conn._connecting = True  # until the loop registered it: writes are queued
    loop.call_soon_threadsafe(_adopt, loop, conn)
    return conn


def _adopt(loop: "EventLoop", conn: Conn) -> None:
    conn._born = loop._batch
    loop._conns[conn._fd] = conn
    conn._connecting = False
    if conn._state != OPEN:
        loop._close_queue.append(conn)
        return
    try:
        loop._poller.add(conn._fd, True, bool(conn._backlog), loop.edge)
    except OSError as exc:
        conn._fail(exc)
        return
    conn._writing = bool(conn._backlog)
    loop._opened(conn)


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

    def dial(self, address: Any, handler: Any, timeout: Optional[float] = 10.0) -> Conn:
        """Open an outgoing connection (see ``EventLoop.dial``); safe from any thread."""
        return self.loop.dial(address, handler, timeout)

    def register(self, sock: Any, handler: Any) -> Conn:
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
            if self.loop._thread_id is None:
                self.loop.close()  # never ran: nothing else will release its fds
        elif thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> "Client":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
