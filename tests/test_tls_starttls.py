"""STARTTLS: ``conn.start_tls`` upgrades a plain connection in every task mode.

The client pipelines: its TLS hello follows the upgrade command in the same
segment, or right behind it while the handler is still busy with the
command (so it waits, read, in the workers' queue).  No byte may be lost or
read as plaintext, and a pause made before the upgrade stays in force.
"""

import socket
import ssl
import threading
import time
from typing import Any, List, Optional, Tuple

import pytest

import pulse
from support import MODE_IDS, MODES, ServerThread, no_leaks, wait_for
from tls_support import TLSFiles, client_context, server_context


class StartTLS(pulse.Handler):
    """Plain lines until ``STARTTLS``; then TLS, echoing."""

    def __init__(self, context: ssl.SSLContext, delay: float = 0.0,
                 pause: bool = False) -> None:
        self.context = context
        self.delay = delay
        self.pause = pause
        self.upgraded: List[bool] = []  # reading_paused as seen in on_start_tls
        self.data: List[Tuple[float, bytes]] = []
        self.closed: List[Any] = []
        self.resumed_at = [0.0]

    def on_data(self, conn: pulse.Conn, data: bytes) -> None:
        if conn.ssl_object is None and not self.upgraded:
            line, _, rest = data.partition(b"\r\n")
            assert line == b"STARTTLS", data
            conn.write(b"OK\r\n")
            if self.pause:
                conn.pause_reading()
            if self.delay:
                time.sleep(self.delay)  # the hello arrives meanwhile, and waits
            conn.start_tls(self.context, server_side=True, buffered=rest)
            self.upgraded.append(False)
            return
        self.data.append((time.monotonic(), data))
        conn.write(data)

    def on_start_tls(self, conn: pulse.Conn) -> None:
        self.upgraded[-1] = conn.reading_paused
        if self.pause:
            def resume() -> None:
                self.resumed_at[0] = time.monotonic()
                conn.resume_reading()
            conn.call_later(0.3, resume)

    def on_close(self, conn: pulse.Conn, err: Optional[BaseException]) -> None:
        self.closed.append(err)


def upgrade_client(address: Any, files: TLSFiles, split: bool) -> Tuple[socket.socket, Any]:
    """Send ``STARTTLS`` and the TLS hello pipelined; finish the handshake."""
    sock = socket.create_connection(address, timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_context(files).wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    if split:
        sock.sendall(b"STARTTLS\r\n")
        time.sleep(0.05)
        sock.sendall(hello)
    else:
        sock.sendall(b"STARTTLS\r\n" + hello)
    reply = b""
    while b"\r\n" not in reply:
        chunk = sock.recv(65536)
        assert chunk, "closed before the OK"
        reply += chunk
    line, _, rest = reply.partition(b"\r\n")
    assert line == b"OK"
    incoming.write(rest)
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            out = outgoing.read()
            if out:
                sock.sendall(out)
            chunk = sock.recv(65536)
            assert chunk, "closed during the handshake"
            incoming.write(chunk)
    sock.sendall(outgoing.read())
    return sock, (obj, incoming, outgoing)


def tls_echo(sock: socket.socket, tls: Any, message: bytes) -> bytes:
    obj, incoming, outgoing = tls
    obj.write(message)
    sock.sendall(outgoing.read())
    got = b""
    deadline = time.monotonic() + 10
    while len(got) < len(message):
        assert time.monotonic() < deadline
        try:
            got += obj.read(65536)
            continue
        except ssl.SSLWantReadError:
            pass
        chunk = sock.recv(65536)
        assert chunk, "closed before the echo"
        incoming.write(chunk)
    return got


@pytest.mark.parametrize("split", [False, True], ids=["one-segment", "two-segments"])
@pytest.mark.parametrize("trigger,task_type", MODES, ids=MODE_IDS)
def test_starttls_with_the_hello_pipelined(tls_files: TLSFiles, trigger: str, task_type: str,
                                           split: bool) -> None:
    handler = StartTLS(server_context(tls_files), delay=0.2 if split else 0.0)
    with no_leaks():
        with ServerThread(handler, trigger=trigger, task_type=task_type) as srv:
            sock, tls = upgrade_client(srv.address, tls_files, split)
            with sock:
                assert tls_echo(sock, tls, b"secret one") == b"secret one"
                assert tls_echo(sock, tls, b"x" * 100000) == b"x" * 100000
            wait_for(lambda: handler.closed, what="on_close")
    assert handler.upgraded == [False]
    assert b"".join(data for _, data in handler.data) == b"secret one" + b"x" * 100000


@pytest.mark.parametrize("task_type", ["loop", "pool"])
def test_starttls_keeps_the_pause(tls_files: TLSFiles, task_type: str) -> None:
    """pause_reading() before start_tls: the handshake still runs, the data
    waits until resume_reading()."""
    handler = StartTLS(server_context(tls_files), pause=True)
    with ServerThread(handler, task_type=task_type) as srv:
        sock, tls = upgrade_client(srv.address, tls_files, split=False)
        with sock:
            assert tls_echo(sock, tls, b"after the pause") == b"after the pause"
    assert handler.upgraded == [True], "the pause was lost across start_tls"
    assert handler.data[0][0] >= handler.resumed_at[0] > 0, "data came before resume_reading()"


def test_start_tls_refuses_bad_calls(tls_files: TLSFiles) -> None:
    errors: List[BaseException] = []
    done = threading.Event()

    class Bad(pulse.Handler):
        def on_open(self, conn: pulse.Conn) -> None:
            for call in (lambda: conn.start_tls("not a context"),
                         lambda: conn.start_tls(ssl.create_default_context(), server_side=False),
                         lambda: conn.start_tls(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT),
                                                server_side=True)):
                try:
                    call()
                except (TypeError, ValueError) as exc:
                    errors.append(exc)
            conn.start_tls(server_context(tls_files), server_side=True)
            try:
                conn.start_tls(server_context(tls_files), server_side=True)
            except ValueError as exc:
                errors.append(exc)
            conn.close()
            done.set()

    with ServerThread(Bad()) as srv:
        with socket.create_connection(srv.address, timeout=10):
            assert done.wait(10)
    messages = [str(e) for e in errors]
    assert len(messages) == 4, messages
    assert "ssl.SSLContext" in messages[0] and "server_hostname" in messages[1]
    assert "server-side" in messages[2] and "already speaks TLS" in messages[3]
