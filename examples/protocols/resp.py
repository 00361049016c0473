"""RESP2 (Redis serialization protocol) for the pulse examples, without any I/O.

* :class:`RequestParser` turns the bytes a Redis client sends into commands
  (lists of ``bytes``), accepting both multibulk requests
  (``*2\\r\\n$3\\r\\nGET\\r\\n$1\\r\\nk\\r\\n``) and inline commands
  (``PING\\r\\n``), with Redis-like limits so garbage input raises
  :class:`~protocols.errors.ProtocolError` instead of growing memory or hanging.
* ``encode_simple`` / ``encode_error`` / ``encode_integer`` / ``encode_bulk`` /
  ``encode_array`` / ``encode_reply`` build server replies;
  ``encode_command`` builds a multibulk request (for clients and tests).
* :class:`ReplyParser` parses replies (for clients, benchmarks and tests).

Both parsers are incremental: a partial element is kept between ``feed()``
calls and large bulks arriving in many chunks are accumulated without being
re-scanned, so total work is linear in the input.
"""

from __future__ import annotations

from typing import Any, Iterable, List, Optional, Sequence, Union

from .errors import ProtocolError, _rearm

__all__ = [
    "DEFAULT_MAX_ARRAY_LENGTH",
    "DEFAULT_MAX_BULK_LENGTH",
    "DEFAULT_MAX_COMMAND_SIZE",
    "DEFAULT_MAX_INLINE_LENGTH",
    "ErrorReply",
    "ProtocolError",
    "ReplyParser",
    "RequestParser",
    "SimpleString",
    "encode_array",
    "encode_bulk",
    "encode_command",
    "encode_error",
    "encode_integer",
    "encode_reply",
    "encode_simple",
]

#: Largest bulk string accepted in a request (Redis' proto-max-bulk-len, 512 MiB).
DEFAULT_MAX_BULK_LENGTH = 512 * 1024 * 1024
#: Largest number of elements in a multibulk request (Redis 6's limit).
DEFAULT_MAX_ARRAY_LENGTH = 1024 * 1024
#: Largest inline command line, excluding its "\n" (Redis' PROTO_INLINE_MAX_SIZE).
DEFAULT_MAX_INLINE_LENGTH = 64 * 1024
#: Largest sum of argument lengths of one multibulk request (like Redis'
#: client-query-buffer-limit, 1 GiB); bounds the memory one partial command holds.
DEFAULT_MAX_COMMAND_SIZE = 1024 * 1024 * 1024

# Longest "*<n>\r\n", "$<n>\r\n" or ":<n>\r\n" line accepted, CRLF included;
# a 64-bit count needs at most 1 + 20 + 2 bytes.
_COUNT_LINE = 32

# RequestParser's fast path (see _parse_fast) takes commands of at most
# _FAST_ARGS arguments of fewer than _FAST_BULK bytes each, written the
# canonical way: it compares whole lines with these precomputed ones instead
# of parsing digits.  Anything else goes to the general parser.
_FAST_ARGS = 64
_FAST_BULK = 1024
_FAST_COUNTS = {b"*%d" % n: n for n in range(1, _FAST_ARGS + 1)}
_FAST_HEADERS = tuple(b"$%d" % n for n in range(_FAST_BULK))
# Larger input (a big value arriving) goes to the general parser: splitting
# it into lines could make many small objects out of one large bulk.
_FAST_MAX_DATA = 256 * 1024

BytesLike = Union[bytes, bytearray, memoryview]
Command = List[bytes]
#: A parsed reply: SimpleString, ErrorReply, int, bytes, None (null) or a list of replies.
Reply = Any


class SimpleString(bytes):
    """A RESP simple-string reply such as ``+OK`` (a ``bytes`` subclass)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "SimpleString(%s)" % bytes.__repr__(self)


class ErrorReply(bytes):
    """A RESP error reply such as ``-ERR unknown command`` (a ``bytes`` subclass, not raised)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ErrorReply(%s)" % bytes.__repr__(self)


# --------------------------------------------------------------------------
# Request parsing (server side)
# --------------------------------------------------------------------------


