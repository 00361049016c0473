"""Helpers of the connection-lifecycle regression tests (``test_lifecycle_runtime.py``,
issue 12): a server whose death is reported instead of hidden behind a client
timeout, a stuck connect, peers that must see the end of their connection,
and two child-process servers (``python runtime_support.py limit|signal``)
for the scenarios that measure a server's CPU or signal handling alone.

Every client talks to 127.0.0.1 only and every wait has a deadline.
"""

import argparse
import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))


# -- in-process helpers ---------------------------------------------------------


@contextlib.contextmanager
def switch_interval(seconds: float) -> Iterator[None]:
    """Make the interpreter switch threads every ``seconds`` while the block runs
    (races between the loop and the workers become likely, not rare)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def assert_serving(srv: Any) -> None:
    """Fail, naming what killed it, when the ``ServerThread``'s ``serve()`` is gone."""
    if not srv.thread.is_alive():
        raise AssertionError("serve() died: {!r}".format(srv.error))


def echo_once(srv: Any, sock: socket.socket, payload: bytes, timeout: float = 5.0) -> None:
    """Send ``payload`` and read its echo; a failure names the server's error if it died
    (checked every 50 ms, so a dead server fails the test at once, not at the timeout)."""
    got = b""
    deadline = time.monotonic() + timeout
    try:
        sock.sendall(payload)
        while len(got) < len(payload):
            assert_serving(srv)
            left = deadline - time.monotonic()
            assert left > 0, "timed out"
            sock.settimeout(min(0.05, left))
            try:
                chunk = sock.recv(len(payload) - len(got))
            except socket.timeout:
                continue
            assert chunk, "closed by the server"
            got += chunk
    except (OSError, AssertionError) as exc:
        assert_serving(srv)
        raise AssertionError("no echo ({} of {} bytes): {}".format(
            len(got), len(payload), exc)) from None
    assert got == payload, "wrong echo"


def recv_or_fail(srv: Any, sock: socket.socket, size: int, timeout: float = 5.0) -> bytes:
    """Read exactly ``size`` bytes; fail at once (naming why) if the server closed
    the connection or ``serve()`` died, else at ``timeout``."""
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < size:
        assert_serving(srv)
        left = deadline - time.monotonic()
        assert left > 0, "timed out after {} of {} bytes".format(len(got), size)
        sock.settimeout(min(0.05, left))
        try:
            chunk = sock.recv(size - len(got))
        except socket.timeout:
            continue
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            assert_serving(srv)
            raise AssertionError("the server closed the connection after {} of {} "
                                 "bytes".format(len(got), size))
        got += chunk
    return got


def exchange(srv: Any, sock: socket.socket, payload: bytes, timeout: float = 10.0) -> bytes:
    """Send ``payload`` while reading the reply (a server with backpressure would
    deadlock a client that sent everything first); return ``len(payload)`` reply
    bytes.  Fails at once if ``serve()`` died or the server closed, else at
    ``timeout`` naming how far each direction got."""
    import selectors
    out = memoryview(payload)
    got = bytearray()
    sock.setblocking(False)
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        while len(got) < len(payload):
            assert_serving(srv)
            if time.monotonic() > deadline:
                raise AssertionError("stalled: sent {} and got back {} of {} bytes".format(
                    len(payload) - len(out), len(got), len(payload)))
            for _, events in sel.select(0.05):
                if events & selectors.EVENT_WRITE and out:
                    try:
                        out = out[sock.send(out[:1 << 20]):]
                    except BlockingIOError:
                        pass
                    if not out:
                        sel.modify(sock, selectors.EVENT_READ)
                if events & selectors.EVENT_READ:
                    try:
                        chunk = sock.recv(1 << 20)
                    except BlockingIOError:
                        continue
                    assert chunk, "the server closed after {} of {} bytes".format(
                        len(got), len(payload))
                    got += chunk
    sock.setblocking(True)
    return bytes(got)


def peer_end(sock: socket.socket, timeout: float = 5.0) -> Tuple[str, bytes]:
    """Read ``sock`` until the server ends the connection: ``("eof"|"reset", bytes read)``."""
    got = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("the server never closed the connection ({} bytes "
                                 "read)".format(len(got)))
        sock.settimeout(left)
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return "reset", bytes(got)
        except socket.timeout:
            continue
        if not chunk:
            return "eof", bytes(got)
        got += chunk


