"""Minimal HTTP/1.1 server-side protocol for the pulse examples, without any I/O.

:class:`RequestParser` turns received bytes into :class:`Request` objects
(pipelining supported, ``Content-Length`` bodies, keep-alive semantics), and
:func:`build_response` / :func:`error_response` produce response bytes.

Deliberate scope limits, each reported as an :class:`HTTPError` whose
``status_code`` the server can answer with before closing:

* ``Transfer-Encoding`` (chunked or any other coding) is *not supported*:
  :class:`UnsupportedTransferEncoding` (501); together with ``Content-Length``
  it is :class:`BadRequest` (400), as that combination is a smuggling vector.
* The request line plus headers must fit ``max_head_size`` (default 8 KiB),
  else :class:`HeadersTooLarge` (431); a body over ``max_body_size`` (default
  1 MiB) is :class:`PayloadTooLarge` (413); a major version other than 1 is
  :class:`VersionNotSupported` (505); anything malformed is :class:`BadRequest`
  (400): bad request line, header name that is not a token (including
  whitespace before the colon and obsolete line folding), bare CR or LF line
  endings, NUL bytes, invalid or conflicting ``Content-Length``, a repeated
  ``Host``, or no ``Host`` in an HTTP/1.1 request.
* ``Expect: 100-continue`` is not answered automatically; the parser simply
  waits for the body.

Header names are returned lower-cased, values with surrounding spaces/tabs
stripped, everything as ``bytes`` (like h11).
"""

from __future__ import annotations

import re
import time
from typing import Any, Iterable, List, Optional, Tuple, Union

from .errors import ProtocolError, _rearm

__all__ = [
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_MAX_HEAD_SIZE",
    "BadRequest",
    "HTTPError",
    "HeadersTooLarge",
    "PayloadTooLarge",
    "ProtocolError",
    "Request",
    "RequestParser",
    "UnsupportedTransferEncoding",
    "VersionNotSupported",
    "build_response",
    "error_response",
]

#: Default limit for request line + headers + terminating blank line, in bytes.
DEFAULT_MAX_HEAD_SIZE = 8 * 1024
#: Default limit for a request body, in bytes.
DEFAULT_MAX_BODY_SIZE = 1024 * 1024

BytesLike = Union[bytes, bytearray, memoryview]
Header = Tuple[bytes, bytes]
StrOrBytes = Union[str, bytes]


class HTTPError(ProtocolError):
    """Base class of HTTP request errors; ``status_code`` is the response status to send."""

    status_code = 400
    reason = "Bad Request"


class BadRequest(HTTPError):
    """A malformed request (status 400)."""

    status_code = 400
    reason = "Bad Request"


class HeadersTooLarge(HTTPError):
    """The request line plus headers exceed ``max_head_size`` (status 431)."""

    status_code = 431
    reason = "Request Header Fields Too Large"


class PayloadTooLarge(HTTPError):
    """The declared ``Content-Length`` exceeds ``max_body_size`` (status 413)."""

    status_code = 413
    reason = "Content Too Large"


class UnsupportedTransferEncoding(HTTPError):
    """The request uses ``Transfer-Encoding``, which this parser does not implement (501)."""

    status_code = 501
    reason = "Not Implemented"


class VersionNotSupported(HTTPError):
    """The request's HTTP major version is not 1 (status 505)."""

    status_code = 505
    reason = "HTTP Version Not Supported"


_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_REQUEST_LINE = re.compile(
    rb"(" + _TCHAR + rb"+) ([\x21-\x7e\x80-\xff]+) HTTP/([0-9]\.[0-9])"
).fullmatch
_TOKEN = re.compile(_TCHAR + rb"+").fullmatch
_TOKENS = re.compile(_TCHAR + rb"+(?::" + _TCHAR + rb"+)*").fullmatch  # ":"-joined names
_SPECIAL = frozenset((b"content-length", b"transfer-encoding", b"connection", b"host"))