class _Incremental:
    """The buffering both parsers share: hold a partial element, parse whole ones.

    Subclasses keep ``_buf``, ``_need``, ``_line_limit`` and ``_error`` and
    provide ``_parse(data, out)`` and ``_reset_after_error()``.
    """

    _buf: bytearray
    _need: int
    _line_limit: int
    _error: Optional[ProtocolError]

    def _feed(self, data: BytesLike) -> List[Any]:
        if self._error is not None:
            raise _rearm(self._error)
        if type(data) is not bytes:
            data = bytes(data)
        buf = self._buf
        if buf:
            line_limit = self._line_limit
            if (b"\n" not in data) if line_limit else (len(buf) + len(data) < self._need):
                # Cannot complete the pending element yet: just accumulate.
                buf += data
                if not line_limit or len(buf) < line_limit:
                    return []
                data = bytes(buf)  # over the line limit: let _parse report it
            else:
                data = b"".join((buf, data))
            del buf[:]
        elif not data:
            return []
        out: List[Any] = []
        try:
            self._parse(data, out)  # type: ignore[attr-defined]
        except ProtocolError as exc:
            exc.completed = out
            self._error = exc
            self._buf = bytearray()
            self._reset_after_error()  # type: ignore[attr-defined]
            raise
        return out


class RequestParser(_Incremental):
    """Incremental RESP2 request parser: ``feed()`` it bytes, get complete commands.

    A request starting with ``*`` is a multibulk array of bulk strings; any other
    request is an inline command, one line ended by ``\\n`` (a preceding ``\\r``
    is dropped) and split on ASCII whitespace, with no quote processing.  Empty
    inline lines, ``*0`` and ``*-1`` are skipped like Redis does.  Limits:
    ``max_bulk_length`` per bulk, ``max_array_length`` elements per array,
    ``max_inline_length`` bytes per inline line, and ``max_command_size`` for the
    sum of one command's bulk lengths; exceeding one, or any malformed element
    (bad count, missing ``$``, bulk not followed by CRLF), raises
    :class:`ProtocolError` and breaks the parser.
    """

    __slots__ = (
        "max_bulk_length",
        "max_array_length",
        "max_inline_length",
        "max_command_size",
        "_buf",
        "_args",
        "_remaining",
        "_held",
        "_need",
        "_line_limit",
        "_error",
        "_fast",
    )

    def __init__(
        self,
        *,
        max_bulk_length: int = DEFAULT_MAX_BULK_LENGTH,
        max_array_length: int = DEFAULT_MAX_ARRAY_LENGTH,
        max_inline_length: int = DEFAULT_MAX_INLINE_LENGTH,
        max_command_size: int = DEFAULT_MAX_COMMAND_SIZE,
    ) -> None:
        if min(max_bulk_length, max_array_length, max_inline_length, max_command_size) < 0:
            raise ValueError("limits must be non-negative")
        self.max_bulk_length = max_bulk_length
        self.max_array_length = max_array_length
        self.max_inline_length = max_inline_length
        self.max_command_size = max_command_size
        self._buf = bytearray()  # unparsed bytes, starting at an element boundary
        self._args: Optional[Command] = None  # arguments of the partial multibulk
        self._remaining = 0  # bulks still expected by the partial multibulk
        self._held = 0  # sum of len(arg) for arg in self._args
        self._need = 0  # len(self._buf) needed before parsing can progress
        self._line_limit = 0  # non-zero: waiting for a line of at most this many bytes
        self._error: Optional[ProtocolError] = None
        # The fast path checks no limit: only take it when none can be exceeded.
        self._fast = (max_bulk_length >= _FAST_BULK - 1 and max_array_length >= _FAST_ARGS
                      and max_command_size >= _FAST_ARGS * (_FAST_BULK - 1))

    @property
    def buffered(self) -> int:
        """Bytes held for the incomplete command: unparsed input plus parsed arguments."""
        return len(self._buf) + self._held

    def feed(self, data: BytesLike) -> List[Command]:
        """Consume ``data`` and return the commands it completed, each a list of ``bytes``.

        Raises :class:`ProtocolError` on malformed input or an exceeded limit;
        commands completed earlier in the same call are attached to the exception
        as ``completed``.
        """
        return self._feed(data)

    def _reset_after_error(self) -> None:
        self._args = None
        self._held = 0

    def _parse(self, data: bytes, out: List[Command]) -> None:
        if self._args is None and self._fast and len(data) <= _FAST_MAX_DATA:
            data = self._parse_fast(data, out)
            if not data:
                self._need = self._line_limit = 0
                return
        self._parse_general(data, out)

    @staticmethod
    def _parse_fast(data: bytes, out: List[Command]) -> bytes:
        """Append the leading complete, canonical multibulk commands; return the rest.

        One ``split`` cuts the input into CRLF-ended lines in C; a command is
        then a count line (``*2``) found in ``_FAST_COUNTS``, and header and
        argument lines that alternate, each header equal to the precomputed
        ``$<len(argument)>``: one dict lookup, two slices and one list
        comparison per command instead of per-byte parsing.  A bulk holding
        CRLF is split short and fails the comparison, as does anything
        malformed, inline or too big: the general parser takes over there.
        """
        lines = data.split(b"\r\n")
        last = len(lines) - 1  # lines[last] is what follows the final CRLF
        counts = _FAST_COUNTS
        headers = _FAST_HEADERS
        append = out.append
        i = 0
        try:
            while i < last:
                count = counts.get(lines[i])
                if count is None:
                    break
                stop = i + 1 + 2 * count
                if stop > last:  # incomplete: its last argument has no CRLF yet
                    break
                # Unrolled for the commands most sent (PING, GET, SET): a loop
                # or a comprehension costs more than the checks themselves.
                if count == 2:
                    key = lines[i + 2]
                    value = lines[i + 4]
                    if lines[i + 1] != headers[len(key)] or lines[i + 3] != headers[len(value)]:
                        break
                    append([key, value])
                elif count == 3:
                    key = lines[i + 2]
                    value = lines[i + 4]
                    extra = lines[i + 6]
                    if (lines[i + 1] != headers[len(key)] or lines[i + 3] != headers[len(value)]
                            or lines[i + 5] != headers[len(extra)]):
                        break
                    append([key, value, extra])
                else:
                    args = lines[i + 2 : stop : 2]
                    if lines[i + 1 : stop : 2] != [headers[len(arg)] for arg in args]:
                        break
                    append(args)
                i = stop
        except IndexError:  # an argument of _FAST_BULK bytes or more
            pass
        if not i:
            return data
        return b"\r\n".join(lines[i:])

    def _parse_general(self, data: bytes, out: List[Command]) -> None:
        pos = 0
        end = len(data)
        args = self._args
        remaining = self._remaining
        held = self._held
        need = 0
        line_limit = 0
        max_bulk = self.max_bulk_length
        max_command = self.max_command_size
        while pos < end:
            if args is None:
                if data[pos] != 42:  # not "*": inline command
                    line_limit = self.max_inline_length + 1
                    eol = data.find(b"\n", pos, pos + line_limit)
                    if eol < 0:
                        if end - pos >= line_limit:
                            raise ProtocolError("too big inline request")
                        break
                    line_limit = 0
                    parts = data[pos:eol].split()
                    pos = eol + 1
                    if parts:
                        out.append(parts)
                    continue
                eol = data.find(b"\r\n", pos, pos + _COUNT_LINE)
                if eol < 0:
                    if end - pos >= _COUNT_LINE:
                        raise ProtocolError("invalid multibulk length")
                    line_limit = _COUNT_LINE
                    break
                digits = data[pos + 1 : eol]
                if digits.isdigit() and (digits[0] != 48 or len(digits) == 1):
                    count = int(digits)
                elif digits == b"-1":
                    count = 0
                else:
                    raise ProtocolError("invalid multibulk length")
                if count > self.max_array_length:
                    raise ProtocolError("invalid multibulk length (%d elements)" % count)
                pos = eol + 2
                if count:
                    args = []
                    remaining = count
                    held = 0
                continue
            # Inside a multibulk: one "$<n>\r\n<n bytes>\r\n" element.
            if data[pos] != 36:  # "$"
                raise ProtocolError("expected '$', got %r" % chr(data[pos]))
            eol = data.find(b"\r\n", pos, pos + _COUNT_LINE)
            if eol < 0:
                if end - pos >= _COUNT_LINE:
                    raise ProtocolError("invalid bulk length")
                line_limit = _COUNT_LINE
                break
            digits = data[pos + 1 : eol]
            if not digits.isdigit() or (digits[0] == 48 and len(digits) != 1):
                raise ProtocolError("invalid bulk length")
            length = int(digits)
            if length > max_bulk:
                raise ProtocolError("invalid bulk length (%d bytes)" % length)
            if held + length > max_command:
                raise ProtocolError("command larger than max_command_size")
            start = eol + 2
            stop = start + length
            if stop + 2 > end:
                need = stop + 2 - pos
                break
            if data[stop] != 13 or data[stop + 1] != 10:
                raise ProtocolError("bulk string not terminated by CRLF")
            args.append(data[start:stop])
            held += length
            pos = stop + 2
            remaining -= 1
            if not remaining:
                out.append(args)
                args = None
                held = 0
        self._args = args
        self._remaining = remaining
        self._held = held
        self._need = need
        self._line_limit = line_limit
        if pos < end:
            self._buf += data[pos:]


