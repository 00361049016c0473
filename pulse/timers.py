"""Timers of one event loop: a heap of handles ordered by due time.

A heap (like asyncio's) keeps ``call_later`` and deadline re-arming at
O(log n); cancelled handles stay in the heap until they surface, and the heap
is rebuilt when more than half of it is cancelled so that 10,000 connections
that each set and cleared a deadline leave nothing behind.
"""

import heapq
import time
from typing import Any, Callable, List, Optional, Tuple

monotonic = time.monotonic


class TimerHandle:
    """A scheduled call; ``cancel()`` stops it if it has not run yet."""

    __slots__ = ("when", "callback", "args", "cancelled", "_timers")

    def __init__(self, when: float, callback: Callable[..., Any], args: Tuple[Any, ...],
                 timers: "Timers") -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False
        self._timers: Optional[Timers] = timers

    def cancel(self) -> None:
        """Cancel the call (idempotent, and a no-op once it ran)."""
        if not self.cancelled:
            self.cancelled = True
            timers = self._timers
            if timers is not None:
                self._timers = None
                timers._cancelled_one()

    def __lt__(self, other: "TimerHandle") -> bool:
        return self.when < other.when


class Timers:
    """A heap of ``TimerHandle``; the loop asks it for its next timeout and due calls."""

    def __init__(self) -> None:
        self._heap: List[TimerHandle] = []
        self._cancelled = 0

    def __len__(self) -> int:
        return len(self._heap) - self._cancelled

    def add(self, when: float, callback: Callable[..., Any], args: Tuple[Any, ...]) -> TimerHandle:
        """Schedule ``callback(*args)`` at monotonic time ``when``."""
        handle = TimerHandle(when, callback, args, self)
        heapq.heappush(self._heap, handle)
        return handle

    def _cancelled_one(self) -> None:
        self._cancelled += 1
        if self._cancelled > 64 and self._cancelled * 2 > len(self._heap):
            self._heap = [h for h in self._heap if not h.cancelled]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def timeout_ms(self, now: float) -> int:
        """Milliseconds until the next live timer, or -1 when there is none."""
        heap = self._heap
        while heap and heap[0].cancelled:
            heapq.heappop(heap)
            self._cancelled -= 1
        if not heap:
            return -1
        delay = heap[0].when - now
        # Round up: waking a millisecond early would spin once for nothing.
        return 0 if delay <= 0 else int(delay * 1000) + 1

    def pop_due(self, now: float) -> List[TimerHandle]:
        """Remove and return the live handles due at ``now``, in due order."""
        heap = self._heap
        due = []
        while heap and heap[0].when <= now:
            handle = heapq.heappop(heap)
            if handle.cancelled:
                self._cancelled -= 1
            else:
                handle._timers = None
                due.append(handle)
        return due
