"""The core examples run as real programs: the echo server and the raw epoll echo."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import connect_when_up, free_port, pattern, recv_exactly

ROOT = Path(__file__).resolve().parent.parent






def check_echo(port: int) -> None:
    socks = [connect_when_up(port) for _ in range(10)]
    for i, sock in enumerate(socks):
        payload = pattern(1000 * (i + 1) * 37, i)
        sock.sendall(payload)
        assert recv_exactly(sock, len(payload), time.monotonic() + 10) == payload
    for sock in socks:
        sock.close()


@pytest.mark.parametrize("script,extra", [
    ("raw_epoll_echo.py", ["--max-seconds", "60"]),
    ("echo_server.py", ["--trigger", "edge"]),
    ("echo_server.py", ["--trigger", "level", "--task-type", "pool"]),
])
def test_example_echoes_and_stops(script: str, extra: list) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / script), "--port",
                             str(port)] + extra, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        check_echo(port)
    finally:
        proc.send_signal(signal.SIGINT if script.startswith("raw") else signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out.decode()
