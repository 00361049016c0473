"""Connection semantics: task modes, backpressure, deadlines, timers, threads."""

import datetime
import random
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import psutil
import pytest

import pulse
from support import (ServerThread, connect_when_up, free_port, no_leaks, offer, pattern,
                     recv_exactly, recv_until_eof, wait_for)

ROOT = Path(__file__).resolve().parent.parent


class Closes(pulse.Handler):
    """Records on_close errors and their times."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.errors: List[Optional[BaseException]] = []
        self.times: List[float] = []

    def on_close(self, conn: pulse.Conn, err: Optional[BaseException]) -> None:
        with self.lock:
            self.errors.append(err)
            self.times.append(time.monotonic())


def test_pool_mode_orders_callbacks_and_never_overlaps_them() -> None:
    class Slow(pulse.Handler):
        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.active: Dict[int, int] = defaultdict(int)
            self.overlaps = 0
            self.seen: Dict[int, List[bytes]] = defaultdict(list)
            self.threads = set()

        def on_data(self, conn: pulse.Conn, data: bytes) -> None:
            key = id(conn)
            with self.lock:
                self.active[key] += 1
                if self.active[key] > 1:
                    self.overlaps += 1
                self.threads.add(threading.get_ident())
            time.sleep(random.uniform(0, 0.004))
            with self.lock:
                self.seen[key].append(data)
                self.active[key] -= 1
            conn.write(data)

    handler = Slow()
    with ServerThread(handler, task_type="pool", pool_size=4) as srv:
        socks = [srv.connect() for _ in range(8)]
        expected = {}
        for i, _sock in enumerate(socks):
            msgs = b"".join(b"<%d:%04d>" % (i, n) for n in range(150))
            expected[i] = msgs
        for n in range(0, 150 * 8, 8):
            for i, sock in enumerate(socks):
                sock.sendall(expected[i][n:n + 8])
        for i, sock in enumerate(socks):
            assert recv_exactly(sock, len(expected[i]), time.monotonic() + 30) == expected[i]
            sock.close()
    assert handler.overlaps == 0
    assert len(handler.threads) > 1, "pool mode should spread connections over workers"
    for data in handler.seen.values():
        text = b"".join(data)
        assert text in expected.values()


def test_thread_mode_serves_1000_connections() -> None:
    threads_seen = set()
    lock = threading.Lock()

    class Echo(pulse.Handler):
        def on_data(self, conn: pulse.Conn, data: bytes) -> None:
            with lock:
                threads_seen.add(threading.get_ident())
            conn.write(data)

    with no_leaks(settle=15):
        with ServerThread(Echo(), task_type="thread") as srv:
            socks = []
            for i in range(1000):
                sock = srv.connect()
                sock.sendall(b"%04d" % i)
                socks.append(sock)
            for i, sock in enumerate(socks):
                assert recv_exactly(sock, 4, time.monotonic() + 30) == b"%04d" % i
                sock.close()
    assert len(threads_seen) > 100


@pytest.mark.parametrize("task_type", ["loop", "pool"])
def test_close_from_foreign_thread(task_type: str) -> None:
    conns: List[pulse.Conn] = []
    handler = Closes()
    handler.on_open = lambda conn: conns.append(conn)
    with ServerThread(handler, task_type=task_type) as srv:
        sock = srv.connect()
        wait_for(lambda: conns, 10, "on_open")
        conns[0].write(b"bye")
        threading.Thread(target=conns[0].close).start()
        assert recv_until_eof(sock, time.monotonic() + 10) == b"bye"
        sock.close()
        wait_for(lambda: handler.errors, 10, "on_close")
    assert handler.errors == [None]
    with pytest.raises(pulse.ConnClosedError):
        conns[0].write(b"x")


@pytest.mark.parametrize("task_type", ["loop", "pool"])
def test_backpressure_pauses_and_resumes_reading(task_type: str) -> None:
    events: List[str] = []

    class Flow(pulse.Handler):
        def on_data(self, conn: pulse.Conn, data: bytes) -> None:
            conn.write(b"x" * 10000)

        def on_pause_writing(self, conn: pulse.Conn) -> None:
            events.append("pause")
            assert conn.reading_paused
            assert conn.write_buffer_size > 64 * 1024

        def on_resume_writing(self, conn: pulse.Conn) -> None:
            events.append("resume")

    with ServerThread(Flow(), task_type=task_type) as srv:
        sock = srv.connect()
        sent = offer(sock, b"r" * 1024, 2)
        wait_for(lambda: "pause" in events, 10, "on_pause_writing")
        # The server stopped reading: we could not push more than kernel buffers hold.
        assert sent < 64 * 1024 * 1024
        received = 0
        deadline = time.monotonic() + 10
        while "resume" not in events and time.monotonic() < deadline:
            try:
                received += len(sock.recv(1 << 20))
            except BlockingIOError:
                time.sleep(0.001)
        assert "resume" in events
        sock.close()


def test_backpressure_bounds_server_memory() -> None:
    """A client offering up to 1 GiB and not reading leaves the server's RSS bounded."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "flow_backpressure.py"),
                             "--port", str(port), "--log-level", "WARNING"])
    try:
        sock = connect_when_up(port)
        server = psutil.Process(proc.pid)
        time.sleep(0.3)
        rss_before = server.memory_info().rss
        offer(sock, b"q" * 65536, 3)
        growth = server.memory_info().rss - rss_before
        # 64 KiB high-water mark plus one read arena; without backpressure the
        # replies to what was offered would be ~10x the bytes offered.
        assert growth < 16 * 1024 * 1024, "server RSS grew by {} bytes".format(growth)
        sock.close()
    finally:
        proc.terminate()
        proc.wait(20)


