"""Counters of one event loop and their snapshot, ``Stats``.

``LoopStats`` is a base of ``EventLoop`` (its ``stats()`` and the counters
are the loop's own).  The rule is that the hot path pays next to nothing:

- bytes are added once per poll batch (``_dispatch``) and once per flush
  (``writes.py``), not once per read or write;
- the loop's time is two ``time.perf_counter()`` calls per iteration, around
  the poll: the rest of the iteration is "busy";
- everything else (accepts, closes, errors, parks) is counted where it
  happens, which is rare next to reads and writes;
- what can be derived is derived when ``stats()`` is called instead of kept
  up to date: open connections, the write backlog summed over them, the
  paused ones.

``stats()`` may be called from any thread: it reads the counters without a
lock, so a snapshot taken while the loop runs can be a little stale or mix
two adjacent iterations; each number on its own is right.
"""

import dataclasses
import logging
import threading
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any, Dict, List, Mapping

if TYPE_CHECKING:  # pragma: no cover
    from .accept import Acceptor
    from .conn import Conn

__all__ = ["LoopStats", "Stats", "perf_counter"]

logger = logging.getLogger("pulse")


@dataclass(frozen=True)
class Stats:
    """A snapshot of one event loop's counters (``Server.stats()``, ``EventLoop.stats()``).

    Totals count from the loop's start; ``connections``, ``write_backlog``,
    ``paused`` and ``listeners_parked`` are the state at the snapshot.
    ``poll_seconds`` is the time spent in the poller call, which waits for
    events and also reads the ready sockets (one C call does both), and
    ``busy_seconds`` the rest of the loop's running time (callbacks,
    flushes, timers); ``utilisation`` is the busy share.  Bytes are those of
    the sockets (ciphertext under TLS).
    """

    connections: int = 0           #: open connections now
    accepted: int = 0              #: connections accepted from the listeners
    closed: int = 0                #: connections closed (accepted, dialed or registered)
    bytes_in: int = 0              #: bytes read from the sockets
    bytes_out: int = 0             #: bytes the kernel took
    write_backlog: int = 0         #: bytes written and not yet taken by the kernel, all connections
    paused: int = 0                #: connections not being read (backpressure, pause_reading)
    iterations: int = 0            #: loop iterations (polls)
    poll_seconds: float = 0.0      #: time in the poller call (waiting, and the batched reads)
    busy_seconds: float = 0.0      #: the loop's other running time
    callback_errors: int = 0       #: exceptions raised by handler callbacks, timers, call_soon
    accept_errors: int = 0         #: failed accepts (out of fds included)
    parks_out_of_fds: int = 0      #: times the listeners were parked for EMFILE/ENFILE
    parks_max_connections: int = 0  #: load-shedding episodes at max_connections
    listeners_parked: bool = False  #: the listeners are parked now

    @property
    def utilisation(self) -> float:
        """The busy share of the loop's running time since it started (0.0 to 1.0)."""
        total = self.busy_seconds + self.poll_seconds
        return self.busy_seconds / total if total > 0 else 0.0

    def utilisation_since(self, earlier: "Stats") -> float:
        """The busy share of the loop's time between ``earlier`` and this snapshot."""
        busy = self.busy_seconds - earlier.busy_seconds
        total = busy + self.poll_seconds - earlier.poll_seconds
        return min(1.0, max(0.0, busy / total)) if total > 0 else 0.0

    def as_dict(self) -> Dict[str, Any]:
        """The fields as a dict of plain numbers (JSON-ready)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Stats":
        """The snapshot ``as_dict`` gave (unknown keys are ignored)."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})


class LoopStats:
    """The counters of ``EventLoop`` and its ``stats()`` (a base class)."""

    # Provided by EventLoop.
    _conns: Dict[int, "Conn"]
    _acceptor: "Acceptor"
    _iteration: int
    _closing_in_runner: int
    _thread_id: Any
    call_soon_threadsafe: Any

    def _init_stats(self) -> None:
        #: Bytes received and sent by all connections (``_dispatch``,
        #: ``_read_direct`` and ``writes.py`` add to them).
        self.bytes_in = 0
        self.bytes_out = 0
        self._closed_count = 0  # connections the loop dropped (_forget)
        self._callback_errors = 0
        # The loop's time.  _run_once subtracts perf_counter() before the
        # poll and adds it after: the cheapest bookkeeping there is (two
        # clock reads, two additions), and while a poll is in progress the
        # sum is negative (its start time is subtracted, and no sum of
        # past polls exceeds it), which tells stats() to add the time the
        # current wait has taken so far.  Busy time is the rest of run().
        self._poll_seconds = 0.0
        self._run_began = self._run_ended = 0.0
        self._running = False

    @property
    def connections(self) -> int:
        """Number of open connections."""
        return len(self._conns)

    @property
    def occupied(self) -> int:
        """Connections that count against ``max_connections``: the open ones,
        plus, in the task modes, the closed ones whose ``on_close`` has not
        run yet (the handler still holds them)."""
        return len(self._conns) + self._closing_in_runner

    def _callback_error(self) -> None:
        """Count a callback that raised (on the loop's thread: a worker hands it over)."""
        self._callback_errors += 1

    def _callback_raised(self, exc: BaseException, message: str, *args: Any) -> None:
        """Count a callback that raised ``exc`` and log ``message % args`` with
        its traceback; from any thread."""
        if threading.get_ident() == self._thread_id:
            self._callback_errors += 1
        else:
            self.call_soon_threadsafe(self._callback_error)  # one writer: the loop's thread
        logger.error(message, *args, exc_info=(type(exc), exc, exc.__traceback__))

    def _start_clock(self) -> None:
        """``run()`` starts: the loop's time counts from here."""
        self._run_began = perf_counter()
        self._running = True

    def _stop_clock(self) -> None:
        """``run()`` returns: its time ends here."""
        if self._running:
            self._run_ended = perf_counter()
            self._running = False

    def stats(self) -> Stats:
        """A snapshot of this loop's counters; safe from any thread (see the
        module docstring: a running loop's may be slightly stale).  It walks
        the open connections: about 0.1 us each (3000 took 0.28 ms)."""
        poll = self._poll_seconds  # one read: a consistent value
        running, now = self._running, perf_counter()
        if poll < 0:
            poll += now  # waiting in the poller right now
        elapsed = (now if running else self._run_ended) - self._run_began
        busy = max(0.0, elapsed - poll)
        backlog = paused = 0
        for conn in self._snapshot_conns():
            backlog += conn._backlog.pending
            if conn._paused or conn._user_pause:
                paused += 1
        acceptor = self._acceptor
        return Stats(
            connections=len(self._conns), accepted=acceptor.accepted, closed=self._closed_count,
            bytes_in=self.bytes_in, bytes_out=self.bytes_out, write_backlog=backlog,
            paused=paused, iterations=self._iteration, poll_seconds=poll, busy_seconds=busy,
            callback_errors=self._callback_errors, accept_errors=acceptor.errors,
            parks_out_of_fds=acceptor.parks_out_of_fds,
            parks_max_connections=acceptor.parks_max_connections,
            listeners_parked=acceptor.parked)

    def _snapshot_conns(self) -> List["Conn"]:
        """The open connections, read safely from another thread too."""
        for _ in range(100):
            try:
                # Copying runs in C, but an allocation may still let the loop
                # thread in and change the dict: then try again.
                return list(self._conns.values())
            except RuntimeError:
                continue
        return []