class Request:
    """One parsed HTTP request.

    ``method``, ``target`` and ``version`` (e.g. ``b"1.1"``) are bytes as sent;
    ``headers`` is the list of ``(lower-cased name, value)`` pairs in order;
    ``body`` holds the ``Content-Length`` bytes (``b""`` if none); and
    ``keep_alive`` tells whether the connection stays open after the response
    (HTTP/1.1 unless ``Connection: close``; HTTP/1.0 only with
    ``Connection: keep-alive``).
    """

    __slots__ = ("method", "target", "version", "headers", "body", "keep_alive")

    def __init__(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: List[Header],
        body: bytes = b"",
        keep_alive: bool = True,
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive

    def header(self, name: StrOrBytes, default: Optional[bytes] = None) -> Optional[bytes]:
        """Return the first value of header ``name`` (case-insensitive), else ``default``."""
        key = name.encode("latin-1") if isinstance(name, str) else name
        key = key.lower()
        for hname, value in self.headers:
            if hname == key:
                return value
        return default

    def _key(self) -> Tuple[Any, ...]:
        return (self.method, self.target, self.version, self.headers, self.body, self.keep_alive)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Request):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            "Request(method=%r, target=%r, version=%r, headers=%r, body=%r, keep_alive=%r)"
            % self._key()
        )


