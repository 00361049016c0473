#!/usr/bin/env python3
"""wrk against the HTTP/1.1 hello examples: pulse vs uvloop vs asyncio, over HTTPS or plain.

The servers are ``examples/http_server.py`` (pulse) and
``examples/uvloop_http_server.py --loop uvloop|asyncio``: the same parser and
the same reply bytes, so the figures compare the event loops and their TLS
layers.  As in ``run.py`` (whose helpers this reuses), each server is pinned
to CPU 0 and the load generator, here ``wrk -t1``, to CPU 1; servers are
interleaved per repeat; the primary figure is the server's CPU time (user +
system, over wrk's whole run) divided by the requests wrk completed.  wrk
keeps its connections alive, so a run holds ``--conns`` handshakes and many
thousand requests: this is the cost of a request on an open TLS connection
(``run.py --cases tls-handshake`` measures handshakes).

    python bench/wrk_http.py                     # HTTPS, 50 connections, 3 repeats
    python bench/wrk_http.py --plain --repeats 5
"""

import argparse
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402  (the runner's helpers: pinning, CPU times, certificates)

SERVERS: Dict[str, run.Server] = {
    "pulse": run.Server("pulse", script=run.REPO / "examples" / "http_server.py"),
    "uvloop": run.Server("uvloop", script=run.REPO / "examples" / "uvloop_http_server.py",
                         args=("--loop", "uvloop"), needs=("uvloop",)),
    "asyncio": run.Server("asyncio", script=run.REPO / "examples" / "uvloop_http_server.py",
                          args=("--loop", "asyncio")),
}
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


class HttpServerProcess(run.ServerProcess):
    """A hello server made ready by one GET (over TLS when ``tls`` is given)."""

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + run.READY_TIMEOUT
        context = None if self.tls is None else ssl.create_default_context(cafile=str(self.tls[0]))
        last_error = "no answer"
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with socket.create_connection((run.HOST, self.port), timeout=2.0) as raw, \
                        (context.wrap_socket(raw, server_hostname=run.HOST)
                         if context is not None else raw) as s:
                    s.sendall(REQUEST)
                    reply = b""
                    while True:
                        chunk = s.recv(4096)
                        if not chunk:
                            break
                        reply += chunk
                    if reply.startswith(b"HTTP/1.1 200"):
                        return
                    last_error = "answered %r" % reply[:40]
            except OSError as exc:
                last_error = str(exc)
            time.sleep(0.05)
        raise run.BenchError("%s not ready on port %d: %s: %s"
                             % (self.server.name, self.port, last_error, self.log_tail()))


def parse_wrk(text: str) -> Tuple[int, float, int]:
    """(requests, requests/s, errors) from wrk's report; errors count socket
    errors and non-2xx answers."""
    done = re.search(r"(\d+) requests in", text)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if done is None or rate is None:
        raise run.BenchError("wrk printed no result: %s" % text.strip()[-300:])
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx is not None:
        errors += int(non2xx.group(1))
    return int(done.group(1)), float(rate.group(1)), errors


def measure(srv: HttpServerProcess, wrk: str, conns: int, duration: float) -> Tuple[float, float]:
    """One wrk run: (server CPU microseconds per request, requests/s)."""
    assert srv.proc is not None
    scheme = "https" if srv.tls is not None else "http"
    cmd = run.pinned([wrk, "-t1", "-c%d" % conns, "-d%ds" % max(1, round(duration)),
                      "%s://%s:%d/" % (scheme, run.HOST, srv.port)], run.LOADGEN_CPU)
    before = sum(run.cpu_times(srv.proc.pid))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30,
                          preexec_fn=run.preexec_for(run.LOADGEN_CPU))
    used = sum(run.cpu_times(srv.proc.pid)) - before
    srv.check_alive()
    requests, rate, errors = parse_wrk(proc.stdout)
    if proc.returncode != 0 or errors or requests == 0:
        raise run.BenchError("wrk: rc %d, %d requests, %d errors: %s"
                             % (proc.returncode, requests, errors, proc.stdout.strip()[-300:]))
    return used / requests * 1e6, rate


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="pulse,uvloop,asyncio")
    parser.add_argument("--plain", action="store_true", help="HTTP instead of HTTPS")
    parser.add_argument("--conns", type=int, default=50)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--python", default=sys.executable, help="interpreter for the servers")
    args = parser.parse_args(argv)
    wrk = shutil.which("wrk")
    if wrk is None:
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    names = [n for n in args.servers.split(",") if n]
    tls: Optional[run.TlsFiles] = None
    if not args.plain:
        tls, why = run.make_tls_files(run.default_cache_dir())
        if tls is None:
            print(why, file=sys.stderr)
            return 2
    results: Dict[str, List[Tuple[float, float]]] = {n: [] for n in names}
    try:
        for repeat in range(args.repeats):
            for name in names:
                with HttpServerProcess(SERVERS[name], args.python, {}, tls) as srv:
                    cpu, rate = measure(srv, wrk, args.conns, args.duration)
                results[name].append((cpu, rate))
                print("[%d/%d] %s: %.2f us/req, %.0f req/s" % (repeat + 1, args.repeats, name,
                                                               cpu, rate), flush=True)
    finally:
        if tls is not None:
            shutil.rmtree(str(tls[0].parent), ignore_errors=True)
    base = statistics.median(c for c, _ in results["uvloop"]) if results.get("uvloop") else None
    print("\n| %s, %d conns | CPU us/req | xuvloop | req/s | CPU spread |" % (
        "HTTP" if args.plain else "HTTPS", args.conns))
    print("|---|---:|---:|---:|---:|")
    for name in names:
        cpus = [c for c, _ in results[name]]
        mid = statistics.median(cpus)
        spread = (max(cpus) - min(cpus)) / 2 / mid * 100
        print("| %s | %.2f | %s | %.0f | ±%.1f%% |" % (
            name, mid, "%.2fx" % (mid / base) if base else "-",
            statistics.median(r for _, r in results[name]), spread))
    return 0


if __name__ == "__main__":
    sys.exit(main())
