"""A real HAProxy in front of ``pulse serve --proxy-protocol``: clients see their own address.

HAProxy (Debian's ``haproxy``; ``.ci/run`` installs it) listens on two
127.0.0.1 ports in TCP mode and relays to one ``pulse serve --workers 2``,
with ``send-proxy`` (version 1) on one and ``send-proxy-v2`` (with the
CRC32C and unique-id TLVs: the checksum is verified against a real sender's)
on the other.  The handler answers with the
``remote_address`` it sees, which must be the client's own socket address,
not HAProxy's.  Every process is killed in ``finally``; every wait is bounded.
"""

import ast
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest

from support import free_port
from test_launcher import Launched, no_child_left, serving  # noqa: F401

pytestmark = [pytest.mark.timeout(90),
              pytest.mark.skipif(shutil.which("haproxy") is None,
                                 reason="needs haproxy (Debian package haproxy)")]

APP = '''
"""Answers with what pulse tells of the connection's origin, then echoes."""
import os

import pulse


class Origin(pulse.Handler):
    def on_open(self, conn):
        if conn.proxy_header is not None and conn.proxy_header.command == "LOCAL":
            with open(os.environ["ORIGIN_LOCAL_LOG"], "a") as log:
                log.write("LOCAL from %s\\n" % (conn.remote_address,))
        seen = {"remote": conn.remote_address, "proxy": conn.proxy_address,
                "tlv_types": [kind for kind, _ in conn.proxy_tlvs], "pid": os.getpid(),
                "version": conn.proxy_header.version if conn.proxy_header else None}
        conn.write(repr(seen).encode() + b"\\n")

    def on_data(self, conn, data):
        conn.write(data)
'''

CONFIG = """
global
    maxconn 200

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend relay_v1
    bind 127.0.0.1:{v1}
    default_backend pulse_v1

frontend relay_v2
    bind 127.0.0.1:{v2}
    unique-id-format %{{+X}}o%ci:%cp
    default_backend pulse_v2

backend pulse_v1
    server pulse 127.0.0.1:{pulse} send-proxy

backend pulse_v2
    # Health checks every 100 ms, each a LOCAL header (check-send-proxy).
    default-server check check-send-proxy inter 100
    server pulse 127.0.0.1:{pulse} send-proxy-v2 proxy-v2-options crc32c,unique-id
"""


