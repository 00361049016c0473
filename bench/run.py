#!/usr/bin/env python3
"""Benchmark runner for pulse: builds the C load generator and C echo server,
then measures the pulse, uvloop, asyncio, gevent and C echo servers side by side.

Each measurement starts a fresh server pinned to CPU 0 and the load generator
pinned to CPU 1, repeats every case (servers interleaved A B A B ...), and
prints a markdown table of medians: server CPU time per request (the primary
figure), requests/s, p50/p99 latency, plus connections/s and resident memory
per idle connection, and the same echo and connection churn over TLS
(handshakes/s). See bench/README.md for the method.

    python bench/run.py --quick
    python bench/run.py --servers pulse,uvloop,asyncio,c --repeats 3 --png out.png
"""

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

try:
    import psutil  # type: ignore
except ImportError:  # e.g. PyPy without psutil: fall back to /proc
    psutil = None

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HOST = "127.0.0.1"
SERVER_CPU = 0
LOADGEN_CPU = 1
READY_TIMEOUT = 30.0
BASELINE = "uvloop"


class BenchError(Exception):
    """A single measurement failed (server died, or the load generator reported
    corrupted or missing echo data); the message says why."""


class ServerStartError(BenchError):
    """The server never became ready (missing module, crash at start-up, or no
    echo within the timeout); such a server is not started again."""


