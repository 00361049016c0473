#!/usr/bin/env python3
"""redis-benchmark against the mini Redis example and the real redis-server, side by side.

Each server is pinned to CPU 0 and ``redis-benchmark`` to CPU 1.  The primary
figure is requests per server CPU-second: the server's user + system CPU
time (``/proc/PID/stat``, every thread) is read just before and just after
one ``redis-benchmark -t get|set -n N -c 50 -P 16|1`` run, and N is divided
by the difference.  It is quoted as a ratio to redis-server measured in the
same run (``--save '' --appendonly no``), because this machine is shared and
its absolute speed varies.  Servers are interleaved (the order rotates each
repeat) and every figure is the median of ``--repeats`` runs.

Each measurement (the CPU readings and the benchmark run between them)
holds an exclusive ``flock`` on ``/tmp/bench.lock``, so that it never
overlaps another benchmark on this machine that takes the same lock; the
lock is released between measurements.  Warm-up passes take it too, since
they load the CPUs just the same.

Servers (``--servers``): ``redis`` (``/usr/bin/redis-server``), ``cpython``
(``examples/redis_server.py`` under ``--python``, default this interpreter),
``pypy`` (the example under ``--pypy``, default ``pypy3``) and ``pypy-1MB``
(the same with ``PYPY_GC_NURSERY=1MB``).  Every server gets an untimed
warm-up pass per test and pipeline depth before the first measurement, and
that pass also sizes N so that a measured run lasts about ``--seconds``.
``--warmup-curve`` instead starts each Python server afresh and prints the
throughput of consecutive short passes: how long PyPy's JIT needs to warm.

    python bench/redis_bench.py                                # all servers, 3 repeats
    python bench/redis_bench.py --servers redis,cpython --tests get -P 16
    python bench/redis_bench.py --servers pypy,pypy-1MB --warmup-curve
"""

