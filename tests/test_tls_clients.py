"""The examples over TLS, driven by real TLS clients and servers of other makes.

``openssl s_client`` talks to the TLS echo (TLS 1.2, TLS 1.3, ALPN), and
``openssl s_server`` is the far end of a pulse dial; ``curl`` and ``wrk``
load the HTTPS example, ``redis-cli --tls`` and ``redis-benchmark --tls`` the
mini Redis (Debian's redis-tools 7.0 is built with TLS; should a redis-cli
without it turn up, its tests skip and ``openssl s_client`` sending RESP
still covers the server).  Certificates are the session's ``tls_files``,
made at test time; every program runs with a timeout, every client checks
the certificate against the test CA, and all of it talks to 127.0.0.1.
"""

import re
import ssl
import subprocess
import sys
import threading
import time
from typing import IO, Callable, Iterator, List, Optional, Sequence, Tuple

import pytest

import pulse
from support import free_port, pattern
from test_examples import EXAMPLES, REDIS_SCRIPT, ROOT, TOOL_TIMEOUT, Example, need, run_tool
from tls_support import TLSFiles, client_context

pytestmark = pytest.mark.timeout(120)

# Every byte value, so that any rewriting (CRLF, a charset, a lost or doubled
# byte) shows; one newline, at the end, so that it is one line in the tools'
# output and in a failure's report.
LINE = bytes(b for b in range(256) if b != 10) + b"\n"


def tls_args(files: TLSFiles) -> List[str]:
    return ["--certfile", files.server_cert, "--keyfile", files.server_key]


@pytest.fixture
def start(tls_files: TLSFiles) -> Iterator[Callable[..., Example]]:
    """``start(script, *args)`` runs an example serving TLS with the test
    certificate; each one started is stopped (and its log checked) after the test."""
    started: List[Example] = []

    def run(script: str, *args: str) -> Example:
        started.append(Example(script, *tls_args(tls_files), *args))
        return started[-1]

    yield run
    for example in started:
        example.stop()


class Program:
    """A program beside the test whose stdout and stderr threads gather, so the
    test can wait for bytes in them with a deadline and never block on a pipe."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=str(ROOT))
        self.out = bytearray()
        self.err = bytearray()
        self._changed = threading.Condition()
        self._ended: List[bytearray] = []  # the buffers whose pipe reached EOF
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [threading.Thread(target=self._drain, args=(pipe, into), daemon=True)
                         for pipe, into in ((self.proc.stdout, self.out),
                                            (self.proc.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    def _drain(self, pipe: IO[bytes], into: bytearray) -> None:
        while True:
            chunk = pipe.read1(65536)  # type: ignore[attr-defined]
            with self._changed:
                if not chunk:
                    self._ended.append(into)
                else:
                    into += chunk
                self._changed.notify_all()
            if not chunk:
                return

    def report(self) -> str:
        return "{} (exit {}):\nstdout: {!r}\nstderr: {}".format(
            " ".join(self.argv), self.proc.poll(), bytes(self.out)[-2000:],
            self.err.decode(errors="replace")[-2000:])

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except BrokenPipeError:
            # It exited (a refused handshake can be that quick): what it
            # printed and its status tell the test what happened.
            pass

    def wait_for(self, expected: bytes, timeout: float = TOOL_TIMEOUT,
                 stderr: bool = False) -> None:
        """Wait until stdout (or stderr) holds ``expected``; fail at the timeout or at EOF."""
        deadline = time.monotonic() + timeout
        where = self.err if stderr else self.out
        with self._changed:
            while expected not in where:
                left = deadline - time.monotonic()
                ended = any(buffer is where for buffer in self._ended)
                assert left > 0 and not ended, "no {!r} from {}".format(expected[:60],
                                                                       self.report())
                self._changed.wait(left)

    def finish(self, timeout: float = TOOL_TIMEOUT) -> int:
        """Close its stdin (the openssl tools then end their session), wait for
        the exit and the last output; its exit status."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:  # it exited already; its status says how
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("did not exit within {} s: {}".format(
                timeout, self.report())) from None
        for reader in self._readers:
            reader.join(timeout)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def programs() -> Iterator[List[Program]]:
    """Programs a test starts; any still running when it ends (a failed assertion) is killed."""
    started: List[Program] = []
    yield started
    for program in started:
        program.kill()


