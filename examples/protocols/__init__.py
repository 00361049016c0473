"""Sans-I/O protocol parsers used by the pulse examples and benchmarks.

The modules here contain protocol logic only -- no sockets, no event loop, in
the spirit of h11: feed them the bytes you received, get back parsed items, and
send the bytes their encoders return.

* :mod:`protocols.tlv` -- 2-byte type / 4-byte length / value framing.
* :mod:`protocols.resp` -- RESP2 (Redis) request parser, reply encoders and a
  reply parser.
* :mod:`protocols.http` -- minimal HTTP/1.1 request parser and response builder.

All parsers raise :class:`protocols.errors.ProtocolError` (or a subclass) on
malformed input.
"""

from .errors import ProtocolError

__all__ = ["ProtocolError"]