def ended_by_server(srv: Any, sock: socket.socket, timeout: float = 5.0) -> str:
    """Wait until the server ends ``sock``'s connection (``"eof"`` or ``"reset"``),
    ignoring any data; fail at once if ``serve()`` died, else at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        assert_serving(srv)
        left = deadline - time.monotonic()
        assert left > 0, "the server never closed the connection"
        sock.settimeout(min(0.05, left))
        try:
            chunk = sock.recv(1 << 16)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return "reset"
        if not chunk:
            return "eof"


class StuckListener:
    """A 127.0.0.1 listener whose accept queue is full, so that a new connect
    to it stays in progress: on Linux further SYNs are dropped (the client
    retransmits, the connect neither completes nor fails for seconds).

    ``check()`` proves it, so that a test built on it cannot pass vacuously.
    """

    def __init__(self, fillers: int = 8) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.address = self.sock.getsockname()
        self.fillers: List[socket.socket] = []
        for _ in range(fillers):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(self.address)
            self.fillers.append(filler)
        time.sleep(0.1)

    def check(self, seconds: float = 0.4) -> None:
        probe = socket.socket()
        try:
            probe.setblocking(False)
            code = probe.connect_ex(self.address)
            assert code == errno.EINPROGRESS, "the probe connect did not stay in progress"
            time.sleep(seconds)
            assert probe.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            try:
                probe.getpeername()
            except OSError:
                return  # still connecting: the queue is really full
            raise AssertionError("a connect to the full listener completed; the test "
                                 "cannot simulate a stuck connect on this system")
        finally:
            probe.close()

    def close(self) -> None:
        for filler in self.fillers:
            filler.close()
        self.sock.close()

    def __enter__(self) -> "StuckListener":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Silent:
    """A 127.0.0.1 listener that never accepts: connects complete (the kernel
    queues them) and what is sent to them stays unsent once the peer's
    receive buffer is full."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.address = self.sock.getsockname()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Silent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- child-process servers --------------------------------------------------------


class LimitHandler:
    """Echo, and keep the number of connections open at once and its peak."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open_now = 0
        self.peak = 0
        self.opens = 0
        self.closes = 0

    def on_open(self, conn: Any) -> None:
        with self.lock:
            self.opens += 1
            self.open_now += 1
            self.peak = max(self.peak, self.open_now)

    def on_data(self, conn: Any, data: bytes) -> None:
        conn.write(data)

    def on_close(self, conn: Any, err: Optional[BaseException]) -> None:
        with self.lock:
            self.closes += 1
            self.open_now -= 1

    def stats(self) -> Dict[str, Any]:
        with self.lock:
            return {"opens": self.opens, "closes": self.closes, "open_now": self.open_now,
                    "peak": self.peak}


def _answer(payload: Dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def limit_main(args: argparse.Namespace) -> int:
    """``limit``: serve 127.0.0.1:0 with the given options; ``stats`` / ``stop`` on stdin."""
    import pulse
    handler = LimitHandler()
    try:
        server = pulse.Server(handler, trigger=args.trigger, task_type=args.task_type,
                              shutdown_timeout=2.0, **json.loads(args.options))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        _answer({"error": "{}: {}".format(type(exc).__name__, exc)})
        return 1
    address = server.listen(("127.0.0.1", 0))

    def control() -> None:
        for line in sys.stdin:
            if line.strip() == "stats":
                _answer(handler.stats())
            elif line.strip() == "stop":
                break
        server.stop()

    threading.Thread(target=control, daemon=True).start()
    threading.Thread(target=lambda: (server.wait_started(30), _answer({"port": address[1]})),
                     daemon=True).start()
    server.serve()
    final = handler.stats()
    final["final"] = True
    _answer(final)
    return 0


def signal_main(args: argparse.Namespace) -> int:
    """``signal``: a plain ``Server`` in the main thread whose SIGTERM handler
    calls ``stop()``.  On ``term`` (stdin) a helper thread sends SIGTERM to
    itself, so the signal is caught while the main thread sits in the poll
    with no timer and no traffic: only a signal wake-up fd can end that wait."""
    import pulse
    server = pulse.Server(pulse.callbacks(on_data=lambda conn, data: conn.write(data)),
                          trigger=args.trigger, task_type=args.task_type)
    server.listen(("127.0.0.1", 0))
    signal.signal(signal.SIGTERM, lambda signum, frame: server.stop())

    def control() -> None:
        server.wait_started(30)
        _answer({"ready": True})
        for line in sys.stdin:
            if line.strip() == "term":
                time.sleep(0.2)  # let the main thread settle into its wait
                _answer({"sent": time.monotonic()})
                signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
            elif line.strip() == "kick":
                os.kill(os.getpid(), signal.SIGTERM)  # the usual, process-wide signal
    threading.Thread(target=control, daemon=True).start()
    server.serve()
    _answer({"stopped": time.monotonic()})
    return 0


class Child:
    """Parent side of ``python runtime_support.py ...``: JSON lines on its stdout."""

    def __init__(self, *argv: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "runtime_support.py"), *argv],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=os.path.dirname(HERE), env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)))
        self._buffer = b""

    def read(self, timeout: float) -> Dict[str, Any]:
        import selectors
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("the child said nothing within {} s".format(timeout))
                if sel.select(left):
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        raise AssertionError("the child exited ({}): {}".format(
                            self.proc.wait(5), self.stderr()))
                    self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def ask(self, command: str, timeout: float = 10.0) -> Dict[str, Any]:
        self.send(command)
        return self.read(timeout)

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace")[-3000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["limit", "signal"])
    parser.add_argument("--trigger", default="edge")
    parser.add_argument("--task-type", default="loop")
    parser.add_argument("--options", default="{}")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(HERE))
    return limit_main(args) if args.command == "limit" else signal_main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
