"""Helpers of the connection-lifecycle regression tests (issue 12, section 2).

``Book`` is a recording handler that finds a connection by its client's port
and notes the time of every callback (``on_eof`` included), so a test can say
"on_close ran once, 0.5 s after the peer saw EOF".  ``read_to_end`` reads a
client socket until EOF, reset or a deadline and says which one ended it.
``PlainPeer`` is a far end made of plain sockets for the dial and proxy
tests.  The few reads of pulse's private state live in one place each
(``watch_carry``, ``fill_kernel``) with a comment, so that a rename in the
fix changes one function.

Every socket here talks to 127.0.0.1 (or ::1 / an abstract Unix name), and
every wait has a deadline.
"""

import array
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import psutil

import pulse
from support import free_port, on_loop

ROOT = Path(__file__).resolve().parent.parent


def counter_bytes(size: int, seed: int = 0) -> bytes:
    """``size`` bytes in which every aligned 8-byte word is distinct (and differs per
    ``seed``): a reordered, duplicated or misrouted chunk is always caught.

    ``support.pattern`` repeats every 4 KiB, so two of its 4 KiB chunks
    swapped compare equal; this one does not.
    """
    words = (size + 7) // 8
    base = (seed + 1) << 40
    return array.array("Q", range(base, base + words)).tobytes()[:size]


def read_to_end(sock: socket.socket, deadline: float, limit: int = 1 << 30) -> Tuple[bytes, str]:
    """Read until the peer's EOF, a reset or ``deadline``.

    Returns ``(data, how)`` with ``how`` one of ``"eof"``, ``"reset"``,
    ``"timeout"`` (or ``"limit"`` once ``limit`` bytes arrived).
    """
    chunks: List[bytes] = []
    got = 0
    while got < limit:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), "timeout"
        sock.settimeout(left)
        try:
            chunk = sock.recv(1 << 20)
        except socket.timeout:
            return b"".join(chunks), "timeout"
        except ConnectionResetError:
            return b"".join(chunks), "reset"
        if not chunk:
            return b"".join(chunks), "eof"
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks), "limit"


def describe(data: bytes, expected: bytes, how: str = "") -> str:
    """A short account of what a client received, for assertion messages."""
    then = ", then {}".format(how) if how else ""
    if data == expected:
        return "the whole {} bytes{}".format(len(data), then)
    prefix = 0
    limit = min(len(data), len(expected))
    step = 1 << 16
    while prefix < limit and data[prefix:prefix + step] == expected[prefix:prefix + step]:
        prefix += step
    while prefix < limit and data[prefix] == expected[prefix]:
        prefix += 1
    return "{} bytes where {} were expected (first difference at byte {}){}".format(
        len(data), len(expected), prefix, then)


def expect_stream(data: bytes, how: str, expected: bytes, who: str = "the client",
                  end: str = "eof") -> None:
    """Fail unless ``data`` is ``expected`` and the stream ended with ``end``
    (a one-line message instead of pytest's diff of two large byte strings)."""
    if data != expected or how != end:
        raise AssertionError("{} got {} (expected the whole {} bytes, then {})".format(
            who, describe(data, expected, how), len(expected), end))


def expect_bytes(data: bytes, expected: bytes, who: str) -> None:
    """Fail unless ``data == expected``, with a one-line message."""
    if data != expected:
        raise AssertionError("{} got {}".format(who, describe(data, expected)))


class Record:
    """What one connection saw on the server side, with the time of each event."""

    def __init__(self, conn: Any, port: Optional[int]) -> None:
        self.conn = conn
        self.port = port
        self.opened_at = time.monotonic()
        self.data = bytearray()
        self.data_times: List[float] = []
        self.eofs: List[Tuple[float, int]] = []  # (time, bytes delivered before on_eof)
        self.closes: List[Optional[BaseException]] = []
        self.closed_at: Optional[float] = None
        self.late_data = 0   # on_data after on_close
        self.notes: List[Any] = []  # free for the test's handler (errors it caught, ...)