# --------------------------------------------------------------------------
# Cases and servers


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark scenario: ``kind`` is ``echo`` (ping-pong or pipelined
    echo of ``size``-byte messages on ``conns`` connections, ``pipeline``
    messages in flight per connection), ``connect`` (connection churn with
    ``conns`` concurrent slots) or ``idle`` (``conns`` idle connections, for
    memory); with ``tls`` the connections speak TLS (for ``connect``: every
    cycle is a full handshake)."""

    name: str
    kind: str
    size: int = 64
    conns: int = 1
    pipeline: int = 1
    tls: bool = False

    def describe(self) -> str:
        """Human-readable one-line description used in the tables."""
        if self.kind == "connect":
            if self.tls:
                return "connect+TLS handshake+echo+close, %d concurrent" % self.conns
            return "connect+echo+close, %d concurrent" % self.conns
        if self.kind == "idle":
            return "%d idle connections" % self.conns
        mode = "pipelined x%d" % self.pipeline if self.pipeline > 1 else "ping-pong"
        return "%s%s x %d conns, %s" % ("TLS " if self.tls else "", size_label(self.size), self.conns, mode)


def size_label(size: int) -> str:
    """Format a byte count as ``64 B`` / ``16 KiB``."""
    if size >= 1024 and size % 1024 == 0:
        return "%d KiB" % (size // 1024)
    return "%d B" % size


def short_size(size: int) -> str:
    """Format a byte count for case names: ``64B``, ``16K``."""
    if size >= 1024 and size % 1024 == 0:
        return "%dK" % (size // 1024)
    return "%dB" % size


def build_cases(idle_conns: int) -> List[Case]:
    """All cases of the full suite, in the order they are run and reported."""
    cases = []
    for size in (64, 1024, 16384, 65536):
        for conns in (1, 50, 500):
            cases.append(Case("%s-%dc" % (short_size(size), conns), "echo", size, conns, 1))
    cases.append(Case("64B-50c-p16", "echo", 64, 50, 16))
    cases.append(Case("connect", "connect", 64, 50, 1))
    for size in (1024, 16384):
        cases.append(Case("tls-%s-50c" % short_size(size), "echo", size, 50, 1, tls=True))
    cases.append(Case("tls-handshake", "connect", 64, 50, 1, tls=True))
    cases.append(Case("idle", "idle", 64, idle_conns, 1))
    return cases


QUICK_CASES = ["64B-50c", "16K-50c"]
CASE_GROUPS = {
    "pingpong": lambda c: c.kind == "echo" and c.pipeline == 1 and not c.tls,
    "pipeline": lambda c: c.kind == "echo" and c.pipeline > 1 and not c.tls,
    "echo": lambda c: c.kind == "echo" and not c.tls,
    "connect": lambda c: c.kind == "connect" and not c.tls,
    "tls": lambda c: c.tls,
    "idle": lambda c: c.kind == "idle",
    "all": lambda c: True,
}


@dataclasses.dataclass(frozen=True)
class Server:
    """An echo server under test: a Python ``script`` run with the chosen
    interpreter (plus ``args``), or a compiled C ``binary`` (a key into the
    built binaries); ``needs`` lists modules the interpreter must import;
    ``tls`` says it takes ``--certfile``/``--keyfile`` (the TLS cases skip the
    others); ``pypy`` runs the script under ``--pypy`` instead of ``--python``,
    with ``--pypy-warmup`` seconds of load before the window so that the JIT
    has compiled the hot loops."""

    name: str
    script: Optional[Path] = None
    binary: Optional[str] = None
    args: Tuple[str, ...] = ()
    needs: Tuple[str, ...] = ()
    tls: bool = False
    pypy: bool = False


SERVERS: Dict[str, Server] = {
    "pulse": Server("pulse", script=REPO / "examples" / "echo_server.py", tls=True),
    "pulse-level": Server("pulse-level", script=REPO / "examples" / "echo_server.py",
                          args=("--trigger", "level"), tls=True),
    "pulse-pypy": Server("pulse-pypy", script=REPO / "examples" / "echo_server.py", tls=True, pypy=True),
    "uvloop": Server("uvloop", script=HERE / "servers" / "uvloop_echo.py", needs=("uvloop",), tls=True),
    "asyncio": Server("asyncio", script=HERE / "servers" / "asyncio_echo.py", tls=True),
    "gevent": Server("gevent", script=HERE / "servers" / "gevent_echo.py", needs=("gevent",)),
    "c": Server("c", binary="c_epoll_echo"),
}
DEFAULT_SERVERS = "pulse,uvloop,asyncio,gevent,c"
QUICK_SERVERS = "pulse,uvloop,asyncio"


# --------------------------------------------------------------------------
# Build


CC = os.environ.get("CC", "cc")
CFLAGS = ["-O2", "-Wall", "-Wextra"]


def compile_c(sources: Dict[str, Path], cache_dir: Path,
              extra: Optional[Dict[str, Tuple[List[str], List[str]]]] = None) -> Dict[str, Path]:
    """Compile each C source with ``cc -O2`` into ``cache_dir`` (named by a hash
    of source, compiler and flags, so rebuilds happen only on change) and return
    the binary paths by name; ``extra[name]`` adds (flags, libraries) for one
    source. Exits with the compiler output on failure."""
    cc = CC
    try:
        cc_version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        sys.exit("error: C compiler %r not usable: %s" % (cc, exc))
    cache_dir.mkdir(parents=True, exist_ok=True)
    out: Dict[str, Path] = {}
    for name, src in sources.items():
        more, libs = (extra or {}).get(name, ([], []))
        flags = CFLAGS + more
        digest = hashlib.sha256()
        digest.update(src.read_bytes())
        digest.update(" ".join([cc] + flags + libs).encode())
        digest.update(cc_version.encode())
        binary = cache_dir / ("%s-%s" % (name, digest.hexdigest()[:12]))
        if not binary.exists():
            tmp = cache_dir / ("%s.tmp%d" % (binary.name, os.getpid()))
            proc = subprocess.run([cc] + flags + ["-o", str(tmp), str(src)] + libs, capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                sys.exit("error: compiling %s failed:\n%s%s" % (src, proc.stdout, proc.stderr))
            os.replace(tmp, binary)
        out[name] = binary
    return out


TLS_PROBE = "#include <openssl/ssl.h>\nint main(void) { return SSL_CTX_new(TLS_client_method()) == 0; }\n"


def tls_build_flags(cache_dir: Path) -> Tuple[Optional[Tuple[List[str], List[str]]], str]:
    """(flags, libraries) that build loadgen.c with TLS (``-DLOADGEN_TLS``,
    OpenSSL from pkg-config or plain ``-lssl -lcrypto``), checked by compiling
    a probe program; or None and the reason when OpenSSL's headers or
    libraries are missing (then the TLS cases fail with that reason)."""
    cflags: List[str] = []
    libs = ["-lssl", "-lcrypto"]
    if shutil.which("pkg-config"):
        got = [subprocess.run(["pkg-config", what, "openssl"], capture_output=True, text=True)
               for what in ("--cflags", "--libs")]
        if all(p.returncode == 0 for p in got):
            cflags, libs = got[0].stdout.split(), got[1].stdout.split() or libs
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=str(cache_dir)) as tmp:
        src = Path(tmp) / "probe.c"
        src.write_text(TLS_PROBE)
        try:
            proc = subprocess.run([CC] + cflags + ["-o", str(Path(tmp) / "probe"), str(src)] + libs,
                                  capture_output=True, text=True)
        except OSError as exc:
            return None, "cannot run the C compiler %r: %s" % (CC, exc)
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["compiler failed"])[0]
        first = first[first.find("error:"):] if "error:" in first else first  # without the probe's path
        return None, ("the load generator was built without TLS: OpenSSL headers/libraries not found "
                      "(install libssl-dev or openssl-devel): %s" % first)
    return (["-DLOADGEN_TLS"] + cflags, libs), ""


TlsFiles = Tuple[Path, Path]  # (certificate, private key), PEM


def make_tls_files(cache_dir: Path) -> Tuple[Optional[TlsFiles], str]:
    """A fresh ECDSA P-256 key and a self-signed certificate for 127.0.0.1
    (with the openssl command) in a new private directory under ``cache_dir``,
    which the caller removes; or None and the reason."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None, "the openssl command (which makes the test certificate) is not installed"
    cache_dir.mkdir(parents=True, exist_ok=True)
    where = Path(tempfile.mkdtemp(prefix="tls-", dir=str(cache_dir)))
    cert, key = where / "cert.pem", where / "key.pem"
    cmd = [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
           "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
           "-addext", "subjectAltName=IP:127.0.0.1"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        made = proc.returncode == 0 and cert.exists() and key.exists()
    except (OSError, subprocess.TimeoutExpired) as exc:
        detail, made = str(exc), False
    if not made:
        shutil.rmtree(str(where), ignore_errors=True)
        return None, "openssl could not make the test certificate: %s" % detail
    return (cert, key), ""


def default_cache_dir() -> Path:
    """Where compiled binaries are kept: $PULSE_BENCH_CACHE, else
    $XDG_CACHE_HOME/pulse-bench, else ~/.cache/pulse-bench (falling back to the
    system temp directory when the home directory is not writable)."""
    env = os.environ.get("PULSE_BENCH_CACHE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = base / "pulse-bench"
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError:
        return Path(tempfile.gettempdir()) / ("pulse-bench-%d" % os.getuid())


# --------------------------------------------------------------------------
# Processes


def raise_nofile(need: int) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit (and the hard limit, when
    permitted) to at least ``need``; children inherit it. Returns the new soft
    limit, which may be lower than ``need`` if the system refuses."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return soft
    if hard != resource.RLIM_INFINITY and hard < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            return need
        except (ValueError, OSError):
            need = hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    except (ValueError, OSError):
        return soft
    return need


TASKSET = shutil.which("taskset")


def can_pin() -> bool:
    """True when CPUs 0 and 1 both exist and are usable by this process (PyPy
    3.9 lacks os.sched_getaffinity: then taskset and two CPUs suffice)."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is None:
        return TASKSET is not None and (os.cpu_count() or 1) > max(SERVER_CPU, LOADGEN_CPU)
    cpus = getaffinity(0)
    return SERVER_CPU in cpus and LOADGEN_CPU in cpus


_PROC_ERRORS: Tuple[type, ...] = (OSError, IndexError, ValueError) + (
    (psutil.Error,) if psutil is not None else ())
PIN = can_pin()


def pinned(cmd: List[str], cpu: int) -> List[str]:
    """Prefix ``cmd`` with ``taskset -c CPU`` (taskset execs the command, so the
    pid stays the same); without taskset, pinning happens in ``preexec``."""
    if PIN and TASKSET:
        return [TASKSET, "-c", str(cpu)] + cmd
    return cmd


def preexec_for(cpu: int) -> Optional[Callable[[], None]]:
    """A preexec function pinning the child to ``cpu`` when taskset is missing."""
    if PIN and not TASKSET and hasattr(os, "sched_setaffinity"):
        return lambda: os.sched_setaffinity(0, {cpu})
    return None


def free_port() -> int:
    """Ask the kernel for a free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _proc_pids(pid: int) -> List[int]:
    """``pid`` plus its descendants (for servers that fork workers)."""
    if psutil is not None:
        try:
            p = psutil.Process(pid)
            return [pid] + [c.pid for c in p.children(recursive=True)]
        except psutil.Error:
            return [pid]
    return [pid]


def cpu_times(pid: int) -> Tuple[float, float]:
    """(user, system) CPU seconds consumed so far by ``pid`` and its
    descendants, all threads included (psutil when available, else
    /proc/PID/stat)."""
    user = system = 0.0
    for p in _proc_pids(pid):
        try:
            if psutil is not None:
                t = psutil.Process(p).cpu_times()
                user += t.user
                system += t.system
            else:
                with open("/proc/%d/stat" % p) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                ticks = os.sysconf("SC_CLK_TCK")
                user += int(fields[11]) / ticks
                system += int(fields[12]) / ticks
        except _PROC_ERRORS:
            pass
    return user, system


def machine_user_steal() -> Tuple[float, float]:
    """Machine-wide (user+nice, steal) CPU seconds from /proc/stat, used to
    detect other processes (and the hypervisor) competing during a window."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[1]) + int(fields[2])) / ticks, int(fields[8]) / ticks
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0


def rss_bytes(pid: int) -> int:
    """Resident set size in bytes of ``pid`` and its descendants."""
    total = 0
    for p in _proc_pids(pid):
        try:
            if psutil is not None:
                total += psutil.Process(p).memory_info().rss
            else:
                with open("/proc/%d/statm" % p) as f:
                    total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except _PROC_ERRORS:
            pass
    return total


def machine_busy_pct(sample: float = 0.5) -> float:
    """Machine-wide non-idle CPU (all CPUs summed, in percent of one CPU,
    steal included) over a ``sample``-second interval, from /proc/stat."""
    def read() -> Tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        idle = v[3] + v[4]
        return sum(v) - idle, sum(v)
    try:
        b0, t0 = read()
        time.sleep(sample)
        b1, t1 = read()
    except (OSError, ValueError):
        return 0.0
    ncpu = os.cpu_count() or 1
    return 100.0 * ncpu * (b1 - b0) / max(1, t1 - t0)


def wait_quiet(limit: float, threshold: float, log: Callable[[str], None]) -> None:
    """Before a run, wait up to ``limit`` seconds for other load on the machine
    to fall below ``threshold`` percent (of one CPU); gives up silently after
    saying so once, so the run still happens and is flagged in the report."""
    if limit <= 0:
        return
    deadline = time.monotonic() + limit
    busy = machine_busy_pct()
    if busy < threshold:
        return
    log("machine busy (%.0f%% CPU used by others); waiting up to %.0f s for quiet" % (busy, limit))
    while time.monotonic() < deadline:
        busy = machine_busy_pct(1.0)
        if busy < threshold:
            return
    log("still busy (%.0f%%); running anyway" % busy)


class ServerProcess:
    """A running echo server: started pinned to CPU 0 with output captured to a
    temporary log, made ready by an echo round trip (over TLS, verifying the
    certificate, when ``tls`` gives the files), stopped with SIGTERM then
    SIGKILL. Use as a context manager."""

    def __init__(self, server: Server, python: str, binaries: Dict[str, Path],
                 tls: Optional[TlsFiles] = None) -> None:
        self.server = server
        self.port = free_port()
        self.tls = tls
        if server.binary is not None:
            cmd = [str(binaries[server.binary])]
        else:
            cmd = [python, str(server.script)]
        self.cmd = cmd + ["--port", str(self.port)] + list(server.args)
        if tls is not None:
            self.cmd += ["--certfile", str(tls[0]), "--keyfile", str(tls[1])]
        self.log = tempfile.TemporaryFile()
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "ServerProcess":
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            pinned(self.cmd, SERVER_CPU), cwd=str(REPO), env=env, stdin=subprocess.DEVNULL,
            stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=preexec_for(SERVER_CPU))
        try:
            self._wait_ready()
        except BenchError as exc:
            self.stop()
            raise ServerStartError(str(exc)) from None
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        self.log.close()

    @property
    def pid(self) -> int:
        """Process id of the server (taskset execs it, so this is the server)."""
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, limit: int = 1500) -> str:
        """The last ``limit`` characters of the server's stdout/stderr."""
        self.log.seek(0)
        text = self.log.read().decode("utf-8", "replace")
        return text[-limit:].strip()

    def check_alive(self) -> None:
        """Raise BenchError if the server process has exited."""
        assert self.proc is not None
        rc = self.proc.poll()
        if rc is not None:
            raise BenchError("%s server exited with status %s: %s" % (self.server.name, rc, self.log_tail()))

    def _wait_ready(self) -> None:
        """Poll until the server echoes a probe message, bounded by READY_TIMEOUT."""
        deadline = time.monotonic() + READY_TIMEOUT
        probe = b"pulse-bench-ready\n"
        last_error = "no attempt"
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=str(self.tls[0]))
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with socket.create_connection((HOST, self.port), timeout=2.0) as raw, \
                        (context.wrap_socket(raw, server_hostname=HOST) if context is not None else raw) as s:
                    s.sendall(probe)
                    got = b""
                    while len(got) < len(probe):
                        chunk = s.recv(len(probe) - len(got))
                        if not chunk:
                            break
                        got += chunk
                    if got == probe:
                        return
                    last_error = "probe echoed %r" % got
            except OSError as exc:
                last_error = str(exc)
            time.sleep(0.05)
        raise BenchError("%s server not ready on port %d after %.0f s (%s): %s"
                         % (self.server.name, self.port, READY_TIMEOUT, last_error, self.log_tail()))

    def stop(self) -> None:
        """Terminate the server (its own pid only) and close the log."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


# --------------------------------------------------------------------------
# Measurements


@dataclasses.dataclass
class Sample:
    """Result of one run of one case against one server."""

    ok: bool
    error: str = ""
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    p50_us: float = 0.0
    p99_us: float = 0.0
    cpu_us_per_req: float = 0.0
    user_us_per_req: float = 0.0  # the user-space part of cpu_us_per_req
    server_cpu_pct: float = 0.0
    loadgen_cpu_pct: float = 0.0
    other_cpu_pct: float = 0.0
    kib_per_conn: float = 0.0
    rss_before: int = 0
    rss_after: int = 0


def loadgen_cmd(loadgen: Path, case: Case, port: int, duration: float, warmup: float,
                busy_poll: bool = False) -> List[str]:
    """Command line of the load generator for ``case`` against ``port``."""
    cmd = [str(loadgen), "--host", HOST, "--port", str(port), "--conns", str(case.conns),
           "--size", str(case.size), "--markers"]
    if case.kind == "idle":
        return cmd + ["--idle", "--duration", "120", "--connect-timeout", "20"]
    cmd += ["--duration", str(duration), "--warmup", str(warmup), "--pipeline", str(case.pipeline)]
    if busy_poll:
        cmd.append("--busy-poll")
    if case.kind == "connect":
        cmd.append("--connect-rate")
    if case.tls:
        cmd.append("--tls")  # the server's certificate is not verified: no client cost for that
    return cmd


def _start_loadgen(cmd: List[str], stdin: Any) -> subprocess.Popen:
    """Start the load generator pinned to CPU 1 with stdout/stderr piped."""
    return subprocess.Popen(pinned(cmd, LOADGEN_CPU), stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec_for(LOADGEN_CPU))


def _watchdog(proc: subprocess.Popen, seconds: float) -> threading.Timer:
    """Kill ``proc`` (that pid only) if it is still running after ``seconds``."""
    def kill() -> None:
        if proc.poll() is None:
            proc.kill()
    timer = threading.Timer(seconds, kill)
    timer.daemon = True
    timer.start()
    return timer


def _loadgen_failure(rc: int, stderr_lines: List[str]) -> BenchError:
    """Turn a non-zero load generator exit into a BenchError carrying its
    stderr (which names the connection, message and offset of bad data)."""
    msg = "".join(stderr_lines).strip() or "(no output)"
    if rc < 0:
        return BenchError("load generator killed by signal %d (timeout?): %s" % (-rc, msg))
    return BenchError("load generator failed (exit %d): %s" % (rc, msg))


def measure_load(srv: ServerProcess, loadgen: Path, case: Case, duration: float, warmup: float,
                 busy_poll: bool = False) -> Sample:
    """Run the load generator for an echo or connect case and sample the
    server's CPU time at the ``#start``/``#stop`` markers that delimit the
    measured window; CPU per request is that delta over the echoed requests."""
    cmd = loadgen_cmd(loadgen, case, srv.port, duration, warmup, busy_poll)
    proc = _start_loadgen(cmd, subprocess.DEVNULL)
    timer = _watchdog(proc, warmup + duration + 120)
    marks: Dict[str, Tuple[float, Tuple[float, float], Tuple[float, float], Tuple[float, float]]] = {}
    other: List[str] = []
    try:
        assert proc.stderr is not None and proc.stdout is not None
        for line in proc.stderr:
            tag = line.strip()
            if tag in ("#start", "#stop"):
                marks[tag] = (time.monotonic(), cpu_times(srv.pid), cpu_times(proc.pid), machine_user_steal())
            else:
                other.append(line)
        out = proc.stdout.read()
        rc = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    srv.check_alive()
    if rc != 0:
        raise _loadgen_failure(rc, other)
    if "#start" not in marks or "#stop" not in marks:
        raise BenchError("load generator printed no measurement markers: %s" % "".join(other))
    data = json.loads(out.strip().splitlines()[-1])
    requests = int(data["requests"])
    if requests <= 0:
        raise BenchError("no requests completed in the measured window")
    (t0, s0, g0, m0), (t1, s1, g1, m1) = marks["#start"], marks["#stop"]
    wall = max(t1 - t0, 1e-9)
    server_cpu = sum(s1) - sum(s0)
    loadgen_cpu = sum(g1) - sum(g0)
    # User time of everything else on the machine, plus hypervisor steal.
    other = (m1[0] - m0[0]) - (s1[0] - s0[0]) - (g1[0] - g0[0]) + (m1[1] - m0[1])
    return Sample(
        ok=True, requests=requests, seconds=float(data["seconds"]), rps=float(data["rps"]),
        p50_us=float(data["p50_us"]), p99_us=float(data["p99_us"]),
        cpu_us_per_req=server_cpu * 1e6 / requests,
        user_us_per_req=(s1[0] - s0[0]) * 1e6 / requests, server_cpu_pct=100.0 * server_cpu / wall,
        loadgen_cpu_pct=100.0 * loadgen_cpu / wall, other_cpu_pct=max(0.0, 100.0 * other / wall))


def measure_idle(srv: ServerProcess, loadgen: Path, case: Case, settle: float) -> Sample:
    """Open ``case.conns`` connections (one echo each, so the server has
    accepted and serviced every one), let the server settle, and report the RSS
    growth divided by the number of connections, in KiB."""
    time.sleep(settle)
    before = rss_bytes(srv.pid)
    cmd = loadgen_cmd(loadgen, case, srv.port, 0, 0)
    proc = _start_loadgen(cmd, subprocess.PIPE)
    timer = _watchdog(proc, 300)
    other: List[str] = []
    after = 0
    try:
        assert proc.stderr is not None and proc.stdout is not None and proc.stdin is not None
        for line in proc.stderr:
            if line.strip() == "#ready":
                time.sleep(settle)
                srv.check_alive()
                after = max(rss_bytes(srv.pid), after)
                time.sleep(0.2)
                after = max(rss_bytes(srv.pid), after)
                proc.stdin.close()  # releases the connections
            else:
                other.append(line)
        proc.stdout.read()
        rc = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if rc != 0:
        raise _loadgen_failure(rc, other)
    if after == 0:
        raise BenchError("load generator never reported the idle connections ready")
    return Sample(ok=True, requests=case.conns, kib_per_conn=(after - before) / case.conns / 1024.0,
                  rss_before=before, rss_after=after)


# --------------------------------------------------------------------------
# Environment description


def machine_info(python: str) -> Dict[str, str]:
    """CPU model, core count, kernel, OS, and the server interpreter's version,
    for the header of the report."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    os_name = platform.system()
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    os_name = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    code = ("import platform,sys;print(platform.python_implementation()+' '+platform.python_version()"
            "+' ('+sys.executable+')')")
    try:
        pyver = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pyver = ""
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count() or "?"),
        "kernel": "%s %s" % (platform.system(), platform.release()),
        "os": os_name,
        "python": pyver or python,
        "runner_python": "%s %s" % (platform.python_implementation(), platform.python_version()),
    }