class RequestParser:
    """Incremental HTTP/1.1 request parser for one connection.

    ``feed(data)`` returns every request completed by ``data`` (pipelined
    requests included) and keeps the partial one.  Empty lines before a request
    line are ignored (RFC 9112 section 2.2).  Once a request with
    ``keep_alive == False`` is returned the parser is ``closed``: the server
    must close after responding, so later bytes are discarded unparsed.  Errors
    are :class:`HTTPError` subclasses; after one the parser is broken and every
    further ``feed()`` raises again.
    """

    __slots__ = (
        "max_head_size",
        "max_body_size",
        "_buf",
        "_pending",
        "_need",
        "_scanned",
        "_closed",
        "_error",
    )

    def __init__(
        self,
        *,
        max_head_size: int = DEFAULT_MAX_HEAD_SIZE,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    ) -> None:
        if max_head_size < 0 or max_body_size < 0:
            raise ValueError("limits must be non-negative")
        self.max_head_size = max_head_size
        self.max_body_size = max_body_size
        # Unparsed bytes: the start of a head, or the body of self._pending.
        self._buf = bytearray()
        self._pending: Optional[Request] = None  # head parsed, body incomplete
        self._need = 0  # body bytes self._pending still needs in total
        self._scanned = 0  # leading bytes of self._buf known not to end the head
        self._closed = False
        self._error: Optional[HTTPError] = None

    @property
    def closed(self) -> bool:
        """True once a request that does not keep the connection alive was returned."""
        return self._closed

    @property
    def buffered(self) -> int:
        """Number of received bytes held for the incomplete request (head or body)."""
        return len(self._buf)

    def feed(self, data: BytesLike) -> List[Request]:
        """Consume ``data`` and return the requests it completed, oldest first.

        Raises an :class:`HTTPError` subclass on a bad or oversized request;
        requests completed earlier in the same call are attached to it as
        ``completed``.  Returns ``[]`` without looking at ``data`` once ``closed``.
        """
        if self._error is not None:
            raise _rearm(self._error)
        if self._closed:
            return []
        if type(data) is not bytes:
            data = bytes(data)
        buf = self._buf
        if buf:
            if self._pending is None:
                # Waiting for the blank line ending the head: needs a "\n".
                if b"\n" not in data:
                    buf += data
                    if len(buf) < self.max_head_size:
                        return []
                    data = bytes(buf)  # over the limit: let _parse report it
                else:
                    data = b"".join((buf, data))
            elif len(buf) + len(data) < self._need:
                buf += data
                return []
            else:
                data = b"".join((buf, data))
            del buf[:]
        elif not data:
            return []
        requests: List[Request] = []
        try:
            self._parse(data, requests)
        except HTTPError as exc:
            exc.completed = requests
            self._error = exc
            self._buf = bytearray()
            self._pending = None
            raise
        return requests

    def _parse(self, data: bytes, out: List[Request]) -> None:
        pos = 0
        end = len(data)
        pending = self._pending
        need = self._need
        scanned = self._scanned
        self._scanned = 0
        max_head = self.max_head_size
        while True:
            if pending is None:
                while data.startswith(b"\r\n", pos):
                    pos += 2
                if pos >= end:
                    break
                limit = pos + max_head
                if scanned:
                    # Resume the search where the previous feed() stopped.
                    head_end = data.find(b"\r\n\r\n", max(pos, scanned - 3), limit)
                    scanned = 0
                else:
                    head_end = data.find(b"\r\n\r\n", pos, limit)
                if head_end < 0:
                    # feed() always parses when a chunk holds a "\n", so a
                    # bare LF is reported whatever the chunking was.
                    region = data[pos:limit]
                    if region.count(b"\n") != region.count(b"\r\n"):
                        raise BadRequest("bare LF line terminator")
                    if end >= limit:
                        raise HeadersTooLarge("request head larger than %d bytes" % max_head)
                    self._scanned = end - pos
                    break
                pending, need = self._parse_head(data[pos:head_end])
                pos = head_end + 4
            stop = pos + need
            if stop > end:
                break
            if need:
                pending.body = data[pos:stop]
            pos = stop
            out.append(pending)
            if not pending.keep_alive:
                self._closed = True
                pending = None
                pos = end
                break
            pending = None
        self._pending = pending
        self._need = need if pending is not None else 0
        if pos < end:
            self._buf += data[pos:]

    def _parse_head(self, head: bytes) -> Tuple[Request, int]:
        lines = head.split(b"\r\n")
        # Each CRLF split away removes one CR and one LF; any other CR, LF or
        # NUL makes the head shrink more under translate().
        if len(head) - len(head.translate(None, b"\r\n\x00")) != 2 * len(lines) - 2:
            raise BadRequest("bare CR or LF, or NUL, in request head")
        match = _REQUEST_LINE(lines[0])
        if match is None:
            raise BadRequest("malformed request line %r" % lines[0][:100])
        method, target, version = match.groups()
        if version[0] != 49:  # major version != "1"
            raise VersionNotSupported("HTTP/%s not supported" % version.decode())
        headers: List[Header] = []
        content_length = -1
        chunked = close = keep_alive_token = False
        hosts = 0
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                raise BadRequest("header line without colon %r" % line[:100])
            name = name.lower()
            value = value.strip(b" \t")
            headers.append((name, value))
            if name in _SPECIAL:
                if name == b"content-length":
                    if not value.isdigit():
                        raise BadRequest("invalid Content-Length %r" % value[:40])
                    length = int(value) if len(value) < 20 else 1 << 64
                    if content_length >= 0 and length != content_length:
                        raise BadRequest("conflicting Content-Length headers")
                    content_length = length
                elif name == b"transfer-encoding":
                    chunked = True
                elif name == b"connection":
                    for option in value.lower().split(b","):
                        option = option.strip(b" \t")
                        if option == b"close":
                            close = True
                        elif option == b"keep-alive":
                            keep_alive_token = True
                else:
                    hosts += 1
        # One regex call checks every name is a non-empty token (this also
        # rejects whitespace before the colon and obsolete line folding).
        if headers and _TOKENS(b":".join([name for name, _ in headers])) is None:
            bad = next(n for n, _ in headers if _TOKEN(n) is None)
            raise BadRequest("invalid header name %r" % bad[:100])
        if chunked:
            if content_length >= 0:
                raise BadRequest("both Transfer-Encoding and Content-Length")
            raise UnsupportedTransferEncoding("Transfer-Encoding is not supported")
        http11 = version != b"1.0"
        if hosts != 1 and (http11 or hosts):
            raise BadRequest(
                "HTTP/1.1 request needs exactly one Host header"
                if http11
                else "more than one Host header"
            )
        if content_length > self.max_body_size:
            raise PayloadTooLarge(
                "body of %d bytes exceeds max_body_size %d" % (content_length, self.max_body_size)
            )
        keep_alive = not close if http11 else (keep_alive_token and not close)
        request = Request(method, target, version, headers, b"", keep_alive)
        return request, max(content_length, 0)


# --------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------

_REASONS = {
    100: "Continue",
    101: "Switching Protocols",
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No Content",
    206: "Partial Content",
    301: "Moved Permanently",
    302: "Found",
    303: "See Other",
    304: "Not Modified",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    414: "URI Too Long",
    415: "Unsupported Media Type",
    417: "Expectation Failed",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}
