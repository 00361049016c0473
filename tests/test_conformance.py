"""The conformance suite: the same behaviour under every trigger and task mode.

Each test runs for edge and level trigger x loop, pool and thread task modes
(``support.MODES``), the way uvloop runs one test mixin against two loops.
"""

import hashlib
import logging
import random
import socket
import threading
import time
from collections import defaultdict
from typing import Dict, List, Optional

import pytest

import pulse
from support import (MODE_IDS, MODES, ServerThread, echo_many, hard_reset, no_leaks, pattern,
                     recv_exactly, recv_until_eof, wait_for)

pytestmark = pytest.mark.parametrize("trigger,task_type", MODES, ids=MODE_IDS)


class Recorder(pulse.Handler):
    """Records every callback per connection; optionally echoes."""

    def __init__(self, echo: bool = True) -> None:
        self.lock = threading.Lock()
        self.echo = echo
        self.opened: List[pulse.Conn] = []
        self.closes: Dict[int, List[Optional[BaseException]]] = defaultdict(list)
        self.data: Dict[int, bytearray] = defaultdict(bytearray)
        self.data_at_close: Dict[int, bytes] = {}
        self.late_data: List[int] = []

    def on_open(self, conn: pulse.Conn) -> None:
        with self.lock:
            self.opened.append(conn)

    def on_data(self, conn: pulse.Conn, data: bytes) -> None:
        with self.lock:
            if id(conn) in self.closes:
                self.late_data.append(id(conn))
            self.data[id(conn)] += data
        if self.echo:
            conn.write(data)

    def on_close(self, conn: pulse.Conn, err: Optional[BaseException]) -> None:
        with self.lock:
            self.closes[id(conn)].append(err)
            self.data_at_close[id(conn)] = bytes(self.data[id(conn)])

    def wait_closed(self, count: int, timeout: float = 10.0) -> None:
        wait_for(lambda: len(self.closes) >= count, timeout, "{} on_close calls".format(count))

    def check_once(self) -> None:
        """on_close exactly once for every on_open, never for an unopened conn."""
        with self.lock:
            opened = {id(c) for c in self.opened}
            assert len(opened) == len(self.opened), "on_open ran twice for one connection"
            assert set(self.closes) == opened, "on_close set differs from on_open set"
            for errs in self.closes.values():
                assert len(errs) == 1, "on_close ran {} times".format(len(errs))
            assert not self.late_data, "on_data after on_close"


def test_echo_200_clients_random_sizes(trigger: str, task_type: str) -> None:
    rng = random.Random(20261127)
    messages = [pattern(rng.randint(1, 1 << 20), seed) for seed in range(200)]
    handler = Recorder()
    with no_leaks():
        with ServerThread(handler, trigger=trigger, task_type=task_type) as srv:
            echo_many(srv.address, messages, timeout=120)
            handler.wait_closed(200)
        handler.check_once()


def test_64mib_to_slow_reader(trigger: str, task_type: str) -> None:
    total = 64 * 1024 * 1024
    chunk = 1024 * 1024
    blob = pattern(total, 64)

    class Blaster(Recorder):
        def on_open(self, conn: pulse.Conn) -> None:
            super().on_open(conn)
            for start in range(0, total, chunk):
                conn.write(blob[start:start + chunk])
            conn.close()  # after flushing everything written

    handler = Blaster(echo=False)
    with ServerThread(handler, trigger=trigger, task_type=task_type) as srv:
        sock = srv.connect()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        deadline = time.monotonic() + 60
        digest = hashlib.sha256()
        got = 0
        reads = 0
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = sock.recv(256 * 1024)
            if not data:
                break
            digest.update(data)
            got += len(data)
            reads += 1
            if reads % 16 == 0:
                time.sleep(0.002)  # a slow reader: the server must buffer, not drop
        sock.close()
        assert got == total
        assert digest.digest() == hashlib.sha256(blob).digest()
        handler.wait_closed(1)
    handler.check_once()
    assert handler.closes[id(handler.opened[0])] == [None]


def test_lifecycle_peer_eof_and_reset(trigger: str, task_type: str) -> None:
    handler = Recorder()
    with ServerThread(handler, trigger=trigger, task_type=task_type) as srv:
        eof = srv.connect()
        eof.sendall(b"bye")
        assert recv_exactly(eof, 3, time.monotonic() + 10) == b"bye"
        eof.close()
        handler.wait_closed(1)
        reset = srv.connect()
        reset.sendall(b"hi")
        assert recv_exactly(reset, 2, time.monotonic() + 10) == b"hi"
        hard_reset(reset)
        handler.wait_closed(2)
    handler.check_once()
    errs = [handler.closes[id(c)][0] for c in handler.opened]
    assert errs[0] is None
    assert isinstance(errs[1], ConnectionResetError)


@pytest.mark.parametrize("where", ["on_open", "on_data", "on_close"])
def test_close_from_each_callback(trigger: str, task_type: str, where: str) -> None:
    class Closer(Recorder):
        def on_open(self, conn: pulse.Conn) -> None:
            super().on_open(conn)
            if where == "on_open":
                conn.write(b"welcome")
                conn.close()

        def on_data(self, conn: pulse.Conn, data: bytes) -> None:
            super().on_data(conn, data)
            if where == "on_data":
                conn.close()
                conn.close()  # twice is a no-op

        def on_close(self, conn: pulse.Conn, err: Optional[BaseException]) -> None:
            super().on_close(conn, err)
            if where == "on_close":
                conn.close()

    handler = Closer()
    with ServerThread(handler, trigger=trigger, task_type=task_type) as srv:
        sock = srv.connect()
        deadline = time.monotonic() + 10
        if where == "on_open":
            assert recv_until_eof(sock, deadline) == b"welcome"
        elif where == "on_data":
            sock.sendall(b"ping")
            assert recv_until_eof(sock, deadline) == b"ping"
        else:
            sock.sendall(b"ping")
            assert recv_exactly(sock, 4, deadline) == b"ping"
            sock.close()
        sock.close()
        handler.wait_closed(1)
        time.sleep(0.05)
    handler.check_once()
    assert handler.closes[id(handler.opened[0])] == [None]