def interpreter(server: Server, args: argparse.Namespace) -> str:
    """The interpreter that runs ``server``'s script."""
    return args.pypy if server.pypy else args.python


def warmup(server: Server, args: argparse.Namespace) -> float:
    """Seconds of load before the measured window: PyPy's JIT needs longer."""
    return max(args.warmup, args.pypy_warmup) if server.pypy else args.warmup


def check_server(server: Server, python: str) -> Tuple[bool, str]:
    """Whether ``server`` can run here: its script exists and the modules it
    needs import under ``python`` (for PyPy: pulse with its compiled backend,
    so that PyPy is not compared on the portable fallback); returns
    (ok, version-or-reason)."""
    if server.binary is not None:
        return True, ""
    assert server.script is not None
    if not server.script.exists():
        return False, "%s does not exist yet" % server.script.relative_to(REPO)
    if server.pypy:
        code = "import pulse; print(pulse.BACKEND)"
        try:
            proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60,
                                  env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=str(REPO))
        except OSError as exc:
            return False, "%s: %s (run .ci/pypy.sh once, or give --pypy)" % (python, exc)
        if proc.returncode != 0 or proc.stdout.strip() == "portable" or proc.stderr.strip():
            return False, "%s cannot import pulse with its compiled backend: %s" % (
                python, (proc.stderr.strip() or proc.stdout.strip())[-300:])
        return True, ""
    if not server.needs:
        return True, ""
    code = "import %s as m; print(getattr(m, '__version__', '?'))" % server.needs[0]
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return False, "%s cannot import %s" % (python, server.needs[0])
    return True, "%s %s" % (server.needs[0], proc.stdout.strip())


