"""Helpers of the fault suite (``test_faults.py``): a pulse server in a child
process, hostile clients, and a recording handler that checks the invariants.

Scenarios that measure the server itself (its RSS, its open fds, its CPU, or a
lowered ``RLIMIT_NOFILE``) run it in a child process started from this very
file (``python fault_support.py serve ...``): the measurement then sees the
server alone, not the test's clients, and the clients do not compete with the
server for one GIL.  The child is driven through its stdin (``stats``,
``stop``) and answers one JSON line per command on its stdout.

Every client talks to 127.0.0.1 only and every loop is bounded by a count and
a deadline.
"""

import argparse
import errno
import json
import os
import random
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import defaultdict
from typing import Any, Callable, Dict, IO, List, Optional, Sequence, Tuple

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))

# (trigger, task_type): the matrix the fault issue asks for.
FAULT_MODES = [(trigger, task) for trigger in ("edge", "level") for task in ("loop", "pool")]
FAULT_MODE_IDS = ["{}-{}".format(t, k) for t, k in FAULT_MODES]

MiB = 1024 * 1024


# -- the child-process server ---------------------------------------------------


class CountingHandler:
    """The child server's handler: echo (or blast, or sink) and count everything.

    Each connection gets a serial number in ``session`` so that a second
    ``on_close`` or an ``on_close`` without ``on_open`` is noticed even though
    ``id()`` values are reused by CPython.
    """

    def __init__(self, mode: str, blast: int) -> None:
        self.mode = mode
        self.blast = b"\xa5" * blast if blast else b""
        self.lock = threading.Lock()
        self.serial = 0
        self.opens = 0
        self.closes = 0
        self.double_closes = 0
        self.unopened_closes = 0
        self.late_data = 0
        self.bytes_in = 0
        self.errors: Dict[str, int] = defaultdict(int)

    def on_open(self, conn: Any) -> None:
        with self.lock:
            self.serial += 1
            self.opens += 1
            conn.session = [self.serial, False]
        if self.blast:
            conn.write(self.blast)

    def on_data(self, conn: Any, data: bytes) -> None:
        session = conn.session
        with self.lock:
            self.bytes_in += len(data)
            if session is None or session[1]:
                self.late_data += 1
        if self.mode != "sink":
            conn.write(data)

    def on_close(self, conn: Any, err: Optional[BaseException]) -> None:
        session = conn.session
        with self.lock:
            self.closes += 1
            if session is None:
                self.unopened_closes += 1
            elif session[1]:
                self.double_closes += 1
            else:
                session[1] = True
            self.errors[type(err).__name__ if err is not None else "None"] += 1

    def stats(self, server: Any) -> Dict[str, Any]:
        loop = server.loop
        with self.lock:
            return {
                "opens": self.opens, "closes": self.closes,
                "double_closes": self.double_closes, "unopened_closes": self.unopened_closes,
                "late_data": self.late_data, "bytes_in": self.bytes_in,
                "errors": dict(self.errors),
                "live": loop.connections if loop is not None else 0,
            }


def child_main(argv: Sequence[str]) -> int:
    """``python fault_support.py serve ...``: serve 127.0.0.1:0 until told to stop."""
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--trigger", default="edge")
    parser.add_argument("--task-type", default="loop")
    parser.add_argument("--mode", default="echo", choices=["echo", "sink"])
    parser.add_argument("--blast", type=int, default=0)
    parser.add_argument("--options", default="{}")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(HERE))
    import pulse  # noqa: E402  (imported late: the parent only needs the helpers)

    handler = CountingHandler(args.mode, args.blast)
    options = json.loads(args.options)
    server = pulse.Server(handler, trigger=args.trigger, task_type=args.task_type,
                          shutdown_timeout=2.0, **options)
    address = server.listen(("127.0.0.1", 0))
    out = sys.stdout

    def answer(payload: Dict[str, Any]) -> None:
        out.write(json.dumps(payload) + "\n")
        out.flush()

    def control() -> None:
        for line in sys.stdin:
            command = line.strip()
            if command == "stats":
                answer(handler.stats(server))
            elif command == "stop":
                break
        server.stop()  # also when the parent died (stdin at EOF)

    threading.Thread(target=control, name="control", daemon=True).start()
    threading.Thread(target=lambda: (server.wait_started(30), answer({"port": address[1]})),
                     daemon=True).start()
    server.serve()
    final = handler.stats(server)
    final["final"] = True
    final["threads"] = threading.active_count()
    answer(final)
    return 0


