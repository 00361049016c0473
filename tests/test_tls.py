"""TLS over pulse, driven by Python's ``ssl`` module as the peer.

Echo byte-exact from 1 B to 16 MiB over every trigger x task mode; mutual
TLS; a wrong host name on a dial; a plaintext client, a silent client and a
client that hangs up mid-handshake on the TLS port; 1,000 concurrent
handshakes; a slow reader over TLS; close_notify in both directions, a FIN
without it, ``write_eof``; the handler API on a TLS connection.  The
certificates are made at test time (``tls_support.py``).
"""

import logging
import selectors
import socket
import ssl
import threading
import time
from typing import Any, List, Optional

import pytest

import pulse
from support import MODE_IDS, MODES, ServerThread, no_leaks, pattern, recv_exactly, wait_for
from tls_support import TLSFiles, bio_handshake, client_context, server_context

SIZES = [1, 1024, 64 * 1024, 1024 * 1024, 16 * 1024 * 1024]


class Echo(pulse.Handler):
    """Echo, recording what the callbacks saw."""

    def __init__(self) -> None:
        self.opened: List[pulse.Conn] = []
        self.closed: List[Any] = []
        self.peer_certs: List[Any] = []
        self.lock = threading.Lock()

    def on_open(self, conn: pulse.Conn) -> None:
        obj = conn.ssl_object
        with self.lock:
            self.opened.append(conn)
            self.peer_certs.append(obj.getpeercert() if obj is not None else None)

    def on_data(self, conn: pulse.Conn, data: bytes) -> None:
        conn.write(data)

    def on_close(self, conn: pulse.Conn, err: Optional[BaseException]) -> None:
        with self.lock:
            self.closed.append((conn, err))


def tls_client(address: Any, files: TLSFiles, cert: bool = False,
               ragged: bool = True) -> ssl.SSLSocket:
    raw = socket.create_connection(address, timeout=30)
    return client_context(files, cert).wrap_socket(raw, server_hostname="localhost",
                                                   suppress_ragged_eofs=ragged)


def echo_through(sock: ssl.SSLSocket, payload: bytes, timeout: float = 60.0) -> bytes:
    """Send ``payload`` and read its echo at the same time, in this one thread.

    (Not a sender thread beside a reader: an ``SSLSocket`` is one OpenSSL
    object, which two threads must not drive at once.)  Non-blocking, with
    ``selectors``; the socket is blocking again afterwards.
    """
    sel = selectors.DefaultSelector()
    sock.setblocking(False)
    view = memoryview(payload)
    sent = 0
    chunks: List[bytes] = []
    got = 0
    deadline = time.monotonic() + timeout
    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    try:
        while got < len(payload):
            assert time.monotonic() < deadline, "echo: {} of {} bytes back".format(
                got, len(payload))
            want = selectors.EVENT_READ | (selectors.EVENT_WRITE if sent < len(payload) else 0)
            sel.modify(sock, want)
            if not sock.pending():
                sel.select(0.1)
            if sent < len(payload):
                try:
                    sent += sock.send(view[sent:sent + 256 * 1024])
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                    pass
            try:
                chunk = sock.recv(1 << 20)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                continue
            assert chunk, "EOF after {} of {} bytes".format(got, len(payload))
            chunks.append(chunk)
            got += len(chunk)
    finally:
        sel.close()
        sock.setblocking(True)
        sock.settimeout(30)
    return b"".join(chunks)


@pytest.mark.parametrize("trigger,task_type", MODES, ids=MODE_IDS)
def test_echo_every_size_every_mode(tls_files: TLSFiles, trigger: str, task_type: str) -> None:
    handler = Echo()
    with no_leaks():
        with ServerThread(handler, ssl=server_context(tls_files), trigger=trigger,
                          task_type=task_type) as srv:
            for index, size in enumerate(SIZES):
                payload = pattern(size, index)
                with tls_client(srv.address, tls_files) as sock:
                    got = echo_through(sock, payload)
                    assert got == payload, "echo of {} bytes differs".format(size)
            wait_for(lambda: len(handler.closed) == len(SIZES), what="every on_close")
    assert len(handler.opened) == len(SIZES)
    assert all(err is None for _, err in handler.closed), handler.closed


