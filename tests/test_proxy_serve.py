"""``Server(proxy_protocol=...)`` over real sockets: what the handler sees, what is refused.

A client on 127.0.0.1 plays the balancer: it sends a PROXY header (built by
``proxy_support``) and then its own bytes.  The handler greets with the
addresses it sees (``remote_address``, ``local_address``, ``proxy_address``,
``proxy_tlvs``) and echoes.  The basic case runs in every trigger x task
mode; the others check that the bytes after the header arrive exactly (in
the header's segment, after a header cut in pieces, under TLS), and that a
connection without a valid header (garbage, oversized, too slow, cut short
by a FIN, from an untrusted peer) is closed with no callback and one debug
line.  Every wait is bounded.
"""

import ast
import logging
import socket
import ssl
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest

import pulse
from proxy_support import SIGNATURE, v1, v2
from support import MODE_IDS, MODES, ServerThread, hard_reset, no_leaks, recv_exactly, wait_for
from tls_support import TLSFiles, client_context, server_context

pytestmark = pytest.mark.timeout(60)

CLIENT = ("203.0.113.7", 51234)  # TEST-NET-3: the client the balancer relays
SERVICE = ("198.51.100.2", 443)  # TEST-NET-2: the address the client dialed
CLIENT6 = ("2001:db8::7", 40000)
SERVICE6 = ("2001:db8::1", 8443)


class Greeter(pulse.Handler):
    """Greets with the addresses it sees (one line), then echoes; records callbacks."""

    def __init__(self) -> None:
        self.events: List[Tuple[str, Any]] = []
        self.lock = threading.Lock()

    def on_open(self, conn: pulse.Conn) -> None:
        seen = {"remote": conn.remote_address, "local": conn.local_address,
                "proxy": conn.proxy_address, "tlvs": conn.proxy_tlvs,
                "command": conn.proxy_header.command if conn.proxy_header else None}
        with self.lock:
            self.events.append(("open", seen))
        conn.write(repr(seen).encode() + b"\n")

    def on_data(self, conn: pulse.Conn, data: bytes) -> None:
        conn.write(data)

    def on_close(self, conn: pulse.Conn, err: Optional[BaseException]) -> None:
        with self.lock:
            self.events.append(("close", err))


def greeting(sock: Any, deadline: float) -> Dict[str, Any]:
    line = b""
    while not line.endswith(b"\n"):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(1)
        assert chunk, "closed before the greeting"
        line += chunk
    seen: Dict[str, Any] = ast.literal_eval(line.decode())
    return seen