# --------------------------------------------------------------------------
# Reporting


def median(values: Sequence[float]) -> float:
    """Median of ``values``, NaN when empty."""
    return statistics.median(values) if values else float("nan")


def fmt(value: float, digits: int = 1) -> str:
    """Format a number for the tables (thousands separators, ``-`` for NaN)."""
    if value != value:  # NaN
        return "-"
    if abs(value) >= 100000:
        return "{:,.0f}".format(value)
    return "{:,.{}f}".format(value, digits)


def ratio(value: float, base: Optional[float]) -> str:
    """``value / base`` as ``0.83x``, or ``-`` when there is no baseline."""
    if base is None or base != base or base == 0 or value != value:
        return "-"
    return "%.2fx" % (value / base)


Results = Dict[str, Dict[str, List[Sample]]]


def summarize(samples: List[Sample]) -> Optional[Dict[str, float]]:
    """Medians of the successful samples, or None when none succeeded."""
    good = [s for s in samples if s.ok]
    if not good:
        return None
    cpu = [s.cpu_us_per_req for s in good]
    med_cpu = median(cpu)
    return {
        "n": len(good),
        "cpu": med_cpu,
        "spread": 100.0 * (max(cpu) - min(cpu)) / 2.0 / med_cpu if med_cpu else 0.0,
        "rps": median([s.rps for s in good]),
        "p50": median([s.p50_us for s in good]),
        "p99": median([s.p99_us for s in good]),
        "srv": median([s.server_cpu_pct for s in good]),
        "gen": median([s.loadgen_cpu_pct for s in good]),
        "other": max(s.other_cpu_pct for s in good),
        "kib": median([s.kib_per_conn for s in good]),
    }