# --------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------


def _as_bytes(value: Union[str, BytesLike]) -> bytes:
    if type(value) is bytes:
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return bytes(value)


def _line(prefix: bytes, text: Union[str, BytesLike]) -> bytes:
    data = _as_bytes(text)
    if b"\r" in data or b"\n" in data:
        raise ValueError("RESP %s line must not contain CR or LF" % prefix.decode())
    return prefix + data + b"\r\n"


def encode_simple(text: Union[str, BytesLike]) -> bytes:
    """Encode a simple-string reply, e.g. ``encode_simple("OK") == b"+OK\\r\\n"``; str is
    UTF-8 encoded and CR/LF inside ``text`` raise ``ValueError``.
    """
    return _line(b"+", text)


def encode_error(message: Union[str, BytesLike]) -> bytes:
    """Encode an error reply: ``encode_error("ERR unknown command") == b"-ERR unknown
    command\\r\\n"``; the caller supplies the error code prefix; CR/LF raise ``ValueError``.
    """
    return _line(b"-", message)


def encode_integer(value: int) -> bytes:
    """Encode an integer reply, e.g. ``encode_integer(42) == b":42\\r\\n"``."""
    return b":%d\r\n" % value


def encode_bulk(value: Optional[Union[str, BytesLike]]) -> bytes:
    """Encode a bulk-string reply (``$<len>\\r\\n<value>\\r\\n``); ``None`` encodes the null
    bulk ``$-1\\r\\n`` and str is UTF-8 encoded.
    """
    if value is None:
        return b"$-1\r\n"
    data = _as_bytes(value)
    return b"$%d\r\n%s\r\n" % (len(data), data)