def origin(port: int, timeout: float = 5.0) -> Dict[str, Any]:
    """Connect through HAProxy, read the greeting, check an echo; the greeting
    and our own address."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        line = b""
        while not line.endswith(b"\n"):
            chunk = sock.recv(256)
            assert chunk, "closed before the greeting"
            line += chunk
        sock.sendall(b"through haproxy")
        got = b""
        while len(got) < 15:
            chunk = sock.recv(64)
            assert chunk, "closed before the echo"
            got += chunk
        assert got == b"through haproxy"
        seen: Dict[str, Any] = ast.literal_eval(line.decode())
        seen["me"] = sock.getsockname()
        return seen


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Dict[str, int]]:
    """``pulse serve --workers 2 --proxy-protocol`` behind HAProxy; the ports."""
    (tmp_path / "origin_app.py").write_text(APP)
    ports = {"pulse": free_port(), "v1": free_port(), "v2": free_port()}
    config = tmp_path / "haproxy.cfg"
    config.write_text(CONFIG.format(**ports))
    log = open(tmp_path / "haproxy.log", "wb")
    haproxy = None
    with Launched.serve(tmp_path, "--workers", "2", "--proxy-protocol", "origin_app:Origin",
                        "--bind", "127.0.0.1:{}".format(ports["pulse"]),
                        "--proxy-protocol-trusted", "127.0.0.0/8",
                        env={"ORIGIN_LOCAL_LOG": str(tmp_path / "local.log")}) as pulse_serve:
        try:
            serving(pulse_serve, 2)
            check = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True,
                                   timeout=20)
            assert check.returncode == 0, check.stdout + check.stderr
            haproxy = subprocess.Popen(["haproxy", "-f", str(config), "-db"], stdout=log,
                                       stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 15
            for name in ("v1", "v2"):
                while True:
                    assert haproxy.poll() is None, (tmp_path / "haproxy.log").read_text()
                    try:
                        socket.create_connection(("127.0.0.1", ports[name]), timeout=1).close()
                        break
                    except OSError:
                        assert time.monotonic() < deadline, "haproxy is not listening"
                        time.sleep(0.05)
            yield ports
            assert pulse_serve.stop() == 0, pulse_serve.log()
        finally:
            if haproxy is not None:
                haproxy.kill()
                haproxy.wait(10)
            log.close()


def test_clients_through_haproxy_see_their_own_address(relay: Dict[str, int]) -> None:
    pids = set()
    for name, version, tlvs in (("v1", 1, []), ("v2", 2, [0x03, 0x05])):
        for _ in range(20):
            seen = origin(relay[name])
            assert tuple(seen["remote"]) == seen["me"], seen
            assert seen["version"] == version
            # HAProxy's own end of its connection to pulse: 127.0.0.1, another port.
            assert seen["proxy"][0] == "127.0.0.1" and seen["proxy"] != seen["me"]
            assert sorted(seen["tlv_types"]) == tlvs
            pids.add(seen["pid"])
    # 40 connections, each hashed to one of the two SO_REUSEPORT sockets.
    assert len(pids) == 2


def test_haproxy_health_checks_send_local_headers(relay: Dict[str, int],
                                                 tmp_path: Path) -> None:
    time.sleep(0.5)  # a few checks: LOCAL headers, then HAProxy closes
    seen = origin(relay["v2"])  # the server is still up, and serves
    assert tuple(seen["remote"]) == seen["me"]
    log = (tmp_path / "haproxy.log").read_text()
    assert "DOWN" not in log, log
    checks = (tmp_path / "local.log").read_text().splitlines()
    # A LOCAL header keeps the socket's addresses: HAProxy's own, on 127.0.0.1.
    assert checks and all(line.startswith("LOCAL from ('127.0.0.1', ") for line in checks)


@pytest.mark.parametrize("argv,app,value", [
    (["--proxy-protocol", "m:a"], "m:a", True),  # the flag alone, then the application
    (["m:a", "--proxy-protocol"], "m:a", True),
    (["m:a", "--proxy-protocol", "v1"], "m:a", "v1"),
    (["--proxy-protocol", "v2", "m:a"], "m:a", "v2"),
    (["m:a", "--proxy-protocol", "any"], "m:a", True),
    (["m:a"], "m:a", None),
])
def test_the_proxy_protocol_flag(argv: list, app: str, value: Any) -> None:
    from pulse.cli import build_parser, server_options
    args = build_parser().parse_args(["serve"] + argv)
    assert server_options(args).get("proxy_protocol") == value
    assert (args.app or getattr(args, "displaced_app", None)) == app


@pytest.mark.parametrize("argv,words", [
    (["m:a", "--proxy-protocol", "v3"], "must be one of v1, v2, any, got 'v3'"),
    (["--proxy-protocol"], "required: MODULE:ATTR"),
    (["m:a", "--proxy-protocol", "n:b"], "unrecognized arguments: n:b"),
])
def test_bad_proxy_protocol_flags(argv: list, words: str,
                                  capsys: pytest.CaptureFixture) -> None:
    from pulse.cli import main
    with pytest.raises(SystemExit) as info:
        main(["serve"] + argv)
    assert info.value.code == 2
    assert words in capsys.readouterr().err


def test_a_bad_trusted_network_is_one_error_line(tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    from pulse.cli import main
    (tmp_path / "origin_app.py").write_text(APP)
    status = main(["serve", "origin_app:Origin", "--app-dir", str(tmp_path), "--bind",
                   "127.0.0.1:{}".format(free_port()), "--proxy-protocol",
                   "--proxy-protocol-trusted", "10.0.0.0/8,bogus"])
    assert status == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pulse: error: proxy_protocol_trusted:") and "bogus" in err[-1]
