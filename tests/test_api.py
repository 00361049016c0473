"""API contract: bad arguments and bad states get clear errors, not crashes."""

import os
import socket
import threading
import time
from typing import List, Optional

import psutil
import pytest

import pulse
from pulse import _sys
from support import ServerThread, no_leaks, recv_exactly, wait_for


@pytest.mark.parametrize("kwargs,exc,words", [
    ({"read_buffer_size": -1}, ValueError, "read_buffer_size must be > 0, got -1"),
    ({"read_buffer_size": 0}, ValueError, "read_buffer_size"),
    ({"read_buffer_size": "big"}, TypeError, "read_buffer_size"),
    ({"trigger": "sideways"}, ValueError, "trigger"),
    ({"task_type": "fibers"}, ValueError, "task_type"),
    ({"pool_size": 0}, ValueError, "pool_size"),
    ({"max_events": 0}, ValueError, "max_events"),
    ({"backlog": -5}, ValueError, "backlog"),
    ({"write_buffer_high_water": -1}, ValueError, "write_buffer_high_water"),
    ({"write_buffer_high_water": 100, "write_buffer_low_water": 200}, ValueError,
     "write_buffer_low_water"),
    ({"write_buffer_limit": 10}, ValueError, "write_buffer_limit"),
    ({"idle_timeout": -1}, ValueError, "idle_timeout"),
    ({"idle_timeout": "soon"}, TypeError, "idle_timeout"),
    ({"zero_copy": True, "task_type": "pool"}, ValueError, "zero_copy"),
    ({"log_level": "chatty"}, ValueError, "log_level"),
])
def test_bad_options_name_the_argument(kwargs: dict, exc: type, words: str) -> None:
    with pytest.raises(exc) as info:
        pulse.Server(pulse.Handler(), **kwargs)
    assert words in str(info.value)


def test_unknown_option_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="read_bufer_size") as info:
        pulse.Server(pulse.Handler(), read_bufer_size=10)
    assert "did you mean 'read_buffer_size'?" in str(info.value)
    assert "write_buffer_high_water" in str(info.value)  # the valid names are listed
    with pytest.raises(TypeError):
        pulse.Options("edge")  # type: ignore[misc]  # keywords only


def test_options_come_from_one_field_table() -> None:
    import inspect
    from pulse.options import FIELDS
    params = list(inspect.signature(pulse.Options).parameters.values())
    assert [(p.name, p.kind, p.default) for p in params] == [
        (f.name, inspect.Parameter.KEYWORD_ONLY, f.default) for f in FIELDS]
    options = pulse.Options()
    assert list(options.as_dict()) == [f.name for f in FIELDS]
    assert options.write_buffer_low_water == options.write_buffer_high_water // 4
    assert pulse.Options(**options.as_dict()).as_dict() == options.as_dict()


def test_handler_without_callbacks_is_rejected() -> None:
    with pytest.raises(TypeError, match="on_data"):
        pulse.Server(object())
    with pytest.raises(TypeError, match="on_open must be callable"):
        pulse.callbacks(on_open=42)


def test_callbacks_helper_builds_a_handler() -> None:
    got: List[bytes] = []
    closed = threading.Event()
    handler = pulse.callbacks(on_data=lambda c, d: (got.append(d), c.write(d.upper())),
                              on_close=lambda c, e: closed.set())
    with ServerThread(handler) as srv:
        sock = srv.connect()
        sock.sendall(b"abc")
        assert recv_exactly(sock, 3, time.monotonic() + 10) == b"ABC"
        sock.close()
        assert closed.wait(10)
    assert got == [b"abc"]


@pytest.mark.parametrize("address,expected", [
    ("127.0.0.1:80", (socket.AF_INET, ("127.0.0.1", 80))),
    (":8080", (socket.AF_INET, ("127.0.0.1", 8080))),
    ("[::1]:9000", (socket.AF_INET6, ("::1", 9000))),
    (("0.0.0.0", 7), (socket.AF_INET, ("0.0.0.0", 7))),
    (8081, (socket.AF_INET, ("127.0.0.1", 8081))),
    ("unix:/tmp/x.sock", (socket.AF_UNIX, "/tmp/x.sock")),
])
def test_address_forms(address: object, expected: tuple) -> None:
    assert pulse.parse_address(address) == expected