# ---------------------------------------------------------------------------
# openssl s_client -> the TLS echo example
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_echo(tls_files: TLSFiles) -> Iterator[Example]:
    """The echo example on TLS, offering two ALPN protocols."""
    server = Example("echo_server.py", *tls_args(tls_files), "--alpn", "pulse-echo,http/1.1")
    yield server
    server.stop()


def s_client(programs: List[Program], port: int, ca_cert: str, *flags: str) -> Program:
    """``openssl s_client`` to 127.0.0.1:``port``, trusting ``ca_cert`` only and
    aborting on a failed verification; ``-nocommands`` so that a line starting
    with Q, R or k is data, not a command."""
    openssl = need("openssl", "openssl")
    program = Program([openssl, "s_client", "-connect", "127.0.0.1:%d" % port,
                       "-CAfile", ca_cert, "-verify_return_error", "-verify_ip", "127.0.0.1",
                       "-servername", "localhost", "-nocommands"] + list(flags))
    programs.append(program)
    return program


def echo_through_s_client(programs: List[Program], port: int, ca_cert: str, payload: bytes,
                          *flags: str) -> Program:
    """Send ``payload`` through s_client, wait for its echo, end the session
    (stdin EOF: s_client sends close_notify) and check s_client exited 0."""
    client = s_client(programs, port, ca_cert, *flags)
    client.send(payload)
    client.wait_for(payload)
    assert client.finish() == 0, client.report()
    return client


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_s_client_echo_is_byte_exact(tls_echo: Example, tls_files: TLSFiles,
                                     programs: List[Program], version: str) -> None:
    """s_client -brief keeps stdout for the data alone, so it must be exactly
    what was sent: a line of every byte value, then 200 KB (many records)."""
    payload = LINE + pattern(200_000, 14)
    flag = "-tls1_2" if version == "TLSv1.2" else "-tls1_3"
    client = echo_through_s_client(programs, tls_echo.port, tls_files.ca_cert, payload,
                                   flag, "-brief")
    assert bytes(client.out) == payload
    summary = client.err.decode(errors="replace")
    assert "Protocol version: " + version in summary, client.report()
    assert "Verification: OK" in summary and "Peer certificate: CN = localhost" in summary, \
        client.report()


@pytest.mark.parametrize("offer, chosen", [
    ("h2,pulse-echo", "ALPN protocol: pulse-echo"),  # the one both sides have
    ("http/1.1,pulse-echo", "ALPN protocol: pulse-echo"),  # the server's preference wins
    ("h2", "No ALPN negotiated"),  # no overlap: the handshake goes on without ALPN
])
def test_s_client_alpn(tls_echo: Example, tls_files: TLSFiles, programs: List[Program],
                       offer: str, chosen: str) -> None:
    """ALPN as s_client reports it in its verbose session summary.  The
    summary goes through stdio's buffer and the data straight to fd 1, so
    their order on stdout means nothing: the echo must be there once."""
    client = echo_through_s_client(programs, tls_echo.port, tls_files.ca_cert, LINE,
                                   "-alpn", offer)
    out = bytes(client.out)
    assert chosen.encode() in out, client.report()
    assert out.count(LINE) == 1, client.report()


def test_s_client_refuses_a_certificate_from_another_ca(
        tls_echo: Example, tls_files: TLSFiles, programs: List[Program]) -> None:
    """The check the tests above rely on can fail: trusting another CA, s_client
    aborts the handshake, nothing is echoed, and the server goes on serving."""
    client = s_client(programs, tls_echo.port, tls_files.other_ca_cert, "-brief")
    client.send(LINE)
    client.wait_for(b"certificate verify failed", stderr=True)
    assert client.finish() != 0, client.report()
    assert LINE not in client.out, client.report()
    echo_through_s_client(programs, tls_echo.port, tls_files.ca_cert, LINE, "-brief")


