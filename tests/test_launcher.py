"""The multi-process launcher and the ``pulse serve`` command line, run as real programs.

Each test starts ``python -m pulse serve`` (or a script calling
``pulse.launch.serve``) in a subprocess, talks to it over 127.0.0.1 with
plain sockets, signals it like an operator would, and checks that no process
is left behind.  Every wait is bounded in time.
"""

import collections
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set

import psutil
import pytest

from pulse import Options, launch as launcher
from pulse.cli import SERVER_OPTIONS, build_parser
from support import free_port

ROOT = Path(__file__).resolve().parent.parent
BULK_BLOCK = bytes(range(256)) * 256  # 64 KiB

pytestmark = pytest.mark.timeout(60)

APP = '''
"""Handlers for the launcher tests."""
import os

import pulse

BLOCK = bytes(range(256)) * 256


class PidEcho(pulse.Handler):
    """Greets with the worker's pid, then echoes."""

    def on_open(self, conn):
        conn.write(b"%d\\n" % os.getpid())

    def on_data(self, conn, data):
        conn.write(data)


class Bulk(pulse.Handler):
    """'GET n' answers n bytes (a repeating 0..255 pattern) and closes."""

    def on_open(self, conn):
        conn.session = b""

    def on_data(self, conn, data):
        conn.session += data
        if b"\\n" in conn.session:
            size = int(conn.session.split()[1])
            conn.write((BLOCK * (size // len(BLOCK) + 1))[:size])
            conn.close()


instance = PidEcho()


def factory():
    return PidEcho()


def flaky():
    """Fails to boot while the file named by $LAUNCHER_FAIL_FLAG exists."""
    if os.path.exists(os.environ.get("LAUNCHER_FAIL_FLAG", "/nonexistent")):
        raise RuntimeError("fail flag is set")
    return PidEcho()


def broken():
    raise RuntimeError("no database")
'''


# -- fixtures and helpers -----------------------------------------------------


def descendants() -> Set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def alive(pid: int) -> bool:
    """True for a running process (a zombie waiting for its reaper is not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(autouse=True)
def no_child_left() -> Iterator[None]:
    """Every test must end with no process of its own still running."""
    before = descendants()
    yield
    deadline = time.monotonic() + 3.0
    left = {pid for pid in descendants() - before if alive(pid)}
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = {pid for pid in descendants() - before if alive(pid)}
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, "processes left behind: {}".format(sorted(left))


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "launcher_app.py").write_text(APP)
    return tmp_path




class Launched:
    """A ``pulse serve`` (or other) command run in a subprocess, its output in a file."""

    def __init__(self, argv: List[str], cwd: Path, env: Optional[Dict[str, str]] = None,
                 pass_fds: tuple = ()) -> None:
        self.log_path = cwd / "launched-{}.log".format(time.monotonic_ns())
        self._log = open(self.log_path, "wb")
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(argv, cwd=str(cwd), stdout=self._log,
                                     stderr=subprocess.STDOUT, env=full_env, pass_fds=pass_fds)

    @classmethod
    def serve(cls, app_dir: Path, *args: str, **kw: object) -> "Launched":
        argv = [sys.executable, "-m", "pulse", "serve", *args, "--app-dir", str(app_dir)]
        return cls(argv, app_dir, **kw)  # type: ignore[arg-type]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if self.proc.poll() is not None and self.log().count(text) < count:
                raise AssertionError("exited ({}) before logging {!r}:\n{}".format(
                    self.proc.returncode, text, self.log()))
            assert time.monotonic() < deadline, "no {!r} in the log:\n{}".format(text, self.log())
            time.sleep(0.02)

    def workers(self) -> Set[int]:
        return {p.pid for p in psutil.Process(self.proc.pid).children() if alive(p.pid)}

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then the exit status (the log is shown when it is not 0)."""
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 10.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("did not exit within {} s:\n{}".format(
                timeout, self.log())) from None

    def __enter__(self) -> "Launched":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # the workers follow (PR_SET_PDEATHSIG / lifeline)
            self.proc.wait(10)
        self._log.close()


