"""A worker process: what runs in the child after the supervisor's ``fork``.

These are plain functions over what the supervisor hands the child (a
``WorkerSpec`` shared by every worker, a ``WorkerStart`` for this fork), not
methods of the supervisor: nothing here touches the supervisor's state, so
nothing the child does can corrupt it.  The child serves with one ``Server``
and tells the supervisor over its status pipe when it is accepting.

Workers never outlive the supervisor: on Linux each asks the kernel for
SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``), which holds even
when the supervisor is killed with SIGKILL; elsewhere a lifeline pipe does
it (the supervisor holds its only write end; a worker thread that reads EOF
ends the process).
"""

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import AbstractSet, Any, Callable, NoReturn, Optional, Tuple

from ..options import Options
from ..server import Server
from .status import StatusWriter

logger = logging.getLogger("pulse")

#: Exit status of a worker that could not start (gunicorn uses 3 as well).
BOOT_ERROR = 3
#: A worker must be accepting this long after its fork, or it is killed.
BOOT_TIMEOUT = 30.0

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker of one supervisor run gets from it: the handler
    factory and options, the supervisor's pid, signals and lifeline, the
    stats interval (``None``: no stats), the TLS context and the interval of
    the stats reports on the status pipe (``None``: no ``--metrics``)."""

    factory: Callable[[], Any]
    options: Options
    stats_interval: Optional[float]
    supervisor_pid: int
    #: The signals the supervisor handles; the worker resets them first.
    supervisor_signals: Tuple[int, ...]
    #: The read end of the lifeline pipe (see the module docstring).
    lifeline_fd: int
    #: The C library (``ctypes``) for ``prctl``, loaded before the fork; or None.
    libc: Any = None
    #: The server-side ``ssl.SSLContext`` (built before the fork), or None.
    ssl: Any = None
    #: Seconds between stats reports on the status pipe (``--metrics``), or None.
    report_interval: Optional[float] = None


@dataclass(frozen=True)
class WorkerStart:
    """What one fork adds to the ``WorkerSpec``: the slot (0-based), its
    listening sockets, the write end of its status pipe, what of the
    supervisor's the child must close (fds, and objects with ``close()``: the
    supervisor's selector, the other slots' sockets) and the signal mask to
    restore once the worker's handlers are in place."""

    slot: int
    listeners: Tuple[socket.socket, ...]
    status_fd: int
    inherited_fds: Tuple[int, ...]
    inherited_objects: Tuple[Any, ...]
    signal_mask: Optional[AbstractSet[int]]


def load_libc() -> Any:
    """The C library through ``ctypes`` on Linux (for ``prctl``), else None.

    Loaded in the supervisor, once, so that a worker needs no ``dlopen``
    after its fork."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True)
    except Exception:  # noqa: BLE001 - no ctypes: the lifeline pipe still works
        return None


def worker_process(spec: WorkerSpec, start: WorkerStart) -> NoReturn:
    """The whole life of a forked worker: run it and ``os._exit`` with its
    status.  Never returns, so nothing escapes into the supervisor's stack
    that the child inherited."""
    code = 1
    try:
        code = worker_main(spec, start)
    except BaseException:  # noqa: BLE001 - nothing may escape into the caller's stack
        with contextlib.suppress(BaseException):
            logger.exception("pulse: worker %d failed", os.getpid())
    finally:
        with contextlib.suppress(BaseException):
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


class _StopOnSignal:
    """The worker's SIGTERM/SIGINT handler: stop the server, or the boot."""

    def __init__(self) -> None:
        self.requested = False
        self.server: Optional[Server] = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.requested = True
        if self.server is not None:
            self.server.stop()


