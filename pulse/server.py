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
from typing import Any, List, Optional

from .address import SockAddr, open_listener
from .errors import ServerStateError
from .handler import check_handler
from .loop import EventLoop
from .options import Options

logger = logging.getLogger("pulse")


class Server:
    """A TCP/Unix server driving ``handler`` callbacks.

    ``handler`` is an object with ``on_open``, ``on_data`` and ``on_close``
    (a ``Handler`` subclass instance, or ``pulse.callbacks(...)``); a class is
    instantiated once.  Keyword options are those of ``pulse.Options``:
    ``trigger`` ("edge" or "level"), ``task_type`` ("loop", "pool" or
    "thread"), ``read_buffer_size``, the write-buffer water marks, timeouts,
    ``log_level``, ...
    """

    def __init__(self, handler: Any, **options: Any) -> None:
        if isinstance(handler, type):
            handler = handler()
        self.handler = check_handler(handler)
        self.options = Options(**options)
        if self.options.log_level is not None:
            level = self.options.log_level
            if isinstance(level, str):
                level = logging.getLevelName(level.upper())
                if not isinstance(level, int):
                    raise ValueError("log_level must be a logging level name, got {!r}".format(
                        self.options.log_level))
            logger.setLevel(level)
        self._listeners: List[socket.socket] = []
        self._unix_paths: List[str] = []
        self._lock = threading.Lock()
        self._state = "new"
        self._stop_requested = False
        self._loop: Optional[EventLoop] = None
        self._started = threading.Event()

    @property
    def loop(self) -> Optional[EventLoop]:
        """The running event loop (``None`` before ``serve()`` and after it returns)."""
        return self._loop

    @property
    def address(self) -> SockAddr:
        """The bound address of the first listener (useful after listening on port 0)."""
        if not self._listeners:
            raise ServerStateError("the server is not listening; call listen() or serve()")
        return self._listeners[0].getsockname()

    @property
    def addresses(self) -> List[SockAddr]:
        """Bound addresses of every listener."""
        return [sock.getsockname() for sock in self._listeners]

    def listen(self, address: Any) -> SockAddr:
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
                    raise ValueError("the socket to serve must be SOCK_STREAM, got {!r}".format(sock))
                sock.setblocking(False)
            else:
                sock = open_listener(address, self.options.backlog, self.options.reuse_port)
                if sock.family == socket.AF_UNIX:
                    self._unix_paths.append(sock.getsockname())
            self._listeners.append(sock)
            return sock.getsockname()

    def wait_started(self, timeout: Optional[float] = None) -> bool:
        """Block until ``serve()`` is accepting connections; False on timeout."""
        return self._started.wait(timeout)

    def serve(self, address: Any = None) -> None:
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
                loop.add_listener(sock, self.handler)
            if self._stop_requested:
                loop.stop()
            for sock in self._listeners:
                logger.info("pulse: serving on %s (%s backend, %s-triggered, task_type=%s)",
                            sock.getsockname(), loop.backend.NAME, self.options.trigger,
                            self.options.task_type)
            self._started.set()
            loop.run(on_stop=self._close_listeners)
        finally:
            self._close_listeners()
            with self._lock:
                self._state = "stopped"
                self._loop = None

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
            if loop is not None and not loop._closed:
                loop.remove_listener(sock)
            sock.close()
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._unix_paths = []
