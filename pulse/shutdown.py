"""How an event loop ends: a graceful stop, an abandoned run, signal wake-ups.

``Stopping`` is a base of ``EventLoop`` holding the three ways out of
``run()``:

- ``_graceful_stop`` (after ``stop()``): stop accepting; stop reading every
  connection; in the pool and thread modes wait until the callbacks already
  queued for a connection have run (their replies must go out, a worker may
  still be writing one); then close each connection gracefully; all within
  ``shutdown_timeout``, after which whatever is left is closed hard.
- ``_abandon`` (an exception left the loop: ``KeyboardInterrupt`` or
  ``SystemExit`` from a callback, a bug): close every connection at once,
  give each ``on_close`` the exception, stop the runner; ``run()`` then
  re-raises.  No fd is left open and no ``on_close`` is skipped.
- ``_signal_wakeup``: on the main thread, a signal that lands just before
  the poller blocks would otherwise wait for the next event (its Python
  handler only runs when the C call returns): the loop installs a
  ``signal.set_wakeup_fd`` socket that the C-level handler writes to, which
  ends the wait at once.
"""

import contextlib
import logging
import signal
import socket
import threading
from typing import TYPE_CHECKING, Any, Iterator, Set

from .timers import monotonic

if TYPE_CHECKING:  # pragma: no cover
    from .conn import Conn

logger = logging.getLogger("pulse")


def _nothing() -> None:
    """Queued only to wake the loop."""


class Stopping:
    """The end of ``EventLoop.run`` (a base class: these are the loop's own methods)."""

    # Provided by EventLoop.
    _conns: Any
    _settle_queue: Any
    _writes: Any
    _ready: Any
    _acceptor: Any
    options: Any
    runner: Any

    def _graceful_stop(self) -> None:
        """Stop accepting, let queued callbacks finish, close everything gracefully."""
        loop: Any = self
        self._acceptor.close()
        runner = self.runner
        deadline = monotonic() + self.options.shutdown_timeout

        def force() -> None:
            for conn in list(self._conns.values()):
                conn._fail(None)
        timer = loop.call_at(deadline, force)
        waiting: Set["Conn"] = set()
        if runner is not None:
            runner.begin_stop(lambda: loop.call_soon_threadsafe(_nothing))
        for conn in list(self._conns.values()):
            conn._start_stop()
            if runner is None or runner.idle(conn):
                conn._begin_close()
            else:
                waiting.add(conn)
        while self._conns or self._settle_queue or self._writes.count or self._ready:
            loop._run_once()
            if waiting:
                for conn in [c for c in waiting if runner.idle(c)]:
                    waiting.discard(conn)
                    conn._begin_close()
        timer.cancel()
        while self._ready:
            loop._run_ready()
        if runner is not None:
            runner.shutdown()

    def _abandon(self, exc: BaseException) -> None:
        """An exception is leaving ``run()``: close every connection now, each
        ``on_close`` getting ``exc``, and stop the runner."""
        loop: Any = self
        try:
            self._acceptor.close()
            for conn in list(self._conns.values()) + loop._take_joining():
                conn._fail(exc)
                conn._settle()  # closes it now: the loop will not iterate again
            self._settle_queue.clear()
        finally:
            if self.runner is not None:
                self.runner.shutdown()

    @contextlib.contextmanager
    def _signal_wakeup(self) -> Iterator[None]:
        """Route signals to a socket the poller watches (main thread only)."""
        loop: Any = self
        if threading.current_thread() is not threading.main_thread() or not hasattr(
                signal, "set_wakeup_fd"):
            yield
            return
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        try:
            previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        except (ValueError, OSError, TypeError):
            previous = None
        if previous is None or previous != -1:
            # Not ours to take (asyncio or the application installed one):
            # put theirs back and do without.
            if previous is not None:
                signal.set_wakeup_fd(previous)
            reader.close()
            writer.close()
            yield
            return

        def drain() -> None:
            try:
                while reader.recv(4096):
                    pass
            except OSError:
                pass  # empty (EAGAIN)
        loop._add_special(reader.fileno(), drain)
        try:
            yield
        finally:
            signal.set_wakeup_fd(-1)
            loop._remove_special(reader.fileno())
            reader.close()
            writer.close()