def test_s_client_with_client_certificates(start: Callable[..., Example], tls_files: TLSFiles,
                                           programs: List[Program]) -> None:
    """--ca-certs checks the certificates clients present (optional ones): one
    the CA signed is echoed to, none at all too, one from another CA gets
    OpenSSL's "unknown ca" alert and no echo."""
    server = start("echo_server.py", "--ca-certs", tls_files.ca_cert)
    for cert, key in ((tls_files.client_cert, tls_files.client_key), (None, None)):
        flags = ["-cert", cert, "-key", key] if cert and key else []
        client = echo_through_s_client(programs, server.port, tls_files.ca_cert, LINE,
                                       "-brief", *flags)
        assert bytes(client.out) == LINE
    other_key = tls_files.other_ca_cert[:-len(".pem")] + ".key"
    client = s_client(programs, server.port, tls_files.ca_cert, "-brief",
                      "-cert", tls_files.other_ca_cert, "-key", other_key)
    client.send(LINE)
    # In TLS 1.3 the client's handshake is over before the server checks its
    # certificate: the alert comes after, and stdin must stay open until then.
    client.wait_for(b"alert unknown ca", stderr=True)
    assert client.finish() != 0, client.report()
    assert LINE not in client.out, client.report()


def test_example_tls_flags_report_bad_files_in_one_line(tls_files: TLSFiles) -> None:
    """A missing file or a TLS flag without --certfile is one "error:" line and
    a non-zero exit, in one process and with --workers, before anything listens."""
    port = str(free_port())
    for args in (["--certfile", "/nonexistent/cert.pem"],
                 ["--certfile", tls_files.server_cert, "--keyfile", "/nonexistent/key.pem",
                  "--workers", "2"],
                 ["--keyfile", tls_files.server_key],
                 ["--certfile", tls_files.ca_cert]):  # a certificate without its key
        result = subprocess.run([sys.executable, str(EXAMPLES / "echo_server.py"), "--port",
                                 port] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                timeout=TOOL_TIMEOUT)
        lines = result.stderr.decode().splitlines()
        assert result.returncode != 0 and len(lines) == 1, (args, result)
        assert lines[0].startswith("echo_server.py: error: "), lines


# ---------------------------------------------------------------------------
# a pulse dial -> openssl s_server
# ---------------------------------------------------------------------------


class Dialer(pulse.Handler):
    """Writes ``greeting`` once the handshake is done and gathers what comes back."""

    def __init__(self, greeting: bytes) -> None:
        self.greeting = greeting
        self.opened = threading.Event()
        self.closed = threading.Event()
        self.lock = threading.Lock()
        self.data = b""
        self.version: Optional[str] = None
        self.alpn: Optional[str] = None
        self.errors: List[Optional[BaseException]] = []

    def on_open(self, conn: pulse.Conn) -> None:
        tls = conn.ssl_object
        assert tls is not None
        self.version, self.alpn = tls.version(), tls.selected_alpn_protocol()
        conn.write(self.greeting)
        self.opened.set()

    def on_data(self, conn: pulse.Conn, data: bytes) -> None:
        with self.lock:
            self.data += data

    def on_close(self, conn: pulse.Conn, err: Optional[BaseException]) -> None:
        self.errors.append(err)
        self.closed.set()

    def wait_data(self, expected: bytes, timeout: float = TOOL_TIMEOUT) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.data) >= len(expected) or self.closed.is_set():
                    break
            time.sleep(0.01)
        with self.lock:
            return self.data


def s_server(programs: List[Program], files: TLSFiles, *flags: str) -> Tuple[Program, int]:
    """``openssl s_server`` for one connection on a free 127.0.0.1 port, once it
    printed ACCEPT (it listens); it relays its stdin to the client and prints
    what the client sends."""
    openssl = need("openssl", "openssl")
    port = free_port()
    program = Program([openssl, "s_server", "-accept", "127.0.0.1:%d" % port,
                       "-cert", files.server_cert, "-key", files.server_key,
                       "-naccept", "1"] + list(flags))
    programs.append(program)
    program.wait_for(b"ACCEPT\n")
    return program, port


