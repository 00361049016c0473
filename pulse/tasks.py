"""Task modes: where the callbacks run when they do not run in the event loop.

``pool``: a fixed pool of worker threads.  Each connection has a serial queue
of callbacks; a connection is handed to at most one worker at a time, so its
callbacks run one at a time and in arrival order, while different
connections run in parallel.  ``thread``: one dedicated thread per
connection, for handlers that block.

In both modes ``on_data`` gets its own ``bytes``, and the loop stops reading a
connection whose queued input passes a bound until the handler catches up:
otherwise a slow handler would let a fast peer fill our memory.  The bound is
checked and the pause flag set under the connection's lock, in the same
critical section as the workers' check that lifts it, so the two can never
miss each other.  Everything that touches the connection's state is handed to
the loop (``call_soon_threadsafe``); the workers only run callbacks.
"""

import collections
import logging
import queue
import threading
from typing import Any, Callable, Deque, List, Optional, Tuple

from .conn import Conn
from .options import Options
from .states import PAUSE_INPUT

logger = logging.getLogger("pulse")

# Queued input per connection above which the loop stops reading it.
INPUT_HIGH_WATER = 256 * 1024
INPUT_LOW_WATER = 64 * 1024
# A pool worker runs at most this many callbacks of one connection before it
# lets other connections have a turn.
POOL_BATCH = 16

# (callback, args, size): size > 0 for on_data (bytes queued), 0 for other
# callbacks, -1 for on_close (the last one).
Item = Tuple[Callable[..., Any], Tuple[Any, ...], int]


class ConnTasks:
    """The per-connection queue of callbacks waiting to run (owned by the runner)."""

    __slots__ = ("items", "lock", "scheduled", "running", "queued_bytes", "input_paused",
                 "cancelled", "ready", "held", "no_thread", "diverted")

    def __init__(self) -> None:
        self.items: Deque[Item] = collections.deque()
        self.lock = threading.Lock()
        self.scheduled = False  # pool: handed to a worker (queued or being run)
        self.running = False  # an item is being run
        self.queued_bytes = 0
        self.input_paused = False  # the loop was asked to stop reading (PAUSE_INPUT)
        self.cancelled = False  # close() was called: drop the on_data still queued
        self.ready = threading.Condition(self.lock)
        self.held: List[Item] = []  # on_data/FIN items kept while reading is paused
        self.no_thread = False  # thread mode: its thread could not start
        # start_tls() from a worker: the input queued behind it is ciphertext,
        # held here until the loop takes it for TLS (Runner.take_input).
        self.diverted = False


def _eof_item(conn: Conn) -> None:
    """Queued behind the data that came before a FIN: ask ``on_eof`` (in the
    worker), then let the loop keep the connection half-open or close it."""
    on_eof = getattr(conn.handler, "on_eof", None)
    keep_open = bool(on_eof(conn)) if on_eof is not None else False
    conn.loop.call_soon_threadsafe(conn._after_eof, keep_open)