@pytest.mark.parametrize("address,exc", [
    ("localhost", ValueError), ("1.2.3.4:99999", ValueError), (":abc", ValueError),
    ("::1:80", ValueError), ("[::1]80", ValueError), ("unix:", ValueError),
    (("h", 1, 2), ValueError), (3.5, TypeError), ((1, 2), TypeError),
])
def test_bad_addresses(address: object, exc: type) -> None:
    with pytest.raises(exc):
        pulse.parse_address(address)


def test_port_in_use_names_the_address() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        server = pulse.Server(pulse.Handler())
        with pytest.raises(OSError) as info:
            server.serve(("127.0.0.1", port))
        assert "127.0.0.1:{}".format(port) in str(info.value)
        assert info.value.errno == 98 or "in use" in str(info.value)
    finally:
        holder.close()


def test_unix_socket_server(tmp_path) -> None:
    path = str(tmp_path / "echo.sock")

    class Echo(pulse.Handler):
        def on_data(self, conn: pulse.Conn, data: bytes) -> None:
            conn.write(data)

    server = pulse.Server(Echo)
    thread = threading.Thread(target=server.serve, args=("unix:" + path,))
    with no_leaks():
        thread.start()
        assert server.wait_started(10)
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        client.sendall(b"over unix")
        assert recv_exactly(client, 9, time.monotonic() + 10) == b"over unix"
        client.close()
        server.stop()
        thread.join(10)
    assert not thread.is_alive()


def test_serve_twice_and_stop_twice() -> None:
    srv = ServerThread(pulse.Handler())
    with srv:
        with pytest.raises(pulse.ServerStateError, match="already"):
            srv.server.serve()
        with pytest.raises(pulse.ServerStateError):
            srv.server.listen(("127.0.0.1", 0))
    srv.server.stop()  # again, after serve() returned: harmless
    with pytest.raises(pulse.ServerStateError, match="already"):
        srv.server.serve()


def test_serve_without_address() -> None:
    with pytest.raises(pulse.ServerStateError, match="nothing to serve"):
        pulse.Server(pulse.Handler()).serve()


def test_stop_before_serve_returns_at_once() -> None:
    server = pulse.Server(pulse.Handler())
    server.listen(("127.0.0.1", 0))
    server.stop()
    started = time.monotonic()
    server.serve()
    assert time.monotonic() - started < 5


def test_stop_from_inside_a_callback() -> None:
    holder: List[pulse.Server] = []
    closes: List[Optional[BaseException]] = []

    class Stopper(pulse.Handler):
        def on_data(self, conn: pulse.Conn, data: bytes) -> None:
            conn.write(data)
            holder[0].stop()

        def on_close(self, conn: pulse.Conn, err: Optional[BaseException]) -> None:
            closes.append(err)

    srv = ServerThread(Stopper())
    holder.append(srv.server)
    with no_leaks():
        srv.thread.start()
        assert srv.server.wait_started(10)
        sock = srv.connect()
        sock.sendall(b"stop please")
        assert recv_exactly(sock, 11, time.monotonic() + 10) == b"stop please"
        srv.thread.join(10)
        assert not srv.thread.is_alive()
        sock.close()
    assert closes == [None]


def test_session_and_addresses() -> None:
    seen = {}

    class Info(pulse.Handler):
        def on_open(self, conn: pulse.Conn) -> None:
            conn.set_session({"n": 0})
            seen["local"] = conn.local_address
            seen["remote"] = conn.remote_address
            seen["fileno"] = conn.fileno()

        def on_data(self, conn: pulse.Conn, data: bytes) -> None:
            conn.get_session()["n"] += len(data)
            conn.write(str(conn.session["n"]).encode())

    with ServerThread(Info()) as srv:
        sock = srv.connect()
        sock.sendall(b"12345")
        assert recv_exactly(sock, 1, time.monotonic() + 10) == b"5"
        assert seen["local"] == srv.address
        assert seen["remote"] == sock.getsockname()
        assert seen["fileno"] > 2
        sock.close()


def test_write_rejects_non_bytes() -> None:
    errors: List[BaseException] = []

    class Bad(pulse.Handler):
        def on_data(self, conn: pulse.Conn, data: bytes) -> None:
            for value in ("text", 42, None):
                try:
                    conn.write(value)
                except TypeError as exc:
                    errors.append(exc)
            conn.write(bytearray(b"ok:"))
            conn.write(memoryview(b"done"))

    with ServerThread(Bad()) as srv:
        sock = srv.connect()
        sock.sendall(b"x")
        assert recv_exactly(sock, 7, time.monotonic() + 10) == b"ok:done"
        sock.close()
    assert len(errors) == 3
    assert all("bytes" in str(e) for e in errors)