class Book(pulse.Handler):
    """A handler that records every callback per connection; subclasses add behaviour.

    ``on_eof`` is *not* defined here (its presence changes pulse's behaviour);
    a subclass that wants it calls ``self.note_eof(conn)``.
    """

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.records: List[Record] = []
        self.by_port: Dict[int, Record] = {}
        self.stray_closes = 0

    def on_open(self, conn: Any) -> None:
        try:
            peer = conn.remote_address
        except OSError:
            peer = None
        port = peer[1] if isinstance(peer, tuple) else None
        with self.lock:
            rec = Record(conn, port)
            self.records.append(rec)
            if port is not None:
                self.by_port[port] = rec
            conn.session = rec
            self.lock.notify_all()

    def on_data(self, conn: Any, data: bytes) -> None:
        rec = conn.session
        with self.lock:
            if rec.closes:
                rec.late_data += 1
            rec.data += data
            rec.data_times.append(time.monotonic())
            self.lock.notify_all()

    def note_eof(self, conn: Any) -> None:
        rec = conn.session
        with self.lock:
            rec.eofs.append((time.monotonic(), len(rec.data)))
            self.lock.notify_all()

    def on_close(self, conn: Any, err: Optional[BaseException]) -> None:
        rec = conn.session
        with self.lock:
            if not isinstance(rec, Record):
                self.stray_closes += 1
                return
            rec.closes.append(err)
            rec.closed_at = time.monotonic()
            self.lock.notify_all()

    def record_for(self, sock: socket.socket, timeout: float = 10.0) -> Record:
        """The server-side record of the connection of client socket ``sock``."""
        port = sock.getsockname()[1]
        return self.wait(lambda: self.by_port.get(port), timeout,
                         "the server to open the connection from port {}".format(port))

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """Wait (under the lock) until ``predicate()`` is truthy; return its value."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                assert left > 0, "timed out after {} s waiting for {}".format(timeout, what)
                self.lock.wait(min(left, 0.05))

    def wait_closed(self, rec: Record, timeout: float = 10.0) -> None:
        self.wait(lambda: rec.closes, timeout, "on_close")

    def check(self) -> None:
        """on_close exactly once per on_open, none without one, no on_data after it."""
        with self.lock:
            assert self.stray_closes == 0, "on_close without on_open"
            for rec in self.records:
                assert len(rec.closes) == 1, "on_close ran {} times: {!r}".format(
                    len(rec.closes), rec.closes)
                assert rec.late_data == 0, "on_data after on_close"


def connected_client(address: Any, rcvbuf: int = 0) -> socket.socket:
    """A blocking client socket (10 s timeout) connected to ``address``;
    ``rcvbuf`` sets SO_RCVBUF before the connect, so the window stays small."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect
    sock.settimeout(10)
    sock.connect(address)
    return sock


def pipeline_behind_the_reply(sock: socket.socket, replied: threading.Event,
                              pipelined: bytes) -> Tuple[bytes, str]:
    """Send one request, wait until the server answered it (and closes), send
    ``pipelined`` behind it, left unread in the server's kernel, then read to
    the end: ``read_to_end``'s (data, how)."""
    sock.sendall(b"GET /1 HTTP/1.1\r\n\r\n")
    assert replied.wait(10), "the server never answered"
    time.sleep(0.05)
    sock.sendall(pipelined)
    time.sleep(0.1)  # the pipelined requests sit unread in the server's kernel
    return read_to_end(sock, time.monotonic() + 10)


@contextlib.contextmanager
def loop_stalled(loop: Any, timeout: float = 5.0) -> Iterator[None]:
    """Hold ``loop`` inside a callback for the duration of the block.

    Whatever the block does to the loop (``call_soon_threadsafe``, ``dial``,
    ``write`` from this thread) is then handled in one later iteration, after
    that iteration's poll and the events it returned (the loop runs the calls
    queued before it polled): a race with the kernel becomes deterministic.
    """
    entered = threading.Event()
    release = threading.Event()

    def hold() -> None:
        entered.set()
        release.wait(timeout)

    loop.call_soon_threadsafe(hold)
    assert entered.wait(timeout), "the loop did not pick up the stall callback"
    try:
        yield
    finally:
        release.set()


