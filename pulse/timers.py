"""Timers of one event loop: a heap of handles ordered by due time.

A heap (like asyncio's) keeps ``call_later`` and deadline re-arming at
O(log n); cancelled handles stay in the heap until they surface, and the heap
is rebuilt when more than half of it is cancelled so that 10,000 connections
that each set and cleared a deadline leave nothing behind.

Thread safety: the heap belongs to the loop's thread.  ``Timers.add`` from
another thread (a pool or thread-mode worker calling ``call_later``) builds
the handle at once and hands the push to the loop through
``call_soon_threadsafe``; ``TimerHandle.cancel`` from another thread only sets
the handle's flag and leaves the bookkeeping to the loop.  So a worker never
touches the list the loop iterates.
"""

import heapq
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

monotonic = time.monotonic

# Rebuilding costs O(n); below this many cancelled handles it is not worth a
# pass (they surface and are popped soon), above it the heap is rebuilt once
# they are the majority, which bounds the garbage at about half the heap.
REBUILD_MIN_CANCELLED = 64
# The longest single wait handed to the poller, in ms.  The C helpers take an
# int: a timer 25 days away (2**31 ms) overflowed it.  Waking once an hour to
# find nothing due costs nothing, and the loop then waits again.
MAX_WAIT_MS = 3600 * 1000

_get_ident = threading.get_ident


class TimerHandle:
    """A scheduled call; ``cancel()`` stops it if it has not run yet (safe from any thread)."""

    __slots__ = ("when", "callback", "args", "cancelled", "ran", "_timers")

    def __init__(self, when: float, callback: Callable[..., Any], args: Tuple[Any, ...],
                 timers: "Optional[Timers]") -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False
        self.ran = False  # popped as due (the loop then runs it)
        self._timers = timers  # set while the handle is in a heap

    @property
    def pending(self) -> bool:
        """True while the call may still run (not run, not cancelled)."""
        return not self.cancelled and not self.ran

    def cancel(self) -> None:
        """Cancel the call (idempotent, and a no-op once it ran)."""
        if not self.cancelled:
            self.cancelled = True
            timers = self._timers
            if timers is not None:
                timers._cancelled_one(self)

    def __lt__(self, other: "TimerHandle") -> bool:
        return self.when < other.when


class Timers:
    """A heap of ``TimerHandle``; the loop asks it for its next timeout and due calls.

    ``thread_id`` is read each call (it is the loop's running thread, or
    None before it runs); ``call_soon_threadsafe`` carries a push from
    another thread to the loop.
    """

    def __init__(self, loop: Any) -> None:
        self._loop = loop
        #: The heap itself, cancelled handles included.  Read-only outside this
        #: class: the loop tests it for emptiness once per iteration, which a
        #: method call would make several times dearer.
        self.heap: List[TimerHandle] = []
        self._cancelled = 0

    def __len__(self) -> int:
        return len(self.heap) - self._cancelled

    def _on_loop_thread(self) -> bool:
        # The loop's _thread_id is read here, the one field of the loop this
        # module reads (a method call per timer would cost as much again).
        owner = self._loop._thread_id
        return owner is None or owner == _get_ident()

    def add(self, when: float, callback: Callable[..., Any], args: Tuple[Any, ...]) -> TimerHandle:
        """Schedule ``callback(*args)`` at monotonic time ``when``; from any thread."""
        if not when < float("inf"):
            raise ValueError("a timer must be due at a finite time, got {}".format(when))
        if self._on_loop_thread():
            handle = TimerHandle(when, callback, args, self)
            heapq.heappush(self.heap, handle)
        else:
            # Not in the heap until the loop pushes it: a cancel before that
            # only sets the flag, and the push drops it.
            handle = TimerHandle(when, callback, args, None)
            self._loop.call_soon_threadsafe(self._push, handle)
        return handle

    def _push(self, handle: TimerHandle) -> None:
        """On the loop: add a handle made on another thread (unless cancelled meanwhile)."""
        if not handle.cancelled:
            handle._timers = self
            heapq.heappush(self.heap, handle)

    def _cancelled_one(self, handle: TimerHandle) -> None:
        if not self._on_loop_thread():
            # The loop counts it when the handle surfaces or at a rebuild.
            return
        handle._timers = None
        self._cancelled += 1
        if self._cancelled > REBUILD_MIN_CANCELLED and self._cancelled * 2 > len(self.heap):
            self.rebuild()

    def rebuild(self) -> None:
        """Drop every cancelled handle (loop thread)."""
        keep = []
        for handle in self.heap:
            if handle.cancelled:
                handle._timers = None
            else:
                keep.append(handle)
        heapq.heapify(keep)
        self.heap = keep
        self._cancelled = 0

    def _pop_cancelled(self, heap: List[TimerHandle]) -> None:
        handle = heapq.heappop(heap)
        if handle._timers is None:
            self._cancelled -= 1  # counted when it was cancelled on the loop thread
        handle._timers = None

    def timeout_ms(self, now: float) -> int:
        """Milliseconds until the next live timer (at most ``MAX_WAIT_MS``), or -1 for none."""
        heap = self.heap
        while heap and heap[0].cancelled:
            self._pop_cancelled(heap)
        if not heap:
            return -1
        delay = heap[0].when - now
        # Round up: waking a millisecond early would spin once for nothing.
        return 0 if delay <= 0 else min(int(delay * 1000) + 1, MAX_WAIT_MS)

    def pop_due(self, now: float) -> List[TimerHandle]:
        """Remove and return the live handles due at ``now``, in due order."""
        heap = self.heap
        due = []
        while heap and heap[0].when <= now:
            if heap[0].cancelled:
                self._pop_cancelled(heap)
                continue
            handle = heapq.heappop(heap)
            handle._timers = None
            handle.ran = True
            due.append(handle)
        return due
