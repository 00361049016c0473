"""TLS on the unlucky paths: a reset in the middle of a large TLS write, and
a dial whose handshake never ends (a silent server) aborted, given a
deadline, timed out, paused and resumed, or cut short by the client's stop,
each from another thread.

Expected everywhere: ``on_close`` exactly once with the error that says what
happened, no ``on_open`` for a handshake that never completed, no fd left
behind, the loop still serving.  127.0.0.1 only; every wait bounded.
"""

import selectors
import socket
import threading
import time
from typing import Any, Iterator, List, Optional

import pytest

import pulse
from support import MODE_IDS, MODES, ServerThread, hard_reset, no_leaks, pattern, wait_for
from tls_support import TLSFiles, client_context, server_context


class Recorder(pulse.Handler):
    """Counts the callbacks of dialed connections."""

    def __init__(self, message: bytes = b"") -> None:
        self.message = message
        self.opens = 0
        self.data = b""
        self.closes: List[Optional[BaseException]] = []
        self.closed_at = 0.0
        self.done = threading.Event()

    def on_open(self, conn: pulse.Conn) -> None:
        self.opens += 1
        if self.message:
            conn.write(self.message)

    def on_data(self, conn: pulse.Conn, data: bytes) -> None:
        self.data += data

    def on_close(self, conn: pulse.Conn, err: Optional[BaseException]) -> None:
        self.closes.append(err)
        self.closed_at = time.monotonic()
        self.done.set()