def first_error(samples: List[Sample]) -> str:
    """A one-line summary of the first failure: the message's first line and,
    for multi-line output such as a traceback, its last line too."""
    for s in samples:
        if not s.ok:
            lines = [x.strip() for x in s.error.splitlines() if x.strip()] or ["failed"]
            text = lines[0] if len(lines) == 1 else "%s ... %s" % (lines[0], lines[-1])
            return text[:240].replace("|", "\\|")
    return ""


def render_markdown(results: Results, cases: List[Case], servers: List[str], info: Dict[str, str],
                    versions: Dict[str, str], args: argparse.Namespace) -> str:
    """Build the markdown report: machine description, method, then one table
    for echo cases, one for connection churn and one for idle memory."""
    lines = ["# pulse echo benchmark", ""]
    lines.append("- CPU: %s, %s cores; %s; %s" % (info["cpu"], info["cores"], info["kernel"], info["os"]))
    lines.append("- Python (servers): %s; runner: %s" % (info["python"], info["runner_python"]))
    if "pypy" in info:
        lines.append("- PyPy (pypy servers): %s; JIT warm-up %.1f s of load before every window%s"
                     % (info["pypy"], args.pypy_warmup,
                        "; PYPY_GC_NURSERY=%s" % os.environ["PYPY_GC_NURSERY"]
                        if os.environ.get("PYPY_GC_NURSERY") else ""))
    vers = ", ".join("%s: %s" % (k, v) for k, v in versions.items() if v)
    if vers:
        lines.append("- Peers: %s" % vers)
    pin = "server on CPU %d, load generator on CPU %d" % (SERVER_CPU, LOADGEN_CPU) if PIN else "NOT pinned"
    lines.append("- Method: %s; %d repeats per case, servers interleaved, medians; warmup %.1f s, "
                 "window %.1f s%s%s" % (pin, args.repeats, args.warmup, args.duration,
                                        "; load generator busy-polls" if args.busy_poll else "",
                                        " (--quick)" if args.quick else ""))
    lines.append("- CPU/req = server user+system CPU time over the window / echoed requests (lower is "
                 "better); xuvloop = ratio to uvloop (CPU: <1 is cheaper; req/s: >1 is faster); "
                 "srv/gen/other = CPU % of the server, the load generator, and everything else "
                 "(other processes' user time + hypervisor steal, worst repeat)")
    noisy = [s.other_cpu_pct for d in results.values() for v in d.values() for s in v
             if s.ok and s.other_cpu_pct >= 10]
    if noisy:
        lines.append("- **Warning: the machine was not quiet**: other processes or the hypervisor used up "
                     "to %.0f%% CPU during %d measured windows; req/s and latency are unreliable, CPU/req "
                     "less affected. Re-run on an idle machine." % (max(noisy), len(noisy)))
    lines.append("")

    have_base = BASELINE in servers
    echo_cases = [c for c in cases if c.kind == "echo" and not c.tls]
    conn_cases = [c for c in cases if c.kind == "connect" and not c.tls]
    tls_echo_cases = [c for c in cases if c.kind == "echo" and c.tls]
    tls_conn_cases = [c for c in cases if c.kind == "connect" and c.tls]
    idle_cases = [c for c in cases if c.kind == "idle"]

    def table(title: str, head: List[str], table_cases: List[Case], label: Callable[[Case], str],
              cells: Callable[[Dict[str, float], Optional[Dict[str, float]], List[Sample]], List[str]]) -> None:
        """Append one table to ``lines``: a row per case and server that has
        samples, ``label(case)`` and the server's name first, then
        ``cells(summary, uvloop_summary, samples)`` or the first error."""
        lines.append("## %s" % title)
        lines.append("")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
        for case in table_cases:
            base = summarize(results.get(case.name, {}).get(BASELINE, []))
            for name in servers:
                samples = results.get(case.name, {}).get(name, [])
                if not samples:
                    continue
                s = summarize(samples)
                row = [label(case), name]
                if s is None:
                    row.append("FAILED: %s" % first_error(samples))
                    row += [""] * (len(head) - len(row))
                else:
                    row += cells(s, base, samples)
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")

    def load_table(title: str, unit: str, rate: str, table_cases: List[Case]) -> None:
        """Append one table of echo or connect results to ``lines``."""
        head = ["case", "server", "CPU us/%s" % unit]
        if have_base:
            head.append("CPU xuvloop")
        head.append(rate)
        if have_base:
            head.append("%s xuvloop" % rate)
        head += ["p50 us", "p99 us", "srv/gen/other CPU %", "CPU spread"]

        def cells(s: Dict[str, float], base: Optional[Dict[str, float]], samples: List[Sample]) -> List[str]:
            out = [fmt(s["cpu"], 2)]
            if s["n"] < len(samples):
                out[0] += " (%d/%d ok)" % (s["n"], len(samples))
            if have_base:
                out.append(ratio(s["cpu"], base["cpu"] if base else None))
            out.append(fmt(s["rps"], 0))
            if have_base:
                out.append(ratio(s["rps"], base["rps"] if base else None))
            return out + [fmt(s["p50"]), fmt(s["p99"]), "%.0f/%.0f/%.0f" % (s["srv"], s["gen"], s["other"]),
                          "±%.1f%%" % s["spread"]]
        table(title, head, table_cases, lambda case: "%s (%s)" % (case.name, case.describe()), cells)

    def idle_cells(s: Dict[str, float], base: Optional[Dict[str, float]], samples: List[Sample]) -> List[str]:
        good = [x for x in samples if x.ok]
        out = [fmt(s["kib"], 2)]
        if have_base:
            out.append(ratio(s["kib"], base["kib"] if base else None))
        return out + [fmt(median([x.rss_before / 2**20 for x in good])),
                      fmt(median([x.rss_after / 2**20 for x in good]))]

    if echo_cases:
        load_table("Echo: server CPU per request (primary), throughput, latency", "req", "req/s", echo_cases)
    if conn_cases:
        load_table("Connection churn: connect, echo 64 B, close", "conn", "conn/s", conn_cases)
    if tls_echo_cases:
        load_table("TLS echo: server CPU per request, throughput, latency", "req", "req/s", tls_echo_cases)
    if tls_conn_cases:
        load_table("TLS handshakes: connect, full handshake, echo 64 B, close", "handshake", "handshakes/s",
                   tls_conn_cases)
    if idle_cases:
        head = ["case", "server", "KiB/conn"] + (["xuvloop"] if have_base else []) + ["RSS before MiB",
                                                                                     "RSS after MiB"]
        table("Resident memory per idle connection", head, idle_cases, lambda case: case.describe(), idle_cells)
    return "\n".join(lines)