def test_write_buffer_limit_closes_with_clear_error() -> None:
    handler = Closes()

    def flood(conn: pulse.Conn) -> None:
        chunk = b"z" * 65536
        for _ in range(512):  # 32 MiB: more than loopback's kernel buffers hold
            conn.write(chunk)
    handler.on_open = flood
    with ServerThread(handler, write_buffer_limit=1024 * 1024) as srv:
        sock = srv.connect()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        wait_for(lambda: handler.errors, 10, "on_close")
        sock.close()
    assert isinstance(handler.errors[0], pulse.WriteBufferFullError)
    assert "write_buffer_limit" in str(handler.errors[0])


@pytest.mark.parametrize("task_type", ["loop", "pool", "thread"])
def test_read_deadline_fires_on_time(task_type: str) -> None:
    handler = Closes()
    starts: List[float] = []

    def arm(conn: pulse.Conn) -> None:
        starts.append(time.monotonic())
        conn.set_read_deadline(0.2)
    handler.on_open = arm
    with ServerThread(handler, task_type=task_type) as srv:
        sock = srv.connect()
        wait_for(lambda: handler.errors, 10, "on_close")
        assert recv_until_eof(sock, time.monotonic() + 5) == b""
        sock.close()
    assert isinstance(handler.errors[0], TimeoutError)
    late = handler.times[0] - starts[0] - 0.2
    assert -0.001 <= late < 0.05, "deadline fired {:.3f} s off target".format(late)


def test_deadline_reset_and_clear_and_datetime() -> None:
    handler = Closes()

    class Refresh(pulse.Handler):
        def on_open(self, conn: pulse.Conn) -> None:
            conn.set_deadline(0.15)

        def on_data(self, conn: pulse.Conn, data: bytes) -> None:
            if data == b"clear":
                conn.set_deadline(None)
            elif data == b"at":
                conn.set_read_deadline(datetime.datetime.now() + datetime.timedelta(seconds=0.1))
            else:
                conn.set_read_deadline(0.15)  # extend on activity
            conn.write(data)

        on_close = handler.on_close

    with ServerThread(Refresh()) as srv:
        sock = srv.connect()
        for _ in range(5):
            time.sleep(0.08)
            sock.sendall(b"tick")
            assert recv_exactly(sock, 4, time.monotonic() + 5) == b"tick"
        sock.sendall(b"clear")
        assert recv_exactly(sock, 5, time.monotonic() + 5) == b"clear"
        time.sleep(0.3)
        assert handler.errors == []  # cleared: still open
        sock.sendall(b"at")
        assert recv_exactly(sock, 2, time.monotonic() + 5) == b"at"
        wait_for(lambda: handler.errors, 5, "datetime deadline")
        sock.close()
    assert isinstance(handler.errors[0], TimeoutError)