class Runner:
    """Common part of the threaded modes: queue callbacks, run them, report errors."""

    def __init__(self, loop: Any, options: Options) -> None:
        self.loop = loop
        self.shutdown_timeout = options.shutdown_timeout
        self._stop_wake: Optional[Callable[[], None]] = None

    # -- called on the loop's thread --------------------------------------

    def open(self, conn: Conn) -> None:
        tasks = ConnTasks()
        conn._set_runner_state(tasks)
        try:
            self._started(conn)
        except (RuntimeError, MemoryError, OSError) as exc:
            # No thread for it (thread limit, memory): fail this connection
            # only; on_close runs on the loop, since it has no thread.
            tasks.no_thread = True
            logger.error("pulse: cannot start a thread for %r: %s; closing it", conn, exc)
            conn._fail(exc)
            return
        self._submit(conn, (conn.handler.on_open, (conn,), 0))

    def data(self, conn: Conn, payload: bytes) -> None:
        if self._submit(conn, (conn.handler.on_data, (conn, payload), len(payload))):
            conn._pause(PAUSE_INPUT)

    def call(self, conn: Conn, func: Callable[[Conn], None]) -> None:
        self._submit(conn, (func, (conn,), 0))

    def eof(self, conn: Conn) -> None:
        self._submit(conn, (_eof_item, (conn,), 0))

    def resume(self, conn: Conn) -> None:
        """End a pause_reading(): the held items run next, before newer ones.

        The flag and the queue change under one lock, so a worker either held
        an item (it is requeued here, at the front) or saw the flag clear.
        """
        tasks = conn._runner_state()
        with tasks.lock:
            conn._clear_user_pause()
            held, tasks.held = tasks.held, []
            if held:
                tasks.items.extendleft(reversed(held))
            kick = bool(held) and self._wake_locked(tasks)
        if kick:
            self._schedule(conn)

    def take_input(self, conn: Conn) -> Tuple[List[bytes], bool]:
        """``start_tls``, on the loop: take the ``on_data`` payloads (and a FIN)
        queued or held for ``conn``, in order, for TLS; end the diversion."""
        tasks = conn._runner_state()
        data: List[bytes] = []
        eof = False
        with tasks.lock:
            tasks.diverted = False
            kept: Deque[Item] = collections.deque()
            for item in tasks.held + list(tasks.items):
                func, args, size = item
                if size > 0:
                    data.append(args[1])
                    tasks.queued_bytes -= size
                elif func is _eof_item:
                    eof = True
                else:
                    kept.append(item)  # the other callbacks stay, in order
            tasks.held = []
            tasks.items = kept
            resume = tasks.input_paused and tasks.queued_bytes <= INPUT_LOW_WATER
            if resume:
                tasks.input_paused = False
        if resume:
            conn._resume(PAUSE_INPUT)
        return data, eof

    def close(self, conn: Conn, err: Optional[BaseException]) -> None:
        tasks = conn._runner_state()
        if tasks is None:  # a dial that never connected: on_close still runs here
            tasks = ConnTasks()
            conn._set_runner_state(tasks)
            try:
                self._started(conn)
            except (RuntimeError, MemoryError, OSError):
                tasks.no_thread = True
        if tasks.no_thread:
            conn._run_on_close(err)
            self.loop._on_close_ran()
            return
        self._submit(conn, (conn.handler.on_close, (conn, err), -1))

    def idle(self, conn: Conn) -> bool:
        """True when no callback of ``conn`` is queued or running."""
        tasks = conn._runner_state()
        if tasks is None:
            return True
        with tasks.lock:
            return not tasks.items and not tasks.running

    def begin_stop(self, wake: Callable[[], None]) -> None:
        """The loop is stopping: call ``wake`` after each callback, so that the
        loop notices connections whose queue ran empty."""
        self._stop_wake = wake

    def divert(self, conn: Conn) -> bool:
        """``start_tls`` from a worker: hold the input queued behind it (see
        ``take_input``); False if an upgrade is already under way."""
        tasks = conn._runner_state()
        with tasks.lock:
            if tasks.diverted:
                return False
            tasks.diverted = True
        return True

    def _submit(self, conn: Conn, item: Item) -> bool:
        """Queue ``item``; True when the loop must stop reading (input bound)."""
        tasks = conn._runner_state()
        size = item[2]
        with tasks.lock:
            tasks.items.append(item)
            pause = False
            if size > 0:
                tasks.queued_bytes += size
                if tasks.queued_bytes > INPUT_HIGH_WATER and not tasks.input_paused:
                    tasks.input_paused = pause = True
            kick = self._wake_locked(tasks)
        if kick:
            self._schedule(conn)
        return pause

    def _wake_locked(self, tasks: ConnTasks) -> bool:
        """With the lock held: make a worker look at the queue; True if
        ``_schedule`` must follow."""
        raise NotImplementedError

    def _schedule(self, conn: Conn) -> None:
        """Hand a connection with queued items to a worker (without the lock)."""

    def _started(self, conn: Conn) -> None:
        """Hook: a connection's queue was created (thread mode starts its thread)."""

    # -- called on worker threads -----------------------------------------

    def _run_item(self, conn: Conn, item: Item) -> None:
        """Run one callback (``tasks.running`` is set by the caller)."""
        func, args, size = item
        tasks = conn._runner_state()
        if size >= 0:
            with tasks.lock:
                if (conn._user_paused or tasks.diverted) and (size > 0 or func is _eof_item):
                    # pause_reading(): keep data and FIN, in order, for resume.
                    tasks.held.append(item)
                    return
                tasks.queued_bytes -= size
                resume = tasks.input_paused and tasks.queued_bytes <= INPUT_LOW_WATER
                if resume:
                    tasks.input_paused = False
            if resume:
                self.loop.call_soon_threadsafe(conn._resume, PAUSE_INPUT)
            if size > 0 and tasks.cancelled:
                return  # close() was called: no on_data after it
        try:
            func(*args)
        except Exception as exc:  # noqa: BLE001 - a callback may raise anything
            self.loop.call_soon_threadsafe(self.loop._callback_error)  # counted on the loop
            if size < 0:
                logger.exception("pulse: on_close raised on %r", conn)
            else:
                logger.error("pulse: %s raised on %r; closing the connection",
                             getattr(func, "__name__", func), conn,
                             exc_info=(type(exc), exc, exc.__traceback__))
                tasks.cancelled = True
                conn._fail_threadsafe(exc)

    def _after_item(self, item: Item) -> None:
        if item[2] < 0:  # on_close ran: the connection's slot is free
            self.loop.call_soon_threadsafe(self.loop._on_close_ran)
        wake = self._stop_wake
        if wake is not None:
            wake()

    def shutdown(self) -> None:
        """Wait for queued callbacks (within shutdown_timeout) and join every thread."""
        raise NotImplementedError