@pytest.mark.parametrize("flags, version, alpn", [
    (["-tls1_2"], "TLSv1.2", None),
    (["-tls1_3"], "TLSv1.3", None),
    (["-alpn", "pulse-echo"], "TLSv1.3", "pulse-echo"),
])
def test_pulse_dial_to_s_server_both_ways(tls_files: TLSFiles, programs: List[Program],
                                          flags: List[str], version: str,
                                          alpn: Optional[str]) -> None:
    """pulse's bytes reach s_server's stdout, s_server's stdin reaches pulse's
    on_data, byte for byte; pulse's close ends the session cleanly (close_notify:
    s_server reports the close and exits 0)."""
    server, port = s_server(programs, tls_files, *flags)
    greeting = b"from pulse: " + LINE
    reply = b"from s_server: " + LINE
    context = client_context(tls_files)
    context.set_alpn_protocols(["http/1.1", "pulse-echo"])
    dialer = Dialer(greeting)
    with pulse.Client() as client:
        conn = client.dial(("127.0.0.1", port), dialer, ssl=context, server_hostname="localhost")
        server.wait_for(greeting)
        server.send(reply)
        assert dialer.wait_data(reply) == reply, server.report()
        assert (dialer.version, dialer.alpn) == (version, alpn)
        conn.close()
        assert dialer.closed.wait(TOOL_TIMEOUT), "on_close did not run"
    assert dialer.errors == [None]
    assert server.finish() == 0, server.report()
    assert b"CONNECTION CLOSED" in server.out and b"ERROR" not in server.out, server.report()


@pytest.mark.parametrize("hostname, ca", [("wrong.example", "ca_cert"),
                                          ("localhost", "other_ca_cert")])
def test_pulse_dial_to_s_server_checks_the_certificate(
        tls_files: TLSFiles, programs: List[Program], hostname: str, ca: str) -> None:
    """A name the certificate does not carry, or a CA that did not sign it:
    on_close gets ssl.SSLCertVerificationError, on_open never runs, and
    s_server saw no data."""
    server, port = s_server(programs, tls_files)
    dialer = Dialer(b"must not arrive\n")
    context = ssl.create_default_context(cafile=getattr(tls_files, ca))
    with pulse.Client() as client:
        client.dial(("127.0.0.1", port), dialer, ssl=context, server_hostname=hostname)
        assert dialer.closed.wait(TOOL_TIMEOUT), "on_close did not run"
    assert not dialer.opened.is_set()
    assert len(dialer.errors) == 1 and isinstance(dialer.errors[0], ssl.SSLCertVerificationError), \
        dialer.errors
    server.finish()  # its status is OpenSSL's business: the client aborted the handshake
    assert b"must not arrive" not in server.out, server.report()


def test_tlv_client_over_tls(start: Callable[..., Example], tls_files: TLSFiles) -> None:
    """The TLV client example's --tls against the TLV server's --certfile: every
    frame verified; a wrong --server-hostname fails every connect, naming the error."""
    server = start("tlv_server.py")
    client = [sys.executable, str(EXAMPLES / "tlv_client.py"), "--port", str(server.port),
              "--tls", "--cafile", tls_files.ca_cert, "--timeout", "10"]
    out = run_tool(client + ["--connections", "4", "--frames", "1000", "--size", "300",
                             "--pipeline", "16", "--server-hostname", "localhost"])
    assert "4000 frames" in out and "all verified" in out, out
    result = subprocess.run(client + ["--connections", "3", "--server-hostname", "wrong.example"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=TOOL_TIMEOUT)
    assert result.returncode == 1
    assert result.stderr.decode().count("connect failed: SSLCertVerificationError") == 3, \
        result.stderr


# ---------------------------------------------------------------------------
# curl and wrk -> the HTTPS example
# ---------------------------------------------------------------------------

# Per URL: the body, then what curl reports of the transfer.
CURL_REPORT = ("\n%{http_code} connects=%{num_connects} http=%{http_version} "
               "verify=%{ssl_verify_result}\n")


def curl(port: int, ca_cert: str, *args: str, paths: Sequence[str] = ("/",),
         check: bool = True) -> "subprocess.CompletedProcess[bytes]":
    tool = need("curl", "curl")
    argv = [tool, "-sS", "--max-time", "10", "--cacert", ca_cert, "-w", CURL_REPORT] + list(args)
    argv += ["https://127.0.0.1:%d%s" % (port, path) for path in paths]
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            timeout=TOOL_TIMEOUT)
    if check:
        assert result.returncode == 0, result
    return result


