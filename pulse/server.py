"""``Server``: one event loop serving one or more listening sockets.

``serve()`` blocks the calling thread until ``stop()`` is called from another
thread, a signal handler or a callback, then closes every connection (each
gets ``on_close``), closes its listeners and fds, joins its threads and
returns.  Several processes can serve one port with ``reuse_port=True``; the
launcher (``pulse.serve``) does that for you.
"""

import logging
import os
import socket
import threading
from typing import TYPE_CHECKING, Any, List, Optional, Type, Union

from .address import Address, AddressLike, open_listener
from .errors import ServerStateError
from .handler import HandlerProtocol, check_handler
from .loop import EventLoop
from .options import Options, parse_log_level
from .stats import Stats

if TYPE_CHECKING:  # pragma: no cover
    from ssl import SSLContext

logger = logging.getLogger("pulse")


class Server:
    """A TCP/Unix server driving ``handler`` callbacks.

    ``handler`` is an object with ``on_open``, ``on_data`` and ``on_close``
    (a ``Handler`` subclass instance, or ``pulse.callbacks(...)``); a class is
    instantiated once.  Keyword options are those of ``pulse.Options``:
    ``trigger`` ("edge" or "level"), ``task_type`` ("loop", "pool" or
    "thread"), ``read_buffer_size``, the write-buffer water marks, timeouts,
    ``log_level``, ...  With ``ssl`` (a server-side ``ssl.SSLContext``) every
    connection speaks TLS: ``on_open`` runs after its handshake, the
    callbacks see plaintext.  With ``proxy_protocol=True`` (or ``"v1"``,
    ``"v2"``) every connection starts with a PROXY protocol header, read
    before ``on_open`` and TLS (``pulse/proxy_gate.py``).
    """

    def __init__(self, handler: Union[HandlerProtocol, Type[HandlerProtocol]],
                 ssl: Optional["SSLContext"] = None, **options: Any) -> None:
        if isinstance(handler, type):
            handler = handler()
        self.handler = check_handler(handler)
        self.options = Options(**options)
        if ssl is not None:
            from .tls import check_context
            check_context(ssl, server_side=True)
        #: The server-side ``ssl.SSLContext`` of every listener, or ``None`` (plain TCP).
        self.ssl = ssl
        level = parse_log_level(self.options.log_level)
        if level is not None:
            logger.setLevel(level)
        self._listeners: List[socket.socket] = []
        self._unix_paths: List[str] = []
        self._lock = threading.Lock()
        self._state = "new"
        self._stop_requested = False
        self._loop: Optional[EventLoop] = None
        self._started = threading.Event()  # set when serve() runs or ended
        self._ran = False  # the loop iterated at least once
        self._final_stats = Stats()  # what stats() answers when no loop runs

    @property
    def loop(self) -> Optional[EventLoop]:
        """The running event loop (``None`` before ``serve()`` and after it returns)."""
        return self._loop

    def stats(self) -> Stats:
        """A snapshot of the server's counters (``pulse.Stats``): connections,
        bytes, loop time, errors.  Safe from any thread; while serving it may
        be slightly stale (see ``pulse/stats.py``); all zeros before
        ``serve()``, and the last counts once it returned."""
        loop = self._loop
        return loop.stats() if loop is not None else self._final_stats

    @property
    def address(self) -> Address:
        """The bound address of the first listener (useful after listening on port 0)."""
        if not self._listeners:
            raise ServerStateError("the server is not listening; call listen() or serve()")
        return self._listeners[0].getsockname()

    @property
    def addresses(self) -> List[Address]:
        """Bound addresses of every listener."""
        return [sock.getsockname() for sock in self._listeners]

    def listen(self, address: Union[AddressLike, socket.socket]) -> Address:
        """Bind and listen on ``address`` (or adopt a listening ``socket.socket``).

        May be called several times, before ``serve()`` only.  Returns the
        bound address; raises ``OSError`` naming the address when it is in
        use.
        """
        with self._lock:
            if self._state != "new":
                raise ServerStateError("listen() must be called before serve()")
            if isinstance(address, socket.socket):
                sock = address
                if sock.type != socket.SOCK_STREAM:
                    raise ValueError("the socket to serve must be SOCK_STREAM, got {!r}".format(
                        sock))
                sock.setblocking(False)
            else:
                sock = open_listener(address, self.options.backlog, self.options.reuse_port)
                if sock.family == socket.AF_UNIX:
                    self._unix_paths.append(sock.getsockname())
            self._listeners.append(sock)
            return sock.getsockname()

    def wait_started(self, timeout: Optional[float] = None) -> bool:
        """Block until ``serve()``'s loop runs (accepting connections, its
        workers and signal wake-up in place); False on timeout or when
        ``serve()`` ended without ever running."""
        return self._started.wait(timeout) and self._ran

    def serve(self, address: Union[None, AddressLike, socket.socket] = None) -> None:
        """Serve until ``stop()``; listens on ``address`` first when given.

        Raises ``ServerStateError`` when called twice or with nothing to
        listen on.
        """
        if address is not None:
            self.listen(address)
        with self._lock:
            if self._state != "new":
                raise ServerStateError("serve() was already called on this server")
            if not self._listeners:
                raise ServerStateError("nothing to serve: pass an address or call listen() first")
            self._state = "serving"
            try:
                loop = EventLoop(self.options)
            except BaseException:
                self._state = "stopped"
                self._close_listeners()
                raise
            self._loop = loop
        try:
            for sock in self._listeners:
                loop.add_listener(sock, self.handler, self.ssl)
            if self._stop_requested:
                loop.stop()
            for sock in self._listeners:
                logger.info("pulse: serving on %s (%s backend, %s-triggered, task_type=%s)",
                            sock.getsockname(), loop.backend.NAME, self.options.trigger,
                            self.options.task_type)
            # Started means iterating: from the loop's first round, with
            # what run() sets up (runner, signal wake-up) in place.
            loop.call_soon_threadsafe(self._mark_started)
            loop.run(on_stop=self._close_listeners)
        finally:
            self._started.set()  # nobody waits for ever on a server that ended
            self._close_listeners()
            with self._lock:
                self._state = "stopped"
                self._final_stats = loop.stats()
                self._loop = None

    def _mark_started(self) -> None:
        self._ran = True
        self._started.set()

    def stop(self) -> None:
        """Stop serving: ``serve()`` closes every connection and returns.

        Safe from any thread, from a signal handler and from a callback;
        calling it again, or before ``serve()``, is harmless.
        """
        self._stop_requested = True
        loop = self._loop
        if loop is not None:
            loop.stop()

    def _close_listeners(self) -> None:
        loop = self._loop
        for sock in self._listeners:
            if loop is not None and not loop.closed:
                loop.remove_listener(sock)
            sock.close()
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._unix_paths = []