def greet(address: object, family: int = socket.AF_INET, timeout: float = 2.0) -> int:
    """Connect, read the worker's greeting (its pid), check one echo, close."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        line = b""
        while not line.endswith(b"\n"):
            chunk = sock.recv(64)
            assert chunk, "closed before the greeting"
            line += chunk
        sock.sendall(b"ping")
        got = b""
        while len(got) < 4:
            chunk = sock.recv(64)
            assert chunk, "closed before the echo"
            got += chunk
        assert got == b"ping"
        return int(line)


def hello(address: object, timeout: float = 2.0) -> int:
    """Connect and read the worker's greeting (its pid): the connection was accepted and served."""
    with socket.create_connection(address, timeout=timeout) as sock:  # type: ignore[arg-type]
        line = b""
        while not line.endswith(b"\n"):
            chunk = sock.recv(64)
            assert chunk, "closed before the greeting"
            line += chunk
        return int(line)


def pids_seen(port: int, want: Set[int], tries: int = 300, timeout: float = 5.0) -> Set[int]:
    """Greet until every pid in ``want`` answered (bounded by count and time)."""
    seen: Set[int] = set()
    deadline = time.monotonic() + timeout
    for _ in range(tries):
        seen.add(greet(("127.0.0.1", port)))
        if want <= seen or time.monotonic() > deadline:
            break
    return seen


def connection_to(port: int, pid: int, tries: int = 300) -> socket.socket:
    """An open connection served by worker ``pid``."""
    for _ in range(tries):
        sock = socket.create_connection(("127.0.0.1", port), timeout=2)
        if int(sock.makefile("rb").readline()) == pid:
            return sock
        sock.close()
    raise AssertionError("worker {} never accepted".format(pid))


def serving(launched: Launched, workers: int) -> Set[int]:
    launched.wait_log("{} worker{} serving".format(workers, "s" if workers > 1 else ""))
    pids = launched.workers()
    assert len(pids) == workers, launched.log()
    return pids


# -- behaviour ----------------------------------------------------------------


def test_two_workers_both_accept_and_serve(app_dir: Path) -> None:
    port = free_port()
    with Launched.serve(app_dir, "launcher_app:PidEcho", "--bind", "127.0.0.1:{}".format(port),
                        "--workers", "2") as srv:
        pids = serving(srv, 2)
        assert pids_seen(port, pids) == pids, "the kernel never spread connections to both"
        assert srv.stop() == 0, srv.log()
    assert "SO_REUSEPORT: one socket per worker" in srv.log()


@pytest.mark.parametrize("target", ["launcher_app:instance", "launcher_app:factory"])
def test_instances_and_factories_serve_too(app_dir: Path, target: str) -> None:
    port = free_port()
    with Launched.serve(app_dir, target, "--bind", "127.0.0.1:{}".format(port),
                        "--workers", "2") as srv:
        pids = serving(srv, 2)
        assert greet(("127.0.0.1", port)) in pids
        assert srv.stop() == 0, srv.log()


def test_killed_worker_is_back_within_2s_while_the_other_serves(app_dir: Path) -> None:
    port = free_port()
    with Launched.serve(app_dir, "launcher_app:PidEcho", "--bind", "127.0.0.1:{}".format(port),
                        "--workers", "2") as srv:
        victim, survivor = sorted(serving(srv, 2))
        kept = connection_to(port, survivor)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        replacement = None
        while time.monotonic() - killed_at < 2.0:
            pid = greet(("127.0.0.1", port), timeout=2.0)  # none may be refused
            assert pid != victim
            if pid != survivor:
                replacement = pid
                break
        assert replacement is not None, "no new worker served within 2 s:\n" + srv.log()
        assert time.monotonic() - killed_at < 2.0
        kept.sendall(b"still here")  # the survivor kept its connection
        kept.settimeout(2)
        assert kept.recv(64) == b"still here"
        kept.close()
        assert srv.workers() == {survivor, replacement}
        assert srv.stop() == 0, srv.log()
    assert "pid {}) was killed by signal 9 (SIGKILL)".format(victim) in srv.log()
    assert "restarting it now" in srv.log()