def test_curl_https_keep_alive(start: Callable[..., Example], tls_files: TLSFiles) -> None:
    """Two URLs in one curl call over HTTP/1.1: both answered, the second on the
    same TLS connection (curl counts 0 new connects), the certificate verified."""
    server = start("http_server.py")
    result = curl(server.port, tls_files.ca_cert, "--http1.1", paths=("/", "/missing"))
    assert result.stdout == (b"Hello, World!\n200 connects=1 http=1.1 verify=0\n"
                             b"404 Not Found\n\n404 connects=0 http=1.1 verify=0\n"), result


def test_curl_https_alpn_and_a_wrong_ca(start: Callable[..., Example], tls_files: TLSFiles) -> None:
    """curl offers h2 and http/1.1; a server started with --alpn http/1.1 picks
    http/1.1 in the handshake.  Trusting another CA, curl refuses (exit 60)."""
    server = start("http_server.py", "--alpn", "http/1.1")
    result = curl(server.port, tls_files.ca_cert, "-v")
    assert result.stdout == b"Hello, World!\n200 connects=1 http=1.1 verify=0\n", result
    assert re.search(rb"ALPN[^\n]*accepted[^\n]*http/1\.1", result.stderr), result.stderr
    refused = curl(server.port, tls_files.other_ca_cert, check=False)
    assert refused.returncode == 60 and b"Hello" not in refused.stdout, refused


def test_curl_https_with_two_workers(start: Callable[..., Example], tls_files: TLSFiles) -> None:
    """--certfile with --workers: each worker process serves TLS (the context
    reaches them through pulse.serve), connection after connection."""
    server = start("http_server.py", "--workers", "2")
    for _ in range(6):
        result = curl(server.port, tls_files.ca_cert)
        assert result.stdout == b"Hello, World!\n200 connects=1 http=1.1 verify=0\n", result


def test_uvloop_https_peer_answers_like_pulse(start: Callable[..., Example],
                                               tls_files: TLSFiles) -> None:
    """The benchmark's uvloop peer with --certfile/--keyfile (asyncio's ssl=)
    gives curl the same answers as the pulse server, over the same TLS."""
    pytest.importorskip("uvloop")
    answers = []
    for script in ("http_server.py", "uvloop_http_server.py"):
        server = start(script)
        result = curl(server.port, tls_files.ca_cert, "--http1.1", paths=("/", "/missing"))
        answers.append(result.stdout)
    assert answers[0] == answers[1] == (b"Hello, World!\n200 connects=1 http=1.1 verify=0\n"
                                        b"404 Not Found\n\n404 connects=0 http=1.1 verify=0\n")


@pytest.mark.parametrize("task_type", ["loop", "thread"])
def test_wrk_over_https(start: Callable[..., Example], tls_files: TLSFiles, task_type: str) -> None:
    """wrk for 2 s, 10 connections, over https: requests counted, no socket
    error and no non-2xx answer in its report."""
    wrk = need("wrk", "wrk")
    server = start("http_server.py", "--task-type", task_type)
    out = run_tool([wrk, "-t1", "-c10", "-d2s", "--timeout", "5s",
                    "https://127.0.0.1:%d/" % server.port], timeout=30)
    match = re.search(r"(\d+) requests in", out)
    assert match and int(match.group(1)) > 0, out
    assert "Non-2xx" not in out and "Socket errors" not in out, out


