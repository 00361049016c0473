"""HTTP/1.1 hello server: TechEmpower's plaintext test on pulse.

``GET /`` or ``GET /plaintext`` answers ``Hello, World!`` (``text/plain``, with
``Server`` and ``Date`` headers, as the TechEmpower plaintext rules ask);
``HEAD`` the same without the body; other paths 404, other methods 405.
Connections are kept alive (HTTP/1.1 by default, HTTP/1.0 when asked with
``Connection: keep-alive``) and pipelined requests are answered in order.

The hot path is one ``feed()`` of the sans-I/O parser (``protocols/http.py``)
per read and *one* write with the responses of every request that read
completed; the usual response is a prebuilt ``bytes`` refreshed once a second
for its ``Date``.  A malformed request is answered ``400`` (a request head over
``--max-head-size`` ``431``, a ``Transfer-Encoding`` ``501``, ...) after the
requests pipelined before it, and the connection is closed: the parser has
lost its place in the stream.

    python examples/http_server.py --port 8080 [--workers N|auto] [--task-type ...]
    wrk -c 100 -d 5 http://127.0.0.1:8080/

With ``--certfile cert.pem --keyfile key.pem`` it serves HTTPS (HTTP/1.1;
``--alpn http/1.1`` lets clients that offer ``h2`` first know at once):

    curl --cacert ca.pem https://127.0.0.1:8080/

``examples/uvloop_http_server.py`` serves the same bytes through uvloop, for
comparison; both use ``HelloApp`` below.
"""

import logging
import time
from email.utils import formatdate
from typing import List, Optional, Tuple

import example_cli
import pulse
from protocols import http

HELLO = b"Hello, World!"
ROUTES = frozenset((b"/", b"/plaintext"))


class HelloApp:
    """Turns parsed requests into response bytes; shared by the pulse and uvloop servers.

    ``respond(requests)`` returns the concatenated responses and whether the
    connection must close after them (the last request did not keep it
    alive).  The common response (keep-alive HTTP/1.1 ``GET`` of a known
    path) is cached per second, since only its ``Date`` changes.
    """

    def __init__(self, server_name: bytes = b"pulse") -> None:
        self.server_name = server_name
        self._second = -1
        self._hello = b""

    def answer(self, parser: http.RequestParser, data: bytes) -> Tuple[bytes, bool]:
        """Feed ``data`` to a connection's parser: the bytes to write back and
        whether to close after them (a malformed request gets its error
        response, after the answers to the requests completed before it)."""
        try:
            requests = parser.feed(data)
        except http.HTTPError as exc:
            out = self.respond(exc.completed)[0] if exc.completed else b""
            return out + http.error_response(exc), True
        if not requests:
            return b"", False
        return self.respond(requests)

    def respond(self, requests: List[http.Request]) -> Tuple[bytes, bool]:
        """Response bytes for ``requests`` (in order) and the close-after flag."""
        now = int(time.time())
        if now != self._second:
            self._refresh(now)
        hello = self._hello
        if len(requests) == 1:
            # One request per read is the common case (no pipelining): no join.
            req = requests[0]
            if req.keep_alive and req.method == b"GET" and req.target in ROUTES \
                    and req.version == b"1.1":
                return hello, False
            return self._other(req), not req.keep_alive
        out = []
        for req in requests:
            if req.keep_alive and req.method == b"GET" and req.target in ROUTES \
                    and req.version == b"1.1":
                out.append(hello)
            else:
                out.append(self._other(req))
        return b"".join(out), not requests[-1].keep_alive

    def _refresh(self, now: int) -> None:
        # The second is stored last: in pool/thread mode another thread that
        # sees the new second must also see the response built for it.
        self._date = formatdate(now, usegmt=True)
        self._hello = http.build_response(200, HELLO, self._headers(len(HELLO)))
        self._second = now

    def _headers(self, length: int) -> List[Tuple[str, str]]:
        return [("Server", self.server_name.decode()), ("Date", self._date),
                ("Content-Type", "text/plain"), ("Content-Length", str(length))]

    def _other(self, req: http.Request) -> bytes:
        """Any response but the cached one: HEAD, 404, 405, closing or HTTP/1.0."""
        if req.method not in (b"GET", b"HEAD"):
            status, body = 405, b"405 Method Not Allowed\n"
            headers = self._headers(len(body)) + [("Allow", "GET, HEAD")]
        elif req.target not in ROUTES:
            status, body = 404, b"404 Not Found\n"
            headers = self._headers(len(body))
        else:
            status, body = 200, HELLO
            headers = self._headers(len(body))
        if req.method == b"HEAD":
            body = b""  # Content-Length still tells the size a GET would get
        return http.build_response(status, body, headers, keep_alive=req.keep_alive,
                                   request_version=req.version)


class HTTPHello(pulse.Handler):
    """One ``http.RequestParser`` per connection (the session), one write per read."""

    def __init__(self, max_head_size: int = http.DEFAULT_MAX_HEAD_SIZE) -> None:
        http.RequestParser(max_head_size=max_head_size)  # a bad limit fails at start
        self.max_head_size = max_head_size
        self.app = HelloApp()

    def on_open(self, conn: pulse.Conn) -> None:
        # Bodies are never used here: accept small ones (a POST gets its 405).
        conn.session = http.RequestParser(max_head_size=self.max_head_size,
                                          max_body_size=64 * 1024)

    def on_data(self, conn: pulse.Conn, data: bytes) -> None:
        out, close = self.app.answer(conn.session, data)
        if out:
            conn.write(out)
        if close:
            conn.close()

    def on_close(self, conn: pulse.Conn, err: Optional[BaseException]) -> None:
        if err is not None:
            logging.getLogger("http").debug("%r closed: %s", conn, err)


def main() -> None:
    parser = example_cli.parser(__doc__, 8080)
    parser.add_argument("--max-head-size", type=int, default=http.DEFAULT_MAX_HEAD_SIZE,
                        help="largest request line + headers in bytes (else 431)")
    args = parser.parse_args()
    example_cli.run(HTTPHello(args.max_head_size), args)


if __name__ == "__main__":
    main()
