"""The supervisor's metrics endpoint: a tiny non-blocking HTTP/1.0 responder.

It runs inside the supervisor's select loop, which also reaps, restarts and
stops the workers, so nothing here may block or grow without bound:

- every socket is non-blocking, and each client is one small state machine
  (read the request head, then write the response, then close) driven by
  the loop's readiness events;
- a request head is at most ``MAX_REQUEST`` bytes (else 431), a client
  gets ``CLIENT_TIMEOUT`` seconds for the whole exchange, and at most
  ``MAX_CLIENTS`` are served at once (the oldest is dropped for a new one),
  so a slow or garbage client costs a socket for a while, never the loop;
- one response per connection, then close (``Connection: close``): a
  scraper connects once per scrape anyway.

``GET /metrics`` (or ``HEAD``) answers 200 with ``render()`` (500 if that
raises: the supervisor logs it and goes on); anything else is 404.
"""

import contextlib
import logging
import selectors
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..address import format_address, open_listener

logger = logging.getLogger("pulse")

#: Longest request head (request line and headers) read before answering 431.
MAX_REQUEST = 8192
#: Seconds a client has to send its request and take the response.
CLIENT_TIMEOUT = 5.0
#: Clients served at once; a new one past this drops the oldest.
MAX_CLIENTS = 32
#: Connections accepted per readiness event of the listener.
ACCEPT_BURST = 16

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found",
            431: "Request Header Fields Too Large", 500: "Internal Server Error"}


class _Client:
    """One connection to the endpoint: the request read so far, then the response."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.request = bytearray()
        self.response: Optional[memoryview] = None


class MetricsEndpoint:
    """An HTTP listener on ``address`` answering ``GET /metrics`` with
    ``render()`` (text) served as ``content_type``; ``open(selector)``
    starts it in the supervisor's selector, whose events carry this
    endpoint's callbacks as their ``data``."""

    def __init__(self, address: Any, render: Callable[[], str], content_type: str) -> None:
        self._address = address
        self._render = render
        self._content_type = content_type
        self._listener: Optional[socket.socket] = None
        self._selector: Optional[selectors.BaseSelector] = None
        self._clients: Dict[int, _Client] = {}

    @property
    def address(self) -> Any:
        """The bound address (after ``open``)."""
        return self._listener.getsockname() if self._listener is not None else None

    def open(self, selector: selectors.BaseSelector) -> None:
        """Listen (``OSError`` naming the address when it is in use) and
        watch the listener in ``selector``."""
        self._listener = open_listener(self._address, backlog=64)
        self._selector = selector
        selector.register(self._listener, selectors.EVENT_READ, self._accept)
        logger.info("pulse: metrics on http://%s/metrics",
                    format_address(self._listener.getsockname()))

    def fds(self) -> Tuple[int, ...]:
        """Every fd of the endpoint: a forked worker closes them (a copy kept
        there would hold the port, and keep a client's connection open after
        the supervisor closed it)."""
        socks = [c.sock for c in self._clients.values()]
        if self._listener is not None:
            socks.append(self._listener)
        return tuple(s.fileno() for s in socks if s.fileno() >= 0)

    def expire(self, now: float) -> None:
        """Close the clients whose time is up (the supervisor calls it every turn)."""
        for client in [c for c in self._clients.values() if c.deadline <= now]:
            self._drop(client)

    def close(self) -> None:
        """Close the listener and every client; again is harmless."""
        for client in list(self._clients.values()):
            self._drop(client)
        if self._listener is not None:
            self._unwatch(self._listener)
            self._listener.close()
            self._listener = None

    # -- events -------------------------------------------------------------

    def _accept(self, events: int) -> None:
        assert self._listener is not None and self._selector is not None
        for _ in range(ACCEPT_BURST):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and company: the next event retries
                logger.warning("pulse: metrics endpoint: accept failed: %s", exc)
                return
            sock.setblocking(False)
            if len(self._clients) >= MAX_CLIENTS:
                self._drop(min(self._clients.values(), key=lambda c: c.deadline))
            client = _Client(sock, time.monotonic() + CLIENT_TIMEOUT)
            self._clients[sock.fileno()] = client
            self._selector.register(sock, selectors.EVENT_READ,
                                    lambda events, client=client: self._on_event(client))

    def _on_event(self, client: _Client) -> None:
        if client.response is None:
            self._read(client)
        else:
            self._write(client)

    def _read(self, client: _Client) -> None:
        try:
            chunk = client.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(client)  # gone before asking
            return
        client.request += chunk
        head_end = _head_end(client.request)
        if head_end < 0:
            if len(client.request) > MAX_REQUEST:
                self._respond(client, 431, b"request too large\n")
            return
        self._respond(client, *self._answer(bytes(client.request[:head_end])))

    def _answer(self, head: bytes) -> Tuple[int, bytes, bool]:
        """Status, body, and whether the body is sent (not for ``HEAD``)."""
        parts = head.split(b"\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return 400, b"bad request\n", True
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method in (b"GET", b"HEAD") and target == b"/metrics":
            try:
                text = self._render()
            except Exception:  # noqa: BLE001 - a bug here must not take the supervisor down
                logger.exception("pulse: metrics endpoint: rendering the metrics failed")
                return 500, b"rendering the metrics failed; see the log\n", True
            return 200, text.encode("utf-8"), method == b"GET"
        return 404, b"not found; try GET /metrics\n", method != b"HEAD"

    def _respond(self, client: _Client, status: int, body: bytes, send_body: bool = True) -> None:
        content_type = self._content_type if status == 200 else "text/plain; charset=utf-8"
        head = ("HTTP/1.0 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n"
                "Connection: close\r\n\r\n").format(status, _REASONS[status], content_type,
                                                    len(body)).encode("ascii")
        client.response = memoryview(head + body if send_body else head)
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.modify(client.sock, selectors.EVENT_WRITE,
                                      lambda events, client=client: self._on_event(client))
        self._write(client)  # most responses fit the socket buffer at once

    def _write(self, client: _Client) -> None:
        response = client.response
        assert response is not None
        try:
            sent = client.sock.send(response)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        client.response = response = response[sent:]
        if not response:
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        sock = client.sock
        fd = sock.fileno()
        if self._clients.get(fd) is client:
            del self._clients[fd]
        self._unwatch(sock)
        # Read what the client still sent: closing with unread input would
        # reset the connection, and a reset can destroy the response in flight.
        with contextlib.suppress(OSError):
            sock.recv(MAX_REQUEST)
        sock.close()

    def _unwatch(self, sock: socket.socket) -> None:
        if self._selector is not None and sock.fileno() >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)


def _head_end(request: bytearray) -> int:
    """Where the request head ends (after its blank line), or -1."""
    ends: List[int] = []
    for mark in (b"\r\n\r\n", b"\n\n"):
        at = request.find(mark)
        if at >= 0:
            ends.append(at + len(mark))
    return min(ends) if ends else -1