def test_sigterm_mid_transfer_delivers_what_was_accepted(app_dir: Path) -> None:
    port = free_port()
    size = 16 * 1024 * 1024
    with Launched.serve(app_dir, "launcher_app:Bulk", "--bind", "127.0.0.1:{}".format(port),
                        "--workers", "2", "--graceful-timeout", "8") as srv:
        serving(srv, 2)
        clients = []
        for _ in range(4):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.sendall(b"GET %d\n" % size)
            clients.append(sock)
        received = [bytearray() for _ in clients]
        deadline = time.monotonic() + 5
        while min(len(r) for r in received) < 256 * 1024:  # every transfer under way
            assert time.monotonic() < deadline, "transfers did not start"
            for sock, got in zip(clients, received):
                got += sock.recv(16 * 1024)
        assert max(len(r) for r in received) < size, "a transfer finished before SIGTERM"
        srv.signal(signal.SIGTERM)
        deadline = time.monotonic() + 9
        open_socks = set(range(len(clients)))
        while open_socks:
            assert time.monotonic() < deadline, "transfers did not finish:\n" + srv.log()
            for i in list(open_socks):
                clients[i].settimeout(0.05)
                try:
                    chunk = clients[i].recv(1 << 20)
                except socket.timeout:
                    continue
                if not chunk:
                    open_socks.discard(i)
                received[i] += chunk
        expected = (BULK_BLOCK * (size // len(BULK_BLOCK) + 1))[:size]
        for got in received:
            assert len(got) == size
            assert got == expected
        for sock in clients:
            sock.close()
        assert srv.wait(10) == 0, srv.log()
    with pytest.raises(OSError):  # stopped accepting: the socket is gone
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_sighup_restarts_workers_without_refusing_a_connection(app_dir: Path) -> None:
    port = free_port()
    with Launched.serve(app_dir, "launcher_app:PidEcho", "--bind", "127.0.0.1:{}".format(port),
                        "--workers", "2") as srv:
        old = serving(srv, 2)
        failures: List[str] = []
        served: collections.Counter = collections.Counter()
        started = time.monotonic()
        hup_sent = done_at = None
        while time.monotonic() - started < 8.0:
            # Only the attempt is judged: a retiring worker closes its connections
            # once it has flushed what it wrote (Server.stop), so a request sent
            # after that is not read; refusing the connection would be the bug.
            try:
                served[hello(("127.0.0.1", port), timeout=2.0)] += 1
            except (OSError, AssertionError, ValueError) as exc:
                failures.append(repr(exc))
            elapsed = time.monotonic() - started
            if hup_sent is None and elapsed > 0.3:
                srv.signal(signal.SIGHUP)
                hup_sent = elapsed
            if done_at is None and hup_sent is not None and "reload done" in srv.log():
                done_at = elapsed
            if done_at is not None and elapsed > done_at + 0.3:
                break
        assert done_at is not None, "the reload did not finish:\n" + srv.log()
        new = srv.workers()
        assert len(new) == 2 and not new & old, srv.log()
        assert failures == [], "{} of {} connection attempts failed: {}".format(
            len(failures), sum(served.values()) + len(failures), failures[:5])
        assert sum(served.values()) > 50
        assert set(served) & new, "the new workers never served"
        assert srv.stop() == 0, srv.log()
    for pid in old:  # the old workers finished gracefully
        assert "(pid {}) exited with status 0".format(pid) in srv.log()


@pytest.mark.parametrize("watchdog", ["pdeathsig", "lifeline"])
def test_sigkill_of_the_supervisor_takes_the_workers_down(app_dir: Path, watchdog: str) -> None:
    env = {"_PULSE_NO_PDEATHSIG": "1"} if watchdog == "lifeline" else {}
    port = free_port()
    with Launched.serve(app_dir, "launcher_app:PidEcho", "--bind", "127.0.0.1:{}".format(port),
                        "--workers", "2", env=env) as srv:
        pids = serving(srv, 2)
        kept = socket.create_connection(("127.0.0.1", port), timeout=2)  # a busy worker too
        srv.signal(signal.SIGKILL)
        srv.wait(5)
        killed_at = time.monotonic()
        while any(alive(pid) for pid in pids):
            assert time.monotonic() - killed_at < 2.0, "workers outlived the supervisor"
            time.sleep(0.01)
        kept.close()


def test_crash_loop_backs_off_and_the_other_worker_takes_the_load(app_dir: Path) -> None:
    port = free_port()
    flag = app_dir / "fail.flag"
    with Launched.serve(app_dir, "launcher_app:flaky", "--bind", "127.0.0.1:{}".format(port),
                        "--workers", "2", env={"LAUNCHER_FAIL_FLAG": str(flag)}) as srv:
        victim, survivor = sorted(serving(srv, 2))
        flag.write_text("1")
        os.kill(victim, signal.SIGKILL)
        srv.wait_log("restarting in 1.0 s", timeout=5)
        # Slot 1 is down and its socket closed: the survivor takes every connection.
        assert {greet(("127.0.0.1", port), timeout=1.0) for _ in range(10)} == {survivor}
        flag.unlink()
        srv.wait_log(") is serving", timeout=3)
        assert len(srv.workers()) == 2
        assert len(pids_seen(port, srv.workers())) == 2
        assert srv.stop() == 0, srv.log()
    log = srv.log()
    assert "failed to start: RuntimeError: fail flag is set" in log
    assert "restarting in 0.5 s" in log
    assert "slot 1 is down" in log


def test_unix_socket(app_dir: Path) -> None:
    path = str(app_dir / "pulse.sock")
    with Launched.serve(app_dir, "launcher_app:PidEcho", "--bind", "unix:" + path,
                        "--workers", "2") as srv:
        pids = serving(srv, 2)
        assert greet(path, family=socket.AF_UNIX) in pids
        assert srv.stop() == 0, srv.log()
    assert not os.path.exists(path), "the socket file was left behind"


def test_inherited_fd(app_dir: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    fd = listener.fileno()
    with Launched.serve(app_dir, "launcher_app:PidEcho", "--fd", str(fd), "--workers", "2",
                        pass_fds=(fd,)) as srv:
        listener.close()  # the server holds the only copies now
        pids = serving(srv, 2)
        assert greet(("127.0.0.1", port)) in pids
        assert "shared by the workers" in srv.log()
        assert srv.stop() == 0, srv.log()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_systemd_socket_activation(app_dir: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    fd = listener.fileno()
    # What systemd does: the socket at fd 3, LISTEN_PID naming the server's pid
    # (exec keeps the pid).
    script = textwrap.dedent("""
        import os, sys
        os.dup2({fd}, 3)
        os.close({fd})
        os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
        os.execv(sys.executable, [sys.executable, "-m", "pulse", "serve",
                 "launcher_app:PidEcho", "--workers", "2", "--app-dir", {dir!r}])
    """).format(fd=fd, dir=str(app_dir))
    with Launched([sys.executable, "-c", script], app_dir, pass_fds=(fd,)) as srv:
        listener.close()
        pids = serving(srv, 2)
        assert greet(("127.0.0.1", port)) in pids
        assert srv.stop() == 0, srv.log()
    assert "127.0.0.1:{} (one socket shared by the workers)".format(port) in srv.log()


def test_stats_interval_logs_each_worker(app_dir: Path) -> None:
    port = free_port()
    with Launched.serve(app_dir, "launcher_app:PidEcho", "--bind", "127.0.0.1:{}".format(port),
                        "--workers", "2", "--stats-interval", "0.2") as srv:
        pids = serving(srv, 2)
        pids_seen(port, pids)
        for slot in (1, 2):
            srv.wait_log("pulse: worker {} (pid ".format(slot), timeout=5)
        assert srv.stop() == 0, srv.log()
    lines = [line for line in srv.log().splitlines() if "connections, in " in line]
    assert any("cpu " in line and "rss " in line and "out " in line for line in lines)
    assert {int(line.split("(pid ")[1].split(")")[0]) for line in lines} >= pids


def test_programmatic_serve_with_a_lambda_factory(app_dir: Path) -> None:
    port = free_port()
    script = textwrap.dedent("""
        import os
        import pulse, pulse.launch

        def greet(conn):
            conn.write(b"%d\\n" % os.getpid())

        pulse.launch.serve(
            lambda: pulse.callbacks(on_open=greet, on_data=lambda c, d: c.write(d)),
            ("127.0.0.1", {port}), workers=2, graceful_timeout=5)
    """).format(port=port)
    with Launched([sys.executable, "-c", script], app_dir) as srv:
        deadline = time.monotonic() + 10
        while len(srv.workers()) < 2 or not srv.workers() <= pids_seen_quietly(port):
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.05)
        assert srv.stop() == 0, srv.log()


def pids_seen_quietly(port: int) -> Set[int]:
    try:
        return {greet(("127.0.0.1", port), timeout=1.0) for _ in range(20)}
    except OSError:
        return set()


def test_echo_server_example_with_workers() -> None:
    port = free_port()
    argv = [sys.executable, str(ROOT / "examples" / "echo_server.py"), "--port", str(port),
            "--workers", "2"]
    with Launched(argv, ROOT / "tests") as srv:
        try:
            srv.wait_log("2 workers serving")
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(b"hello")
                assert sock.recv(16) == b"hello"
            assert len(srv.workers()) == 2
            assert srv.stop() == 0, srv.log()
        finally:
            srv.log_path.unlink()


# -- start-up failures: one clear line, a non-zero exit ----------------------


def run_cli(app_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pulse", "serve", *args, "--app-dir",
                           str(app_dir)], cwd=str(app_dir), capture_output=True, text=True,
                          timeout=20)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, "expected one line, got:\n" + result.stderr
    return lines[0]


def test_module_that_does_not_import(app_dir: Path) -> None:
    result = run_cli(app_dir, "no_such_module_xyz:App", "--bind", "127.0.0.1:0")
    line = one_error_line(result)
    assert result.returncode == 1
    assert "cannot import 'no_such_module_xyz:App'" in line and "No module named" in line


def test_attribute_that_does_not_exist(app_dir: Path) -> None:
    result = run_cli(app_dir, "launcher_app:Nope", "--bind", "127.0.0.1:0")
    assert "has no attribute 'Nope'" in one_error_line(result)


def test_port_in_use(app_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_cli(app_dir, "launcher_app:PidEcho", "--bind", "127.0.0.1:{}".format(port),
                         "--workers", "2")
    line = one_error_line(result)
    assert result.returncode == 1
    assert "cannot listen on 127.0.0.1:{}".format(port) in line and "in use" in line


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_bad_worker_count(app_dir: Path, value: str) -> None:
    result = run_cli(app_dir, "launcher_app:PidEcho", "--workers", value)
    line = one_error_line(result)
    assert result.returncode == 2
    assert "--workers" in line and ">= 1 or 'auto'" in line


def test_bad_server_option(app_dir: Path) -> None:
    result = run_cli(app_dir, "launcher_app:PidEcho", "--read-buffer-size", "-1",
                     "--bind", "127.0.0.1:0")
    assert "read_buffer_size must be > 0, got -1" in one_error_line(result)


def test_worker_that_fails_to_boot(app_dir: Path) -> None:
    result = run_cli(app_dir, "launcher_app:broken", "--bind", "127.0.0.1:0", "--workers", "2",
                     "--log-level", "warning")
    line = one_error_line(result)
    assert result.returncode == 1
    assert "failed to start: RuntimeError: no database" in line


# -- the pieces -------------------------------------------------------------


def test_restart_delay_backs_off_and_caps() -> None:
    delays = [launcher.restart_delay(n) for n in range(1, 12)]
    assert delays[:5] == [0.0, 0.5, 1.0, 2.0, 4.0]
    assert delays == sorted(delays)
    assert delays[-1] == launcher.MAX_RESTART_DELAY


def test_resolve_workers() -> None:
    assert launcher.resolve_workers("auto") == launcher.cpu_count() >= 1
    assert launcher.resolve_workers(3) == launcher.resolve_workers("3") == 3
    for bad in (0, -1, "0", "x", True, 1.5):
        with pytest.raises(ValueError, match="workers must be"):
            launcher.resolve_workers(bad)


def test_handler_factory_kinds() -> None:
    import pulse

    class Echo(pulse.Handler):
        pass
    instance = Echo()
    assert launcher.handler_factory(Echo) is Echo
    assert launcher.handler_factory(instance)() is instance
    assert isinstance(launcher.handler_factory(lambda: Echo())(), Echo)
    with pytest.raises(TypeError, match="handler class, a handler instance or a factory"):
        launcher.handler_factory(42)
    with pytest.raises(TypeError, match="lacks callable"):
        launcher.handler_factory(int)


def test_serve_rejects_bad_arguments_before_forking() -> None:
    import pulse
    with pytest.raises(ValueError, match="workers must be"):
        launcher.Supervisor(pulse.Handler, ("127.0.0.1", 0), workers=0)
    with pytest.raises(ValueError, match="trigger"):
        launcher.Supervisor(pulse.Handler, ("127.0.0.1", 0), trigger="sideways")
    with pytest.raises(ValueError, match="nothing to listen on"):
        launcher.Supervisor(pulse.Handler)
    with pytest.raises(ValueError, match="stats_interval"):
        launcher.Supervisor(pulse.Handler, ("127.0.0.1", 0), stats_interval=0)


def test_systemd_listen_fds_is_only_for_its_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert launcher.systemd_listen_fds() == []
    assert "LISTEN_FDS" not in os.environ


def test_adopt_listener_names_a_bad_fd() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(OSError, match="fd {} is not a usable socket".format(r)):
            launcher.adopt_listener(r)
    finally:
        os.close(r)
        os.close(w)
    with socket.socket() as unbound:
        with pytest.raises(ValueError, match="not a listening one"):
            launcher.adopt_listener(unbound.fileno())


def test_cli_has_a_flag_for_every_server_option() -> None:
    import inspect
    keywords = set(inspect.signature(Options.__init__).parameters) - {"self"}
    launcher_owned = {"reuse_port", "shutdown_timeout"}
    assert set(SERVER_OPTIONS) == keywords - launcher_owned, \
        "a new Server option needs a flag in pulse/cli.py"
    args = build_parser().parse_args(["serve", "m:a"])
    for name in SERVER_OPTIONS:
        assert hasattr(args, name)


@pytest.mark.parametrize("flag,value,words", [
    ("--graceful-timeout", "-1", ">= 0 seconds"),
    ("--graceful-timeout", "inf", "finite"),
    ("--graceful-timeout", "nan", ">= 0 seconds"),
    ("--stats-interval", "0", "> 0 seconds"),
    ("--idle-timeout", "soon", "a number of seconds"),
])
def test_cli_durations_follow_check_seconds(flag: str, value: str, words: str,
                                            capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", "m:a", flag, value])
    assert info.value.code == 2
    line = capsys.readouterr().err.strip()
    assert "argument {}:".format(flag) in line and words in line