def test_server_stop_closes_every_connection(trigger: str, task_type: str) -> None:
    handler = Recorder()
    socks = []
    with no_leaks():
        srv = ServerThread(handler, trigger=trigger, task_type=task_type)
        with srv:
            for _ in range(5):
                sock = srv.connect()
                sock.sendall(b"x")
                assert recv_exactly(sock, 1, time.monotonic() + 10) == b"x"
                socks.append(sock)
        # serve() returned: every connection got exactly one on_close.
        assert len(handler.closes) == 5
        handler.check_once()
        for sock in socks:
            assert recv_until_eof(sock, time.monotonic() + 10) == b""
            sock.close()


def test_data_with_fin_is_delivered_before_on_close(trigger: str, task_type: str) -> None:
    handler = Recorder(echo=False)
    payloads = [pattern(size, size) for size in (1, 100, 70000, 300000)]
    with ServerThread(handler, trigger=trigger, task_type=task_type) as srv:
        for payload in payloads:
            sock = srv.connect()
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)  # FIN right behind the data
            recv_until_eof(sock, time.monotonic() + 10)
            sock.close()
        handler.wait_closed(len(payloads))
    handler.check_once()
    for conn, payload in zip(handler.opened, payloads):
        assert handler.data_at_close[id(conn)] == payload


def test_half_close_still_gets_the_reply(trigger: str, task_type: str) -> None:
    handler = Recorder(echo=True)
    payload = pattern(200000, 7)
    with ServerThread(handler, trigger=trigger, task_type=task_type) as srv:
        sock = srv.connect()
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock, time.monotonic() + 10) == payload
        sock.close()
        handler.wait_closed(1)
    handler.check_once()


def test_callback_exception_closes_only_that_connection(
        trigger: str, task_type: str, caplog: pytest.LogCaptureFixture) -> None:
    class Boom(Recorder):
        def on_data(self, conn: pulse.Conn, data: bytes) -> None:
            if data.startswith(b"boom"):
                raise RuntimeError("handler exploded")
            super().on_data(conn, data)

    handler = Boom()
    caplog.set_level(logging.ERROR, logger="pulse")
    with ServerThread(handler, trigger=trigger, task_type=task_type) as srv:
        good = srv.connect()
        bad = srv.connect()
        good.sendall(b"one")
        assert recv_exactly(good, 3, time.monotonic() + 10) == b"one"
        bad.sendall(b"boom")
        assert recv_until_eof(bad, time.monotonic() + 10) == b""
        handler.wait_closed(1)
        good.sendall(b"two")
        assert recv_exactly(good, 3, time.monotonic() + 10) == b"two"
        newcomer = srv.connect()
        newcomer.sendall(b"three")
        assert recv_exactly(newcomer, 5, time.monotonic() + 10) == b"three"
        for sock in (good, bad, newcomer):
            sock.close()
        handler.wait_closed(3)
    handler.check_once()
    errs = [e for errs in handler.closes.values() for e in errs if e is not None]
    assert len(errs) == 1 and isinstance(errs[0], RuntimeError)
    assert "handler exploded" in caplog.text
    assert any(r.name == "pulse" and r.levelno == logging.ERROR for r in caplog.records)


def test_write_after_close_raises(trigger: str, task_type: str) -> None:
    seen: List[BaseException] = []

    class LateWriter(Recorder):
        def on_data(self, conn: pulse.Conn, data: bytes) -> None:
            conn.write(b"last")
            conn.close()
            try:
                conn.write(b"too late")
            except pulse.ConnClosedError as exc:
                seen.append(exc)

        def on_close(self, conn: pulse.Conn, err: Optional[BaseException]) -> None:
            super().on_close(conn, err)
            try:
                conn.write(b"after on_close")
            except pulse.ConnClosedError as exc:
                seen.append(exc)

    handler = LateWriter()
    with ServerThread(handler, trigger=trigger, task_type=task_type) as srv:
        sock = srv.connect()
        sock.sendall(b"x")
        assert recv_until_eof(sock, time.monotonic() + 10) == b"last"
        sock.close()
        handler.wait_closed(1)
    assert len(seen) == 2


def test_pause_reading_holds_data_and_fin_until_resume(trigger: str, task_type: str) -> None:
    class Paused(Recorder):
        def on_open(self, conn: pulse.Conn) -> None:
            conn.pause_reading()
            super().on_open(conn)

    handler = Paused(echo=False)
    with ServerThread(handler, trigger=trigger, task_type=task_type) as srv:
        sock = srv.connect()
        sock.sendall(b"first ")
        sock.sendall(b"second")
        sock.shutdown(socket.SHUT_WR)
        wait_for(lambda: handler.opened, 10, "on_open")
        time.sleep(0.2)
        with handler.lock:
            early = (bytes(handler.data[id(handler.opened[0])]), dict(handler.closes))
        assert early == (b"", {}), "delivered while paused: {!r}".format(early)
        handler.opened[0].resume_reading()  # from this (foreign) thread
        handler.wait_closed(1)
        sock.close()
    handler.check_once()
    assert handler.data_at_close[id(handler.opened[0])] == b"first second"