class ChildServer:
    """Parent side of a server child process; use as a context manager.

    ``stats()`` asks the child for its counters; ``stop()`` stops it and
    returns the final counters.  ``process`` is a ``psutil.Process`` for RSS,
    fd and CPU measurements.
    """

    def __init__(self, trigger: str, task_type: str, mode: str = "echo", blast: int = 0,
                 nofile: Optional[int] = None, stderr_path: Optional[str] = None,
                 **options: Any) -> None:
        self.trigger = trigger
        self.task_type = task_type
        argv = [sys.executable, os.path.join(HERE, "fault_support.py"), "serve",
                "--trigger", trigger, "--task-type", task_type, "--mode", mode,
                "--blast", str(blast), "--options", json.dumps(options)]
        preexec: Optional[Callable[[], None]] = None
        if nofile is not None:
            def preexec() -> None:
                import resource
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))
        self._stderr: Optional[IO[bytes]] = open(stderr_path, "wb") if stderr_path else None
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr if self._stderr is not None else subprocess.DEVNULL,
            preexec_fn=preexec, close_fds=True)
        self._buffer = b""
        self.process = psutil.Process(self.proc.pid)
        hello = self._read_line(30.0)
        self.port = int(hello["port"])
        self.address = ("127.0.0.1", self.port)

    def _read_line(self, timeout: float) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            assert left > 0, "the server child did not answer within {} s".format(timeout)
            sel = selectors.DefaultSelector()
            sel.register(fd, selectors.EVENT_READ)
            ready = sel.select(min(left, 1.0))
            sel.close()
            if ready:
                chunk = os.read(fd, 65536)
                assert chunk, "the server child exited (code {})".format(self.proc.poll())
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _command(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def stats(self, timeout: float = 10.0) -> Dict[str, Any]:
        self._command("stats")
        return self._read_line(timeout)

    def wait_stats(self, predicate: Callable[[Dict[str, Any]], bool], timeout: float,
                   what: str) -> Dict[str, Any]:
        """Poll ``stats()`` until ``predicate`` holds; fail with the last stats."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if predicate(stats):
                return stats
            assert time.monotonic() < deadline, "timed out waiting for {}: {}".format(what, stats)
            time.sleep(0.05)

    def rss(self) -> int:
        return self.process.memory_info().rss

    def num_fds(self) -> int:
        return self.process.num_fds()

    def cpu_seconds(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system

    def stop(self, timeout: float = 20.0) -> Dict[str, Any]:
        if self.proc.poll() is not None:
            raise AssertionError("the server child already exited with {}".format(
                self.proc.returncode))
        self._command("stop")
        final = self._read_line(timeout)
        self.proc.wait(timeout)
        assert self.proc.returncode == 0, "server child exit code {}".format(self.proc.returncode)
        return final

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> "ChildServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cpu_fraction(server: ChildServer, seconds: float) -> float:
    """The child's CPU use over ``seconds`` of wall time, as a fraction of one core."""
    start_cpu = server.cpu_seconds()
    start = time.monotonic()
    time.sleep(seconds)
    return (server.cpu_seconds() - start_cpu) / (time.monotonic() - start)


def quiet_fds(server: ChildServer, seconds: float = 0.2) -> int:
    """The child's open fds once start-up is over (the least seen over ``seconds``)."""
    least = server.num_fds()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.02)
        least = min(least, server.num_fds())
    return least


def settle_fds(server: ChildServer, target: int, timeout: float = 10.0) -> int:
    """Wait until the child has at most ``target`` fds open; return the last count."""
    deadline = time.monotonic() + timeout
    count = server.num_fds()
    while count > target and time.monotonic() < deadline:
        time.sleep(0.05)
        count = server.num_fds()
    return count


# -- clients --------------------------------------------------------------------


