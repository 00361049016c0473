"""Task modes: where the callbacks run when they do not run in the event loop.

``pool``: a fixed pool of worker threads.  Each connection has a serial queue
of callbacks; a connection is handed to at most one worker at a time, so its
callbacks run one at a time and in arrival order, while different
connections run in parallel.  ``thread``: one dedicated thread per
connection, for handlers that block.

In both modes ``on_data`` gets its own ``bytes``, and the loop stops reading a
connection whose queued input passes a bound until the handler catches up:
otherwise a slow handler would let a fast peer fill our memory.
"""

import collections
import logging
import queue
import threading
from typing import Any, Callable, Deque, List, Optional, Tuple

from .conn import Conn
from .options import Options

logger = logging.getLogger("pulse")

# Queued input per connection above which the loop stops reading it.
INPUT_HIGH_WATER = 256 * 1024
INPUT_LOW_WATER = 64 * 1024
# A pool worker runs at most this many callbacks of one connection before it
# lets other connections have a turn.
POOL_BATCH = 16

Item = Tuple[Callable[..., Any], Tuple[Any, ...], int]


class ConnTasks:
    """The per-connection queue of callbacks waiting to run."""

    __slots__ = ("items", "lock", "scheduled", "queued_bytes", "cancelled", "ready", "held")

    def __init__(self) -> None:
        self.items: Deque[Item] = collections.deque()
        self.lock = threading.Lock()
        self.scheduled = False
        self.queued_bytes = 0
        self.cancelled = False  # close() was called: drop the on_data still queued
        self.ready = threading.Condition(self.lock)
        self.held: List[Item] = []  # on_data/FIN items kept while reading is paused


class Runner:
    """Common part of the threaded modes: queue callbacks, run them, report errors."""

    def __init__(self, loop: Any, options: Options) -> None:
        self.loop = loop
        self.shutdown_timeout = options.shutdown_timeout

    # Called on the loop's thread.
    def open(self, conn: Conn) -> None:
        conn._task = ConnTasks()
        self._started(conn)
        self._submit(conn, conn._handler.on_open, (conn,), 0)

    def data(self, conn: Conn, payload: bytes) -> None:
        size = len(payload)
        self._submit(conn, conn._handler.on_data, (conn, payload), size)
        tasks = conn._task
        if tasks.queued_bytes > INPUT_HIGH_WATER and not conn._input_paused:
            conn._input_paused = True
            conn._update_interest()

    def call(self, conn: Conn, func: Callable[[Conn], None]) -> None:
        self._submit(conn, func, (conn,), 0)

    def eof(self, conn: Conn) -> None:
        self._submit(conn, _peer_closed, (conn,), 0)

    def resume(self, conn: Conn) -> None:
        """On the loop: end a pause_reading(); the held items run next, before newer ones.

        The flag and the queue change under one lock, so a worker either held
        an item (it is requeued here, at the front) or saw the flag clear.
        """
        tasks = conn._task
        with tasks.lock:
            conn._user_paused = False
            held, tasks.held = tasks.held, []
            if held:
                tasks.items.extendleft(reversed(held))
            kick = bool(held) and self._wake_locked(conn)
        if kick:
            self._schedule(conn)

    def _wake_locked(self, conn: Conn) -> bool:
        """With the lock held: make a worker look at the queue; True if ``_schedule`` must follow."""
        return False

    def _schedule(self, conn: Conn) -> None:
        """Hand a connection with queued items to a worker (without the lock)."""

    def close(self, conn: Conn, err: Optional[BaseException]) -> None:
        if conn._task is None:  # a dial that never connected: on_close still runs here
            conn._task = ConnTasks()
            self._started(conn)
        self._submit(conn, conn._handler.on_close, (conn, err), -1)

    # Called on worker threads.
    def _run_item(self, conn: Conn, item: Item) -> None:
        func, args, size = item
        tasks = conn._task
        if size >= 0:
            with tasks.lock:
                if conn._user_paused and (size > 0 or func is _peer_closed):
                    # pause_reading(): keep data and FIN, in order, for resume.
                    tasks.held.append(item)
                    return
                tasks.queued_bytes -= size
                resume = conn._input_paused and tasks.queued_bytes <= INPUT_LOW_WATER
            if resume:
                self.loop.call_soon_threadsafe(_resume_input, conn)
            if size > 0 and tasks.cancelled:
                return  # close() was called: no on_data after it
        try:
            func(*args)
        except Exception as exc:  # noqa: BLE001 - a callback may raise anything
            if size < 0:
                logger.exception("pulse: on_close raised on %r", conn)
            else:
                logger.error("pulse: %s raised on %r; closing the connection",
                             getattr(func, "__name__", func), conn,
                             exc_info=(type(exc), exc, exc.__traceback__))
                tasks.cancelled = True
                conn.abort(exc)

    def _started(self, conn: Conn) -> None:
        """Hook: a connection's queue was created."""

    def _submit(self, conn: Conn, func: Callable[..., Any], args: Tuple[Any, ...], size: int) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        """Wait for queued callbacks (within shutdown_timeout) and join every thread."""
        raise NotImplementedError