def encode_array(items: Optional[Iterable[Reply]]) -> bytes:
    """Encode an array reply whose elements are encoded by :func:`encode_reply` (so bytes
    and str become bulks, int integers, None null bulks, lists nested arrays); ``None``
    encodes the null array ``*-1\\r\\n``.
    """
    if items is None:
        return b"*-1\r\n"
    parts = [b""]
    parts.extend(encode_reply(item) for item in items)
    parts[0] = b"*%d\r\n" % (len(parts) - 1)
    return b"".join(parts)


def encode_reply(value: Reply) -> bytes:
    """Encode a Python value as a reply: SimpleString -> ``+``, ErrorReply -> ``-``, int ->
    ``:``, bytes-like or str -> bulk, None -> null bulk, list or tuple -> array; other
    types raise ``TypeError``.  ``ReplyParser`` parses the result back to an equal value.
    """
    if isinstance(value, SimpleString):
        return _line(b"+", value)
    if isinstance(value, ErrorReply):
        return _line(b"-", value)
    if isinstance(value, (bytes, bytearray, memoryview, str)):
        return encode_bulk(value)
    if isinstance(value, int):
        return b":%d\r\n" % value
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, (list, tuple)):
        return encode_array(value)
    raise TypeError("cannot encode %r as a RESP reply" % (value,))


def encode_command(args: Sequence[Union[str, int, BytesLike]]) -> bytes:
    """Encode a command as a multibulk request, e.g. ``encode_command([b"GET", b"k"]) ==
    b"*2\\r\\n$3\\r\\nGET\\r\\n$1\\r\\nk\\r\\n"``; str is UTF-8 encoded and int written in decimal.
    """
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = b"%d" % arg if isinstance(arg, int) else _as_bytes(arg)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


# --------------------------------------------------------------------------
# Reply parsing (client side)
# --------------------------------------------------------------------------


