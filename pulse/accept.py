"""Accepting connections: one loop's listeners, bursts, and when to stop.

``Acceptor`` owns the listening sockets a loop watches.  Each readiness
event accepts a burst (one C call that accepts and registers up to
``ACCEPT_BURST`` sockets).  Two conditions take the listeners out of the
poller -- "parking" them -- so that a level-triggered listener cannot make
the loop spin on connections it will not take:

- out of file descriptors (``EMFILE``/``ENFILE``/...): parked for
  ``ACCEPT_BACKOFF``, or until a connection closes and gives an fd back;
- ``max_connections`` open (load shedding): parked until one closes.  New
  connections wait in the kernel's accept queue meanwhile, as nginx's
  ``worker_connections`` does; one log line per episode.
"""

import errno
import logging
import socket
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from .handler import HandlerProtocol
from .timers import TimerHandle

if TYPE_CHECKING:  # pragma: no cover
    from ssl import SSLContext

    from .loop import EventLoop

logger = logging.getLogger("pulse")

# Connections accepted per listener event before the others get a turn: one
# accept4 each, so 64 bounds the time a connect storm holds the loop to about
# what one full poll of reads takes, while a burst still costs one C call.
ACCEPT_BURST = 64
# After EMFILE/ENFILE the listener is parked this long instead of spinning on
# a level-triggered event that accept cannot clear.
ACCEPT_BACKOFF = 0.1

# A load-shedding episode ends (and is logged again next time) once the
# open connections fall below this share of max_connections.
SHED_EPISODE_END = 0.9

_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

# A listening socket, the handler of its connections, their TLS context.
Listener = Tuple[socket.socket, HandlerProtocol, Optional["SSLContext"]]


class Acceptor:
    """The listeners of one loop, watched or parked (loop thread only)."""

    def __init__(self, loop: "EventLoop", max_connections: int) -> None:
        self._loop = loop
        self._max = max_connections
        self._watched: Dict[int, Listener] = {}
        self._parked: Dict[int, Listener] = {}
        self._backoff: Optional[TimerHandle] = None
        self._shedding = False  # parked at max_connections
        # Counters for EventLoop.stats(): connections taken in, failed
        # accepts, and parking episodes by cause (one per log line).
        self.accepted = 0
        self.errors = 0
        self.parks_out_of_fds = 0
        self.parks_max_connections = 0

    @property
    def parked(self) -> bool:
        """True while the listeners are out of the poller (no fds, or at the limit)."""
        return bool(self._parked)

    def add(self, sock: socket.socket, handler: HandlerProtocol,
            ssl: Optional["SSLContext"] = None) -> None:
        """Accept from the listening ``sock`` and serve with ``handler`` (over TLS with ``ssl``)."""
        sock.setblocking(False)
        listener = (sock, handler, ssl)
        fd = sock.fileno()
        if self._parked:
            self._parked[fd] = listener
            return
        self._watch(fd, listener)

    def _watch(self, fd: int, listener: Listener) -> None:
        self._watched[fd] = listener
        self._loop._add_special(fd, lambda: self._accept(listener))

    def remove(self, sock: socket.socket) -> None:
        """Stop accepting from ``sock`` (before it is closed)."""
        fd = sock.fileno()
        self._parked.pop(fd, None)
        if self._watched.pop(fd, None) is not None:
            self._loop._remove_special(fd)

    def close(self) -> None:
        """Stop accepting from every listener (the loop is stopping)."""
        for fd in list(self._watched):
            self._loop._remove_special(fd)
        self._watched.clear()
        self._parked.clear()
        if self._backoff is not None:
            self._backoff.cancel()
            self._backoff = None

    def _accept(self, listener: Listener) -> None:
        sock, handler, ssl = listener
        loop = self._loop
        lfd = sock.fileno()
        if lfd < 0:
            return
        burst = ACCEPT_BURST
        if self._max:
            burst = min(burst, self._max - loop.occupied)
            if burst <= 0:
                self._shed()
                return
        errors: List[OSError] = []  # sockets accepted but not registrable, closed
        try:
            fds = loop.backend.accept_batch(lfd, loop._accept_poller(), loop.options.tcp_nodelay,
                                            loop.edge, burst, errors=errors)
        except OSError as exc:
            self._log_dropped(errors)
            self.errors += 1
            if exc.errno in _RESOURCE_ERRORS:
                self._park_for_fds(exc)
            else:
                logger.error("pulse: accept on fd %d failed: %s", lfd, exc)
            return
        self._log_dropped(errors)
        taken = 0
        try:
            for fd, peer in fds:
                taken += 1
                loop._accepted(fd, peer, handler, ssl)
        finally:
            # An exception leaving run() from an on_open: the sockets of the
            # burst not taken in yet are closed, not leaked.
            self.accepted += taken
            for fd, _ in fds[taken:]:
                loop._close_stray(fd)
        if self._max and loop.occupied >= self._max:
            self._shed()

    def _log_dropped(self, errors: List[OSError]) -> None:
        self.errors += len(errors)
        for error in errors:
            logger.warning("pulse: %s", error)

    def _park_all(self) -> None:
        for fd, listener in list(self._watched.items()):
            self._loop._remove_special(fd)
            self._parked[fd] = listener
        self._watched.clear()

    def _park_for_fds(self, exc: OSError) -> None:
        """Out of fds: stop watching the listeners for a while instead of spinning."""
        logger.warning("pulse: accept failed (%s); pausing accepts for %.0f ms with %d "
                       "connections open", exc.strerror, ACCEPT_BACKOFF * 1000,
                       self._loop.connections)
        self._park_all()
        if self._backoff is None:
            self.parks_out_of_fds += 1
            self._backoff = self._loop.call_later(ACCEPT_BACKOFF, self._unpark)

    def _shed(self) -> None:
        """``max_connections`` reached: leave new connections in the accept queue."""
        if not self._shedding:
            self._shedding = True  # until the load falls clearly (see _unpark)
            self.parks_max_connections += 1
            logger.warning("pulse: max_connections=%d reached; new connections wait in the "
                           "accept queue until one closes", self._max)
        self._park_all()

    def _unpark(self) -> None:
        """Watch the parked listeners again (the back-off ended or an fd came back)."""
        if self._backoff is not None:
            self._backoff.cancel()
            self._backoff = None
        if self._shedding:
            occupied = self._loop.occupied
            if occupied >= self._max:
                return
            # One episode, one log line: it ends when the load has clearly
            # fallen (under 90 % of the limit), not at every slot a close frees.
            if occupied <= self._max * SHED_EPISODE_END:
                self._shedding = False
                logger.info("pulse: below max_connections=%d again", self._max)
        parked, self._parked = self._parked, {}
        for fd, listener in parked.items():
            if not self._loop.stopping and listener[0].fileno() == fd:
                self._watch(fd, listener)

    def connection_closed(self) -> None:
        """A connection closed: an fd is back and the count went down."""
        if self._parked:
            self._unpark()
