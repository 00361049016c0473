"""Validated options shared by ``Server``, ``EventLoop`` and the launcher.

Every bad value fails here, at construction, with a message that names the
option and the value (``read_buffer_size must be > 0, got -1``), instead of
deep in C or on the first connection.
"""

from typing import Any, Dict, Optional

TRIGGERS = ("edge", "level")
TASK_TYPES = ("loop", "pool", "thread")

# asyncio's defaults for its transports: 64 KiB high, 16 KiB low.
DEFAULT_HIGH_WATER = 64 * 1024
DEFAULT_LOW_WATER = 16 * 1024


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("{} must be an int, got {!r}".format(name, value))
    if value < minimum:
        raise ValueError("{} must be >= {}, got {}".format(name, minimum, value)
                         if minimum != 1 else "{} must be > 0, got {}".format(name, value))
    return value


def _seconds(name: str, value: Any, allow_none: bool = True) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("{} must be a number of seconds{}, got {!r}".format(
            name, " or None" if allow_none else "", value))
    if value != value or value < 0:
        raise ValueError("{} must be >= 0 seconds, got {}".format(name, value))
    return float(value)


class Options:
    """The reactor's tunables, checked once.  Attribute names are the keyword names."""

    def __init__(self, *, trigger: str = "edge", task_type: str = "loop",
                 pool_size: int = 8, read_buffer_size: int = 128 * 1024,
                 max_events: int = 1024, max_reads_per_event: int = 4,
                 backlog: int = 1024, reuse_port: bool = False, tcp_nodelay: bool = True,
                 tcp_keepalive: bool = False, zero_copy: bool = False,
                 write_buffer_high_water: int = DEFAULT_HIGH_WATER,
                 write_buffer_low_water: Optional[int] = None,
                 write_buffer_limit: int = 0, idle_timeout: Optional[float] = None,
                 shutdown_timeout: float = 5.0, log_level: Any = None,
                 backend: Optional[str] = None) -> None:
        if trigger not in TRIGGERS:
            raise ValueError("trigger must be one of {}, got {!r}".format(TRIGGERS, trigger))
        if task_type not in TASK_TYPES:
            raise ValueError("task_type must be one of {}, got {!r}".format(TASK_TYPES, task_type))
        self.trigger = trigger
        self.task_type = task_type
        self.pool_size = _int("pool_size", pool_size, 1)
        self.read_buffer_size = _int("read_buffer_size", read_buffer_size, 1)
        if read_buffer_size > 64 * 1024 * 1024:
            raise ValueError("read_buffer_size must be <= 64 MiB, got {}".format(read_buffer_size))
        self.max_events = _int("max_events", max_events, 1)
        self.max_reads_per_event = _int("max_reads_per_event", max_reads_per_event, 1)
        self.backlog = _int("backlog", backlog, 1)
        self.reuse_port = bool(reuse_port)
        self.tcp_nodelay = bool(tcp_nodelay)
        self.tcp_keepalive = bool(tcp_keepalive)
        self.zero_copy = bool(zero_copy)
        if zero_copy and task_type != "loop":
            raise ValueError("zero_copy=True needs task_type='loop' (the memoryview is only "
                             "valid during the callback), got task_type={!r}".format(task_type))
        high = _int("write_buffer_high_water", write_buffer_high_water, 0)
        low = high // 4 if write_buffer_low_water is None else _int(
            "write_buffer_low_water", write_buffer_low_water, 0)
        if low > high:
            raise ValueError("write_buffer_low_water ({}) must be <= write_buffer_high_water "
                             "({})".format(low, high))
        self.write_buffer_high_water = high
        self.write_buffer_low_water = low
        limit = _int("write_buffer_limit", write_buffer_limit, 0)
        if limit and limit < high:
            raise ValueError("write_buffer_limit ({}) must be 0 (no cap) or >= "
                             "write_buffer_high_water ({})".format(limit, high))
        self.write_buffer_limit = limit
        self.idle_timeout = _seconds("idle_timeout", idle_timeout)
        if self.idle_timeout == 0:
            raise ValueError("idle_timeout must be > 0 seconds or None, got 0")
        self.shutdown_timeout = _seconds("shutdown_timeout", shutdown_timeout, allow_none=False)
        self.log_level = log_level
        if backend is not None:
            from ._sys import check_backend_name
            check_backend_name(backend)
        self.backend = backend

    @property
    def edge(self) -> bool:
        """True for edge-triggered polling."""
        return self.trigger == "edge"

    def as_dict(self) -> Dict[str, Any]:
        """The options as keyword arguments (for passing on to worker processes)."""
        return dict(vars(self))