def test_write_deadline_only_fires_with_unsent_data() -> None:
    handler = Closes()

    def arm(conn: pulse.Conn) -> None:
        conn.set_write_deadline(0.1)  # nothing unsent at 0.1 s: harmless
        conn.call_later(0.3, lambda: (conn.write(b"w" * (8 << 20)), conn.set_write_deadline(0.1)))
    handler.on_open = arm
    with ServerThread(handler) as srv:
        sock = srv.connect()
        time.sleep(0.25)
        assert handler.errors == []
        wait_for(lambda: handler.errors, 5, "write deadline")
        sock.close()
    assert isinstance(handler.errors[0], TimeoutError)
    assert "write deadline" in str(handler.errors[0])


def test_idle_timeout() -> None:
    handler = Closes()
    handler.on_data = lambda conn, data: conn.write(data)
    with ServerThread(handler, idle_timeout=0.2) as srv:
        idle = srv.connect()
        busy = srv.connect()
        for _ in range(6):
            busy.sendall(b"b")
            assert recv_exactly(busy, 1, time.monotonic() + 5) == b"b"
            time.sleep(0.07)
        assert len(handler.errors) == 1 and isinstance(handler.errors[0], TimeoutError)
        assert recv_until_eof(idle, time.monotonic() + 5) == b""
        idle.close()
        busy.close()


def test_timers_of_closed_connections_are_gone() -> None:
    loops: List[pulse.EventLoop] = []
    fired: List[int] = []

    class Timed(pulse.Handler):
        def on_open(self, conn: pulse.Conn) -> None:
            if not loops:
                loops.append(conn.loop)
            conn.set_deadline(60)
            conn.call_later(60, fired.append, 1)

    with ServerThread(Timed(), idle_timeout=60) as srv:
        for _ in range(10000):
            sock = socket.create_connection(srv.address)
            sock.close()
        wait_for(lambda: loops[0].connections == 0, 20, "every connection closed")
        timers = loops[0]._timers
        wait_for(lambda: len(timers) == 0, 5, "timers cancelled")
        assert len(timers.heap) < 1000, "cancelled timers were not purged"
    assert fired == []


def test_deadline_on_closed_connection_and_bad_values() -> None:
    errors: List[BaseException] = []

    class Bad(pulse.Handler):
        def on_open(self, conn: pulse.Conn) -> None:
            for value in ("soon", -1.0, float("nan")):
                try:
                    conn.set_deadline(value)
                except (TypeError, ValueError) as exc:
                    errors.append(exc)
            conn.close()
            try:
                conn.set_read_deadline(1)
            except pulse.ConnClosedError as exc:
                errors.append(exc)

    with ServerThread(Bad()) as srv:
        sock = srv.connect()
        assert recv_until_eof(sock, time.monotonic() + 5) == b""
        sock.close()
    kinds = [type(e) for e in errors]
    assert kinds == [TypeError, ValueError, ValueError, pulse.ConnClosedError]


def test_zero_copy_hands_a_memoryview() -> None:
    kinds: List[type] = []

    class View(pulse.Handler):
        def on_data(self, conn: pulse.Conn, data: memoryview) -> None:
            kinds.append(type(data))
            conn.write(data)  # written from the view before the call returns

    with ServerThread(View(), zero_copy=True) as srv:
        sock = srv.connect()
        sock.sendall(b"zero copy")
        assert recv_exactly(sock, 9, time.monotonic() + 5) == b"zero copy"
        sock.close()
    assert kinds and kinds[0] is memoryview


def test_pause_and_resume_reading() -> None:
    conns: List[pulse.Conn] = []
    got = bytearray()

    class Pausable(pulse.Handler):
        def on_open(self, conn: pulse.Conn) -> None:
            conns.append(conn)
            conn.pause_reading()

        def on_data(self, conn: pulse.Conn, data: bytes) -> None:
            got.extend(data)

    with ServerThread(Pausable()) as srv:
        sock = srv.connect()
        sock.sendall(b"held back")
        time.sleep(0.2)
        assert got == b""
        conns[0].loop.call_soon_threadsafe(conns[0].resume_reading)
        wait_for(lambda: bytes(got) == b"held back", 5, "data after resume")
        sock.close()


