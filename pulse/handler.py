"""The callback API: what a handler is, a ``Handler`` base class and ``callbacks()``.

A handler is any object with ``on_open(conn)``, ``on_data(conn, data)`` and
``on_close(conn, err)`` (``HandlerProtocol``, the type the server, the client
and the loop take).  Subclass ``Handler`` to get no-op defaults, or pass
three plain functions to ``callbacks`` (the Go library's ``ToCallback``).
"""

from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from .conn import Conn

#: The callbacks every handler has, in the order a connection sees them.
CALLBACKS = ("on_open", "on_data", "on_close")


class HandlerProtocol(Protocol):
    """What pulse calls on a handler; any object with these methods is one.

    ``on_data``'s ``data`` is ``bytes``, or a ``memoryview`` valid only during
    the call with ``zero_copy=True``.  Two more callbacks are optional, so not
    part of the protocol (the loop calls them only where defined):
    ``on_pause_writing(conn)`` when the connection's write backlog passed
    ``write_buffer_high_water``, and ``on_resume_writing(conn)`` when it fell
    below ``write_buffer_low_water``.
    """

    def on_open(self, conn: "Conn") -> None:
        """The connection is established."""

    def on_data(self, conn: "Conn", data: Any) -> None:
        """Bytes arrived on the connection."""

    def on_close(self, conn: "Conn", err: Optional[BaseException]) -> None:
        """The connection is gone: ``err`` is ``None`` after a clean close."""


class Handler:
    """Base class for connection handlers; every callback defaults to a no-op.

    ``on_open`` runs once when a connection is established, ``on_data`` for
    every chunk received (``bytes``; a ``memoryview`` valid only during the
    call with ``zero_copy=True``), and ``on_close`` exactly once per opened
    connection, with ``err`` ``None`` on a clean close (peer EOF, ``close()``,
    server stop) or the exception that ended it.
    """

    def on_open(self, conn: "Conn") -> None:
        """Called once, when the connection is established."""

    def on_data(self, conn: "Conn", data: Any) -> None:
        """Called for every chunk of bytes received."""

    def on_close(self, conn: "Conn", err: Optional[BaseException]) -> None:
        """Called exactly once when the connection is gone."""

    # Optional, not defined here so that the loop skips them when absent:
    # on_pause_writing(conn): the write backlog passed write_buffer_high_water;
    #     the connection is no longer read until it drains.
    # on_resume_writing(conn): the backlog fell below write_buffer_low_water.


class _FunctionHandler(Handler):
    """A ``Handler`` whose callbacks are plain functions (see ``callbacks``)."""

    def __init__(self, on_open: Optional[Callable[..., None]],
                 on_data: Optional[Callable[..., None]],
                 on_close: Optional[Callable[..., None]]) -> None:
        for name, func in zip(CALLBACKS, (on_open, on_data, on_close)):
            if func is not None:
                if not callable(func):
                    raise TypeError("{} must be callable, got {!r}".format(name, func))
                setattr(self, name, func)


def callbacks(on_open: Optional[Callable[["Conn"], None]] = None,
              on_data: Optional[Callable[["Conn", Any], None]] = None,
              on_close: Optional[Callable[["Conn", Optional[BaseException]], None]] = None,
              ) -> Handler:
    """Build a handler from up to three functions; missing ones are no-ops."""
    return _FunctionHandler(on_open, on_data, on_close)


def check_handler(handler: Any) -> HandlerProtocol:
    """Return ``handler`` if it has the three callbacks, else raise ``TypeError``."""
    missing = [name for name in CALLBACKS if not callable(getattr(handler, name, None))]
    if missing:
        raise TypeError("handler {!r} lacks callable {}".format(handler, ", ".join(missing)))
    return handler