def fill_kernel(conn: Any, seed: int, cap: int = 64 << 20) -> bytes:
    """Fill ``conn``'s kernel send buffer behind pulse's back; return what went out.

    Uses the documented low level (``conn.loop.backend.send`` on
    ``conn.fileno()``), so pulse's write backlog stays empty while the socket
    is full: the next batched write of this connection is then refused by the
    kernel in the flush.  Call it on the loop's thread.
    """
    backend = conn.loop.backend
    fd = conn.fileno()
    # A small send buffer keeps the filler (which the peer must read) small.
    backend.setsockopt_int(fd, socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    chunk = counter_bytes(64 * 1024, seed)
    sent = bytearray()
    while len(sent) < cap:
        count = backend.send(fd, chunk)
        if count is None:
            return bytes(sent)
        sent += chunk[:count]
    raise AssertionError("the socket never filled up ({} bytes sent)".format(len(sent)))


class CarryWatch:
    """Watches the carry list the loop hands to each poll (edge mode).

    This wraps the poller's ``poll_read`` (``loop._poller``, private): the
    carry argument is the list of fds that the last poll left unread and this
    one reads first.  If the fix renames ``_poller`` or changes how the carry
    is passed, change this function only.
    """

    def __init__(self, loop: Any) -> None:
        self.polls = 0
        self.carried_polls = 0
        self.longest = 0
        self.most_duplicates = 0
        self.worst: List[int] = []
        poller = loop._poller  # private: see the class docstring
        original = poller.poll_read

        def poll_read(timeout: Any, arena: Any, carry: Any, *rest: Any) -> Any:
            fds = [fd if fd >= 0 else ~fd for fd in carry]  # ~fd marks a seen hang-up
            self.polls += 1
            if fds:
                self.carried_polls += 1
            dups = len(fds) - len(set(fds))
            if len(fds) > self.longest:
                self.longest = len(fds)
            if dups > self.most_duplicates:
                self.most_duplicates = dups
                self.worst = fds
            return original(timeout, arena, carry, *rest)

        poller.poll_read = poll_read


class PlainPeer:
    """A plain-socket far end on 127.0.0.1: accepts one connection, then runs
    ``script(sock, peer)`` in a thread (the default reads to EOF).

    ``received`` and ``how`` (``read_to_end``'s result) are filled in by the
    default script; a custom one may use them too.
    """

    def __init__(self, script: Optional[Callable[[socket.socket, "PlainPeer"], None]] = None,
                 timeout: float = 10.0) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.address = self.listener.getsockname()
        self.script = script or PlainPeer.read_all
        self.timeout = timeout
        self.received = b""
        self.how = "never connected"
        self.error: Optional[BaseException] = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="plain-peer", daemon=True)
        self.thread.start()

    @staticmethod
    def read_all(sock: socket.socket, peer: "PlainPeer") -> None:
        peer.received, peer.how = read_to_end(sock, time.monotonic() + peer.timeout)

    def _run(self) -> None:
        try:
            self.listener.settimeout(self.timeout)
            try:
                sock, _ = self.listener.accept()
            except socket.timeout:
                return
            with sock:
                self.script(sock, self)
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.error = exc
        finally:
            self.done.set()

    def join(self, timeout: float = 10.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the plain peer did not finish"
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.listener.close()


def start_proxy(upstream: Tuple[str, int], trigger: str = "edge",
                task_type: str = "loop") -> Tuple[subprocess.Popen, int]:
    """Start ``examples/proxy.py`` as ``tests/test_client.py`` does; ``(proc, port)``."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "proxy.py"), "--port", str(port),
         "--upstream", "{}:{}".format(*upstream), "--trigger", trigger,
         "--task-type", task_type, "--log-level", "WARNING"],
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)))
    # Wait for the listening socket without connecting to it: a probe
    # connection would make the proxy dial the upstream, and a PlainPeer
    # upstream serves one connection only.
    watcher = psutil.Process(proc.pid)
    # psutil >= 6 renamed connections() to net_connections().
    listing = getattr(watcher, "net_connections", None) or watcher.connections
    deadline = time.monotonic() + 15
    while True:
        if proc.poll() is not None:
            raise AssertionError("the proxy exited with {}".format(proc.returncode))
        try:
            listening = any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                            for c in listing("tcp"))
        except psutil.Error:
            listening = False
        if listening:
            return proc, port
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(10)
            raise AssertionError("the proxy did not listen within 15 s")
        time.sleep(0.05)


def stop_proxy(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def running_client(**options: Any) -> Iterator[pulse.Client]:
    """A ``pulse.Client`` whose loop runs in a thread of ours; on exit it is
    stopped and the thread must end within 5 s (a hung shutdown fails the
    test instead of hanging it)."""
    client = pulse.Client(**options)
    thread = threading.Thread(target=client.run, name="pulse-test-client", daemon=True)
    thread.start()
    try:
        on_loop(client.loop, lambda: None)  # the loop runs callbacks: it has started
        yield client
    finally:
        client.loop.stop()
        thread.join(5)
    assert not thread.is_alive(), "the client loop did not return within 5 s of stop()"