class ReplyParser(_Incremental):
    """Incremental RESP2 reply parser: ``feed()`` it bytes, get complete replies.

    Replies come back as :class:`SimpleString`, :class:`ErrorReply` (returned, not
    raised), ``int``, ``bytes``, ``None`` (null bulk or null array) or ``list``
    (arrays, nested to at most ``max_depth`` levels).  A line longer than
    ``max_line_length``, a bulk over ``max_bulk_length``, an array over
    ``max_array_length`` or an unknown type byte raises :class:`ProtocolError`.
    """

    __slots__ = (
        "max_bulk_length",
        "max_array_length",
        "max_line_length",
        "max_depth",
        "_buf",
        "_stack",
        "_need",
        "_line_limit",
        "_error",
    )

    def __init__(
        self,
        *,
        max_bulk_length: int = DEFAULT_MAX_BULK_LENGTH,
        max_array_length: int = 1 << 32,
        max_line_length: int = 64 * 1024,
        max_depth: int = 64,
    ) -> None:
        if min(max_bulk_length, max_array_length, max_line_length, max_depth) < 0:
            raise ValueError("limits must be non-negative")
        self.max_bulk_length = max_bulk_length
        self.max_array_length = max_array_length
        self.max_line_length = max_line_length
        self.max_depth = max_depth
        self._buf = bytearray()
        self._stack: List[List[Any]] = []  # [elements, remaining] per open array
        self._need = 0
        self._line_limit = 0
        self._error: Optional[ProtocolError] = None

    @property
    def buffered(self) -> int:
        """Number of unparsed bytes held (elements of open arrays are not counted)."""
        return len(self._buf)

    def feed(self, data: BytesLike) -> List[Reply]:
        """Consume ``data`` and return the replies it completed, oldest first.

        Raises :class:`ProtocolError` on malformed input; replies completed earlier
        in the same call are attached to the exception as ``completed``.
        """
        return self._feed(data)

    def _reset_after_error(self) -> None:
        self._stack = []

    def _parse(self, data: bytes, out: List[Reply]) -> None:
        pos = 0
        end = len(data)
        stack = self._stack
        need = 0
        line_limit = 0
        while pos < end:
            kind = data[pos]
            limit = self.max_line_length + 3 if kind == 43 or kind == 45 else _COUNT_LINE
            eol = data.find(b"\r\n", pos, pos + limit)
            if eol < 0:
                if kind not in b"+-:$*":
                    raise ProtocolError("unknown reply type byte %r" % chr(kind))
                if end - pos >= limit:
                    raise ProtocolError("reply line too long")
                line_limit = limit
                break
            body = data[pos + 1 : eol]
            if kind == 36:  # "$"
                if body == b"-1":
                    value: Reply = None
                    pos = eol + 2
                else:
                    if not body.isdigit():
                        raise ProtocolError("invalid bulk length %r" % body)
                    length = int(body)
                    if length > self.max_bulk_length:
                        raise ProtocolError("bulk length %d exceeds limit" % length)
                    start = eol + 2
                    stop = start + length
                    if stop + 2 > end:
                        need = stop + 2 - pos
                        break
                    if data[stop] != 13 or data[stop + 1] != 10:
                        raise ProtocolError("bulk string not terminated by CRLF")
                    value = data[start:stop]
                    pos = stop + 2
            elif kind == 43:  # "+"
                value = SimpleString(body)
                pos = eol + 2
            elif kind == 58:  # ":"
                if not (body[1:] if body[:1] == b"-" else body).isdigit():
                    raise ProtocolError("invalid integer %r" % body)
                value = int(body)
                pos = eol + 2
            elif kind == 45:  # "-"
                value = ErrorReply(body)
                pos = eol + 2
            elif kind == 42:  # "*"
                if body == b"-1":
                    value = None
                elif not body.isdigit():
                    raise ProtocolError("invalid array length %r" % body)
                else:
                    count = int(body)
                    if count > self.max_array_length:
                        raise ProtocolError("array length %d exceeds limit" % count)
                    if count:
                        if len(stack) >= self.max_depth:
                            raise ProtocolError("arrays nested deeper than max_depth")
                        stack.append([[], count])
                        pos = eol + 2
                        continue
                    value = []
                pos = eol + 2
            else:
                raise ProtocolError("unknown reply type byte %r" % chr(kind))
            # Attach the finished value to its array, closing arrays that fill up.
            while stack:
                top = stack[-1]
                top[0].append(value)
                top[1] -= 1
                if top[1]:
                    break
                stack.pop()
                value = top[0]
            else:
                out.append(value)
        self._need = need
        self._line_limit = line_limit
        if pos < end:
            self._buf += data[pos:]