def write_png(path: str, results: Results, cases: List[Case], servers: List[str]) -> None:
    """Draw grouped bar charts (CPU per request, requests/s, KiB per idle
    connection) with matplotlib if it is importable; otherwise say so."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not importable; skipping the chart (%s)" % path, file=sys.stderr)
        return
    panels = []
    load_cases = [c for c in cases if c.kind in ("echo", "connect")]
    if load_cases and BASELINE in servers:
        panels.append(("server CPU per request relative to uvloop (lower is better)", load_cases, "ratio", False))
    if load_cases:
        panels.append(("server CPU us per request (lower is better)", load_cases, "cpu", True))
        panels.append(("requests (connections) per second", load_cases, "rps", True))
    idle_cases = [c for c in cases if c.kind == "idle"]
    if idle_cases:
        panels.append(("KiB RSS per idle connection", idle_cases, "kib", False))
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.2 * len(load_cases) + 3), 4 * len(panels)),
                             squeeze=False)
    width = 0.8 / max(1, len(servers))
    for ax, (title, pcases, key, log) in zip(axes[:, 0], panels):
        for i, name in enumerate(servers):
            xs, ys = [], []
            for j, case in enumerate(pcases):
                s = summarize(results.get(case.name, {}).get(name, []))
                if s is None:
                    continue
                if key == "ratio":
                    base = summarize(results.get(case.name, {}).get(BASELINE, []))
                    if base is None or not base["cpu"]:
                        continue
                    value = s["cpu"] / base["cpu"]
                else:
                    value = s[key]
                xs.append(j + (i - (len(servers) - 1) / 2) * width)
                ys.append(value)
            if xs:
                ax.bar(xs, ys, width, label=name)
        ax.set_title(title)
        ax.set_xticks(range(len(pcases)))
        ax.set_xticklabels([c.name for c in pcases], rotation=30, ha="right")
        if log:
            ax.set_yscale("log")
        if key == "ratio":
            ax.axhline(1.0, color="black", linewidth=0.8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("wrote %s" % path, file=sys.stderr)


# --------------------------------------------------------------------------
# Main


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command-line options; see ``--help``."""
    parser = argparse.ArgumentParser(description="Benchmark pulse against uvloop, asyncio, gevent and C.")
    parser.add_argument("--quick", action="store_true",
                        help="only %s with short windows (servers default to %s)"
                             % (", ".join(QUICK_CASES), QUICK_SERVERS))
    parser.add_argument("--servers", default=None,
                        help="comma list from %s (default %s)" % (",".join(SERVERS), DEFAULT_SERVERS))
    parser.add_argument("--cases", default=None,
                        help="comma list of case names or groups (%s); default all" % ",".join(CASE_GROUPS))
    parser.add_argument("--repeats", type=int, default=3, help="runs per case and server (default 3)")
    parser.add_argument("--duration", type=float, default=None,
                        help="measured seconds per run (default 5, --quick 2)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="warmup seconds per run (default 1, --quick 0.5; raise for PyPy's JIT)")
    parser.add_argument("--idle-conns", type=int, default=10000, help="idle connections (default 10000)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the Python servers")
    parser.add_argument("--pypy", default=None,
                        help="PyPy interpreter for the pypy servers (pulse-pypy), with pulse importable "
                             "and compiled for it (default: .venv-pypy/bin/python from .ci/pypy.sh, "
                             "else pypy3 on PATH)")
    parser.add_argument("--pypy-warmup", type=float, default=5.0,
                        help="load before each window of a pypy server, for the JIT (default 5 s; "
                             "see bench/README.md for how that was chosen)")
    parser.add_argument("--busy-poll", action="store_true",
                        help="load generator polls epoll without sleeping (removes wake-up IPI costs "
                             "from the server's account, notably on VMs; see README)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each run, wait up to SECONDS for other CPU load to drop below 10%% "
                             "(useful on shared machines; default 0 = don't wait)")
    parser.add_argument("--png", default=None, help="write a chart here (needs matplotlib)")
    parser.add_argument("--json", default=None, help="write every raw sample here")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 2.0 if args.quick else 5.0
    if args.warmup is None:
        args.warmup = 0.5 if args.quick else 1.0
    if args.servers is None:
        args.servers = QUICK_SERVERS if args.quick else DEFAULT_SERVERS
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if not 0 < args.duration <= 600 or not 0 <= args.warmup <= 600 or not 0 <= args.pypy_warmup <= 600:
        parser.error("--duration must be in (0, 600], --warmup and --pypy-warmup in [0, 600]")
    if args.pypy is None:
        venv = REPO / ".venv-pypy" / "bin" / "python"
        args.pypy = str(venv) if venv.exists() else (shutil.which("pypy3") or "pypy3")
    if not 1 <= args.idle_conns <= 100000:
        parser.error("--idle-conns must be in [1, 100000]")
    return args


def select_cases(args: argparse.Namespace) -> List[Case]:
    """The cases to run, from --cases (names or groups) or --quick."""
    all_cases = build_cases(args.idle_conns)
    by_name = {c.name: c for c in all_cases}
    if args.cases:
        wanted = [w.strip() for w in args.cases.split(",") if w.strip()]
    elif args.quick:
        wanted = QUICK_CASES
    else:
        wanted = ["all"]
    chosen: List[Case] = []
    for w in wanted:
        if w in CASE_GROUPS:
            picked = [c for c in all_cases if CASE_GROUPS[w](c)]
        elif w in by_name:
            picked = [by_name[w]]
        else:
            sys.exit("error: unknown case %r; known: %s, groups: %s"
                     % (w, ", ".join(by_name), ", ".join(CASE_GROUPS)))
        chosen += [c for c in picked if c not in chosen]
    return [c for c in all_cases if c in chosen]


def main(argv: Optional[List[str]] = None) -> int:
    """Build, run every selected case for every available server (fresh server
    per run, servers interleaved per repeat), print the markdown report and
    optionally write JSON and a PNG chart. Returns 1 if any run failed."""
    args = parse_args(argv)
    cases = select_cases(args)
    if args.list:
        for c in cases:
            print("%-14s %s" % (c.name, c.describe()))
        return 0
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    for n in names:
        if n not in SERVERS:
            sys.exit("error: unknown server %r; known: %s" % (n, ", ".join(SERVERS)))

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if not PIN:
        log("warning: CPUs 0 and 1 are not both available; running unpinned (figures are less reliable)")
    if psutil is None:
        log("note: psutil is not importable here; reading /proc directly")
    # Idle case: client and server each hold N sockets; children inherit this.
    need = args.idle_conns + 1024 if any(c.kind == "idle" for c in cases) else 4096
    limit = raise_nofile(need)
    if limit < need and any(c.kind == "idle" for c in cases):
        new_n = max(1, limit - 1024)
        log("warning: RLIMIT_NOFILE is %d; idle case reduced to %d connections" % (limit, new_n))
        cases = [dataclasses.replace(c, conns=new_n) if c.kind == "idle" else c for c in cases]
    if PIN:  # keep the runner itself off the server's CPU
        try:
            if hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, {LOADGEN_CPU})
            elif TASKSET:
                subprocess.run([TASKSET, "-p", "-c", str(LOADGEN_CPU), str(os.getpid())],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        except OSError:
            pass

    cache_dir = default_cache_dir()
    tls_flags, tls_problem = tls_build_flags(cache_dir)
    binaries = compile_c({"loadgen": HERE / "loadgen.c", "c_epoll_echo": HERE / "servers" / "c_epoll_echo.c"},
                         cache_dir, {"loadgen": tls_flags} if tls_flags else None)
    servers: List[str] = []
    versions: Dict[str, str] = {}
    for n in names:
        ok, detail = check_server(SERVERS[n], interpreter(SERVERS[n], args))
        if ok:
            servers.append(n)
            if detail:
                versions[n] = detail
        else:
            log("skipping %s: %s" % (n, detail))
    if not servers:
        log("error: no server available to benchmark")
        return 1
    info = machine_info(args.python)
    if any(SERVERS[n].pypy for n in servers):
        info["pypy"] = machine_info(args.pypy)["python"]
    tls_files: Optional[TlsFiles] = None
    if any(c.tls for c in cases):
        no_tls = [n for n in servers if not SERVERS[n].tls]
        if no_tls:
            log("TLS cases skip %s (no TLS in that server)" % ", ".join(no_tls))
        if not tls_problem:
            tls_files, tls_problem = make_tls_files(cache_dir)
        if tls_problem:
            log("TLS cases will fail: %s" % tls_problem)
    try:
        return run_all(args, cases, servers, binaries, info, versions, tls_files, tls_problem, log)
    finally:
        if tls_files is not None:
            shutil.rmtree(str(tls_files[0].parent), ignore_errors=True)


def run_all(args: argparse.Namespace, cases: List[Case], servers: List[str], binaries: Dict[str, Path],
            info: Dict[str, str], versions: Dict[str, str], tls_files: Optional[TlsFiles], tls_problem: str,
            log: Callable[[str], None]) -> int:
    """Run every case for every server (fresh server per run, servers
    interleaved per repeat; TLS cases only for servers with TLS, or failing
    with ``tls_problem``), print the report, write the JSON and the chart.
    Returns 1 if any run failed."""
    results: Results = {c.name: {s: [] for s in servers} for c in cases}
    broken: Dict[str, str] = {}
    def runs_case(case: Case, name: str) -> bool:
        return SERVERS[name].tls or not case.tls
    total = sum(args.repeats for c in cases for n in servers if runs_case(c, n))
    done = 0
    failed = False
    for case in cases:
        for rep in range(args.repeats):
            for name in servers:  # interleaved: A B C, A B C, ...
                if not runs_case(case, name):
                    continue
                done += 1
                prefix = "[%d/%d] %s %s #%d" % (done, total, case.name, name, rep + 1)
                if name in broken:
                    results[case.name][name].append(Sample(ok=False, error=broken[name]))
                    continue
                if case.tls and tls_problem:
                    failed = True
                    results[case.name][name].append(Sample(ok=False, error=tls_problem))
                    continue
                wait_quiet(args.wait_quiet, 10.0, log)
                try:
                    with ServerProcess(SERVERS[name], interpreter(SERVERS[name], args), binaries,
                                       tls_files if case.tls else None) as srv:
                        if case.kind == "idle":
                            sample = measure_idle(srv, binaries["loadgen"], case, settle=0.5)
                        else:
                            sample = measure_load(srv, binaries["loadgen"], case, args.duration,
                                                  warmup(SERVERS[name], args),
                                                  args.busy_poll)
                except BenchError as exc:
                    failed = True
                    sample = Sample(ok=False, error=str(exc))
                    log("%s: FAILED: %s" % (prefix, exc))
                    if isinstance(exc, ServerStartError):
                        broken[name] = "server did not start: %s" % exc
                        log("%s: not starting it again" % name)
                    results[case.name][name].append(sample)
                    continue
                results[case.name][name].append(sample)
                if case.kind == "idle":
                    log("%s: %.2f KiB/conn" % (prefix, sample.kib_per_conn))
                else:
                    log("%s: %.2f us/req (user %.2f), %.0f req/s, p99 %.0f us, server CPU %.0f%%"
                        % (prefix, sample.cpu_us_per_req, sample.user_us_per_req, sample.rps, sample.p99_us, sample.server_cpu_pct)
                        + (", other load %.0f%%" % sample.other_cpu_pct if sample.other_cpu_pct >= 10 else ""))

    report = render_markdown(results, cases, servers, info, versions, args)
    print(report)
    if args.json:
        raw = {"machine": info, "versions": versions, "args": vars(args),
               "results": {c: {s: [dataclasses.asdict(x) for x in v] for s, v in d.items()}
                           for c, d in results.items()}}
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)
        log("wrote %s" % args.json)
    if args.png:
        write_png(args.png, results, cases, servers)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