@pytest.fixture
def silent_server() -> Iterator[Any]:
    """A TCP listener that accepts and never says a word: a TLS handshake
    with it never completes.  It reads and drops what comes, and closes its
    side once the client's is gone (so a test's fd count sees only pulse)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            for key, _ in sel.select(0.05):
                sock = key.fileobj
                if sock is listener:
                    peer, _ = listener.accept()
                    sel.register(peer, selectors.EVENT_READ)
                    continue
                try:
                    data = sock.recv(65536)  # type: ignore[union-attr]
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(sock)
                    sock.close()  # type: ignore[union-attr]

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()
    finally:
        stop.set()
        thread.join(5)
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()


# -- a reset in the middle of a large TLS write ---------------------------------------


class Blast(pulse.Handler):
    """Writes 8 MiB over TLS as soon as the handshake completed."""

    def __init__(self) -> None:
        self.opens = 0
        self.closes: List[Optional[BaseException]] = []
        self.lock = threading.Lock()

    def on_open(self, conn: pulse.Conn) -> None:
        with self.lock:
            self.opens += 1
        conn.write(pattern(8 * 1024 * 1024, 7))

    def on_data(self, conn: pulse.Conn, data: bytes) -> None:
        conn.write(data)

    def on_close(self, conn: pulse.Conn, err: Optional[BaseException]) -> None:
        with self.lock:
            self.closes.append(err)


@pytest.mark.parametrize("trigger,task_type", MODES, ids=MODE_IDS)
def test_reset_in_the_middle_of_a_tls_write(tls_files: TLSFiles, trigger: str,
                                            task_type: str) -> None:
    handler = Blast()
    with no_leaks():
        with ServerThread(handler, ssl=server_context(tls_files), trigger=trigger,
                          task_type=task_type) as srv:
            for _ in range(3):
                raw = socket.create_connection(srv.address, timeout=10)
                sock = client_context(tls_files).wrap_socket(raw, server_hostname="localhost")
                got = 0
                while got < 100000:  # part of the 8 MiB: the rest is in flight
                    chunk = sock.recv(65536)
                    assert chunk
                    got += len(chunk)
                hard_reset(sock)
            wait_for(lambda: len(handler.closes) == 3, what="every on_close")
            # Still serving TLS, byte-exact.
            raw = socket.create_connection(srv.address, timeout=10)
            with client_context(tls_files).wrap_socket(raw, server_hostname="localhost") as sock:
                want = pattern(8 * 1024 * 1024, 7)
                got_all = bytearray()
                while len(got_all) < len(want):
                    chunk = sock.recv(1 << 20)
                    assert chunk
                    got_all += chunk
                assert bytes(got_all) == want
            wait_for(lambda: len(handler.closes) == 4, what="the last on_close")
    assert handler.opens == 4
    assert all(isinstance(err, (ConnectionResetError, BrokenPipeError))
               for err in handler.closes[:3]), handler.closes


# -- a dial whose handshake never completes ------------------------------------------


def test_abort_from_another_thread_during_the_handshake(tls_files: TLSFiles,
                                                        silent_server: Any) -> None:
    with no_leaks():
        with pulse.Client() as client:
            rec = Recorder(b"never sent")
            conn = client.dial(silent_server, rec, ssl=client_context(tls_files),
                               server_hostname="localhost")
            conn.write(b"queued before the handshake")
            time.sleep(0.2)  # connected, ClientHello sent, no answer
            started = time.monotonic()
            conn.abort()
            assert rec.done.wait(5)
            assert rec.closed_at - started < 1.0
            time.sleep(0.1)
    assert rec.opens == 0 and len(rec.closes) == 1, (rec.opens, rec.closes)
    assert rec.closes == [None]  # abort(err) hands on_close ``err``


def test_deadline_during_the_handshake(tls_files: TLSFiles, silent_server: Any) -> None:
    with no_leaks():
        with pulse.Client() as client:
            rec = Recorder()
            conn = client.dial(silent_server, rec, ssl=client_context(tls_files),
                               server_hostname="localhost")
            started = time.monotonic()
            conn.set_deadline(0.3)
            assert rec.done.wait(5)
            assert 0.2 < rec.closed_at - started < 2.0
    assert rec.opens == 0 and len(rec.closes) == 1
    assert isinstance(rec.closes[0], TimeoutError), rec.closes


def test_handshake_timeout_of_a_dial(tls_files: TLSFiles, silent_server: Any) -> None:
    with no_leaks():
        with pulse.Client(ssl_handshake_timeout=0.3) as client:
            rec = Recorder()
            started = time.monotonic()
            client.dial(silent_server, rec, ssl=client_context(tls_files),
                        server_hostname="localhost")
            assert rec.done.wait(5)
            assert 0.2 < rec.closed_at - started < 2.0
    assert rec.opens == 0 and len(rec.closes) == 1
    assert isinstance(rec.closes[0], TimeoutError) and "handshake" in str(rec.closes[0]), \
        rec.closes


def test_close_during_the_handshake_waits_for_it_and_stop_cuts_it(
        tls_files: TLSFiles, silent_server: Any) -> None:
    """``close()`` keeps the handshake going (what was written goes out once
    it completes); stopping the client does not wait for it: ``on_close``
    gets ``ConnectionAbortedError`` at once."""
    with no_leaks():
        client = pulse.Client()
        client.start()
        rec = Recorder()
        conn = client.dial(silent_server, rec, ssl=client_context(tls_files),
                           server_hostname="localhost")
        conn.write(b"after the handshake")
        conn.close()
        assert not rec.done.wait(0.5), "close() did not wait for the handshake"
        started = time.monotonic()
        client.stop()
        assert rec.done.wait(5)
        assert rec.closed_at - started < 2.0
    assert rec.opens == 0 and len(rec.closes) == 1
    assert isinstance(rec.closes[0], ConnectionAbortedError), rec.closes


class Echo(pulse.Handler):
    def on_data(self, conn: pulse.Conn, data: bytes) -> None:
        conn.write(data)


@pytest.mark.parametrize("task_type", ["loop", "pool", "thread"])
def test_pause_from_another_thread_during_the_handshake(tls_files: TLSFiles,
                                                        task_type: str) -> None:
    """A dial paused before its handshake completed still completes it (the
    handshake reads through a pause) and runs ``on_open``; the echo of what
    ``on_open`` wrote waits for ``resume_reading()``, then arrives whole."""
    message = pattern(50000, 3)
    with ServerThread(Echo(), ssl=server_context(tls_files)) as srv:
        with pulse.Client(task_type=task_type) as client:
            rec = Recorder(message)
            conn = client.dial(srv.address, rec, ssl=client_context(tls_files),
                               server_hostname="localhost")
            conn.pause_reading()
            wait_for(lambda: rec.opens == 1, what="on_open after the handshake")
            time.sleep(0.3)  # the echo is back in the socket by now
            assert rec.data == b"", "on_data ran while paused"
            conn.resume_reading()
            wait_for(lambda: len(rec.data) >= len(message), what="the echo after resume()")
            assert rec.data == message
            conn.close()
            assert rec.done.wait(5)
    assert rec.closes == [None]



def _tracked(chunks: List[bytes]) -> Any:
    """A ``TLS`` record tracker fed ``chunks`` as the socket delivered them."""
    from pulse.tls import TLS
    tracker = TLS.__new__(TLS)
    tracker._record_left = 0
    tracker._head = b""
    for chunk in chunks:
        tracker._track(memoryview(chunk))
    return tracker


def test_record_tracking_survives_every_split_of_the_stream() -> None:
    """The FIN rule (a record cut short -> SSLEOFError) follows record
    boundaries however the reads split the stream, a header included: a
    read that ended two bytes into a header once left the tracker three
    bytes ahead, so a clean FIN after a 16 MiB echo was reported as a cut
    record now and then."""
    stream = b"".join(bytes([23, 3, 3, n >> 8, n & 255]) + bytes(n) for n in (0, 1, 7, 300, 5))
    for i in range(len(stream) + 1):
        for j in range(i, min(len(stream), i + 12) + 1):
            tracker = _tracked([stream[:i], stream[i:j], stream[j:]])
            assert (tracker._record_left, tracker._head) == (0, b""), (i, j)
    for cut in range(1, 14):  # cut inside the last two records (the last is 10 bytes)
        short = stream[:-cut]
        tracker = _tracked([short[:3], short[3:-2], short[-2:]])
        cut_short = bool(tracker._record_left or tracker._head)
        assert cut_short == (cut != 10), cut