def worker_main(spec: WorkerSpec, start: WorkerStart) -> int:
    """The body of a worker process; returns its exit status."""
    stop = _StopOnSignal()
    signal.set_wakeup_fd(-1)
    for signum in spec.supervisor_signals:
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # The supervisor does SIGHUP; a HUP sent to the whole group must not kill workers.
    hangup = getattr(signal, "SIGHUP", None)
    if hangup is not None:
        signal.signal(hangup, signal.SIG_IGN)
    watched = _die_with_parent(spec.supervisor_pid, spec.libc)
    _close_inherited(start, spec.lifeline_fd if watched else -1)
    if not watched:
        threading.Thread(target=_watch_lifeline, args=(spec.lifeline_fd,),
                         name="pulse-lifeline", daemon=True).start()
    if start.signal_mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, start.signal_mask)

    status = StatusWriter(start.status_fd)

    def boot_failed(exc: BaseException) -> int:
        logger.debug("pulse: worker %d failed to start", os.getpid(), exc_info=True)
        status.error("{}: {}".format(type(exc).__name__, exc))
        return BOOT_ERROR

    try:
        server = Server(spec.factory(), ssl=spec.ssl, **spec.options.as_dict())
        # These sockets stay open in the supervisor and in this worker's
        # successor: Server.stop takes each out of the loop's poller before
        # closing it (EventLoop.remove_listener says why that matters).
        for sock in start.listeners:
            server.listen(sock)
    except Exception as exc:  # noqa: BLE001 - the factory may raise anything
        return boot_failed(exc)
    stop.server = server
    if stop.requested:
        server.stop()

    def announce() -> None:
        if not server.wait_started(BOOT_TIMEOUT):
            return
        status.ready(keep_open=spec.report_interval is not None)
        loop = server.loop
        if spec.stats_interval and loop is not None:
            loop.call_soon_threadsafe(_start_stats, loop, start.slot, spec.stats_interval)
        if spec.report_interval and loop is not None:
            loop.call_soon_threadsafe(_start_reports, loop, status, spec.report_interval)
    threading.Thread(target=announce, name="pulse-announce", daemon=True).start()
    try:
        server.serve()
    except Exception as exc:  # noqa: BLE001
        if not status.ready_sent:
            return boot_failed(exc)
        logger.exception("pulse: worker %d (pid %d) failed", start.slot + 1, os.getpid())
        return 1
    finally:
        if spec.report_interval is not None and status.ready_sent:
            status.stats(server.stats().as_dict())  # the final counts: totals stay exact
        status.close()
    return 0


def _die_with_parent(parent_pid: int, libc: Any) -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux).

    Returns False where that is not available; exits at once when the
    parent already died between ``fork`` and here.
    """
    if libc is None or os.environ.get("_PULSE_NO_PDEATHSIG"):
        return False
    try:
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except Exception:  # noqa: BLE001 - no prctl in this libc
        return False
    if os.getppid() != parent_pid:
        os._exit(1)
    return True


def _watch_lifeline(fd: int) -> None:
    """Exit the worker when the supervisor is gone (the pipe reads EOF)."""
    while True:
        try:
            data = os.read(fd, 1)
        except InterruptedError:
            continue
        except OSError:
            data = b""
        if not data:
            logger.error("pulse: worker %d: the supervisor is gone; exiting", os.getpid())
            os._exit(1)


def _close_inherited(start: WorkerStart, lifeline_fd: int) -> None:
    """In a new worker: close the supervisor's fds and the other slots' sockets
    (and ``lifeline_fd`` when it is >= 0: not needed under PDEATHSIG).

    Why the sockets matter: the supervisor closes a crash-looping slot's
    socket to stop the kernel queueing connections there; a copy kept in
    a sibling would keep that queue alive with nobody accepting.
    """
    for obj in start.inherited_objects:
        with contextlib.suppress(OSError):
            obj.close()
    for fd in start.inherited_fds + (lifeline_fd,):
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def _start_reports(loop: Any, status: StatusWriter, interval: float) -> None:
    """In a worker's loop: send its ``stats()`` to the supervisor every
    ``interval`` seconds (``--metrics``; see ``launch/metrics.py``)."""
    def tick() -> None:
        status.stats(loop.stats().as_dict())
        loop.call_later(interval, tick)
    tick()


def _start_stats(loop: Any, slot: int, interval: float) -> None:
    """In a worker's loop: log its stats every ``interval`` seconds, one line."""
    import psutil
    proc = psutil.Process()
    proc.cpu_percent(None)  # the first call only starts the measurement
    last = [time.monotonic(), loop.stats()]

    def tick() -> None:
        now = time.monotonic()
        elapsed = max(now - last[0], 1e-6)
        stats, before = loop.stats(), last[1]
        try:
            cpu = proc.cpu_percent(None)
            rss = proc.memory_info().rss
        except psutil.Error:
            cpu, rss = 0.0, 0
        logger.info("pulse: worker %d (pid %d): %d connections, in %s (%s/s), out %s (%s/s), "
                    "cpu %.1f%%, rss %s, loop %.0f%% busy, %.0f iterations/s, accepted %d, "
                    "closed %d, backlog %s, paused %d, errors %d callback %d accept",
                    slot + 1, os.getpid(), stats.connections, _size(stats.bytes_in),
                    _size((stats.bytes_in - before.bytes_in) / elapsed), _size(stats.bytes_out),
                    _size((stats.bytes_out - before.bytes_out) / elapsed), cpu, _size(rss),
                    100 * stats.utilisation_since(before),
                    (stats.iterations - before.iterations) / elapsed, stats.accepted,
                    stats.closed, _size(stats.write_backlog), stats.paused,
                    stats.callback_errors, stats.accept_errors)
        last[:] = [now, stats]
        loop.call_later(interval, tick)
    loop.call_later(interval, tick)


def _size(count: float) -> str:
    """A byte count for people: ``512 B``, ``1.5 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return "{:.0f} {}".format(count, unit) if unit == "B" else "{:.1f} {}".format(
                count, unit)
        count /= 1024.0
    return ""  # pragma: no cover
