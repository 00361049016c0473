"""The protocol examples run as real programs and are driven by real clients.

Each example starts as a subprocess on a free 127.0.0.1 port.  The TLV server
is driven by raw sockets and by ``examples/tlv_client.py``; the HTTP server by
``wrk`` and raw sockets; the mini Redis by ``redis-cli`` (replies checked
byte for byte; they were taken from Debian's redis-server 7.0) and
``redis-benchmark``.  A test whose external tool is not on PATH is skipped
with the package to install.  Every client call is bounded by a timeout.
"""

import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import pytest

from support import free_port, recv_exactly, recv_until_eof

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TOOL_TIMEOUT = 15.0


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------




def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip("{} is not on PATH (Debian package {})".format(tool, package))
    return path


class Example:
    """An example server running as a subprocess on a free port."""

    def __init__(self, script: str, *args: str) -> None:
        self.port = free_port()
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / script), "--port", str(self.port),
             "--log-level", "WARNING"] + list(args),
            stdout=self.log, stderr=subprocess.STDOUT, cwd=str(ROOT))
        self._wait_up()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def _wait_up(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError("example exited with {}:\n{}".format(
                    self.proc.returncode, self.output()))
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.proc.kill()
                    raise AssertionError("example did not listen within {} s:\n{}".format(
                        timeout, self.output())) from None
                time.sleep(0.05)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def stop(self) -> None:
        """SIGTERM, then check the example stopped cleanly and logged no error."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("example ignored SIGTERM:\n" + self.output()) from None
        output = self.output()
        self.log.close()
        assert self.proc.returncode == 0, output
        assert "Traceback" not in output and "ERROR" not in output, output


@pytest.fixture
def start() -> Iterator:
    """``start(script, *args)`` runs an example; every one started is stopped after the test."""
    started: List[Example] = []

    def run(script: str, *args: str) -> Example:
        example = Example(script, *args)
        started.append(example)
        return example

    yield run
    for example in started:
        example.stop()


def run_tool(argv: Sequence[str], stdin: Optional[bytes] = None,
             timeout: float = TOOL_TIMEOUT) -> str:
    """Run a client program; fail on a non-zero exit; return its stdout."""
    result = subprocess.run(list(argv), input=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, timeout=timeout, cwd=str(ROOT))
    assert result.returncode == 0, "{} exited {}:\n{}\n{}".format(
        argv[0], result.returncode, result.stdout.decode(errors="replace"),
        result.stderr.decode(errors="replace"))
    return result.stdout.decode(errors="replace")


# ---------------------------------------------------------------------------
# TLV
# ---------------------------------------------------------------------------


def tlv(frame_type: int, value: bytes) -> bytes:
    return struct.pack(">HI", frame_type, len(value)) + value


def test_tlv_pipelined_frames_in_one_send_are_all_answered(start) -> None:
    server = start("tlv_server.py")
    frames = b"".join(tlv(i, bytes([i % 251]) * (i * 37 % 3000)) for i in range(200))
    with server.connect() as sock:
        sock.sendall(frames)
        assert recv_exactly(sock, len(frames), time.monotonic() + 10) == frames


def test_tlv_frames_split_byte_by_byte(start) -> None:
    server = start("tlv_server.py", "--task-type", "pool")
    frames = tlv(1, b"hello") + tlv(2, b"") + tlv(0xFFFE, b"x" * 40)
    with server.connect() as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(frames)):
            sock.sendall(frames[i:i + 1])
            time.sleep(0.002)  # separate segments, so the server sees separate reads
        assert recv_exactly(sock, len(frames), time.monotonic() + 10) == frames


def test_tlv_oversize_frame_closes_with_an_error_frame(start) -> None:
    server = start("tlv_server.py", "--max-frame-size", "1024")
    good = tlv(7, b"a" * 1024)
    with server.connect() as sock:
        sock.sendall(good + struct.pack(">HI", 8, 1025))
        reply = recv_until_eof(sock, time.monotonic() + 10)
    assert reply.startswith(good)  # the frame before the bad header is still answered
    error_type, length = struct.unpack(">HI", reply[len(good):len(good) + 6])
    assert error_type == 0xFFFF
    assert b"1025" in reply[len(good) + 6:] and len(reply) == len(good) + 6 + length


@pytest.mark.parametrize("task_type", ["loop", "pool"])
def test_tlv_client_against_tlv_server(start, task_type: str) -> None:
    server = start("tlv_server.py", "--task-type", task_type)
    out = run_tool([sys.executable, str(EXAMPLES / "tlv_client.py"), "--port", str(server.port),
                    "--connections", "8", "--frames", "2000", "--size", "200",
                    "--pipeline", "32", "--task-type", task_type, "--timeout", "10"])
    assert "16000 frames" in out and "all verified" in out, out


def test_tlv_client_reports_a_refused_connect() -> None:
    result = subprocess.run([sys.executable, str(EXAMPLES / "tlv_client.py"), "--port",
                             str(free_port()), "--connections", "2", "--timeout", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=TOOL_TIMEOUT)
    assert result.returncode == 1
    assert result.stderr.decode().count("connect failed") == 2, result.stderr


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------

GET = b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def read_response(sock: socket.socket, deadline: float) -> Tuple[int, dict, bytes]:
    """One HTTP response: (status, lower-cased headers, body)."""
    head = b""
    while b"\r\n\r\n" not in head:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        byte = sock.recv(1)
        assert byte, "connection closed inside a response head: {!r}".format(head)
        head += byte
    lines = head[:-4].decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = recv_exactly(sock, int(headers.get("content-length", 0)), deadline)
    return status, headers, body


@pytest.fixture(scope="module")
def http_server() -> Iterator[Example]:
    server = Example("http_server.py")
    yield server
    server.stop()


def test_http_hello_keep_alive(http_server: Example) -> None:
    with http_server.connect() as sock:
        for _ in range(3):  # three requests, one after the other, one connection
            sock.sendall(GET % b"/")
            status, headers, body = read_response(sock, time.monotonic() + 10)
            assert (status, body) == (200, b"Hello, World!")
            assert headers["content-type"] == "text/plain" and "date" in headers
            assert headers.get("connection") != "close"


def test_http_pipelined_requests_are_answered_in_order(http_server: Example) -> None:
    with http_server.connect() as sock:
        sock.sendall(GET % b"/" + GET % b"/missing" + GET % b"/plaintext")
        deadline = time.monotonic() + 10
        answers = [read_response(sock, deadline) for _ in range(3)]
    assert [(status, body) for status, _, body in answers] == [
        (200, b"Hello, World!"), (404, b"404 Not Found\n"), (200, b"Hello, World!")]


def test_http_garbage_gets_400_and_close(http_server: Example) -> None:
    with http_server.connect() as sock:
        # The request before the bad one is still answered, then 400, then EOF.
        sock.sendall(GET % b"/" + b"garbage\r\n\r\n")
        deadline = time.monotonic() + 10
        assert read_response(sock, deadline)[0] == 200
        status, headers, _ = read_response(sock, deadline)
        assert (status, headers["connection"]) == (400, "close")
        assert recv_until_eof(sock, deadline) == b""


def test_http_huge_head_gets_431_and_close(http_server: Example) -> None:
    with http_server.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 10000 + b"\r\n\r\n")
        deadline = time.monotonic() + 10
        status, headers, _ = read_response(sock, deadline)
        assert (status, headers["connection"]) == (431, "close")
        assert recv_until_eof(sock, deadline) == b""


def test_http_1_0_closes_after_the_response(http_server: Example) -> None:
    with http_server.connect() as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        deadline = time.monotonic() + 10
        status, headers, body = read_response(sock, deadline)
        assert (status, body, headers["connection"]) == (200, b"Hello, World!", "close")
        assert recv_until_eof(sock, deadline) == b""


@pytest.mark.parametrize("task_type", ["loop", "thread"])
def test_http_wrk_reports_no_errors(start, task_type: str) -> None:
    wrk = need("wrk", "wrk")
    server = start("http_server.py", "--task-type", task_type)
    out = run_tool([wrk, "-t1", "-c10", "-d1", "http://127.0.0.1:%d/" % server.port])
    match = re.search(r"(\d+) requests in", out)
    assert match and int(match.group(1)) > 0, out
    assert "Non-2xx" not in out and "Socket errors" not in out, out


def test_uvloop_hello_server_answers_like_the_pulse_one(http_server: Example, start) -> None:
    pytest.importorskip("uvloop")
    peer = start("uvloop_http_server.py")
    answers = []
    for server in (http_server, peer):
        with server.connect() as sock:
            sock.sendall(GET % b"/" + GET % b"/missing" + b"garbage\r\n\r\n")
            deadline = time.monotonic() + 10
            answers.append([read_response(sock, deadline)[::2] for _ in range(3)])
            assert recv_until_eof(sock, deadline) == b""
    assert answers[0] == answers[1]


# ---------------------------------------------------------------------------
# mini Redis
# ---------------------------------------------------------------------------

# (command line fed to redis-cli, its --no-raw output), from redis-server 7.0.
REDIS_SCRIPT = [
    ("PING", "PONG"),
    ("PING hello", '"hello"'),
    ('ECHO "hi there"', '"hi there"'),
    ("SET k v", "OK"),
    ("GET k", '"v"'),
    ("get nokey", "(nil)"),
    ("SET n 10", "OK"),
    ("INCR n", "(integer) 11"),
    ("incr n", "(integer) 12"),
    ("INCR k", "(error) ERR value is not an integer or out of range"),
    ("INCR counter", "(integer) 1"),
    ("SET big 9223372036854775807", "OK"),
    ("INCR big", "(error) ERR increment or decrement would overflow"),
    ("SET lead 012", "OK"),
    ("INCR lead", "(error) ERR value is not an integer or out of range"),
    ("EXISTS k n nokey k", "(integer) 3"),
    ("DEL k n nokey", "(integer) 2"),
    ("EXISTS k", "(integer) 0"),
    ("MSET a 1 b 2", "OK"),
    ("MGET a nokey b", '1) "1"\n2) (nil)\n3) "2"'),
    ("MSET a", "(error) ERR wrong number of arguments for 'mset' command"),
    ("GET", "(error) ERR wrong number of arguments for 'get' command"),
    ("FOO bar baz", "(error) ERR unknown command 'FOO', with args beginning with: 'bar' 'baz' "),
    ("SET k v EX 0", "(error) ERR invalid expire time in 'set' command"),
    ("SET k v EX soon", "(error) ERR value is not an integer or out of range"),
    ("SET k v PX 10 EX 1", "(error) ERR syntax error"),
    ("SET k v NX", "OK"),
    ("SET k w NX", "(nil)"),
    ("SET k w XX", "OK"),
    ("GET k", '"w"'),
    ("DEL a b k counter big lead", "(integer) 6"),
    ("DBSIZE", "(integer) 0"),
]


@pytest.fixture(scope="module", params=["loop", "pool"])
def redis_server(request) -> Iterator[Example]:
    server = Example("redis_server.py", "--task-type", request.param)
    yield server
    server.stop()


def redis_cli(server: Example, *args: str, stdin: Optional[str] = None) -> str:
    cli = need("redis-cli", "redis-tools")
    return run_tool([cli, "--no-raw", "-p", str(server.port)] + list(args),
                    stdin=None if stdin is None else stdin.encode())


def test_redis_cli_scripted_commands(redis_server: Example) -> None:
    script = "".join(command + "\n" for command, _ in REDIS_SCRIPT)
    expected = "".join(reply + "\n" for _, reply in REDIS_SCRIPT)
    assert redis_cli(redis_server, stdin=script) == expected


class RealRedis:
    """Debian's redis-server on a free 127.0.0.1 port, nothing saved to disk."""

    def __init__(self) -> None:
        path = need("redis-server", "redis-server")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [path, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd=tempfile.gettempdir())
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError("redis-server did not listen") from None
                time.sleep(0.05)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def multibulk(words: Sequence[str]) -> bytes:
    return b"*%d\r\n" % len(words) + b"".join(
        b"$%d\r\n%s\r\n" % (len(w.encode()), w.encode()) for w in words)


def test_redis_answers_byte_for_byte_like_redis_server() -> None:
    # The same bytes to the example and to the real redis-server, each ending
    # in QUIT (or a protocol error) so that the reply is everything read to EOF.
    real = RealRedis()
    example = Example("redis_server.py")
    try:
        script = "".join(command + "\n" for command, _ in REDIS_SCRIPT)
        assert redis_cli(example, stdin=script) == run_tool(
            [need("redis-cli", "redis-tools"), "--no-raw", "-p", str(real.port)],
            stdin=script.encode())
        streams = [
            b"".join(multibulk(shlex.split(command)) for command, _ in REDIS_SCRIPT),
            b"PING\r\nECHO hello\r\nSET raw:k 5\nINCR raw:k\r\n*2\r\n$3\r\nGET\r\n"
            b"$5\r\nraw:k\r\nDEL raw:k\r\nNOPE x\r\nget\r\n",
            # Pipelined, as redis-benchmark -P 16 sends them, and a bulk holding CRLF.
            b"".join(multibulk(["SET", "key:%d" % i, "v" * i]) + multibulk(["GET", "key:%d" % i])
                     for i in range(16)) + multibulk(["SET", "crlf", "a\r\nb"])
            + multibulk(["GET", "crlf"])
            + multibulk(["DEL", "crlf"] + ["key:%d" % i for i in range(16)]),
        ]
        for stream in streams:
            replies = []
            for server in (example, real):
                with server.connect() as sock:
                    sock.sendall(stream + b"QUIT\r\n")
                    replies.append(recv_until_eof(sock, time.monotonic() + 10))
            assert replies[0] == replies[1], stream
        # (Not a bulk without its CRLF: redis-server skips any two bytes there.)
        for stream in (b"PING\r\n*1\r\n$4\r\nPING\r\n*x\r\nPING\r\n",
                       b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$-2\r\n"):
            replies = []
            for server in (example, real):
                with server.connect() as sock:
                    sock.sendall(stream)
                    replies.append(recv_until_eof(sock, time.monotonic() + 10))
            assert replies[0] == replies[1], stream
    finally:
        example.stop()
        real.stop()


def test_redis_set_px_expires(redis_server: Example) -> None:
    script = "SET ttl:key v PX 400\nGET ttl:key\nEXISTS ttl:key\n"
    assert redis_cli(redis_server, stdin=script) == 'OK\n"v"\n(integer) 1\n'
    time.sleep(0.6)
    assert redis_cli(redis_server, "GET", "ttl:key") == "(nil)\n"
    assert redis_cli(redis_server, "EXISTS", "ttl:key") == "(integer) 0\n"


def test_redis_sweep_deletes_expired_keys_nobody_reads(redis_server: Example) -> None:
    # Memory stays bounded: keys with a TTL that are never touched again go too.
    baseline = redis_cli(redis_server, "DBSIZE")
    script = "".join("SET sweep:%d v PX 300\n" % i for i in range(200))
    assert redis_cli(redis_server, stdin=script) == "OK\n" * 200
    deadline = time.monotonic() + 5
    while redis_cli(redis_server, "DBSIZE") != baseline:
        assert time.monotonic() < deadline, "expired keys were not swept"
        time.sleep(0.1)


def test_redis_store_expires_lazily_on_access() -> None:
    # In-process, with no loop attached: no sweep runs, so only GET can expire.
    sys.path.insert(0, str(EXAMPLES))
    try:
        import redis_server
    finally:
        sys.path.remove(str(EXAMPLES))
    store = redis_server.Store()
    assert store.execute([[b"SET", b"k", b"v", b"PX", b"50"]]) == (b"+OK\r\n", False)
    time.sleep(0.1)
    assert b"k" in store.data  # expired but still held
    assert store.execute([[b"GET", b"k"]]) == (b"$-1\r\n", False)
    assert b"k" not in store.data and b"k" not in store.expires


def test_redis_inline_commands_and_pipelining_over_a_raw_socket(redis_server: Example) -> None:
    with redis_server.connect() as sock:
        sock.sendall(b"PING\r\nECHO hello\r\nSET raw:k 5\nINCR raw:k\r\n"
                     b"*2\r\n$3\r\nGET\r\n$5\r\nraw:k\r\nDEL raw:k\r\nNOPE x\r\n")
        expected = (b"+PONG\r\n$5\r\nhello\r\n+OK\r\n:6\r\n$1\r\n6\r\n:1\r\n"
                    b"-ERR unknown command 'NOPE', with args beginning with: 'x' \r\n")
        assert recv_exactly(sock, len(expected), time.monotonic() + 10) == expected
        sock.sendall(b"QUIT\r\n")
        assert recv_until_eof(sock, time.monotonic() + 10) == b"+OK\r\n"


def test_redis_protocol_error_answers_what_came_before_then_closes(redis_server: Example) -> None:
    with redis_server.connect() as sock:
        sock.sendall(b"PING\r\n*1\r\n$4\r\nPING\r\n*x\r\nPING\r\n")
        reply = recv_until_eof(sock, time.monotonic() + 10)
    assert reply == b"+PONG\r\n+PONG\r\n-ERR Protocol error: invalid multibulk length\r\n"


def test_redis_benchmark_completes(redis_server: Example) -> None:
    bench = need("redis-benchmark", "redis-tools")
    out = run_tool([bench, "-p", str(redis_server.port), "-q", "-n", "2000", "-c", "10",
                    "-P", "16", "-t", "ping,set,get"])
    lines = out.replace("\r", "\n")
    for test in ("PING_INLINE", "PING_MBULK", "SET", "GET"):
        assert re.search(r"^ ?%s: [\d.]+ requests per second" % test, lines, re.M), out


def test_redis_with_two_workers(start) -> None:
    cli = need("redis-cli", "redis-tools")
    server = start("redis_server.py", "--workers", "2")
    # Each worker has its own store, so only per-connection results are checked.
    script = "SET w 1\nINCR w\nGET w\n"
    for _ in range(4):
        out = run_tool([cli, "--no-raw", "-p", str(server.port)], stdin=script.encode())
        assert out == 'OK\n(integer) 2\n"2"\n'