import argparse
import contextlib
import csv
import fcntl
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "redis_server.py"
LOCK_PATH = "/tmp/bench.lock"
SERVER_CPU = "0"
CLIENT_CPU = "1"
TICKS = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def bench_lock() -> Iterator[None]:
    """Hold the machine's benchmark lock for one measurement (blocks while another holds it)."""
    with open(LOCK_PATH, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cpu_seconds(pid: int) -> Tuple[float, float]:
    """(user, system) CPU seconds used so far by process ``pid``, all its threads."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """One server process pinned to ``SERVER_CPU`` on a free 127.0.0.1 port."""

    def __init__(self, name: str, argv: List[str], env: Optional[Dict[str, str]] = None) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        self.port = free_port()
        argv = [arg.replace("{port}", str(self.port)) for arg in self.argv]
        env = dict(os.environ, **(self.env or {}))
        # taskset execs the server, so proc.pid is the server's own pid.
        self.proc = subprocess.Popen(["taskset", "-c", SERVER_CPU] + argv, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     cwd=str(REPO))
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited with %s: %s" % (
                    self.name, self.proc.returncode, self.proc.stderr.read().decode()))
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("%s did not listen within 20 s" % self.name) from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def cpu(self) -> Tuple[float, float]:
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)


def make_servers(names: Sequence[str], python: str, pypy: str) -> List[Server]:
    # The example finds pulse through PYTHONPATH (this checkout), like the tests.
    pythonpath = {"PYTHONPATH": str(REPO)}
    example = [str(EXAMPLE), "--port", "{port}", "--log-level", "WARNING"]
    known = {
        "redis": lambda: Server("redis", [shutil.which("redis-server") or "/usr/bin/redis-server",
                                          "--port", "{port}", "--bind", "127.0.0.1",
                                          "--save", "", "--appendonly", "no"]),
        "cpython": lambda: Server("cpython", [python] + example, pythonpath),
        "pypy": lambda: Server("pypy", [pypy] + example, pythonpath),
        "pypy-1MB": lambda: Server("pypy-1MB", [pypy] + example,
                                   dict(pythonpath, PYPY_GC_NURSERY="1MB")),
    }
    unknown = [name for name in names if name not in known]
    if unknown:
        sys.exit("unknown server(s) %s; choose from %s" % (", ".join(unknown), ", ".join(known)))
    return [known[name]() for name in names]


def backend_of(interpreter: str) -> str:
    """Which pulse backend ``interpreter`` loads from this checkout (epoll or portable)."""
    out = subprocess.run([interpreter, "-W", "ignore", "-c",
                          "import pulse, platform; print(pulse.BACKEND, "
                          "platform.python_implementation(), platform.python_version())"],
                         env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, timeout=60)
    return out.stdout.decode().strip().splitlines()[-1]


def redis_benchmark(port: int, test: str, requests: int, clients: int, pipeline: int,
                    timeout: float) -> float:
    """Run one bounded redis-benchmark pass; return the requests/s it reports."""
    argv = ["taskset", "-c", CLIENT_CPU, "redis-benchmark", "-h", "127.0.0.1", "-p", str(port),
            "-t", test, "-n", str(requests), "-c", str(clients), "-P", str(pipeline),
            "-q", "--csv"]
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError("redis-benchmark exited %d: %s" % (
            result.returncode, result.stderr.decode(errors="replace")))
    rows = list(csv.reader(io.StringIO(result.stdout.decode())))
    for row in rows:
        if row and row[0].upper() == test.upper():
            return float(row[1])
    raise RuntimeError("no %s row in redis-benchmark output: %r" % (test, result.stdout))


def measure(server: Server, test: str, requests: int, clients: int, pipeline: int,
            timeout: float) -> Dict[str, float]:
    """One locked measurement: requests per server CPU-second, requests/s, wall and CPU time."""
    with bench_lock():
        user0, sys0 = server.cpu()
        t0 = time.monotonic()
        rps = redis_benchmark(server.port, test, requests, clients, pipeline, timeout)
        wall = time.monotonic() - t0
        user1, sys1 = server.cpu()
    user, system = user1 - user0, sys1 - sys0
    cpu = user + system
    return {"requests": requests, "rps": rps, "wall": wall, "cpu": cpu,
            "user_us": 1e6 * user / requests, "sys_us": 1e6 * system / requests,
            "per_cpu_s": requests / cpu if cpu > 0 else float("inf")}


def size_run(rps: float, seconds: float) -> int:
    """A request count that lasts about ``seconds`` at ``rps``, rounded to 2 digits."""
    n = max(10000, int(rps * seconds))
    scale = 10 ** (len(str(n)) - 2)
    return n // scale * scale


def warmup_curve(server: Server, args: argparse.Namespace) -> None:
    """Fresh server, consecutive fixed-size passes: print throughput and CPU per pass."""
    server.start()
    try:
        print("\n### warm-up of %s (GET, -P %d, -c %d, %d requests a pass)\n"
              % (server.name, args.pipelines[0], args.clients, args.curve_requests))
        print("| pass | elapsed s | req/s | req per CPU-s |")
        print("|---|---|---|---|")
        elapsed = 0.0
        with bench_lock():
            for i in range(args.curve_passes):
                cpu0 = sum(server.cpu())
                t0 = time.monotonic()
                rps = redis_benchmark(server.port, "get", args.curve_requests, args.clients,
                                      args.pipelines[0], args.timeout)
                wall = time.monotonic() - t0
                cpu = sum(server.cpu()) - cpu0
                elapsed += wall
                print("| %d | %.1f | %.0f | %.0f |" % (i + 1, elapsed, rps,
                                                      args.curve_requests / max(cpu, 1e-9)),
                      flush=True)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--servers", default="redis,cpython,pypy,pypy-1MB")
    parser.add_argument("--tests", default="get,set")
    parser.add_argument("-P", "--pipelines", default="16,1",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("-c", "--clients", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="target length of one measured run (N is sized from the warm-up)")
    parser.add_argument("--warmup-requests", type=int, default=300000,
                        help="requests of the untimed warm-up pass per test and depth "
                             "(x4 for PyPy servers, whose JIT needs them)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds after which one redis-benchmark run is killed")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--pypy", default="pypy3")
    parser.add_argument("--warmup-curve", action="store_true")
    parser.add_argument("--curve-requests", type=int, default=200000)
    parser.add_argument("--curve-passes", type=int, default=10)
    parser.add_argument("--json", metavar="FILE", help="write every sample here")
    args = parser.parse_args()
    for tool in ("taskset", "redis-benchmark"):
        if shutil.which(tool) is None:
            sys.exit("%s is not on PATH" % tool)
    names = args.servers.split(",")
    tests = args.tests.split(",")
    servers = make_servers(names, args.python, args.pypy)
    for name, interpreter in (("cpython", args.python), ("pypy", args.pypy)):
        if any(s.startswith(name) for s in names):
            log("%s: %s" % (name, backend_of(interpreter)))
    if args.warmup_curve:
        for server in servers:
            if server.name != "redis":
                warmup_curve(server, args)
        return

    cases = [(test, pipeline) for test in tests for pipeline in args.pipelines]
    samples: Dict[Tuple[str, str, int], List[Dict[str, float]]] = {}
    sizes: Dict[Tuple[str, str, int], int] = {}
    try:
        for server in servers:
            server.start()
            for test, pipeline in cases:
                warm = args.warmup_requests * (4 if server.name.startswith("pypy") else 1)
                if pipeline == 1:
                    warm //= 4
                t0 = time.monotonic()
                sample = measure(server, test, warm, args.clients, pipeline, args.timeout)
                sizes[server.name, test, pipeline] = size_run(sample["rps"], args.seconds)
                log("warm-up %s %s -P %d: %d requests in %.1f s, %.0f req/s" % (
                    server.name, test, pipeline, warm, time.monotonic() - t0, sample["rps"]))
        for repeat in range(args.repeats):
            order = servers[repeat % len(servers):] + servers[:repeat % len(servers)]
            for test, pipeline in cases:
                for server in order:
                    key = (server.name, test, pipeline)
                    sample = measure(server, test, sizes[key], args.clients, pipeline,
                                     args.timeout)
                    samples.setdefault(key, []).append(sample)
                    log("run %d %s %s -P %d: %.0f req/CPU-s, %.0f req/s, %.1f s" % (
                        repeat + 1, server.name, test, pipeline, sample["per_cpu_s"],
                        sample["rps"], sample["wall"]))
    finally:
        for server in servers:
            server.stop()

    print("\n| server | test | -P | req per server CPU-s | x redis-server | req/s | "
          "server CPU % | user us/req | sys us/req | runs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for test, pipeline in cases:
        base = samples.get(("redis", test, pipeline))
        base_median = statistics.median(s["per_cpu_s"] for s in base) if base else None
        for server in servers:
            runs = samples[server.name, test, pipeline]
            per_cpu = statistics.median(s["per_cpu_s"] for s in runs)
            rps = statistics.median(s["rps"] for s in runs)
            busy = statistics.median(100 * s["cpu"] / s["wall"] for s in runs)
            user = statistics.median(s["user_us"] for s in runs)
            system = statistics.median(s["sys_us"] for s in runs)
            ratio = "%.2f" % (per_cpu / base_median) if base_median else "-"
            print("| %s | %s | %d | %.0f | %s | %.0f | %.0f | %.2f | %.2f | %d |" % (
                server.name, test.upper(), pipeline, per_cpu, ratio, rps, busy, user, system,
                len(runs)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"server": k[0], "test": k[1], "pipeline": k[2], "samples": v}
                       for k, v in samples.items()], f, indent=1)


if __name__ == "__main__":
    main()