def test_mutual_tls_accepts_a_good_client_certificate_and_refuses_none(
        tls_files: TLSFiles) -> None:
    handler = Echo()
    context = server_context(tls_files, client_ca=tls_files.ca_cert)
    with ServerThread(handler, ssl=context) as srv:
        with tls_client(srv.address, tls_files, cert=True) as sock:
            assert echo_through(sock, b"with a certificate") == b"with a certificate"
        wait_for(lambda: len(handler.opened) == 1, what="on_open")
        subject = dict(item[0] for item in handler.peer_certs[0]["subject"])
        assert subject["commonName"] == "pulse test client"
        # Without a certificate: TLS 1.3 reports the refusal on the first read.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with tls_client(srv.address, tls_files) as sock:
                sock.sendall(b"no certificate")
                sock.recv(100)
        time.sleep(0.2)
        assert len(handler.opened) == 1, "on_open ran for a client without a certificate"


class Dialer(pulse.Handler):
    def __init__(self, message: bytes = b"") -> None:
        self.message = message
        self.opened = False
        self.data = b""
        self.result: List[Any] = []
        self.done = threading.Event()

    def on_open(self, conn: pulse.Conn) -> None:
        self.opened = True
        if self.message:
            conn.write(self.message)

    def on_data(self, conn: pulse.Conn, data: bytes) -> None:
        self.data += data
        if len(self.data) >= len(self.message):
            conn.close()

    def on_close(self, conn: pulse.Conn, err: Optional[BaseException]) -> None:
        self.result.append(err)
        self.done.set()


def test_dial_with_a_wrong_host_name_reports_the_verification_error(tls_files: TLSFiles) -> None:
    with ServerThread(Echo(), ssl=server_context(tls_files)) as srv:
        with pulse.Client() as client:
            dialer = Dialer(b"hello")
            conn = client.dial(srv.address, dialer, ssl=client_context(tls_files),
                               server_hostname="not-the-server.example")
            assert dialer.done.wait(10)
            assert not dialer.opened and not conn.opened
            assert isinstance(dialer.result[0], ssl.SSLCertVerificationError), dialer.result


def test_dial_writes_and_closes_before_the_handshake_in_order(tls_files: TLSFiles) -> None:
    """Writes and close() made while dialing wait for the connect and the handshake."""
    handler = Echo()
    got: List[bytes] = []
    done = threading.Event()

    class Reader(pulse.Handler):
        def on_data(self, conn: pulse.Conn, data: bytes) -> None:
            got.append(data)

        def on_close(self, conn: pulse.Conn, err: Optional[BaseException]) -> None:
            got.append(repr(err).encode())
            done.set()

    class Collect(Echo):
        def on_data(self, conn: pulse.Conn, data: bytes) -> None:
            got.append(data)

    with ServerThread(Collect(), ssl=server_context(tls_files)) as srv:
        with pulse.Client() as client:
            conn = client.dial(srv.address, Reader(), ssl=client_context(tls_files))
            parts = [pattern(100, 1), pattern(70000, 2), pattern(5, 3)]
            for part in parts:
                conn.write(part)
            conn.close()
            assert done.wait(10)
            wait_for(lambda: b"".join(got[:-1]).startswith(b"".join(parts)), what="the writes")
    assert got[-1] == b"None"
    del handler