def test_tcp_options_per_connection() -> None:
    values = {}

    class Opts(pulse.Handler):
        def on_open(self, conn: pulse.Conn) -> None:
            fd = conn.fileno()
            values["nodelay_default"] = pulse._sys.getsockopt_int(
                fd, socket.IPPROTO_TCP, socket.TCP_NODELAY)
            conn.set_nodelay(False)
            conn.set_keepalive(True)
            values["nodelay_off"] = pulse._sys.getsockopt_int(
                fd, socket.IPPROTO_TCP, socket.TCP_NODELAY)
            values["keepalive"] = pulse._sys.getsockopt_int(
                fd, socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            conn.close()

    with ServerThread(Opts()) as srv:
        sock = srv.connect()
        recv_until_eof(sock, time.monotonic() + 5)
        sock.close()
    assert values == {"nodelay_default": 1, "nodelay_off": 0, "keepalive": 1}


# -- direct reads of large messages ------------------------------------------


class DirectProbe(pulse.Handler):
    """Echo that records, per on_data, the chunk size and whether the loop
    was reading this connection directly (not through the arena)."""

    def __init__(self) -> None:
        self.seen: List[tuple] = []
        self.fd = -1
        self.closed = threading.Event()

    def on_open(self, conn: pulse.Conn) -> None:
        self.fd = conn.fileno()

    def on_data(self, conn: pulse.Conn, data: bytes) -> None:
        assert type(data) is bytes
        direct = conn.loop._direct  # None on the portable backend: always the arena
        self.seen.append((len(data), direct[conn.fileno()] if direct is not None else 0))
        conn.write(data)

    def on_close(self, conn: pulse.Conn, err: Optional[BaseException]) -> None:
        self.closed.set()


@pytest.mark.parametrize("task_type", ["loop", "pool", "thread"])
@pytest.mark.parametrize("trigger", ["edge", "level"])
def test_large_reads_go_direct_and_small_ones_come_back(
        trigger: str, task_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection that receives large chunks is read straight into the
    bytes given to on_data; when its messages become small it returns to the
    batched arena reads; every byte arrives in order either way, and the
    next connection on the same fd number starts on the arena."""
    # Whether a batch spreads past the arena's cached head depends on timing;
    # with DIRECT_AFTER = 0 every large read switches.
    monkeypatch.setattr(pulse.loop, "DIRECT_AFTER", 0)
    handler = DirectProbe()
    with no_leaks():
        with ServerThread(handler, trigger=trigger, task_type=task_type) as srv:
            loop = srv.server._loop
            supported = not loop.backend.__name__.endswith(".portable")
            assert (loop._direct is not None) == supported
            sock = srv.connect()
            big = pattern(8 * 1024 * 1024, 7)
            got = bytearray()
            sender = threading.Thread(target=sock.sendall, args=(big,))
            sender.start()
            got += recv_exactly(sock, len(big), time.monotonic() + 30)
            sender.join(30)
            assert got == big
            assert any(flag for _, flag in handler.seen) == supported, \
                "large reads never went direct"
            # Small request/response rounds: the connection returns to the arena.
            for i in range(20):
                msg = b"small-%d" % i
                sock.sendall(msg)
                assert recv_exactly(sock, len(msg), time.monotonic() + 10) == msg
            assert handler.seen[-1] == (len(b"small-19"), 0), handler.seen[-3:]
            # Back to large, then close: the fd's flag is cleared with the connection.
            sock.sendall(big[:1024 * 1024])
            assert recv_exactly(sock, 1024 * 1024, time.monotonic() + 30) == big[:1024 * 1024]
            sock.close()
            assert handler.closed.wait(10)
            wait_for(lambda: not srv.server._loop._conns, 10, "the connection closed")
            if supported:
                assert loop._direct[handler.fd] == 0