def hard_reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer sees a reset (RST), not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _nonblocking_connect(address: Tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    code = sock.connect_ex(address)
    if code not in (0, errno.EINPROGRESS):
        sock.close()
        raise OSError(code, os.strerror(code))
    return sock


def echo_latency(address: Tuple[str, int], rounds: int, size: int = 64,
                 timeout: float = 10.0) -> List[float]:
    """Round-trip times of ``rounds`` echoes of ``size`` bytes on one fresh connection."""
    sock = socket.create_connection(address, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    try:
        for i in range(rounds):
            msg = bytes([i % 256]) * size
            start = time.monotonic()
            sock.sendall(msg)
            got = b""
            while len(got) < size:
                chunk = sock.recv(size - len(got))
                assert chunk, "echo connection closed"
                got += chunk
            times.append(time.monotonic() - start)
            assert got == msg
    finally:
        sock.close()
    return times


def churn(address: Tuple[str, int], cycles: int, concurrency: int, deadline: float,
          payload: bytes = b"x" * 32) -> int:
    """``cycles`` connect / echo ``payload`` / close cycles, ``concurrency`` at a time.

    One thread multiplexes every client with ``selectors``.  Returns the
    number of completed cycles; fails at ``deadline``, on a wrong echo, or on
    a connection the server closed early.
    """
    sel = selectors.DefaultSelector()
    size = len(payload)
    state: Dict[int, List[Any]] = {}
    started = done = 0

    def start_one() -> None:
        nonlocal started
        sock = _nonblocking_connect(address)
        state[sock.fileno()] = [sock, b""]
        sel.register(sock, selectors.EVENT_WRITE)
        started += 1

    try:
        while started < min(concurrency, cycles):
            start_one()
        while done < cycles:
            assert time.monotonic() < deadline, "churn: {} of {} cycles in time".format(
                done, cycles)
            for key, events in sel.select(1.0):
                sock = key.fileobj
                entry = state[key.fd]
                if events & selectors.EVENT_WRITE:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    assert err == 0, "churn: connect failed: {}".format(os.strerror(err))
                    sock.send(payload)  # 32 bytes always fit a fresh socket
                    sel.modify(sock, selectors.EVENT_READ)
                    continue
                try:
                    chunk = sock.recv(size)
                except BlockingIOError:
                    continue
                assert chunk, "churn: server closed before echoing"
                entry[1] += chunk
                if len(entry[1]) < size:
                    continue
                assert entry[1] == payload, "churn: wrong echo"
                sel.unregister(sock)
                del state[key.fd]
                sock.close()
                done += 1
                if started < cycles:
                    start_one()
    finally:
        for entry in state.values():
            entry[0].close()
        sel.close()
    return done


def reset_storm(address: Tuple[str, int], count: int, concurrency: int, deadline: float,
                seed: int = 3) -> Dict[str, int]:
    """``count`` connections that each send a little and are reset (SO_LINGER 0)
    while the server is still writing to them.

    A third are reset as soon as they are connected, a third right after
    sending, and the rest once the server's reply has started to arrive (a
    transfer in progress both ways).  Returns how many took each path.
    """
    rng = random.Random(seed)
    sel = selectors.DefaultSelector()
    state: Dict[int, List[Any]] = {}
    paths = {"at_connect": 0, "after_send": 0, "mid_reply": 0}
    started = done = 0
    blob = b"r" * 4096

    def start_one() -> None:
        nonlocal started
        sock = _nonblocking_connect(address)
        state[sock.fileno()] = [sock, rng.choice(list(paths))]
        sel.register(sock, selectors.EVENT_WRITE)
        started += 1

    def finish(sock: socket.socket, fd: int, path: str) -> None:
        nonlocal done
        sel.unregister(sock)
        del state[fd]
        hard_reset(sock)
        paths[path] += 1
        done += 1
        if started < count:
            start_one()

    try:
        while started < min(concurrency, count):
            start_one()
        while done < count:
            assert time.monotonic() < deadline, "reset storm: {} of {} in time".format(done, count)
            for key, events in sel.select(1.0):
                sock, path = state[key.fd]
                if events & selectors.EVENT_WRITE:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    assert err == 0, "reset storm: connect failed: {}".format(os.strerror(err))
                    if path == "at_connect":
                        finish(sock, key.fd, path)
                        continue
                    sock.send(blob)
                    if path == "after_send":
                        finish(sock, key.fd, path)
                        continue
                    sel.modify(sock, selectors.EVENT_READ)
                    continue
                try:
                    chunk = sock.recv(1024)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    chunk = b""
                assert chunk, "reset storm: the server closed first"
                finish(sock, key.fd, path)
    finally:
        for entry in state.values():
            entry[0].close()
        sel.close()
    return paths


def blast_without_reading(socks: Sequence[socket.socket], seconds: float,
                          chunk: int = 256 * 1024) -> int:
    """Send to every socket as fast as the kernel takes it, never reading, for
    ``seconds``; return the bytes sent in all."""
    data = b"s" * chunk
    sel = selectors.DefaultSelector()
    for sock in socks:
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_WRITE)
    sent = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            for key, _ in sel.select(min(0.1, max(0.0, deadline - time.monotonic()))):
                try:
                    sent += key.fileobj.send(data)
                except BlockingIOError:
                    pass
    finally:
        sel.close()
    return sent


class Trickler:
    """``count`` connections that each send one byte every ``interval`` seconds
    (slowloris), from one thread, for ``rounds`` rounds."""

    def __init__(self, address: Tuple[str, int], count: int, interval: float,
                 rounds: int) -> None:
        self.socks = [socket.create_connection(address, timeout=10) for _ in range(count)]
        self.interval = interval
        self.rounds = rounds
        self.sent = 0
        self.done_rounds = 0
        self.error: Optional[BaseException] = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="slowloris")

    def _run(self) -> None:
        try:
            next_at = time.monotonic()
            for _ in range(self.rounds):
                for sock in self.socks:
                    sock.send(b"!")
                    self.sent += 1
                self.done_rounds += 1
                next_at += self.interval
                if self._stop.wait(max(0.0, next_at - time.monotonic())):
                    return
        except BaseException as exc:  # surfaced by join()
            self.error = exc

    def start(self) -> "Trickler":
        self.thread.start()
        return self

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the slowloris thread did not finish"
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(10)
        for sock in self.socks:
            sock.close()