class PoolRunner(Runner):
    """Callbacks on a pool of ``pool_size`` worker threads, serial per connection."""

    def __init__(self, loop: Any, options: Options) -> None:
        super().__init__(loop, options)
        self._queue: "queue.SimpleQueue[Optional[Conn]]" = queue.SimpleQueue()
        # Connections handed to a worker and not yet done: shutdown waits for
        # 0 before the sentinels, or a connection re-queued behind them (more
        # than POOL_BATCH items) would never get its on_close.
        self._busy = 0
        self._idle = threading.Condition(threading.Lock())
        self._threads: List[threading.Thread] = []
        for index in range(options.pool_size):
            thread = threading.Thread(target=self._work, name="pulse-pool-{}".format(index),
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def _wake_locked(self, tasks: ConnTasks) -> bool:
        if tasks.scheduled:
            return False
        tasks.scheduled = True
        with self._idle:
            self._busy += 1
        return True

    def _schedule(self, conn: Conn) -> None:
        self._queue.put(conn)

    def _work(self) -> None:
        get = self._queue.get
        while True:
            conn = get()
            if conn is None:
                return
            tasks = conn._runner_state()
            for _ in range(POOL_BATCH):
                with tasks.lock:
                    tasks.running = False
                    if not tasks.items:
                        tasks.scheduled = False
                        with self._idle:
                            self._busy -= 1
                            if not self._busy:
                                self._idle.notify_all()
                        break
                    item = tasks.items.popleft()
                    tasks.running = True
                self._run_item(conn, item)
                self._after_item(item)
            else:
                with tasks.lock:
                    tasks.running = False
                self._queue.put(conn)  # more to do: back of the line, stays scheduled

    def shutdown(self) -> None:
        with self._idle:
            if not self._idle.wait_for(lambda: self._busy == 0, self.shutdown_timeout):
                logger.error("pulse: pool callbacks still queued after %.1f s",
                             self.shutdown_timeout)
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(self.shutdown_timeout)
            if thread.is_alive():
                logger.error("pulse: pool thread %s still busy after %.1f s", thread.name,
                             self.shutdown_timeout)
        self._threads = []


class ThreadRunner(Runner):
    """Callbacks on one dedicated thread per connection."""

    def __init__(self, loop: Any, options: Options) -> None:
        super().__init__(loop, options)
        self._threads: "set[threading.Thread]" = set()
        self._lock = threading.Lock()

    def _started(self, conn: Conn) -> None:
        thread = threading.Thread(target=self._work, args=(conn,),
                                  name="pulse-conn-{}".format(conn.fileno()), daemon=True)
        thread.start()  # may raise (thread limit): Runner.open fails the connection
        with self._lock:
            self._threads.add(thread)

    def _wake_locked(self, tasks: ConnTasks) -> bool:
        tasks.ready.notify()  # the lock held is the condition's own
        return False

    def _work(self, conn: Conn) -> None:
        tasks = conn._runner_state()
        try:
            while True:
                with tasks.ready:
                    tasks.running = False
                    while not tasks.items:
                        tasks.ready.wait()
                    item = tasks.items.popleft()
                    tasks.running = True
                self._run_item(conn, item)
                self._after_item(item)
                if item[2] < 0:
                    return  # on_close ran: this connection's thread is done
        finally:
            with tasks.lock:
                tasks.running = False
            with self._lock:
                self._threads.discard(threading.current_thread())

    def shutdown(self) -> None:
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(self.shutdown_timeout)
            if thread.is_alive():
                logger.error("pulse: connection thread %s still busy after %.1f s", thread.name,
                             self.shutdown_timeout)


def make_runner(loop: Any, options: Options) -> Runner:
    """The runner for ``options.task_type`` ("pool" or "thread")."""
    if options.task_type == "pool":
        return PoolRunner(loop, options)
    if options.task_type == "thread":
        return ThreadRunner(loop, options)
    raise ValueError("no runner for task_type={!r}".format(options.task_type))