class HeldReplyRelay:
    """A TCP relay that forwards client -> server at once and server -> client
    only once ``release`` is set, so a test can choose when the server's
    handshake reply reaches the client."""

    def __init__(self, target: Any) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.target = target
        self.reply_seen = threading.Event()
        self.release = threading.Event()
        self.threads: List[threading.Thread] = []
        self._start(self._accept)

    def _start(self, fn: Any, *args: Any) -> None:
        thread = threading.Thread(target=fn, args=args, daemon=True)
        thread.start()
        self.threads.append(thread)

    def _accept(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(self.target, timeout=10)
        self._start(self._pump, client, server, False)
        self._pump(server, client, True)

    def _pump(self, src: socket.socket, dst: socket.socket, held: bool) -> None:
        src.settimeout(10)
        try:
            while True:
                data = src.recv(65536)
                if held:
                    self.reply_seen.set()
                    self.release.wait(10)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
        except OSError:
            return

    def close(self) -> None:
        self.release.set()
        self.listener.close()


def test_writes_and_close_from_a_thread_racing_the_handshakes_end_keep_their_order(
        tls_files: TLSFiles) -> None:
    """close() from another thread, behind writes that the loop has not run
    yet, while the handshake completes: the writes go first (the loop once
    acted on close()'s cross-thread flag at the handshake's end, sent
    close_notify, and the queued writes then failed with PROTOCOL_IS_SHUTDOWN)."""
    got: List[bytes] = []
    closed: List[Optional[BaseException]] = []
    done = threading.Event()

    class Collect(Echo):
        def on_data(self, conn: pulse.Conn, data: bytes) -> None:
            got.append(data)

    class Reader(pulse.Handler):
        def on_close(self, conn: pulse.Conn, err: Optional[BaseException]) -> None:
            closed.append(err)
            done.set()

    parts = [pattern(100, 1), pattern(70000, 2)]
    with ServerThread(Collect(), ssl=server_context(tls_files)) as srv:
        relay = HeldReplyRelay(srv.address)
        try:
            with pulse.Client() as client:
                conn = client.dial(relay.address, Reader(), ssl=client_context(tls_files))
                assert relay.reply_seen.wait(10), "the server never answered the ClientHello"
                # Hold the loop in a callback, let the reply land in the
                # client's socket, then queue the writes and the close: the
                # next iteration reads the reply (the handshake ends) before
                # it runs the queued calls.
                blocked, go = threading.Event(), threading.Event()
                client.loop.call_soon_threadsafe(lambda: (blocked.set(), go.wait(10)))
                assert blocked.wait(10)
                relay.release.set()
                time.sleep(0.2)
                for part in parts:
                    conn.write(part)
                conn.close()
                go.set()
                assert done.wait(10)
                assert closed == [None]
                wait_for(lambda: b"".join(got) == b"".join(parts), what="the writes")
        finally:
            relay.close()


def test_plaintext_client_on_the_tls_port_is_closed_and_the_server_keeps_serving(
        tls_files: TLSFiles, caplog: pytest.LogCaptureFixture) -> None:
    handler = Echo()
    with ServerThread(handler, ssl=server_context(tls_files), log_level="DEBUG") as srv:
        with caplog.at_level(logging.DEBUG, logger="pulse"):
            with socket.create_connection(srv.address, timeout=10) as plain:
                plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                plain.settimeout(10)
                reply = b""
                while True:  # the alert, then EOF: a clean close, not a hang
                    chunk = plain.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
            wait_for(lambda: any("TLS handshake with" in r.getMessage() for r in caplog.records),
                     what="the debug line")
        lines = [r for r in caplog.records if "TLS handshake with" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.DEBUG
        assert "127.0.0.1" in lines[0].getMessage()
        with tls_client(srv.address, tls_files) as sock:
            assert echo_through(sock, b"still serving") == b"still serving"
    assert len(handler.opened) == 1 and len(handler.closed) == 1


def test_silent_client_is_closed_at_the_handshake_timeout(tls_files: TLSFiles) -> None:
    handler = Echo()
    with ServerThread(handler, ssl=server_context(tls_files), ssl_handshake_timeout=0.5) as srv:
        with socket.create_connection(srv.address, timeout=10) as silent:
            start = time.monotonic()
            silent.settimeout(10)
            assert silent.recv(100) == b""
            took = time.monotonic() - start
        assert 0.4 < took < 5, took
        # A client that starts the handshake and hangs up mid-way: closed, no callback.
        with socket.create_connection(srv.address, timeout=10) as half:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            obj = client_context(tls_files).wrap_bio(incoming, outgoing,
                                                      server_hostname="localhost")
            with pytest.raises(ssl.SSLWantReadError):
                obj.do_handshake()
            half.sendall(outgoing.read())
            half.recv(100)  # the server's first flight
    time.sleep(0.3)
    assert handler.opened == [] and handler.closed == []


def test_a_thousand_concurrent_handshakes(tls_files: TLSFiles) -> None:
    """1,000 pulse TLS dials against a pulse TLS server at once, each echoed."""
    count = 1000
    handler = Echo()
    with no_leaks(settle=10):
        with ServerThread(handler, ssl=server_context(tls_files), backlog=2048) as srv:
            done = threading.Semaphore(0)
            results: List[Any] = []

            class One(Dialer):
                def on_close(self, conn: pulse.Conn, err: Optional[BaseException]) -> None:
                    results.append((self.data == self.message, err))
                    done.release()

            with pulse.Client() as client:
                context = client_context(tls_files)
                for index in range(count):
                    client.dial(srv.address, One(b"handshake %d" % index), ssl=context,
                                timeout=60)
                deadline = time.monotonic() + 120
                for _ in range(count):
                    assert done.acquire(timeout=max(0.1, deadline - time.monotonic())), \
                        "{} of {} finished".format(len(results), count)
            assert results == [(True, None)] * count, [r for r in results if r != (True, None)][:5]
            wait_for(lambda: len(handler.closed) == count, timeout=30, what="server on_close")


def test_slow_reader_keeps_the_backlog_bounded(tls_files: TLSFiles) -> None:
    """A client that sends much and reads nothing: the echo's backlog (ciphertext)
    stays near the high-water mark because reading stops, as without TLS."""
    peak = [0]

    class Watch(Echo):
        def on_data(self, conn: pulse.Conn, data: bytes) -> None:
            conn.write(data)
            peak[0] = max(peak[0], conn.write_buffer_size)

    with ServerThread(Watch(), ssl=server_context(tls_files)) as srv:
        sock = tls_client(srv.address, tls_files)
        sock.setblocking(False)
        chunk = b"x" * 65536
        sent = 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and sent < 512 * 1024 * 1024:
            try:
                sent += sock.send(chunk)
            except (ssl.SSLWantWriteError, BlockingIOError):
                time.sleep(0.01)
        sock.close()
    assert sent > 1024 * 1024, "the test did not push enough ({} bytes)".format(sent)
    assert peak[0] < 4 * 1024 * 1024, "backlog reached {} bytes after {} sent".format(
        peak[0], sent)


def test_close_sends_close_notify_after_the_backlog(tls_files: TLSFiles) -> None:
    big = pattern(3 * 1024 * 1024, 9)

    class Reply(Echo):
        def on_data(self, conn: pulse.Conn, data: bytes) -> None:
            conn.write(big)
            conn.close()

    handler = Reply()
    with ServerThread(handler, ssl=server_context(tls_files)) as srv:
        with tls_client(srv.address, tls_files, ragged=False) as sock:
            sock.sendall(b"go")
            got = recv_exactly(sock, len(big), time.monotonic() + 30)
            assert got == big
            assert sock.recv(100) == b""  # close_notify: with ragged EOFs refused, no error
        wait_for(lambda: handler.closed, what="on_close")
    assert handler.closed[0][1] is None


def test_peer_close_notify_fin_without_it_and_a_cut_record(tls_files: TLSFiles) -> None:
    handler = Echo()
    with ServerThread(handler, ssl=server_context(tls_files)) as srv:
        # 1. close_notify, then FIN: a clean EOF.
        with tls_client(srv.address, tls_files) as sock:
            assert echo_through(sock, b"one") == b"one"
            sock.unwrap().close()
        wait_for(lambda: len(handler.closed) == 1, what="on_close 1")
        conn, err = handler.closed[0]
        assert err is None and not conn.tls_truncated
        # 2. FIN between records, no close_notify: EOF, truncation noted, no error.
        raw = socket.create_connection(srv.address, timeout=10)
        sock = client_context(tls_files).wrap_socket(raw, server_hostname="localhost")
        assert echo_through(sock, b"two") == b"two"
        raw_fd = socket.socket(fileno=sock.detach())
        raw_fd.shutdown(socket.SHUT_WR)
        wait_for(lambda: len(handler.closed) == 2, what="on_close 2")
        raw_fd.close()
        conn, err = handler.closed[1]
        assert err is None and conn.tls_truncated
        # 3. FIN in the middle of a record: the end of the data was lost.
        with socket.create_connection(srv.address, timeout=10) as raw3:
            obj, _, outgoing = bio_handshake(raw3, tls_files)
            obj.write(b"three, cut short")
            record = outgoing.read()
            raw3.sendall(record[:-4])
            raw3.shutdown(socket.SHUT_WR)
            wait_for(lambda: len(handler.closed) == 3, what="on_close 3")
        conn, err = handler.closed[2]
        assert isinstance(err, ssl.SSLEOFError), err


def test_write_eof_sends_close_notify_and_keeps_reading(tls_files: TLSFiles) -> None:
    received: List[bytes] = []

    class HalfClose(Echo):
        def on_data(self, conn: pulse.Conn, data: bytes) -> None:
            received.append(data)
            if data == b"first":
                conn.write(b"bye")
                conn.write_eof()
                with pytest.raises(pulse.ConnClosedError):
                    conn.write(b"more")

    handler = HalfClose()
    with ServerThread(handler, ssl=server_context(tls_files)) as srv:
        with tls_client(srv.address, tls_files, ragged=False) as sock:
            sock.sendall(b"first")
            assert recv_exactly(sock, 3, time.monotonic() + 10) == b"bye"
            assert sock.recv(10) == b""  # close_notify
            sock.sendall(b"second")  # our side is still open, and the server reads on
            wait_for(lambda: b"second" in received, what="data after write_eof")
            sock.unwrap()
        wait_for(lambda: handler.closed, what="on_close")
    assert handler.closed[0][1] is None


def test_alpn_version_cipher_and_the_api_on_a_tls_connection(tls_files: TLSFiles) -> None:
    seen: List[Any] = []

    class Info(Echo):
        def on_open(self, conn: pulse.Conn) -> None:
            obj = conn.ssl_object
            assert obj is not None
            seen.append((obj.selected_alpn_protocol(), obj.version(), obj.cipher()[0]))
            conn.set_deadline(30)
            conn.call_later(0.01, conn.write, b"timer ")

    context = server_context(tls_files, alpn=["h2", "http/1.1"])
    with ServerThread(Info(), ssl=context, task_type="pool") as srv:
        client = client_context(tls_files)
        client.set_alpn_protocols(["http/1.1"])
        raw = socket.create_connection(srv.address, timeout=10)
        with client.wrap_socket(raw, server_hostname="localhost") as sock:
            assert recv_exactly(sock, 6, time.monotonic() + 10) == b"timer "
            assert echo_through(sock, b"x") == b"x"
            assert sock.selected_alpn_protocol() == "http/1.1"
    assert seen[0][0] == "http/1.1" and seen[0][1] in ("TLSv1.2", "TLSv1.3")


def test_bad_arguments() -> None:
    # (Explicitly PROTOCOL_TLS_CLIENT: PyPy's create_default_context() makes a
    # context of either side.)
    client_side = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with pytest.raises(TypeError, match="ssl must be an ssl.SSLContext"):
        pulse.Server(Echo(), ssl="cert.pem")
    with pytest.raises(ValueError, match="server-side SSLContext"):
        pulse.Server(Echo(), ssl=client_side)
    with pulse.Client() as client:
        with pytest.raises(ValueError, match="client-side SSLContext"):
            client.dial("127.0.0.1:9", Echo(), ssl=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        with pytest.raises(ValueError, match="server_hostname is only for a TLS dial"):
            client.dial("127.0.0.1:9", Echo(), server_hostname="x")
        with pytest.raises(ValueError, match="needs server_hostname"):
            client.dial("unix:/tmp/nothing-here", Echo(), ssl=client_side)


def test_half_open_after_the_peers_close_notify(tls_files: TLSFiles) -> None:
    """The peer's close_notify is its EOF: a handler that keeps the connection
    open (``on_eof`` returns True) still writes, then closes."""

    class Late(Echo):
        def on_data(self, conn: pulse.Conn, data: bytes) -> None:
            self.got = getattr(self, "got", b"") + data

        def on_eof(self, conn: pulse.Conn) -> bool:
            conn.write(b"after your EOF: " + self.got)
            conn.close()
            return True

    handler = Late()
    with ServerThread(handler, ssl=server_context(tls_files)) as srv:
        with socket.create_connection(srv.address, timeout=10) as raw:
            obj, incoming, outgoing = bio_handshake(raw, tls_files)
            obj.write(b"request")
            with pytest.raises(ssl.SSLWantReadError):
                obj.unwrap()  # our close_notify; the connection stays up
            raw.sendall(outgoing.read())
            reply = b""
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                chunk = raw.recv(65536)
                if not chunk:
                    break
                incoming.write(chunk)
                try:
                    while True:
                        data = obj.read(65536)
                        if not data:
                            break
                        reply += data
                except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                    pass
        assert reply == b"after your EOF: request"
        wait_for(lambda: handler.closed, what="on_close")
    assert handler.closed[0][1] is None and not handler.closed[0][0].tls_truncated


def test_zero_copy_echo_over_tls(tls_files: TLSFiles) -> None:
    payload = pattern(2 * 1024 * 1024, 77)
    with ServerThread(Echo(), ssl=server_context(tls_files), zero_copy=True) as srv:
        with tls_client(srv.address, tls_files) as sock:
            assert echo_through(sock, payload) == payload
