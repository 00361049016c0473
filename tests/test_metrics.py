"""Metrics: ``Server.stats()`` against real traffic, and ``pulse serve --metrics``.

The counters are checked against what plain-socket clients sent and got,
in every task mode; the endpoint is scraped while traffic flows and parsed
with ``prometheus_client``'s parser (the reference reader of the text
format), including while slow and garbage clients hold connections to it.
Every wait is bounded in time.
"""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import psutil
import pytest

import pulse
from pulse.launch.metrics import MetricsBoard
from support import ServerThread, free_port, recv_exactly, wait_for

pytestmark = pytest.mark.timeout(90)

TASK_TYPES = ["loop", "pool", "thread"]


class Doubler(pulse.Handler):
    """Answers every chunk twice: bytes out are exactly twice bytes in."""

    def on_data(self, conn: pulse.Conn, data: bytes) -> None:
        conn.write(data + data)


def exchange(address: Tuple[str, int], payload: bytes) -> None:
    """One connection: send ``payload``, read its double back, close."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(payload)
        got = recv_exactly(sock, 2 * len(payload), time.monotonic() + 10)
        assert got == payload + payload


# -- Server.stats() -------------------------------------------------------------


@pytest.mark.parametrize("task_type", TASK_TYPES)
def test_stats_count_what_the_clients_sent(task_type: str) -> None:
    payloads = [bytes([65 + i]) * size for i, size in enumerate((1, 100, 5000, 70000, 300000))]
    with ServerThread(Doubler(), task_type=task_type) as srv:
        server = srv.server
        for payload in payloads:
            exchange(srv.address, payload)
        wait_for(lambda: server.stats().closed == len(payloads), what="the closes counted")
        with socket.create_connection(srv.address, timeout=10) as held:
            wait_for(lambda: server.stats().connections == 1, what="one open connection")
            held.sendall(b"x")
            recv_exactly(held, 2, time.monotonic() + 10)
        wait_for(lambda: server.stats().closed == len(payloads) + 1, what="the last close")
        stats = server.stats()  # from this thread, not the loop's
    sent = sum(len(p) for p in payloads) + 1
    assert isinstance(stats, pulse.Stats)
    assert (stats.accepted, stats.closed, stats.connections) == (6, 6, 0)
    assert stats.bytes_in == sent
    assert stats.bytes_out == 2 * sent
    assert stats.write_backlog == 0 and stats.paused == 0
    assert stats.callback_errors == stats.accept_errors == 0
    assert stats.parks_out_of_fds == stats.parks_max_connections == 0
    assert not stats.listeners_parked
    assert stats.iterations > 6
    assert stats.poll_seconds > 0 and stats.busy_seconds > 0
    assert 0.0 < stats.utilisation < 1.0
    # serve() returned: the last counts stay readable.
    final = server.stats()
    assert (final.accepted, final.bytes_in, final.bytes_out) == (6, sent, 2 * sent)
    assert final.busy_seconds + final.poll_seconds == pytest.approx(
        server.stats().busy_seconds + server.stats().poll_seconds)  # the clock stopped


def test_stats_before_serve_are_zero_and_round_trip_as_json() -> None:
    server = pulse.Server(Doubler())
    assert server.stats() == pulse.Stats()
    stats = pulse.Stats(accepted=3, bytes_in=10, poll_seconds=3.0, busy_seconds=1.0,
                        listeners_parked=True)
    again = pulse.Stats.from_dict(json.loads(json.dumps(dict(stats.as_dict(), new_field=1))))
    assert again == stats
    assert stats.utilisation == 0.25
    later = pulse.Stats(poll_seconds=4.0, busy_seconds=4.0)
    assert later.utilisation_since(stats) == 0.75
    with pytest.raises(AttributeError):
        stats.accepted = 4  # type: ignore[misc]  # a snapshot is frozen


def test_an_idle_loop_counts_its_wait_as_poll_time() -> None:
    with ServerThread(Doubler()) as srv:
        time.sleep(0.3)  # blocked in the poller all along: no iteration ends meanwhile
        stats = srv.server.stats()
    assert stats.poll_seconds >= 0.25
    assert stats.utilisation < 0.5


@pytest.mark.parametrize("task_type", TASK_TYPES)
def test_stats_count_callback_errors(task_type: str) -> None:
    def boom(conn: pulse.Conn, data: bytes) -> None:
        raise ValueError("boom")

    with ServerThread(pulse.callbacks(on_data=boom), task_type=task_type) as srv:
        with socket.create_connection(srv.address, timeout=10) as sock:
            sock.sendall(b"hello")
            assert sock.recv(10) == b""  # closed because the callback raised
        loop = srv.server.loop
        assert loop is not None
        loop.call_soon_threadsafe(lambda: 1 / 0)  # a loop callback raising counts too
        wait_for(lambda: srv.server.stats().callback_errors == 2, what="two callback errors")
        assert srv.server.stats().closed == 1


def test_stats_see_the_write_backlog_and_paused_connections() -> None:
    class Flood(pulse.Handler):
        def on_data(self, conn: pulse.Conn, data: bytes) -> None:
            conn.write(b"z" * (8 << 20))  # far more than the socket buffers hold

    with ServerThread(Flood()) as srv:
        with socket.create_connection(srv.address, timeout=10) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"go")  # and never read: the server's backlog stays
            wait_for(lambda: srv.server.stats().paused == 1, what="backpressure")
            stats = srv.server.stats()
            assert 0 < stats.write_backlog <= 8 << 20
            assert stats.connections == 1


def test_stats_count_parking_at_max_connections() -> None:
    with ServerThread(Doubler(), max_connections=1) as srv:
        first = socket.create_connection(srv.address, timeout=10)
        wait_for(lambda: srv.server.stats().listeners_parked, what="the listener parked")
        second = socket.create_connection(srv.address, timeout=10)  # waits in the queue
        stats = srv.server.stats()
        assert (stats.accepted, stats.parks_max_connections) == (1, 1)
        first.close()
        second.sendall(b"hi")
        assert recv_exactly(second, 4, time.monotonic() + 10) == b"hihi"
        second.close()
        wait_for(lambda: srv.server.stats().accepted == 2, what="the second accept")


def test_stats_count_accept_errors_and_parking_out_of_fds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with ServerThread(Doubler()) as srv:
        loop = srv.server.loop
        assert loop is not None
        real = loop.backend.accept_batch
        failures = [OSError(errno.EMFILE, os.strerror(errno.EMFILE))]

        def accept_batch(*args: object, **kw: object) -> object:
            if failures:
                raise failures.pop()
            return real(*args, **kw)

        monkeypatch.setattr(loop.backend, "accept_batch", accept_batch)
        exchange(srv.address, b"after the back-off")  # accepted once the listener is back
        stats = srv.server.stats()
        assert (stats.accept_errors, stats.parks_out_of_fds, stats.accepted) == (1, 1, 1)


# -- the supervisor's endpoint -------------------------------------------------

APP = '''
import pulse


class Doubler(pulse.Handler):
    def on_data(self, conn, data):
        conn.write(data + data)
'''


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "metrics_app.py").write_text(APP)
    return tmp_path


class Served:
    """``pulse serve metrics_app:Doubler`` in a subprocess, its output in a file."""

    def __init__(self, app_dir: Path, *args: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.log_path = app_dir / "serve-{}.log".format(time.monotonic_ns())
        self._log = open(self.log_path, "wb")
        argv = [sys.executable, "-m", "pulse", "serve", "metrics_app:Doubler", "--app-dir",
                str(app_dir), "--bind", "127.0.0.1:{}".format(self.port),
                "--metrics", "127.0.0.1:{}".format(self.metrics_port), *args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(argv, cwd=str(app_dir), stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert self.proc.poll() is None, "exited early:\n" + self.log()
            assert time.monotonic() < deadline, "no {!r} in:\n{}".format(text, self.log())
            time.sleep(0.02)

    def workers(self) -> List[int]:
        return [p.pid for p in psutil.Process(self.proc.pid).children()
                if p.status() != psutil.STATUS_ZOMBIE]

    def __enter__(self) -> "Served":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def http_get(port: int, path: str = "/metrics", timeout: float = 5.0) -> Tuple[int, Dict[str, str],
                                                                               str]:
    """A plain HTTP/1.0 GET: status, headers (lower-case names), body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall("GET {} HTTP/1.0\r\nHost: test\r\n\r\n".format(path).encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    assert int(headers["content-length"]) == len(body)
    return int(lines[0].split()[1]), headers, body.decode("utf-8")


def scrape(port: int) -> Dict[str, Dict[Tuple[Tuple[str, str], ...], float]]:
    """GET /metrics parsed by prometheus_client: sample name -> labels -> value."""
    from prometheus_client.parser import text_string_to_metric_families
    status, headers, body = http_get(port)
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Dict[str, Dict[Tuple[Tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = \
                sample.value
    for name in ("pulse_bytes_received_total", "pulse_connections"):
        assert "# TYPE {} ".format(name) in body and "# HELP {} ".format(name) in body
    return samples


def total(samples: Dict[str, Dict[Tuple[Tuple[str, str], ...], float]], name: str) -> float:
    return samples.get(name, {}).get((), -1.0)


def per_worker(samples: Dict[str, Dict[Tuple[Tuple[str, str], ...], float]],
               name: str) -> Dict[str, float]:
    return {dict(labels)["worker"]: value for labels, value in samples[name].items() if labels}


def wait_scrape(port: int, check, timeout: float = 15.0):  # type: ignore[no-untyped-def]
    """Scrape until ``check(samples)`` holds (the reports come once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if check(samples):
            return samples
        assert time.monotonic() < deadline, "metrics never matched: {}".format(
            {k: v for k, v in samples.items() if k.startswith("pulse_")})
        time.sleep(0.1)


def traffic(port: int, count: int, size: int, errors: List[BaseException]) -> None:
    try:
        for i in range(count):
            exchange(("127.0.0.1", port), bytes([i % 256]) * size)
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


def test_metrics_endpoint_counts_the_traffic_of_every_worker(app_dir: Path) -> None:
    with Served(app_dir, "--workers", "2") as srv:
        srv.wait_log("2 workers serving")
        errors: List[BaseException] = []
        count, size = 200, 1000
        clients = [threading.Thread(target=traffic, args=(srv.port, count, size, errors))
                   for _ in range(2)]
        for client in clients:
            client.start()
        seen: List[float] = []
        while any(c.is_alive() for c in clients):  # scraped while traffic flows
            seen.append(total(scrape(srv.metrics_port), "pulse_bytes_received_total"))
            time.sleep(0.05)
        for client in clients:
            client.join(30)
        assert not errors, errors
        assert seen == sorted(seen), "a counter went back"
        connections = 2 * count
        samples = wait_scrape(srv.metrics_port, lambda s: total(
            s, "pulse_connections_closed_total") == connections)
        assert total(samples, "pulse_connections_accepted_total") == connections
        assert total(samples, "pulse_bytes_received_total") == connections * size
        assert total(samples, "pulse_bytes_sent_total") == 2 * connections * size
        assert total(samples, "pulse_connections") == 0
        assert total(samples, "pulse_workers") == 2
        accepted = per_worker(samples, "pulse_connections_accepted_total")
        assert set(accepted) == {"1", "2"} and sum(accepted.values()) == connections
        assert set(per_worker(samples, "pulse_loop_utilisation")) == {"1", "2"}
        assert all(0 <= v <= 1 for v in per_worker(samples, "pulse_loop_utilisation").values())
        assert all(v < 5 for v in per_worker(samples, "pulse_worker_report_age_seconds").values())
        parks = samples["pulse_listener_parks_total"]
        assert parks[(("reason", "max_connections"),)] == 0

        # A worker killed and replaced: its slot's counts do not go back.
        victim = srv.workers()[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(srv.workers()) == 2 and victim not in srv.workers(), 15,
                 "the replacement worker")
        exchange(("127.0.0.1", srv.port), b"after the restart")
        samples = wait_scrape(srv.metrics_port, lambda s: total(
            s, "pulse_connections_accepted_total") == connections + 1)
        assert total(samples, "pulse_bytes_received_total") == connections * size + 17


def test_metrics_stay_exact_over_a_reload(app_dir: Path) -> None:
    with Served(app_dir) as srv:
        srv.wait_log("1 worker serving")
        for i in range(10):
            exchange(("127.0.0.1", srv.port), b"%d" % i)
        # At once, most likely before the next periodic report: the old
        # worker's counts then reach the supervisor in its final report.
        srv.proc.send_signal(signal.SIGHUP)
        srv.wait_log("reload done")
        wait_for(lambda: len(srv.workers()) == 1, 15, "the old worker gone")
        exchange(("127.0.0.1", srv.port), b"new")
        samples = wait_scrape(srv.metrics_port,
                              lambda s: total(s, "pulse_connections_closed_total") == 11)
        assert total(samples, "pulse_connections_accepted_total") == 11
        assert total(samples, "pulse_bytes_received_total") == 10 + 3
        assert per_worker(samples, "pulse_bytes_sent_total") == {"1": 2 * 13}


def test_metrics_endpoint_answers_404_and_survives_slow_and_garbage_clients(
        app_dir: Path) -> None:
    with Served(app_dir) as srv:
        srv.wait_log("1 worker serving")
        status, headers, body = http_get(srv.metrics_port, "/")
        assert status == 404 and "GET /metrics" in body
        assert http_get(srv.metrics_port, "/metrics?x=1")[0] == 200
        address = ("127.0.0.1", srv.metrics_port)
        silent = socket.create_connection(address)           # connects, says nothing
        dribbler = socket.create_connection(address)         # half a request line
        dribbler.sendall(b"GET /met")
        garbage = socket.create_connection(address)          # no request at all
        garbage.sendall(b"\x16\x03\x01\x02\x00" + os.urandom(200) + b"\r\n\r\n")
        flood = socket.create_connection(address)            # an endless head
        flood.settimeout(5)
        try:
            for _ in range(20):
                flood.sendall(b"X-Junk: " + b"y" * 1000 + b"\r\n")
        except OSError:
            pass  # answered and closed before the end: fine
        try:
            answer = flood.recv(200)
        except OSError:  # reset: the junk it had not read yet
            answer = b"HTTP/1.0 431"
        assert answer.startswith(b"HTTP/1.0 431"), answer
        garbage.settimeout(5)
        assert garbage.recv(100).startswith(b"HTTP/1.0 400")
        started = time.monotonic()
        for _ in range(5):  # the silent clients hold their sockets; scrapes go on
            assert total(scrape(srv.metrics_port), "pulse_workers") == 1
        assert time.monotonic() - started < 5
        silent.settimeout(10)
        assert silent.recv(10) == b""  # dropped after CLIENT_TIMEOUT
        for sock in (silent, dribbler, garbage, flood):
            sock.close()
        srv.proc.send_signal(signal.SIGTERM)  # the supervisor still obeys at once
        assert srv.proc.wait(15) == 0, srv.log()


def test_stats_interval_logs_one_line_with_the_snapshot(app_dir: Path) -> None:
    with Served(app_dir, "--stats-interval", "0.3") as srv:
        srv.wait_log("1 worker serving")
        for _ in range(3):
            exchange(("127.0.0.1", srv.port), b"abc")
        deadline = time.monotonic() + 10
        while True:
            lines = [line for line in srv.log().splitlines() if "accepted 3, closed 3" in line]
            if lines:
                break
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.05)
    line = lines[0]
    for part in ("pulse: worker 1 (pid ", "0 connections", "in 9 B", "out 18 B", "% busy",
                 "iterations/s", "backlog 0 B", "paused 0", "errors 0 callback 0 accept",
                 "cpu ", "rss "):
        assert part in line, line


def test_bad_metrics_address_and_port_in_use(app_dir: Path) -> None:
    from pulse import launch
    with pytest.raises(ValueError, match="metrics address"):
        launch.Supervisor(pulse.Handler, ("127.0.0.1", 0), metrics="127.0.0.1:notaport")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "pulse", "serve", "metrics_app:Doubler", "--app-dir",
             str(app_dir), "--bind", "127.0.0.1:{}".format(free_port()),
             "--metrics", "127.0.0.1:{}".format(port)],
            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "pulse: error: cannot listen on 127.0.0.1:{}".format(port) in result.stderr


def test_board_keeps_counters_of_replaced_workers_and_gauges_of_live_ones() -> None:
    board = MetricsBoard(workers=2)

    def report(slot: int, pid: int, **values: object) -> None:
        board.report(slot, pid, json.dumps(pulse.Stats(**values).as_dict()))  # type: ignore

    report(0, 100, accepted=5, connections=2, bytes_in=50)
    report(1, 200, accepted=1, connections=1)
    board.exited(100)
    report(0, 101, accepted=2, connections=1, bytes_in=1)
    board.report(0, 101, "not json")  # ignored
    from prometheus_client.parser import text_string_to_metric_families
    values: Dict[Tuple[str, Optional[str]], float] = {}
    for family in text_string_to_metric_families(board.render()):
        for sample in family.samples:
            values[(sample.name, sample.labels.get("worker"))] = sample.value
    assert values[("pulse_connections_accepted_total", "1")] == 7
    assert values[("pulse_connections_accepted_total", None)] == 8
    assert values[("pulse_bytes_received_total", "1")] == 51
    assert values[("pulse_connections", "1")] == 1
    assert values[("pulse_connections", None)] == 2
    assert values[("pulse_workers", None)] == 2


@pytest.fixture(autouse=True)
def no_child_left() -> Iterator[None]:
    """No test leaves a process of its own behind."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = [p for p in psutil.Process().children(recursive=True)
                if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE]
        if not left:
            return
        time.sleep(0.05)
    for proc in left:
        proc.kill()
    raise AssertionError("processes left behind: {}".format(left))


def test_endpoint_in_process_answers_500_when_rendering_fails_and_goes_on() -> None:
    import selectors
    from pulse.launch.endpoint import MetricsEndpoint
    broken = [True]

    def render() -> str:
        if broken[0]:
            raise RuntimeError("a bug")
        return "pulse_up 1\n"

    selector = selectors.DefaultSelector()
    endpoint = MetricsEndpoint(("127.0.0.1", 0), render, "text/plain; version=0.0.4")
    endpoint.open(selector)
    port = endpoint.address[1]
    done = threading.Event()

    def drive() -> None:  # what the supervisor's select loop does
        while not done.is_set():
            for key, events in selector.select(0.05):
                key.data(events)
            endpoint.expire(time.monotonic())

    driver = threading.Thread(target=drive)
    driver.start()
    try:
        assert http_get(port)[0] == 500
        broken[0] = False
        status, headers, body = http_get(port)
        assert (status, body) == (200, "pulse_up 1\n")
        assert headers["connection"] == "close"
    finally:
        done.set()
        driver.join(10)
        endpoint.close()
        selector.close()