def closed_by_server(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True once the server closed (EOF or reset) without sending a byte."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(100)
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    assert data == b"", "the server answered a refused connection: {!r}".format(data)
    return True


@pytest.mark.parametrize("trigger,task_type", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_handler_sees_the_carried_addresses(trigger: str, task_type: str,
                                                version: str) -> None:
    handler = Greeter()
    header = v1(CLIENT, SERVICE) if version == "v1" else v2(CLIENT, SERVICE, [(0xE0, b"id")])
    with no_leaks(), ServerThread(handler, trigger=trigger, task_type=task_type,
                                  proxy_protocol=True) as server:
        with server.connect() as sock:
            deadline = time.monotonic() + 10
            sock.sendall(header + b"hello")  # the client's bytes in the header's segment
            seen = greeting(sock, deadline)
            assert seen["remote"] == CLIENT and seen["local"] == SERVICE
            assert seen["proxy"] == sock.getsockname()  # the balancer: us
            assert seen["tlvs"] == ([] if version == "v1" else [(0xE0, b"id")])
            assert recv_exactly(sock, 5, deadline) == b"hello"
            sock.sendall(b" again")
            assert recv_exactly(sock, 6, deadline) == b" again"
        wait_for(lambda: len(handler.events) == 2, what="on_close")
    assert [kind for kind, _ in handler.events] == ["open", "close"]


@pytest.mark.parametrize("versions", [True, "v1", "v2"])
def test_ipv6_and_the_accepted_versions(versions: Any) -> None:
    handler = Greeter()
    with ServerThread(handler, proxy_protocol=versions) as server:
        for header, name in ((v1(CLIENT6, SERVICE6), "v1"), (v2(CLIENT6, SERVICE6), "v2")):
            with server.connect() as sock:
                sock.sendall(header)
                if versions in (True, name):
                    seen = greeting(sock, time.monotonic() + 10)
                    assert (seen["remote"], seen["local"]) == (CLIENT6, SERVICE6)
                else:
                    assert closed_by_server(sock)


@pytest.mark.parametrize("trigger,step", [("edge", 1), ("level", 7)])
def test_a_header_in_pieces_and_a_large_payload_in_its_segment(trigger: str, step: int) -> None:
    handler = Greeter()
    payload = bytes(range(256)) * 1024  # 256 KiB, the first part in the header's segment
    with ServerThread(handler, proxy_protocol=True, trigger=trigger) as server:
        for header in (v1(CLIENT, SERVICE), v2(CLIENT, SERVICE, [(0x02, b"example.org")] * 20)):
            with server.connect() as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for i in range(0, len(header) - 1, step):  # cut in pieces, sent apart
                    sock.sendall(header[i:min(i + step, len(header) - 1)])
                    time.sleep(0.001)
                sock.sendall(header[-1:] + payload)
                deadline = time.monotonic() + 20
                assert greeting(sock, deadline)["remote"] == CLIENT
                assert recv_exactly(sock, len(payload), deadline) == payload


class HeaderEcho(pulse.Handler):
    """Answers the header with itself (as the v1 line it was), then echoes;
    ``pause`` holds the rest of the header's segment for 50 ms."""

    def __init__(self, pause: bool) -> None:
        self.pause = pause
        self.closes: List[Optional[BaseException]] = []
        self.lock = threading.Lock()

    def on_open(self, conn: pulse.Conn) -> None:
        conn.write(v1(CLIENT, SERVICE))
        if self.pause:
            conn.pause_reading()
            conn.call_later(0.05, conn.resume_reading)

    def on_data(self, conn: pulse.Conn, data: Any) -> None:
        conn.write(bytes(data))

    def on_close(self, conn: pulse.Conn, err: Optional[BaseException]) -> None:
        with self.lock:
            self.closes.append(err)


def _send_then_fin(address: Tuple[str, int], message: bytes, errors: List[str]) -> None:
    """Send ``message`` and a FIN from one thread, read the echo to EOF in another."""
    try:
        with socket.create_connection(address, timeout=20) as sock:
            def send() -> None:
                sock.sendall(message)
                sock.shutdown(socket.SHUT_WR)
            sender = threading.Thread(target=send)
            sender.start()
            got = bytearray()
            while True:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                got += chunk
            sender.join(20)
            if bytes(got) != message:
                errors.append("{} of {} bytes, equal prefix: {}".format(
                    len(got), len(message), message.startswith(bytes(got))))
    except OSError as exc:
        errors.append(repr(exc))


@pytest.mark.parametrize("trigger,task_type,zero_copy",
                         [mode + (False,) for mode in MODES] + [("edge", "loop", True)],
                         ids=MODE_IDS + ["edge-loop-zero_copy"])
@pytest.mark.parametrize("pause", [False, True], ids=["", "paused"])
def test_every_byte_after_the_header_once_and_in_order(trigger: str, task_type: str,
                                                       zero_copy: bool, pause: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Header, 2 MiB and a FIN sent at once by 4 clients: the rest of the
    # header's segment goes through the gate, the bytes after it through the
    # arena and (large reads) direct reads, then on_eof and on_close.
    from pulse.loop import EventLoop
    direct = []
    read_direct = EventLoop._read_direct

    def counted(self: EventLoop, conn: Any, flags: int) -> None:
        direct.append(1)
        read_direct(self, conn, flags)
    monkeypatch.setattr(EventLoop, "_read_direct", counted)
    handler = HeaderEcho(pause)
    header = v1(CLIENT, SERVICE)
    messages = [header + bytes([i]) * 7 + bytes(range(256)) * 8192 for i in range(4)]
    errors: List[str] = []
    with no_leaks(), ServerThread(handler, proxy_protocol=True, trigger=trigger,
                                  task_type=task_type, zero_copy=zero_copy) as server:
        clients = [threading.Thread(target=_send_then_fin, args=(server.address, m, errors))
                   for m in messages]
        for client in clients:
            client.start()
        for client in clients:
            client.join(40)
        assert not errors, errors
        wait_for(lambda: len(handler.closes) == 4, what="every on_close")
    assert handler.closes == [None] * 4
    assert direct or zero_copy, "no direct read: the case was not exercised"


def test_local_and_unknown_keep_the_real_addresses() -> None:
    handler = Greeter()
    with ServerThread(handler, proxy_protocol=True) as server:
        for header, command in ((v2(command=0), "LOCAL"), (b"PROXY UNKNOWN\r\n", "PROXY"),
                                (v2(), "PROXY")):
            with server.connect() as sock:
                sock.sendall(header + b"x")
                seen = greeting(sock, time.monotonic() + 10)
                assert seen["remote"] == seen["proxy"] == sock.getsockname()
                assert seen["local"] == sock.getpeername() and seen["command"] == command
                assert recv_exactly(sock, 1, time.monotonic() + 10) == b"x"


@pytest.mark.parametrize("what,data", [
    ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("a TLS hello", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"),
    ("a bad v1 port", b"PROXY TCP4 1.2.3.4 5.6.7.8 080 80\r\n"),
    ("an oversized v2 header", SIGNATURE + b"\x21\x11\x20\x00" + b"\x00" * 100),
    ("a v1 line without CRLF", b"PROXY UNKNOWN " + b"a" * 200),
])
def test_a_bad_header_is_closed_without_callbacks(what: str, data: bytes,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    handler = Greeter()
    caplog.set_level(logging.DEBUG, logger="pulse")
    with ServerThread(handler, proxy_protocol=True) as server:
        with server.connect() as sock:
            sock.sendall(data)
            assert closed_by_server(sock), what
        wait_for(lambda: any("refused" in r.getMessage() for r in caplog.records))
    refused = [r for r in caplog.records if "PROXY protocol header" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.DEBUG, refused
    assert handler.events == []


def test_a_slow_or_cut_header_is_closed(caplog: pytest.LogCaptureFixture) -> None:
    handler = Greeter()
    caplog.set_level(logging.DEBUG, logger="pulse")
    with ServerThread(handler, proxy_protocol=True, proxy_protocol_timeout=0.3) as server:
        started = time.monotonic()
        with server.connect() as sock:
            sock.sendall(v2(CLIENT, SERVICE)[:20])  # a valid beginning, never finished
            assert closed_by_server(sock, 5.0)
        assert 0.25 < time.monotonic() - started < 3.0
        with server.connect() as sock:
            sock.sendall(b"PROXY TCP4 1.2.3.4")
            sock.shutdown(socket.SHUT_WR)  # a FIN before the CRLF
            assert closed_by_server(sock)
    messages = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(messages) == 2
    assert "proxy_protocol_timeout" in messages[0] and "before its PROXY" in messages[1]
    assert handler.events == []


@pytest.mark.parametrize("trigger,task_type", [("edge", "loop"), ("level", "pool")])
def test_a_reset_mid_header_is_one_debug_line_and_frees_its_slot(
        trigger: str, task_type: str, caplog: pytest.LogCaptureFixture) -> None:
    handler = Greeter()
    caplog.set_level(logging.DEBUG, logger="pulse")
    with no_leaks(), ServerThread(handler, proxy_protocol=True, max_connections=1,
                                  trigger=trigger, task_type=task_type) as server:
        loop = server.server.loop
        assert loop is not None
        sock = server.connect()
        sock.sendall(b"PROXY TCP4 1.2")
        wait_for(lambda: loop.connections == 1, what="the connection accepted")
        hard_reset(sock)
        wait_for(lambda: loop.occupied == 0, what="the slot freed")
        with server.connect() as sock:  # the one slot is free again
            sock.sendall(v1(CLIENT, SERVICE))
            assert greeting(sock, time.monotonic() + 10)["remote"] == CLIENT
    lines = [r for r in caplog.records if "PROXY protocol header" in r.getMessage()]
    # (It closed with no line at all: a reset is not the gate's refusal.)
    assert len(lines) == 1 and lines[0].levelno == logging.DEBUG, lines
    assert "before its PROXY protocol header was complete" in lines[0].getMessage()
    assert [kind for kind, _ in handler.events] == ["open", "close"]


def test_only_trusted_peers_may_send_headers(caplog: pytest.LogCaptureFixture) -> None:
    handler = Greeter()
    caplog.set_level(logging.DEBUG, logger="pulse")
    with ServerThread(handler, proxy_protocol=True,
                      proxy_protocol_trusted=["10.0.0.0/8", "192.168.0.0/16"]) as server:
        with server.connect() as sock:
            assert closed_by_server(sock)  # at once, before any byte is sent
    assert handler.events == []
    assert any("not in proxy_protocol_trusted" in r.getMessage() for r in caplog.records)
    with ServerThread(handler, proxy_protocol=True,
                      proxy_protocol_trusted="10.0.0.0/8, 127.0.0.0/8") as server:
        with server.connect() as sock:
            sock.sendall(v1(CLIENT, SERVICE))
            assert greeting(sock, time.monotonic() + 10)["remote"] == CLIENT


def test_stopping_with_a_header_pending_runs_no_callback() -> None:
    handler = Greeter()
    with no_leaks():
        server = ServerThread(handler, proxy_protocol=True)
        with server:
            sock = server.connect()
            sock.sendall(b"PROXY TCP4 ")
            loop = server.server.loop
            assert loop is not None
            wait_for(lambda: loop.connections == 1, what="the connection accepted")
        assert closed_by_server(sock)
        sock.close()
    assert handler.events == []


def tls_through(port: int, header: bytes, context: ssl.SSLContext, together: bool) -> Any:
    """Send ``header``, then a TLS handshake over the same socket: the
    ClientHello in its own segment, or (``together``) in the header's."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    if not together:
        raw.sendall(header)
        return context.wrap_socket(raw, server_hostname="localhost")
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    raw.sendall(header + outgoing.read())
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            if outgoing.pending:
                raw.sendall(outgoing.read())
            chunk = raw.recv(65536)
            assert chunk, "closed during the handshake"
            incoming.write(chunk)
    if outgoing.pending:
        raw.sendall(outgoing.read())
    return raw, obj, incoming, outgoing


@pytest.mark.parametrize("trigger,task_type", [("edge", "loop"), ("level", "pool"),
                                               ("edge", "thread")])
def test_tls_gets_exactly_the_bytes_after_the_header(tls_files: TLSFiles, trigger: str,
                                                     task_type: str) -> None:
    handler = Greeter()
    with ServerThread(handler, proxy_protocol=True, ssl=server_context(tls_files),
                      trigger=trigger, task_type=task_type) as server:
        port = server.address[1]
        context = client_context(tls_files)
        with tls_through(port, v2(CLIENT, SERVICE), context, together=False) as sock:
            deadline = time.monotonic() + 10
            assert greeting(sock, deadline)["remote"] == CLIENT
            sock.sendall(b"secret")
            assert recv_exactly(sock, 6, deadline) == b"secret"
        raw, obj, incoming, outgoing = tls_through(port, v1(CLIENT6, SERVICE6), context,
                                                   together=True)
        with raw:
            obj.write(b"ping")
            raw.sendall(outgoing.read())
            got = b""
            deadline = time.monotonic() + 10
            while not got.endswith(b"ping"):
                try:
                    got += obj.read(65536)
                except ssl.SSLWantReadError:
                    raw.settimeout(max(0.01, deadline - time.monotonic()))
                    chunk = raw.recv(65536)
                    assert chunk, "closed before the echo"
                    incoming.write(chunk)
            seen = ast.literal_eval(got[:got.index(b"\n")].decode())
            assert seen["remote"] == CLIENT6 and seen["proxy"] == raw.getsockname()
        wait_for(lambda: len(handler.events) == 4, what="both on_close")
    # (In thread mode the first on_close may run after the second on_open.)
    assert sorted(kind for kind, _ in handler.events) == ["close", "close", "open", "open"]


def test_a_bad_tls_hello_after_a_good_header_is_quiet_too(tls_files: TLSFiles) -> None:
    handler = Greeter()
    with ServerThread(handler, proxy_protocol=True, ssl=server_context(tls_files)) as server:
        with server.connect() as sock:
            sock.sendall(v1(CLIENT, SERVICE) + b"GET / HTTP/1.1\r\n\r\n")
            sock.settimeout(5)
            try:
                while sock.recv(4096):
                    pass  # OpenSSL's alert, then the close
            except ConnectionResetError:
                pass
    assert handler.events == []


class Upgrader(Greeter):
    """Speaks TLS from on_open on (``start_tls``): the server has no ``ssl=``."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__()
        self.context = context

    def on_open(self, conn: pulse.Conn) -> None:
        conn.start_tls(self.context, server_side=True)

    def on_start_tls(self, conn: pulse.Conn) -> None:
        super().on_open(conn)


@pytest.mark.parametrize("task_type", ["loop", "pool"])
def test_start_tls_in_on_open_gets_the_rest_of_the_header_segment(tls_files: TLSFiles,
                                                                   task_type: str) -> None:
    # The ClientHello in the header's segment is the rest that the gate holds
    # when on_open runs: it must go to the TLS that on_open started, not to
    # on_data (it did in loop mode, and the handshake never completed).
    handler = Upgrader(server_context(tls_files))
    with ServerThread(handler, proxy_protocol=True, task_type=task_type) as server:
        raw, obj, incoming, outgoing = tls_through(server.address[1], v1(CLIENT, SERVICE),
                                                   client_context(tls_files), together=True)
        with raw:
            got = b""
            deadline = time.monotonic() + 10
            while not got.endswith(b"\n"):
                try:
                    got += obj.read(65536)
                except ssl.SSLWantReadError:
                    raw.settimeout(max(0.01, deadline - time.monotonic()))
                    chunk = raw.recv(65536)
                    assert chunk, "closed before the greeting"
                    incoming.write(chunk)
            assert ast.literal_eval(got.decode())["remote"] == CLIENT


class Holder(Greeter):
    """Pauses in on_open, so the bytes after the header must wait for the resume."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: List[Any] = []

    def on_open(self, conn: pulse.Conn) -> None:
        conn.pause_reading()
        conn.call_later(0.2, conn.resume_reading)
        super().on_open(conn)

    def on_data(self, conn: pulse.Conn, data: Any) -> None:
        self.chunks.append(type(data))
        conn.write(bytes(data))


@pytest.mark.parametrize("zero_copy", [False, True])
def test_the_rest_of_the_segment_respects_a_pause_and_zero_copy(zero_copy: bool) -> None:
    handler = Holder()
    with ServerThread(handler, proxy_protocol=True, zero_copy=zero_copy) as server:
        with server.connect() as sock:
            sock.sendall(v2(CLIENT, SERVICE) + b"first bytes")
            deadline = time.monotonic() + 10
            assert greeting(sock, deadline)["remote"] == CLIENT
            started = time.monotonic()
            assert recv_exactly(sock, 11, deadline) == b"first bytes"
            assert time.monotonic() - started > 0.1  # held until resume_reading()
    assert handler.chunks[0] is bytes  # held data is always bytes
    handler = Holder()
    handler.on_open = Greeter.on_open.__get__(handler)  # type: ignore[method-assign]
    with ServerThread(handler, proxy_protocol=True, zero_copy=zero_copy) as server:
        with server.connect() as sock:
            sock.sendall(v1(CLIENT, SERVICE) + b"now")
            deadline = time.monotonic() + 10
            greeting(sock, deadline)
            assert recv_exactly(sock, 3, deadline) == b"now"
    assert handler.chunks[0] is (memoryview if zero_copy else bytes)


def test_an_on_open_that_raises_gets_its_on_close() -> None:
    class Raiser(Greeter):
        def on_open(self, conn: pulse.Conn) -> None:
            with self.lock:
                self.events.append(("open", None))
            raise RuntimeError("boom")

    handler = Raiser()
    with ServerThread(handler, proxy_protocol=True) as server:
        with server.connect() as sock:
            sock.sendall(v1(CLIENT, SERVICE) + b"data that must not reach on_data")
            assert closed_by_server(sock)
        wait_for(lambda: len(handler.events) == 2, what="on_close")
    assert handler.events[0][0] == "open"
    assert handler.events[1][0] == "close" and isinstance(handler.events[1][1], RuntimeError)


def test_refused_connections_free_their_slots() -> None:
    handler = Greeter()
    with ServerThread(handler, proxy_protocol=True, max_connections=2) as server:
        loop = server.server.loop
        assert loop is not None
        for _ in range(5):  # more refusals than slots: each gave its slot back
            with server.connect() as sock:
                sock.sendall(b"nope")
                assert closed_by_server(sock)
        wait_for(lambda: loop.occupied == 0, what="no connection left")
        with server.connect() as sock:
            sock.sendall(v1(CLIENT, SERVICE))
            assert greeting(sock, time.monotonic() + 10)["remote"] == CLIENT
    assert handler.events[0][0] == "open"


def test_the_options_are_checked() -> None:
    for bad, message in (("v3", "proxy_protocol must be"), (1, "proxy_protocol must be")):
        with pytest.raises(ValueError, match=message):
            pulse.Options(proxy_protocol=bad)
    with pytest.raises(ValueError, match="proxy_protocol_trusted needs proxy_protocol"):
        pulse.Options(proxy_protocol_trusted=["10.0.0.0/8"])
    with pytest.raises(ValueError, match="proxy_protocol_trusted: .*10.0.0.1/8"):
        pulse.Options(proxy_protocol=True, proxy_protocol_trusted=["10.0.0.1/8"])
    with pytest.raises(ValueError, match="proxy_protocol_trusted is empty"):
        pulse.Options(proxy_protocol=True, proxy_protocol_trusted=[])
    with pytest.raises(TypeError, match="proxy_protocol_trusted must"):
        pulse.Options(proxy_protocol=True, proxy_protocol_trusted=[10])
    with pytest.raises(ValueError, match="proxy_protocol_timeout must be >= 0"):
        pulse.Options(proxy_protocol=True, proxy_protocol_timeout=-1)
    options = pulse.Options(proxy_protocol="any", proxy_protocol_trusted="::1,10.0.0.0/8")
    assert options.proxy_protocol is True
    assert [str(n) for n in options.proxy_protocol_trusted or ()] == ["::1/128", "10.0.0.0/8"]
    # What the launcher hands its workers is accepted back as it is.
    assert pulse.Options(**options.as_dict()).proxy_protocol_trusted == \
        options.proxy_protocol_trusted
    assert pulse.Options().proxy_protocol is False


def _serve_in_thread(server: pulse.Server) -> threading.Thread:
    thread = threading.Thread(target=server.serve, name="pulse-test-proxy")
    thread.start()
    assert server.wait_started(10)
    return thread


def test_unix_and_ipv6_listeners(tmp_path: Any) -> None:
    handler = Greeter()
    path = str(tmp_path / "proxy.sock")
    # Unix peers are trusted whatever the list says (the socket's permissions
    # decide); an IPv6 peer is checked against the IPv6 networks.
    server = pulse.Server(handler, proxy_protocol=True, proxy_protocol_trusted=["::1/128"])
    server.listen("unix:" + path)
    try:
        port = server.listen(("::1", 0))[1]
    except OSError:
        port = 0  # no IPv6 loopback here
    thread = _serve_in_thread(server)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(v2(unix=(b"/run/front.sock", b"/run/back.sock")) + b"u")
            seen = greeting(sock, time.monotonic() + 10)
            assert seen["remote"] == "/run/front.sock" and seen["local"] == "/run/back.sock"
            assert seen["proxy"] == ""  # an unnamed Unix client
            assert recv_exactly(sock, 1, time.monotonic() + 10) == b"u"
        if port:
            with socket.create_connection(("::1", port), timeout=10) as sock:
                sock.sendall(v1(CLIENT, SERVICE))
                assert greeting(sock, time.monotonic() + 10)["remote"] == CLIENT
    finally:
        server.stop()
        thread.join(15)
    assert not thread.is_alive()


def test_trust_rules() -> None:
    from pulse.proxy_gate import is_trusted, parse_networks
    networks = parse_networks("10.0.0.0/8, 2001:db8::/32,")
    assert networks is not None and len(networks) == 2
    assert is_trusted(("10.1.2.3", 1), networks)
    assert is_trusted(("::ffff:10.1.2.3", 1), networks)  # a dual-stack socket's IPv4 peer
    assert is_trusted(("2001:db8::9%eth0", 1), networks)  # the zone is not part of it
    assert not is_trusted(("11.0.0.1", 1), networks)
    assert not is_trusted(("::1", 1), networks)
    assert is_trusted("/run/balancer.sock", networks) and is_trusted(("1.1.1.1", 1), None)
