"""Validated options shared by ``Server``, ``EventLoop`` and the launcher.

Every bad value fails here, at construction, with a message that names the
option and the value (``read_buffer_size must be > 0, got -1``), instead of
deep in C or on the first connection.

Each option is declared once, as a ``Field`` in the body of ``Options``: its
kind, default, rule and help text.  ``Options`` checks and stores values from
those declarations, and ``pulse serve`` (``pulse/cli.py``) builds its flags
and the list of names it hands on from ``FIELDS``, so a new option is one
declaration here (plus its line in the README's table).
"""

import difflib
import inspect
import logging
from typing import Any, Dict, Generic, Literal, Optional, Tuple, TypeVar, Union, overload

from ._sys.contract import MAX_EVENTS

TRIGGERS = ("edge", "level")
TASK_TYPES = ("loop", "pool", "thread")

# asyncio's defaults for its transports: 64 KiB high, 16 KiB low.
DEFAULT_HIGH_WATER = 64 * 1024
DEFAULT_LOW_WATER = 16 * 1024
# Each loop's read arena is four reads big (at least 4 MiB, see loop.py), so
# this keeps one loop's arena at 256 MiB or less.
MAX_READ_BUFFER_SIZE = 64 * 1024 * 1024

#: The kinds of value a ``Field`` holds.  Each has one rule in ``Field.check``
#: and one way of becoming a flag in ``pulse/cli.py``.
KINDS = ("choice", "int", "bool", "seconds", "log_level", "backend", "proxy_protocol",
         "networks")

T = TypeVar("T")


