"""The timers of one connection: read and write deadlines, the idle timeout,
the lingering-close timer and the user's ``call_later`` handles.

``ConnTimers`` owns every handle a connection arms, so that closing the
connection cancels them all in one call (``cancel_all``) and nothing else
keeps a timer of a dead connection.  Deadlines follow Go: absolute times that
data does not extend.  The connect timeout of a dial is not here: it belongs
to the connector (``client.Connector``), so that a user's deadline set while
dialing cannot cancel it.
"""

import datetime
import time
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Union

from .options import check_seconds
from .timers import TimerHandle, monotonic

if TYPE_CHECKING:  # pragma: no cover
    from .lifecycle import Lifecycle

Deadline = Union[None, int, float, datetime.datetime]

# A long-lived connection that keeps scheduling must not grow its list of
# handles: past this many, the ones that ran or were cancelled are dropped.
USER_TIMERS_PRUNE_AT = 32


def deadline_time(deadline: Deadline) -> Optional[float]:
    """A deadline as ``time.monotonic()`` time (``None`` stays ``None``)."""
    if deadline is None:
        return None
    if isinstance(deadline, datetime.datetime):
        wall = deadline.timestamp()  # naive datetimes are local time, as in datetime
        return monotonic() + (wall - time.time())
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)):
        raise TypeError("deadline must be seconds, a datetime or None, got {!r}".format(deadline))
    return monotonic() + check_seconds("deadline", deadline)


class ConnTimers:
    """Every timer of one connection (loop thread only; ``Conn`` routes calls
    from other threads here through the loop)."""

    __slots__ = ("_conn", "_loop", "read", "write", "idle", "linger", "user")

    def __init__(self, conn: "Lifecycle", loop: Any) -> None:
        self._conn = conn
        self._loop = loop
        self.read: Optional[TimerHandle] = None
        self.write: Optional[TimerHandle] = None
        self.idle: Optional[TimerHandle] = None
        self.linger: Optional[TimerHandle] = None
        self.user: Optional[List[TimerHandle]] = None

    def arm_deadline(self, when: Optional[float], read: bool) -> None:
        """Replace the read (or write) deadline; ``None`` clears it."""
        old = self.read if read else self.write
        if old is not None:
            old.cancel()
        handle = None
        if when is not None:
            handle = self._loop.call_at(when, self._deadline_expired, read)
        if read:
            self.read = handle
        else:
            self.write = handle

    def _deadline_expired(self, read: bool) -> None:
        conn = self._conn
        if read:
            self.read = None
            conn._fail(TimeoutError("read deadline exceeded"))
        else:
            self.write = None
            if conn._unsent():
                conn._fail(TimeoutError("write deadline exceeded with {} bytes unsent".format(
                    conn._unsent())))

    def start_idle(self, timeout: float) -> None:
        """Close the connection once it has been idle for ``timeout`` seconds."""
        self.idle = self._loop.call_later(timeout, self._idle_check, timeout)

    def _idle_check(self, timeout: float) -> None:
        """The idle timer fired: close if idle long enough, else re-arm for the rest."""
        due = self._conn._last_active() + timeout
        if due <= monotonic() + 0.001:
            self.idle = None
            self._conn._fail(TimeoutError("idle for {:g} s".format(timeout)))
        else:
            self.idle = self._loop.call_at(due, self._idle_check, timeout)

    def start_linger(self, timeout: float, expired: Callable[..., None], *args: Any) -> None:
        """Run ``expired(*args)`` after ``timeout`` seconds (draining, then
        lingering: one slot, replaced)."""
        if self.linger is not None:
            self.linger.cancel()
        self.linger = self._loop.call_later(timeout, expired, *args)

    def add_user(self, handle: TimerHandle) -> None:
        """Keep a ``Conn.call_later`` handle, to be cancelled with the connection."""
        timers = self.user
        if timers is None:
            timers = self.user = []
        elif len(timers) >= USER_TIMERS_PRUNE_AT:
            timers[:] = [t for t in timers if t.pending]
        timers.append(handle)

    def cancel_all(self) -> None:
        """Cancel every timer of the connection (it is closing for good)."""
        for handle in (self.read, self.write, self.idle, self.linger):
            if handle is not None:
                handle.cancel()
        self.read = self.write = self.idle = self.linger = None
        if self.user:
            for handle in self.user:
                handle.cancel()
        self.user = None
        # The connection and this object point at each other: break the cycle
        # so a closed connection is freed at once, not at the next collection.
        self._conn = None  # type: ignore[assignment]