_STATUS_LINES = {
    code: b"HTTP/1.1 %d %s\r\n" % (code, reason.encode("ascii"))
    for code, reason in _REASONS.items()
}
_BAD_VALUE = re.compile(rb"[\x00\r\n]").search
_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_date_cache = [-1, b""]


def _http_date() -> bytes:
    now = int(time.time())
    if now != _date_cache[0]:
        t = time.gmtime(now)
        _date_cache[1] = b"Date: %s, %02d %s %04d %02d:%02d:%02d GMT\r\n" % (
            _WEEKDAYS[t.tm_wday].encode(),
            t.tm_mday,
            _MONTHS[t.tm_mon - 1].encode(),
            t.tm_year,
            t.tm_hour,
            t.tm_min,
            t.tm_sec,
        )
        _date_cache[0] = now
    return _date_cache[1]  # type: ignore[return-value]


def _latin1(value: StrOrBytes) -> bytes:
    return value.encode("latin-1") if isinstance(value, str) else bytes(value)


def build_response(
    status: int,
    body: BytesLike = b"",
    headers: Iterable[Tuple[StrOrBytes, StrOrBytes]] = (),
    *,
    reason: Optional[StrOrBytes] = None,
    keep_alive: bool = True,
    request_version: bytes = b"1.1",
    date: bool = False,
) -> bytes:
    """Return the bytes of an ``HTTP/1.1`` response with ``status``, ``headers`` and ``body``.

    ``Content-Length`` is added unless given in ``headers`` (and never for 1xx, 204 or
    304, which must have an empty body); unless ``headers`` has a ``Connection`` field,
    ``Connection: close`` is added when ``keep_alive`` is false and
    ``Connection: keep-alive`` when keeping an HTTP/1.0 (``request_version=b"1.0"``)
    client alive.  ``date=True`` adds a ``Date`` header.  Header names must be tokens
    and values must not contain CR, LF or NUL (``ValueError``); str is latin-1 encoded.
    """
    if not 100 <= status <= 999:
        raise ValueError("status %r outside 100..999" % (status,))
    if reason is None:
        status_line = _STATUS_LINES.get(status)
        if status_line is None:
            status_line = b"HTTP/1.1 %d \r\n" % status
    else:
        reason_b = _latin1(reason)
        if _BAD_VALUE(reason_b):
            raise ValueError("reason phrase must not contain CR, LF or NUL")
        status_line = b"HTTP/1.1 %d %s\r\n" % (status, reason_b)
    if type(body) is not bytes:
        body = bytes(body)
    parts = [status_line]
    has_length = has_connection = False
    for name, value in headers:
        name_b = _latin1(name)
        value_b = _latin1(value)
        if _TOKEN(name_b) is None:
            raise ValueError("invalid header name %r" % (name_b,))
        if _BAD_VALUE(value_b):
            raise ValueError("header value for %r contains CR, LF or NUL" % (name_b,))
        lname = name_b.lower()
        if lname == b"content-length":
            has_length = True
        elif lname == b"connection":
            has_connection = True
        parts.append(b"%s: %s\r\n" % (name_b, value_b))
    if status < 200 or status == 204 or status == 304:
        if body:
            raise ValueError("a %d response must not have a body" % status)
    elif not has_length:
        parts.append(b"Content-Length: %d\r\n" % len(body))
    if not has_connection:
        if not keep_alive:
            parts.append(b"Connection: close\r\n")
        elif request_version == b"1.0":
            parts.append(b"Connection: keep-alive\r\n")
    if date:
        parts.append(_http_date())
    parts.append(b"\r\n")
    parts.append(body)
    return b"".join(parts)


def error_response(exc: HTTPError) -> bytes:
    """Return a ``Connection: close`` response for ``exc`` (status ``exc.status_code``,
    plain-text body naming the status), to send before closing the connection.
    """
    body = ("%d %s\n" % (exc.status_code, exc.reason)).encode("ascii")
    return build_response(
        exc.status_code,
        body,
        [(b"Content-Type", b"text/plain; charset=utf-8")],
        keep_alive=False,
    )