def _int(name: str, value: Any, minimum: int, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("{} must be an int, got {!r}".format(name, value))
    if value < minimum:
        raise ValueError("{} must be >= {}, got {}".format(name, minimum, value)
                         if minimum != 1 else "{} must be > 0, got {}".format(name, value))
    if maximum is not None and value > maximum:
        raise ValueError("{} must be <= {}, got {}".format(name, maximum, value))
    return value


@overload
def check_seconds(name: str, value: Any, *, allow_none: Literal[False] = ...,
                  positive: bool = ...) -> float: ...


@overload
def check_seconds(name: str, value: Any, *, allow_none: bool = ...,
                  positive: bool = ...) -> Optional[float]: ...


def check_seconds(name: str, value: Any, *, allow_none: bool = False,
                  positive: bool = False) -> Optional[float]:
    """``value`` as float seconds, or raise naming ``name``: the one check for
    every duration and delay in pulse (options, deadlines, timers, the CLI).

    Rejects bools and non-numbers (``TypeError``), NaN, negatives, zero when
    ``positive``, and infinity (``ValueError``): a timer that never fires is
    "no timer", spelled ``None`` where ``allow_none``.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("{} must be a number of seconds{}, got {!r}".format(
            name, " or None" if allow_none else "", value))
    if positive and not value > 0:
        raise ValueError("{} must be > 0 seconds{}, got {}".format(
            name, " or None" if allow_none else "", value))
    if not value >= 0:
        raise ValueError("{} must be >= 0 seconds, got {}".format(name, value))
    if value == float("inf"):
        raise ValueError("{} must be finite{}, got {}".format(
            name, " (use None for no limit)" if allow_none else "", value))
    return float(value)


def parse_log_level(level: Any) -> Optional[int]:
    """A logging level from a name (``"debug"``) or a number; ``None`` stays ``None``."""
    if level is None or (isinstance(level, int) and not isinstance(level, bool)):
        return level
    number = logging.getLevelName(str(level).upper())
    if not isinstance(number, int):
        raise ValueError("log_level must be a logging level name, got {!r}".format(level))
    return number


class Field(Generic[T]):
    """One option, declared in the body of ``Options``: the kind of value (one
    of ``KINDS``), its default, the rule a value must pass, and the help text
    and metavar of its ``pulse serve`` flag.

    ``minimum`` is the least ``int`` and ``maximum`` (``None``: no bound) the
    greatest; ``positive`` makes ``seconds`` refuse
    zero; ``allow_none`` accepts ``None`` (the help says what it means);
    ``choices`` are the values of a ``choice``; ``cli=False`` leaves the option
    out of the command line's server options because the launcher has a flag
    of its own for it.  Read on the class (``Options.trigger``) a field is this
    declaration; read on an ``Options`` instance it is the checked value.
    """

    def __init__(self, kind: str, default: Any, help: str, *, metavar: Optional[str] = None,
                 choices: Tuple[str, ...] = (), minimum: int = 0,
                 maximum: Optional[int] = None, positive: bool = False,
                 allow_none: bool = False, cli: bool = True) -> None:
        if kind not in KINDS:
            raise ValueError("kind must be one of {}, got {!r}".format(KINDS, kind))
        self.name = ""  # set by __set_name__ when the class body runs
        self.kind = kind
        self.default = default
        self.help = help
        self.metavar = metavar
        self.choices = choices
        self.minimum = minimum
        self.maximum = maximum
        self.positive = positive
        self.allow_none = allow_none
        self.cli = cli

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type) -> "Field[T]": ...

    @overload
    def __get__(self, instance: object, owner: type) -> T: ...

    def __get__(self, instance: Optional[object], owner: type) -> Any:
        # Reached on the class only: Options.__init__ puts every value in the
        # instance's __dict__, which wins over a descriptor that has no
        # __set__, so reading an option costs what reading any attribute does.
        if instance is None:
            return self
        raise AttributeError("{!r} has no option {!r} set".format(instance, self.name))

    def check(self, value: Any) -> Any:
        """``value`` as the option stores it, or ``TypeError``/``ValueError`` naming the option."""
        name, kind = self.name, self.kind
        if kind == "seconds":
            return check_seconds(name, value, allow_none=self.allow_none, positive=self.positive)
        if value is None and self.allow_none:
            return None
        if kind == "choice":
            if value not in self.choices:
                raise ValueError("{} must be one of {}, got {!r}".format(name, self.choices, value))
            return value
        if kind == "int":
            return _int(name, value, self.minimum, self.maximum)
        if kind == "bool":
            return bool(value)
        if kind == "log_level":
            parse_log_level(value)
            return value  # as given: the launcher hands it on to its workers unchanged
        if kind == "proxy_protocol":
            if value is False or value is None:
                return False
            from .proxy_protocol import check_versions
            return check_versions(value, name)
        if kind == "networks":
            from .proxy_gate import parse_networks
            return parse_networks(value, name)
        # "backend": which backends exist and work here is pulse._sys's to say.
        from ._sys import check_backend_name
        return check_backend_name(value)

    def __repr__(self) -> str:
        return "Field({!r}, {!r}, default={!r})".format(self.name, self.kind, self.default)


class Options:
    """The reactor's tunables, checked once.  Attribute names are the keyword names.

    ``Options(read_buffer_size=65536, trigger="level")``: keywords only, each
    one of the fields below; the others keep their defaults.  A bad value
    raises ``TypeError`` or ``ValueError`` naming the option, an unknown name
    raises ``TypeError`` listing the valid ones.
    """

    # Each option once, in the class body rather than a separate tuple: the
    # annotation is then also what type checkers know the attribute as
    # (``options.read_buffer_size`` is an int), with no second list to keep.
    trigger: Field[str] = Field("choice", "edge", "epoll/kqueue trigger mode",
                                choices=TRIGGERS)
    task_type: Field[str] = Field(
        "choice", "loop", "where callbacks run: the loop, a thread pool, a thread each",
        choices=TASK_TYPES)
    pool_size: Field[int] = Field("int", 8, "threads in pool mode", metavar="N", minimum=1)
    read_buffer_size: Field[int] = Field("int", 128 * 1024, "bytes per read",
                                         metavar="BYTES", minimum=1)
    # The pollers' own bound (pulse._sys.contract.MAX_EVENTS says why), so that
    # an absurd value fails here and not when the loop sizes its arrays.
    max_events: Field[int] = Field("int", 1024, "events per poll (at most {})".format(MAX_EVENTS),
                                   metavar="N", minimum=1, maximum=MAX_EVENTS)
    max_reads_per_event: Field[int] = Field("int", 4, "reads of one socket per poll round",
                                            metavar="N", minimum=1)
    backlog: Field[int] = Field("int", 1024, "listen backlog", metavar="N", minimum=1)
    # The launcher decides this per listener itself (its --reuse-port flag).
    reuse_port: Field[bool] = Field("bool", False, "SO_REUSEPORT on the listening sockets",
                                    cli=False)
    tcp_nodelay: Field[bool] = Field("bool", True, "TCP_NODELAY on accepted sockets")
    tcp_keepalive: Field[bool] = Field("bool", False, "SO_KEEPALIVE on accepted sockets")
    zero_copy: Field[bool] = Field(
        "bool", False, "on_data gets a memoryview valid during the call; loop mode only")
    write_buffer_high_water: Field[int] = Field(
        "int", DEFAULT_HIGH_WATER, "stop reading a connection whose write backlog passes this",
        metavar="BYTES")
    # Field[int], not Optional: __init__ turns None into a quarter of the
    # high-water mark, so what readers see is always an int.
    write_buffer_low_water: Field[int] = Field(
        "int", None, "resume reading once the backlog falls below this", metavar="BYTES",
        allow_none=True)
    write_buffer_limit: Field[int] = Field(
        "int", 0, "close a connection whose backlog passes this (0: no cap)", metavar="BYTES")
    idle_timeout: Field[Optional[float]] = Field(
        "seconds", None, "close connections idle this long", metavar="S", positive=True,
        allow_none=True)
    # The launcher sets it from its --graceful-timeout flag.
    shutdown_timeout: Field[float] = Field(
        "seconds", 5.0, "seconds a stopping loop lets its connections flush", metavar="S",
        cli=False)
    # nginx's lingering_timeout is 5 s: long enough for a pipelined request
    # in flight to arrive and be discarded, short enough that a peer which
    # never closes cannot hold the fd for long.
    linger_timeout: Field[float] = Field(
        "seconds", 5.0, "after a graceful close, read and discard the peer's data for up to "
        "this long before closing, so that unread input cannot turn the close into a reset "
        "that eats the reply (0: close at once)", metavar="S")
    # asyncio's defaults: a minute for the handshake, 30 s for the shutdown.
    ssl_handshake_timeout: Field[float] = Field(
        "seconds", 60.0, "close a TLS connection whose handshake has not completed in this "
        "long (0: no limit)", metavar="S")
    ssl_shutdown_timeout: Field[float] = Field(
        "seconds", 30.0, "after close() on a TLS connection, wait this long for the peer's "
        "close_notify or FIN (it replaces linger_timeout there; 0: close at once)",
        metavar="S")
    max_connections: Field[int] = Field(
        "int", 0, "at this many open connections stop accepting (new ones wait in the "
        "kernel's accept queue) until one closes (0: no limit)", metavar="N")
    proxy_protocol: Field[Union[bool, str]] = Field(
        "proxy_protocol", False, "read a PROXY protocol header (HAProxy's; 'v1', 'v2', or "
        "'any': either) at the start of each accepted connection, before TLS; its addresses "
        "become the connection's", metavar="v1|v2|any")
    proxy_protocol_trusted: Field[Optional[Tuple[Any, ...]]] = Field(
        "networks", None, "only these peers (IP networks) may send PROXY headers; others are "
        "closed at once (default: every peer)", metavar="CIDR,...", allow_none=True)
    # The spec asks for "at least 3 seconds to cover a TCP retransmit"; a
    # balancer sends the header with its connect, so 5 s is plenty.
    proxy_protocol_timeout: Field[float] = Field(
        "seconds", 5.0, "close a connection whose PROXY header has not arrived in this long "
        "(0: no limit)", metavar="S")
    log_level: Field[Union[None, int, str]] = Field(
        "log_level", None, "level of the 'pulse' logger: a name or a number", allow_none=True)
    backend: Field[Optional[str]] = Field(
        "backend", None, "syscall backend (default: this OS's native one)", allow_none=True)

    # ``**values`` rather than eighteen keyword parameters: the names and
    # defaults are written once, in the fields above, where a signature would
    # be a second copy to keep equal by hand.  Type checkers lose little:
    # Options is mostly reached through Server(**options), Client(**options)
    # and pulse.serve(**options), which they cannot check either way, and
    # help(), inspect and run-time call tips see the real keywords through the
    # __signature__ set below the class.
    def __init__(self, **values: Any) -> None:
        unknown = [name for name in values if name not in _NAMES]
        if unknown:
            raise TypeError(_unknown_message(unknown[0]))
        for field in FIELDS:
            setattr(self, field.name, field.check(values.get(field.name, field.default)))
        # The rules between options, after each value passed its own.
        if self.read_buffer_size > MAX_READ_BUFFER_SIZE:
            raise ValueError("read_buffer_size must be <= 64 MiB, got {}".format(
                self.read_buffer_size))
        if self.zero_copy and self.task_type != "loop":
            raise ValueError("zero_copy=True needs task_type='loop' (the memoryview is only "
                             "valid during the callback), got task_type={!r}".format(
                                 self.task_type))
        high = self.write_buffer_high_water
        if values.get("write_buffer_low_water") is None:
            self.write_buffer_low_water = high // 4
        elif self.write_buffer_low_water > high:
            raise ValueError("write_buffer_low_water ({}) must be <= write_buffer_high_water "
                             "({})".format(self.write_buffer_low_water, high))
        if self.proxy_protocol_trusted is not None and not self.proxy_protocol:
            raise ValueError("proxy_protocol_trusted needs proxy_protocol (True, 'v1' or 'v2')")
        limit = self.write_buffer_limit
        if limit and limit < high:
            raise ValueError("write_buffer_limit ({}) must be 0 (no cap) or >= "
                             "write_buffer_high_water ({})".format(limit, high))

    @property
    def edge(self) -> bool:
        """True for edge-triggered polling."""
        return self.trigger == "edge"

    def as_dict(self) -> Dict[str, Any]:
        """The options as keyword arguments (for passing on to worker processes)."""
        return dict(vars(self))


#: Every option, in declaration order: what ``Options`` checks and the command line offers.
FIELDS: Tuple[Field[Any], ...] = tuple(
    value for value in vars(Options).values() if isinstance(value, Field))
_NAMES = tuple(field.name for field in FIELDS)

Options.__init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default)
       for field in FIELDS])


def _unknown_message(name: str) -> str:
    """The ``TypeError`` text for an unknown keyword, as Python words its own, plus a hint."""
    close = difflib.get_close_matches(name, _NAMES, n=1)
    return "Options() got an unexpected keyword argument {!r}{}; the options are: {}".format(
        name, " (did you mean {!r}?)".format(close[0]) if close else "", ", ".join(_NAMES))
