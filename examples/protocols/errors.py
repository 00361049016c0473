"""Error types shared by the sans-I/O protocol parsers in ``examples/protocols``.

Every parser (TLV, RESP, HTTP) reports a peer's protocol violation by raising
:class:`ProtocolError` or a subclass of it, so a server can handle all of them
with one ``except`` clause and then close the connection.
"""

from __future__ import annotations

from typing import Any, List, Optional

__all__ = ["ProtocolError"]


class ProtocolError(Exception):
    """Raised when the peer's bytes violate the protocol being parsed.

    ``completed`` holds the items (frames, commands or requests) that were fully
    parsed from the same ``feed()`` call before the violation was found, in
    order; a server may still answer them before it reports the error and closes
    the connection.  A parser that raised is unusable afterwards: the stream
    position is lost, so every later ``feed()`` raises again (with an empty
    ``completed``).
    """

    completed: List[Any]

    def __init__(self, message: str = "", completed: Optional[List[Any]] = None) -> None:
        super().__init__(message)
        self.completed = [] if completed is None else completed


def _rearm(exc: ProtocolError) -> ProtocolError:
    """Return a fresh copy of ``exc`` (same class and message) for a broken parser."""
    return type(exc)(*exc.args[:1])