def _peer_closed(conn: Conn) -> None:
    """Queued behind the data that came before a FIN: close on the loop now."""
    conn._loop.call_soon_threadsafe(conn._peer_closed)


def _resume_input(conn: Conn) -> None:
    if conn._input_paused:
        conn._input_paused = False
        conn._update_interest()


class PoolRunner(Runner):
    """Callbacks on a pool of ``pool_size`` worker threads, serial per connection."""

    def __init__(self, loop: Any, options: Options) -> None:
        super().__init__(loop, options)
        self._queue: "queue.SimpleQueue[Optional[Conn]]" = queue.SimpleQueue()
        self._threads: List[threading.Thread] = []
        for index in range(options.pool_size):
            thread = threading.Thread(target=self._work, name="pulse-pool-{}".format(index),
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def _submit(self, conn: Conn, func: Callable[..., Any], args: Tuple[Any, ...], size: int) -> None:
        tasks = conn._task
        with tasks.lock:
            tasks.items.append((func, args, size))
            if size > 0:
                tasks.queued_bytes += size
            if not self._wake_locked(conn):
                return
        self._queue.put(conn)

    def _wake_locked(self, conn: Conn) -> bool:
        tasks = conn._task
        if tasks.scheduled:
            return False
        tasks.scheduled = True
        return True

    def _schedule(self, conn: Conn) -> None:
        self._queue.put(conn)

    def _work(self) -> None:
        get = self._queue.get
        while True:
            conn = get()
            if conn is None:
                return
            tasks = conn._task
            for _ in range(POOL_BATCH):
                with tasks.lock:
                    if not tasks.items:
                        tasks.scheduled = False
                        break
                    item = tasks.items.popleft()
                self._run_item(conn, item)
            else:
                self._queue.put(conn)  # more to do: back of the line, stays scheduled

    def shutdown(self) -> None:
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
                                  name="pulse-conn-{}".format(conn._fd), daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _submit(self, conn: Conn, func: Callable[..., Any], args: Tuple[Any, ...], size: int) -> None:
        tasks = conn._task
        with tasks.ready:
            tasks.items.append((func, args, size))
            if size > 0:
                tasks.queued_bytes += size
            tasks.ready.notify()

    def _wake_locked(self, conn: Conn) -> bool:
        conn._task.ready.notify()  # the lock held is the condition's own
        return False

    def _work(self, conn: Conn) -> None:
        tasks = conn._task
        try:
            while True:
                with tasks.ready:
                    while not tasks.items:
                        tasks.ready.wait()
                    item = tasks.items.popleft()
                self._run_item(conn, item)
                if item[2] < 0:
                    return  # on_close ran: this connection's thread is done
        finally:
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