def test_writes_from_foreign_threads_keep_order() -> None:
    conns: List[pulse.Conn] = []

    class Keep(pulse.Handler):
        def on_open(self, conn: pulse.Conn) -> None:
            conns.append(conn)

    with ServerThread(Keep()) as srv:
        sock = srv.connect()
        wait_for(lambda: conns, 10, "on_open")
        expected = b"".join(b"%06d" % i for i in range(5000))

        def writer() -> None:
            for i in range(5000):
                conns[0].write(b"%06d" % i)
            conns[0].close()
        thread = threading.Thread(target=writer)
        thread.start()
        got = recv_exactly(sock, len(expected), time.monotonic() + 20)
        thread.join(10)
        assert got == expected
        sock.close()


def test_sys_layer_reports_eagain_as_none() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        assert _sys.recv_into(a.fileno(), bytearray(10)) is None
        assert _sys.send(b.fileno(), b"hello") == 5
        assert _sys.recv(a.fileno(), 10) == b"hello"
        assert _sys.writev(b.fileno(), [b"ab", bytearray(b"cd"), memoryview(b"ef")]) == 6
        buf = bytearray(10)
        assert _sys.recv_into(a.fileno(), buf) == 6 and bytes(buf[:6]) == b"abcdef"
        with pytest.raises(OSError) as info:
            _sys.send(-1, b"x")
        assert info.value.errno == 9
        poller = _sys.Poller()
        # Each backend speaks its own masks: EPOLLIN, EVFILT_READ, EVENT_READ.
        readable = {"epoll": "EPOLLIN", "kqueue": "EVFILT_READ", "portable": "EVENT_READ"}
        mask = getattr(_sys.backend, readable[_sys.BACKEND])
        poller.register(a.fileno(), mask)
        assert poller.poll(0) == []
        _sys.send(b.fileno(), b"!")
        assert poller.poll(1) == [(a.fileno(), mask)]
        poller.unregister(a.fileno())
        poller.unregister(a.fileno())  # twice: ignored
        poller.close()
        assert _sys.BACKEND == (os.environ.get("PULSE_BACKEND") or _sys.native_backend())
    finally:
        a.close()
        b.close()


def test_remote_address_answers_in_on_close_after_a_reset() -> None:
    from support import hard_reset
    seen = []

    class Late(pulse.Handler):
        def on_close(self, conn: pulse.Conn, err: Optional[BaseException]) -> None:
            seen.append((conn.remote_address, err))
            try:
                _ = conn.local_address  # never read while open: a clear error, not EBADF
            except pulse.ConnClosedError as exc:
                seen.append(exc)

    with ServerThread(Late()) as srv:
        sock = srv.connect()
        name = sock.getsockname()
        time.sleep(0.05)
        hard_reset(sock)
        wait_for(lambda: len(seen) == 2, 10, "on_close")
    assert seen[0][0] == name
    assert isinstance(seen[0][1], ConnectionResetError)
    assert "local address" in str(seen[1])


@pytest.mark.parametrize("task_type", ["loop", "pool"])
def test_wait_started_means_the_loop_runs(task_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``wait_started()`` returns once the loop iterates, with every fd of a
    running server open (the signal wake-up pair of ``run()`` in the main
    thread).  It used to return before ``run()`` was entered: the fault
    suite's fd baseline, taken right after it, then missed those two fds and
    a reset storm looked like a leak (CI, 2026-12-02).  ``run()`` is slowed
    here so the old order shows every time."""
    from pulse.loop import EventLoop
    slow_run = EventLoop.run

    def run(self: EventLoop, *args: object, **kwargs: object) -> None:
        time.sleep(0.3)
        slow_run(self, *args, **kwargs)

    monkeypatch.setattr(EventLoop, "run", run)
    server = pulse.Server(pulse.Handler(), task_type=task_type)
    server.listen(("127.0.0.1", 0))
    counts: List[int] = []

    def watch() -> None:
        try:
            assert server.wait_started(10)
            counts.append(psutil.Process().num_fds())
            time.sleep(0.6)
            counts.append(psutil.Process().num_fds())
        finally:
            server.stop()

    watcher = threading.Thread(target=watch)
    watcher.start()
    server.serve()  # in the main thread, as `pulse serve` and the fault child do
    watcher.join(10)
    assert len(counts) == 2 and counts[0] == counts[1], counts
