"""Test support: run a pulse server in a thread, drive many clients, check leaks.

Every client here talks to 127.0.0.1 and every loop is bounded by a deadline.
"""

import contextlib
import hashlib
import os
import platform
import selectors
import socket
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import psutil

import pulse

# PyPy's JIT and its generational GC take a flat ~30 MiB soon after load
# starts (measured: +30 MiB within 1 s, then flat for 4 s under 8 blasting
# clients, where CPython grows 3 MiB); memory bounds allow for it there.
PYPY = platform.python_implementation() == "PyPy"
RSS_SLACK = 40 * 1024 * 1024 if PYPY else 0

# Both triggers x every task mode: the conformance suite runs over all of them.
MODES = [(trigger, task) for trigger in ("edge", "level") for task in ("loop", "pool", "thread")]
MODE_IDS = ["{}-{}".format(t, k) for t, k in MODES]


def resources() -> Tuple[int, int]:
    """Open fds and threads of this process."""
    proc = psutil.Process()
    return proc.num_fds(), threading.active_count()


@contextlib.contextmanager
def no_leaks(settle: float = 5.0) -> Iterator[None]:
    """Fail if the block leaves fds or threads behind (waits up to ``settle`` s)."""
    before = resources()
    yield
    deadline = time.monotonic() + settle
    while any(now > then for now, then in zip(resources(), before)) \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    after = resources()
    assert after[0] <= before[0], "fd leak: {} before, {} after".format(before[0], after[0])
    assert after[1] <= before[1], "thread leak: {} before, {} after".format(before[1], after[1])


class ServerThread:
    """A ``pulse.Server`` serving 127.0.0.1:0 in a background thread."""

    def __init__(self, handler: object, **options: object) -> None:
        self.server = pulse.Server(handler, **options)
        self.address = self.server.listen(("127.0.0.1", 0))
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="pulse-test-server")

    def _run(self) -> None:
        try:
            self.server.serve()
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        assert self.server.wait_started(10), "server did not start"
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.server.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "serve() did not return after stop()"
        if self.error is not None:
            raise self.error

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def connect(self, timeout: float = 10.0) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=timeout)
        return sock


def recv_exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    """Read exactly ``size`` bytes or fail at ``deadline``."""
    chunks = []
    got = 0
    while got < size:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(min(1 << 20, size - got))
        if not chunk:
            raise AssertionError("connection closed after {} of {} bytes".format(got, size))
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_until_eof(sock: socket.socket, deadline: float) -> bytes:
    """Read until the peer closes, or fail at ``deadline``."""
    chunks = []
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def pattern(size: int, seed: int) -> bytes:
    """Deterministic bytes that differ per seed (so misrouted data is caught)."""
    block = hashlib.sha256(seed.to_bytes(8, "little")).digest() * 128  # 4 KiB
    reps = size // len(block) + 1
    return (block * reps)[:size]


def echo_many(address: Tuple[str, int], messages: List[bytes], timeout: float = 60.0) -> None:
    """Open one connection per message, send each, and check the echo byte-exact.

    One thread multiplexes all clients with ``selectors`` so that sending and
    receiving overlap (a client that sent 1 MiB before reading would deadlock
    against any server with backpressure).
    """
    sel = selectors.DefaultSelector()
    state: Dict[socket.socket, List[object]] = {}
    try:
        for msg in messages:
            sock = socket.create_connection(address, timeout=10)
            sock.setblocking(False)
            state[sock] = [memoryview(msg), bytearray(), msg]
            sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        deadline = time.monotonic() + timeout
        pending = len(state)
        while pending:
            assert time.monotonic() < deadline, "{} echo clients unfinished".format(pending)
            for key, events in sel.select(timeout=1.0):
                sock = key.fileobj
                out, got, msg = state[sock]
                if events & selectors.EVENT_WRITE and out:
                    try:
                        sent = sock.send(out[:256 * 1024])
                    except BlockingIOError:
                        sent = 0
                    out = out[sent:]
                    state[sock][0] = out
                    if not out:
                        sel.modify(sock, selectors.EVENT_READ)
                if events & selectors.EVENT_READ:
                    try:
                        chunk = sock.recv(1 << 20)
                    except BlockingIOError:
                        continue
                    assert chunk, "server closed a connection early ({} of {} bytes)".format(
                        len(got), len(msg))
                    got += chunk
                    if len(got) >= len(msg):
                        assert bytes(got) == msg, "echo mismatch on a {}-byte message".format(
                            len(msg))
                        sel.unregister(sock)
                        pending -= 1
    finally:
        for sock in state:
            sock.close()
        sel.close()


def offer(sock: socket.socket, chunk: bytes, seconds: float, cap: int = 1 << 30) -> int:
    """Send ``chunk`` again and again on ``sock`` (made non-blocking) for
    ``seconds`` or until ``cap`` bytes went out, retrying while the kernel
    refuses; return the bytes sent."""
    sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and sent < cap:
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            time.sleep(0.001)
    return sent


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.005)


def hard_reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0 so the peer sees a reset (RST), not a FIN."""
    import struct
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def rss() -> int:
    """Resident set size of this process in bytes."""
    return psutil.Process(os.getpid()).memory_info().rss


def free_port() -> int:
    """A 127.0.0.1 port nobody listens on (now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def connect_when_up(port: int, timeout: float = 15.0) -> socket.socket:
    """Connect to 127.0.0.1:``port``, retrying until a server starting up listens."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def on_loop(loop: Any, func: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Run ``func`` on ``loop``'s thread and return its result (or raise its exception)."""
    done = threading.Event()
    box: List[Any] = [None, None]

    def call() -> None:
        try:
            box[0] = func()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            box[1] = exc
        done.set()

    loop.call_soon_threadsafe(call)
    assert done.wait(timeout), "the loop did not run a callback within {} s".format(timeout)
    if box[1] is not None:
        raise box[1]
    return box[0]