# -- in-process recording handler -----------------------------------------------


class Ledger:
    """Per-connection record kept by ``Recorder``: every callback, in order."""

    __slots__ = ("serial", "conn", "fd", "peer", "data", "closes", "late_data",
                 "user_paused", "paused_data", "opened_at")

    def __init__(self, serial: int, conn: Any, fd: int, peer: Any) -> None:
        self.serial = serial
        self.conn = conn
        self.fd = fd
        self.peer = peer
        self.data = bytearray()
        self.closes: List[Optional[BaseException]] = []
        self.late_data = 0
        # Set by a test, on the loop's thread, while it holds reading paused;
        # on_data counts into paused_data meanwhile (meaningful in loop mode).
        self.user_paused = False
        self.paused_data = 0
        self.opened_at = time.monotonic()


class Recorder:
    """A handler that records every callback per connection and can echo.

    Connections are found by their client's port (``by_port``), which the
    test knows from its own socket.  ``check()`` asserts the lifecycle
    invariants: ``on_close`` exactly once per ``on_open``, none without one,
    no ``on_data`` after ``on_close``.
    """

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
        self.lock = threading.Lock()
        self.ledgers: List[Ledger] = []
        self.by_port: Dict[int, Ledger] = {}
        self.stray_closes = 0
        self.closed_event = threading.Condition(self.lock)

    def on_open(self, conn: Any) -> None:
        try:
            peer = conn.remote_address
        except OSError:
            peer = None  # already reset by the peer (the threaded modes run on_open late)
        with self.lock:
            ledger = Ledger(len(self.ledgers), conn, conn.fileno(), peer)
            self.ledgers.append(ledger)
            if isinstance(peer, tuple):
                self.by_port[peer[1]] = ledger
            conn.session = ledger

    def on_data(self, conn: Any, data: bytes) -> None:
        ledger = conn.session
        with self.lock:
            if ledger.closes:
                ledger.late_data += 1
            if ledger.user_paused:
                ledger.paused_data += len(data)
            ledger.data += data
        if self.echo:
            conn.write(data)

    def on_close(self, conn: Any, err: Optional[BaseException]) -> None:
        ledger = conn.session
        with self.lock:
            if not isinstance(ledger, Ledger):
                self.stray_closes += 1
                return
            ledger.closes.append(err)
            self.closed_event.notify_all()

    def mark(self) -> int:
        """A mark to pass to ``ledger_for``: take it before connecting."""
        with self.lock:
            return len(self.ledgers)

    def ledger_for(self, sock: socket.socket, timeout: float = 10.0, since: int = 0) -> Ledger:
        """The server-side record of the connection of client socket ``sock``.

        Client ports are reused: with ``since`` (a ``mark()`` taken before
        connecting) an older connection from the same port is never returned.
        """
        port = sock.getsockname()[1]
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                ledger = self.by_port.get(port)
            if ledger is not None and ledger.serial >= since:
                return ledger
            assert time.monotonic() < deadline, "the server never opened port {}".format(port)
            time.sleep(0.002)

    def closed_count(self) -> int:
        with self.lock:
            return sum(1 for ledger in self.ledgers if ledger.closes)

    def wait_all_closed(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self.lock:
            while any(not ledger.closes for ledger in self.ledgers):
                left = deadline - time.monotonic()
                open_ones = [ledger.serial for ledger in self.ledgers if not ledger.closes]
                assert left > 0, "no on_close for connections {}".format(open_ones)
                self.closed_event.wait(min(left, 0.1))

    def check(self) -> None:
        with self.lock:
            assert self.stray_closes == 0, "on_close without on_open"
            for ledger in self.ledgers:
                assert len(ledger.closes) == 1, "connection {} got {} on_close calls".format(
                    ledger.serial, len(ledger.closes))
                assert ledger.late_data == 0, "on_data after on_close"


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