# ---------------------------------------------------------------------------
# redis-cli and redis-benchmark -> the mini Redis
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_redis(tls_files: TLSFiles) -> Iterator[Example]:
    server = Example("redis_server.py", *tls_args(tls_files))
    yield server
    server.stop()


def redis_tls_tool(tool: str) -> str:
    """The tool's path, skipping when it is absent or built without TLS."""
    path = need(tool, "redis-tools")
    usage = subprocess.run([path, "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=TOOL_TIMEOUT).stdout
    if b"--tls" not in usage:
        pytest.skip("{} is built without TLS (test_redis_resp_through_s_client covers the "
                    "server)".format(tool))
    return path


def redis_cli(server: Example, ca_cert: str, *args: str, stdin: Optional[str] = None) -> str:
    cli = redis_tls_tool("redis-cli")
    return run_tool([cli, "--tls", "--cacert", ca_cert, "--no-raw", "-p", str(server.port)]
                    + list(args), stdin=None if stdin is None else stdin.encode())


def test_redis_cli_tls_set_get(tls_redis: Example, tls_files: TLSFiles) -> None:
    assert redis_cli(tls_redis, tls_files.ca_cert, "SET", "k", "v") == "OK\n"
    assert redis_cli(tls_redis, tls_files.ca_cert, "GET", "k") == '"v"\n'
    assert redis_cli(tls_redis, tls_files.ca_cert, "DEL", "k") == "(integer) 1\n"


def test_redis_cli_tls_scripted_commands(tls_redis: Example, tls_files: TLSFiles) -> None:
    """The plain-TCP script of test_examples, replies checked line for line, over TLS."""
    script = "".join(command + "\n" for command, _ in REDIS_SCRIPT)
    expected = "".join(reply + "\n" for _, reply in REDIS_SCRIPT)
    assert redis_cli(tls_redis, tls_files.ca_cert, stdin=script) == expected


def test_redis_cli_tls_refuses_another_ca(tls_redis: Example, tls_files: TLSFiles) -> None:
    cli = redis_tls_tool("redis-cli")
    result = subprocess.run([cli, "--tls", "--cacert", tls_files.other_ca_cert, "-p",
                             str(tls_redis.port), "PING"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=TOOL_TIMEOUT)
    assert b"PONG" not in result.stdout and b"certificate verify failed" in result.stdout, result


def test_redis_benchmark_tls(tls_redis: Example, tls_files: TLSFiles) -> None:
    bench = redis_tls_tool("redis-benchmark")
    out = run_tool([bench, "--tls", "--cacert", tls_files.ca_cert, "-p", str(tls_redis.port),
                    "-n", "2000", "-t", "get,set", "-q"], timeout=60)
    lines = out.replace("\r", "\n")
    for test in ("SET", "GET"):
        assert re.search(r"^ ?%s: [\d.]+ requests per second" % test, lines, re.M), out


def test_redis_resp_through_s_client(tls_redis: Example, tls_files: TLSFiles,
                                     programs: List[Program]) -> None:
    """RESP by hand through s_client: a pipelined multibulk SET, GET of a binary
    value (every byte but the newline, which s_client would pass as well) and
    DEL, replies checked byte for byte."""
    value = LINE[:-1]
    request = (b"*3\r\n$3\r\nSET\r\n$6\r\nbinary\r\n$%d\r\n%s\r\n" % (len(value), value)
               + b"*2\r\n$3\r\nGET\r\n$6\r\nbinary\r\n*2\r\n$3\r\nDEL\r\n$6\r\nbinary\r\n")
    expected = b"+OK\r\n$%d\r\n%s\r\n:1\r\n" % (len(value), value)
    client = s_client(programs, tls_redis.port, tls_files.ca_cert, "-brief")
    client.send(request)
    client.wait_for(expected)
    assert client.finish() == 0, client.report()
    assert bytes(client.out) == expected
