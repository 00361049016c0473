"""The multi-process launcher: a supervisor and N reactor processes on one port.

The GIL allows one busy reactor per process, so pulse uses every core by
running several worker processes, each with its own ``Server`` and event
loop.  ``serve()`` (and ``pulse serve`` on the command line) opens the
listeners, forks the workers, restarts a worker that dies, stops them
gracefully on SIGTERM/SIGINT and replaces them one at a time on SIGHUP.

Why it is built this way:

- Workers are made with ``os.fork()``, not ``multiprocessing`` or
  ``subprocess``.  The handler (a class, an instance, a lambda factory, a
  closure) reaches the workers as it is, with no pickling; the listening
  sockets are inherited at the same fd; a restart costs a fork instead of a
  new interpreter importing everything again (and PyPy keeps its warm JIT);
  and the supervisor needs exact ``waitpid`` statuses and control of the
  signal mask around ``fork``, which ``multiprocessing.Process`` hides.  So
  the supervisor runs no threads of its own, and the application is imported
  once, in the supervisor (like gunicorn's ``--preload``): a broken import
  fails at start, before any worker exists.
- The supervisor owns the listening sockets and keeps them open across worker
  restarts.  For TCP on Linux every worker *slot* gets its own socket bound
  with ``SO_REUSEPORT`` (the kernel spreads connections over the sockets by
  hash) and a slot's replacement worker inherits that same socket.  The
  connections waiting in a socket's accept queue are reset when the last
  descriptor of that socket closes; because the supervisor holds one, a worker
  that dies or retires never takes its queue down with it, and the
  replacement accepts what was waiting.  SIGHUP starts the replacement on the
  same socket, waits until it accepts, and only then asks the old worker to
  stop: no connection attempt is refused.  Unix sockets, ``fds`` (``--fd``)
  and systemd sockets are one socket that every worker shares.
- Workers never outlive the supervisor: on Linux each asks the kernel for
  SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``), which holds even
  when the supervisor is killed with SIGKILL; elsewhere a lifeline pipe does
  it (the supervisor holds its only write end; a worker thread that reads EOF
  ends the process).
"""

import collections
import contextlib
import importlib
import logging
import os
import selectors
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .address import format_address, open_listener, parse_address
from .errors import PulseError, ServerStateError
from .handler import check_handler
from .options import Options
from .server import Server

logger = logging.getLogger("pulse")

#: Exit status of a worker that could not start (gunicorn uses 3 as well).
BOOT_ERROR = 3
#: A worker that ran this long before dying was not crash-looping: its
#: replacement starts at once and the back-off starts over.
STABLE_UPTIME = 5.0
#: Restart back-off for a crash-looping slot: 0, 0.5, 1, 2, ... up to this.
MAX_RESTART_DELAY = 30.0
#: A worker must be accepting this long after its fork, or it is killed.
BOOT_TIMEOUT = 30.0
#: The supervisor's SIGKILL backstop fires this long after the graceful
#: timeout, which the worker enforces itself first (``shutdown_timeout``).
KILL_GRACE = 2.0
#: The first fd that systemd passes (``SD_LISTEN_FDS_START``).
SD_LISTEN_FDS_START = 3

_PR_SET_PDEATHSIG = 1
_SUPERVISOR_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                       signal.SIGCHLD)
_CALLBACKS = ("on_open", "on_data", "on_close")

Address = Any


class LaunchError(PulseError, RuntimeError):
    """The launcher could not start: an application that does not import, a
    worker that failed to boot, ...  The message says what and why."""


# -- helpers that the command line shares ----------------------------------


def restart_delay(crashes: int) -> float:
    """Seconds to wait before restarting a slot whose worker died ``crashes``
    times in a row, each within ``STABLE_UPTIME`` of its start: the first
    restart is immediate, then 0.5 s doubling up to ``MAX_RESTART_DELAY``."""
    if crashes <= 1:
        return 0.0
    return min(MAX_RESTART_DELAY, 0.5 * 2.0 ** (crashes - 2))


def cpu_count() -> int:
    """The number of cores this process may run on (psutil): the CPU affinity
    where the OS has one (it honours ``taskset`` and cpusets), else the
    logical core count."""
    import psutil
    try:
        count = len(psutil.Process().cpu_affinity())
    except (AttributeError, NotImplementedError, OSError):
        count = 0  # macOS has no affinity
    return count or psutil.cpu_count(logical=True) or os.cpu_count() or 1


def resolve_workers(workers: Union[int, str]) -> int:
    """The worker count for ``workers``: a positive int, its decimal string,
    or ``"auto"`` for one per core; anything else raises ``ValueError``."""
    if isinstance(workers, str):
        text = workers.strip().lower()
        if text == "auto":
            return cpu_count()
        if text.isdigit():
            workers = int(text)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError("workers must be a number >= 1 or 'auto', got {!r}".format(workers))
    return workers


def handler_factory(target: Any) -> Callable[[], Any]:
    """A function that makes one worker's handler from ``target``: a handler
    class (instantiated in each worker), a handler instance (each worker gets
    its forked copy) or a factory (called in each worker, after the fork, so
    that per-process resources such as database connections are not
    shared).  Raises ``TypeError`` for anything else."""
    if isinstance(target, type):
        check_handler(target)  # the callbacks are there, as functions of the class
        return target
    if all(callable(getattr(target, name, None)) for name in _CALLBACKS):
        return lambda: target
    if callable(target):
        return target
    raise TypeError("the handler must be a handler class, a handler instance or a factory "
                    "that returns one, got {!r}".format(target))


def load_target(spec: str) -> Any:
    """Import ``"MODULE:ATTR"`` (``ATTR`` may be dotted) and return the object;
    ``LaunchError`` names what failed (the module, the attribute, or the
    exception the module raised while importing)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise LaunchError("the application must be given as MODULE:ATTR (e.g. myapp:Echo), "
                          "got {!r}".format(spec))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LaunchError("cannot import {!r}: {}".format(spec, exc)) from exc
    except Exception as exc:  # the module's own code failed
        raise LaunchError("cannot import {!r}: importing {} raised {}: {}".format(
            spec, module_name, type(exc).__name__, exc)) from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise LaunchError("cannot load {!r}: module {!r} has no attribute {!r}".format(
                spec, module_name, attr)) from None
    return obj


def systemd_listen_fds(unset_environment: bool = True) -> List[int]:
    """The listening fds passed by systemd socket activation (``LISTEN_FDS``
    and ``LISTEN_PID``, as ``sd_listen_fds(3)`` reads them), or ``[]``.  The
    variables are removed so that nothing started later takes them for its
    own, and the fds are made close-on-exec."""
    pid_text = os.environ.get("LISTEN_PID", "")
    count_text = os.environ.get("LISTEN_FDS", "")
    if unset_environment:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    try:
        pid, count = int(pid_text), int(count_text)
    except ValueError:
        return []
    if pid != os.getpid() or count <= 0:
        return []
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    for fd in fds:
        with contextlib.suppress(OSError):
            os.set_inheritable(fd, False)
    return fds


def adopt_listener(fd: int) -> socket.socket:
    """Wrap the inherited listening socket ``fd``; ``OSError`` or
    ``ValueError`` name the fd when it is not an open, listening stream
    socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise OSError(exc.errno, "fd {} is not a usable socket: {}".format(
            fd, exc.strerror or exc)) from None
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ValueError("fd {} is not a stream (TCP or Unix) socket".format(fd))
    accepting = getattr(socket, "SO_ACCEPTCONN", None)
    if accepting is not None:
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, accepting)
        except OSError:
            listening = 1  # the platform cannot tell: trust the caller
        if not listening:
            sock.detach()
            raise ValueError("fd {} is a socket but not a listening one (call listen() on it "
                             "first)".format(fd))
    sock.setblocking(False)
    return sock


def describe_exit(status: int) -> str:
    """``waitpid`` status in words: ``exited with status 3``, ``was killed by
    signal 9 (SIGKILL)``."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "?"
        return "was killed by signal {} ({})".format(number, name)
    if os.WIFEXITED(status):
        return "exited with status {}".format(os.WEXITSTATUS(status))
    return "ended with wait status {}".format(status)


def _level_number(level: Any) -> Optional[int]:
    if level is None or isinstance(level, int):
        return level
    number = logging.getLevelName(str(level).upper())
    if not isinstance(number, int):
        raise ValueError("log_level must be a logging level name, got {!r}".format(level))
    return number


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return "{:.0f} {}".format(count, unit) if unit == "B" else "{:.1f} {}".format(
                count, unit)
        count /= 1024.0
    return ""  # pragma: no cover


# -- inside a worker ---------------------------------------------------------


class _WorkerListener(socket.socket):
    """A worker's descriptor of a listening socket that other processes hold too.

    ``close()`` first takes the socket out of the worker's poller.  Why:
    epoll watches an open *file description*, not an fd number, and this one
    stays open in the supervisor and in the worker's successor, so closing the
    fd alone would leave it in the retiring worker's epoll set, waking that
    worker (under a stale fd number) for connections that are its successor's.
    """

    pulse_server: Optional[Server] = None

    def close(self) -> None:
        server = self.pulse_server
        loop = server.loop if server is not None else None
        fd = self.fileno()
        if loop is not None and fd >= 0:
            try:
                remove = getattr(loop, "remove_listener", None)
                if remove is not None:
                    remove(self)
                else:
                    loop._poller.unregister(fd)  # until EventLoop has remove_listener
            except Exception:  # noqa: BLE001 - the loop may be closing; the close below matters
                pass
        super().close()


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


# -- the supervisor ----------------------------------------------------------


class _Worker:
    """The supervisor's record of one worker process."""

    __slots__ = ("slot", "pid", "status_fd", "started", "ready", "role", "kill_at",
                 "killed", "error", "buffer")

    def __init__(self, slot: int, pid: int, status_fd: int) -> None:
        self.slot = slot
        self.pid = pid
        self.status_fd = status_fd
        self.started = time.monotonic()
        self.ready = False
        self.role = "current"  # or "candidate" (a SIGHUP replacement), "retiring"
        self.kill_at: Optional[float] = None
        self.killed = False
        self.error: Optional[str] = None
        self.buffer = b""

    def __str__(self) -> str:
        return "worker {} (pid {})".format(self.slot + 1, self.pid)


class Supervisor:
    """Runs ``workers`` reactor processes serving ``handler`` on ``address``.

    Most programs call ``serve()``, which builds one and runs it.  The
    arguments are those of ``serve()``; bad ones raise ``ValueError`` or
    ``TypeError`` here, before anything is opened.  ``run()`` blocks in the
    main thread; ``stop()`` and ``reload()`` may be called from other threads.
    """

    def __init__(self, handler: Any, address: Any = None, *, workers: Union[int, str] = 1,
                 fds: Sequence[int] = (), graceful_timeout: Optional[float] = None,
                 stats_interval: Optional[float] = None, reuse_port: Optional[bool] = None,
                 **options: Any) -> None:
        self._factory = handler_factory(handler)
        self.workers = resolve_workers(workers)
        if graceful_timeout is not None:
            options["shutdown_timeout"] = graceful_timeout
        options.pop("reuse_port", None)  # the launcher owns the listeners (see reuse_port)
        self.options = Options(**options)
        self._log_level = _level_number(self.options.log_level)
        if stats_interval is not None:
            if isinstance(stats_interval, bool) or not isinstance(stats_interval, (int, float)) \
                    or not stats_interval > 0:
                raise ValueError("stats_interval must be > 0 seconds or None, got {!r}".format(
                    stats_interval))
        self.stats_interval = stats_interval
        if address is None:
            addresses: List[Any] = []
        elif isinstance(address, list):
            addresses = list(address)
        else:
            addresses = [address]
        for item in addresses:
            if not isinstance(item, socket.socket):
                parse_address(item)  # fail now, with the parser's message
        for fd in fds:
            if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
                raise ValueError("fds must be file descriptor numbers, got {!r}".format(fd))
        if not addresses and not fds:
            raise ValueError("nothing to listen on: pass an address or inherited fds")
        self._addresses = addresses
        self._fds = list(fds)
        if reuse_port is None:
            # Only Linux spreads connections over SO_REUSEPORT sockets; BSD and
            # macOS hand them all to one, so there the workers share one socket.
            reuse_port = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")
        self.reuse_port = bool(reuse_port)
        self._state = "new"
        self._requests: Deque[Any] = collections.deque()
        self._slots: List[Optional[_Worker]] = [None] * self.workers
        self._procs: Dict[int, _Worker] = {}
        self._crashes = [0] * self.workers
        self._restart_at: List[Optional[float]] = [None] * self.workers
        self._candidate: Optional[_Worker] = None
        self._reload_queue: List[int] = []
        self._reload_again = False
        self._boot_error: Optional[str] = None
        self._reuse_addrs: List[Tuple[str, int]] = []
        self._slot_socks: List[List[Optional[socket.socket]]] = [[] for _ in range(self.workers)]
        self._shared: List[socket.socket] = []
        self._unix_paths: List[str] = []
        self._selector: Optional[selectors.BaseSelector] = None
        self._wake_r = self._wake_w = -1
        self._lifeline_r = self._lifeline_w = -1
        self._libc: Any = None
        self._pid = os.getpid()

    # -- public --------------------------------------------------------------

    @property
    def addresses(self) -> List[Any]:
        """Bound addresses of the listeners (after ``run()`` opened them)."""
        socks = [s for s in self._slot_socks[0] if s is not None] + self._shared
        return [sock.getsockname() for sock in socks if sock.fileno() >= 0]

    def stop(self, graceful: bool = True) -> None:
        """Stop as SIGTERM does (``graceful=False``: as SIGQUIT, killing the
        workers at once); safe from another thread."""
        self._request("stop" if graceful else "kill")

    def reload(self) -> None:
        """Replace the workers one at a time, as SIGHUP does; safe from another thread."""
        self._request("reload")

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or ``stop()``) and the workers have
        finished; returns normally after a stop.

        Must run in the main thread (it installs signal handlers and forks;
        no other thread should be running then).  A start-up failure raises:
        ``OSError`` for a listener (port in use), ``LaunchError`` for a worker
        that failed to boot, with the worker's own error in the message.
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("pulse.serve() must run in the main thread (it handles signals)")
        if self._state != "new":
            raise ServerStateError("a Supervisor runs once")
        self._state = "starting"
        self._pid = os.getpid()
        try:
            self._open_listeners()
            self._open_pipes()
            with self._signal_handlers():
                for slot in range(self.workers):
                    self._slots[slot] = self._spawn(slot)
                self._main_loop()
        finally:
            self._state = "stopped"
            self._kill_and_reap_all()
            self._close_all()
        if self._boot_error is not None:
            raise LaunchError(self._boot_error)

    # -- setting up ----------------------------------------------------------

    def _open_listeners(self) -> None:
        opts = self.options
        for item in self._addresses:
            if isinstance(item, socket.socket):
                item.setblocking(False)
                self._shared.append(item)
                continue
            family, _ = parse_address(item)
            if family == socket.AF_UNIX or not self.reuse_port:
                sock = open_listener(item, opts.backlog, reuse_port=False)
                self._shared.append(sock)
                if family == socket.AF_UNIX:
                    self._unix_paths.append(sock.getsockname())
                continue
            # One SO_REUSEPORT socket per slot, all on the port the first one got
            # (so that port 0 works).
            first = open_listener(item, opts.backlog, reuse_port=True)
            self._slot_socks[0].append(first)
            host, port = first.getsockname()[:2]
            self._reuse_addrs.append((host, port))
            for slot in range(1, self.workers):
                self._slot_socks[slot].append(open_listener((host, port), opts.backlog, True))
        for fd in self._fds:
            self._shared.append(adopt_listener(fd))
        for address in self._reuse_addrs:
            logger.info("pulse: listening on %s (SO_REUSEPORT: one socket per worker)",
                        format_address(address))
        for sock in self._shared:
            logger.info("pulse: listening on %s (one socket shared by the workers)",
                        format_address(sock.getsockname()))

    def _open_pipes(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._lifeline_r, self._lifeline_w = os.pipe()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        if sys.platform.startswith("linux"):
            try:
                import ctypes
                self._libc = ctypes.CDLL(None, use_errno=True)
            except Exception:  # noqa: BLE001 - no ctypes: the lifeline pipe still works
                self._libc = None

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        previous: Dict[int, Any] = {}
        try:
            old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        except TypeError:  # an interpreter without the keyword
            old_wakeup = signal.set_wakeup_fd(self._wake_w)
        try:
            for signum in _SUPERVISOR_SIGNALS:
                previous[signum] = signal.signal(signum, self._on_signal)
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
            signal.set_wakeup_fd(old_wakeup)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # The wakeup fd already woke the main loop; it acts on the queue.
        self._requests.append(signum)

    def _request(self, what: str) -> None:
        self._requests.append(what)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    # -- forking -------------------------------------------------------------

    def _spawn(self, slot: int) -> _Worker:
        socks = self._listeners_of(slot)
        status_r, status_w = os.pipe()
        # Signals stay blocked across fork so that the child cannot run the
        # supervisor's handlers before it has installed its own.
        mask = None
        if hasattr(signal, "pthread_sigmask"):
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SUPERVISOR_SIGNALS)
        try:
            pid = os.fork()
        except BaseException:
            os.close(status_r)
            os.close(status_w)
            if mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            raise
        if pid == 0:  # the worker: never returns
            code = 1
            try:
                os.close(status_r)
                code = self._worker_main(slot, socks, status_w, mask)
            except BaseException:  # noqa: BLE001 - nothing may escape into the caller's stack
                with contextlib.suppress(BaseException):
                    logger.exception("pulse: worker %d failed", os.getpid())
            finally:
                with contextlib.suppress(BaseException):
                    logging.shutdown()
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(status_w)
        os.set_blocking(status_r, False)
        worker = _Worker(slot, pid, status_r)
        self._procs[pid] = worker
        assert self._selector is not None
        self._selector.register(status_r, selectors.EVENT_READ, worker)
        return worker

    def _listeners_of(self, slot: int) -> List[socket.socket]:
        """The slot's SO_REUSEPORT sockets (reopened if suspended) and the shared ones."""
        socks = self._slot_socks[slot]
        for index, sock in enumerate(socks):
            if sock is None:
                socks[index] = open_listener(self._reuse_addrs[index], self.options.backlog, True)
        return [s for s in socks if s is not None] + self._shared

    def _worker_main(self, slot: int, socks: List[socket.socket], status_fd: int,
                     mask: Any) -> int:
        """The body of a worker process; returns its exit status."""
        state: Dict[str, Any] = {"server": None, "stop": False}

        def on_stop_signal(signum: int, frame: Any) -> None:
            state["stop"] = True
            if state["server"] is not None:
                state["server"].stop()
        signal.set_wakeup_fd(-1)
        for signum in _SUPERVISOR_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, on_stop_signal)
        signal.signal(signal.SIGINT, on_stop_signal)
        # The supervisor does SIGHUP; a HUP sent to the whole group must not kill workers.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        watched = _die_with_parent(self._pid, self._libc)
        self._close_inherited(slot, keep_lifeline=not watched)
        if not watched:
            threading.Thread(target=_watch_lifeline, args=(self._lifeline_r,),
                             name="pulse-lifeline", daemon=True).start()
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

        announced = threading.Lock()
        status = {"ready": False, "fd": status_fd}

        def send(message: bytes) -> None:
            with announced:
                fd = status["fd"]
                if fd < 0:
                    return
                with contextlib.suppress(OSError):
                    os.write(fd, message)

        def boot_failed(exc: BaseException) -> int:
            logger.debug("pulse: worker %d failed to start", os.getpid(), exc_info=True)
            text = "{}: {}".format(type(exc).__name__, exc).replace("\n", " ")
            send(b"E" + text.encode("utf-8", "replace") + b"\n")
            return BOOT_ERROR

        try:
            server = Server(self._factory(), **self.options.as_dict())
            for sock in socks:
                mine = _WorkerListener(sock.family, sock.type, sock.proto, fileno=sock.detach())
                mine.pulse_server = server
                server.listen(mine)
        except Exception as exc:  # noqa: BLE001 - the factory may raise anything
            return boot_failed(exc)
        state["server"] = server
        if state["stop"]:
            server.stop()

        def announce() -> None:
            if not server.wait_started(BOOT_TIMEOUT):
                return
            with announced:
                fd = status["fd"]
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.write(fd, b"R\n")
                    os.close(fd)
                    status["fd"] = -1
                status["ready"] = True
            loop = server.loop
            if self.stats_interval and loop is not None:
                loop.call_soon_threadsafe(self._start_stats, loop, slot)
        threading.Thread(target=announce, name="pulse-announce", daemon=True).start()
        try:
            server.serve()
        except Exception as exc:  # noqa: BLE001
            if not status["ready"]:
                return boot_failed(exc)
            logger.exception("pulse: worker %d (pid %d) failed", slot + 1, os.getpid())
            return 1
        return 0

    def _close_inherited(self, slot: int, keep_lifeline: bool) -> None:
        """In a new worker: close the supervisor's fds and the other slots' sockets.

        Why the sockets matter: the supervisor closes a crash-looping slot's
        socket to stop the kernel queueing connections there; a copy kept in
        a sibling would keep that queue alive with nobody accepting.
        """
        if self._selector is not None:
            with contextlib.suppress(OSError):
                self._selector.close()
        fds = [self._wake_r, self._wake_w, self._lifeline_w]
        if not keep_lifeline:
            fds.append(self._lifeline_r)
        fds.extend(w.status_fd for w in self._procs.values())
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        for index, socks in enumerate(self._slot_socks):
            if index != slot:
                for sock in socks:
                    if sock is not None:
                        sock.close()

    def _start_stats(self, loop: Any, slot: int) -> None:
        """In a worker's loop: log its stats every ``stats_interval`` seconds."""
        import psutil
        proc = psutil.Process()
        proc.cpu_percent(None)  # the first call only starts the measurement
        interval = float(self.stats_interval or 1.0)
        last = [time.monotonic(), loop.bytes_in, loop.bytes_out]

        def tick() -> None:
            now = time.monotonic()
            elapsed = max(now - last[0], 1e-6)
            bytes_in, bytes_out = loop.bytes_in, loop.bytes_out
            try:
                cpu = proc.cpu_percent(None)
                rss = proc.memory_info().rss
            except psutil.Error:
                cpu, rss = 0.0, 0
            logger.info("pulse: worker %d (pid %d): %d connections, in %s (%s/s), out %s (%s/s), "
                        "cpu %.1f%%, rss %s", slot + 1, os.getpid(), loop.connections,
                        _size(bytes_in), _size((bytes_in - last[1]) / elapsed), _size(bytes_out),
                        _size((bytes_out - last[2]) / elapsed), cpu, _size(rss))
            last[:] = [now, bytes_in, bytes_out]
            loop.call_later(interval, tick)
        loop.call_later(interval, tick)

    # -- the supervisor's loop ---------------------------------------------

    def _main_loop(self) -> None:
        assert self._selector is not None
        while True:
            for key, _ in self._selector.select(self._timeout()):
                if key.data is None:
                    with contextlib.suppress(OSError):
                        while os.read(self._wake_r, 512):
                            pass
                else:
                    self._read_status(key.data)
            self._handle_requests()
            self._reap()
            self._run_due()
            if self._state == "stopping" and not self._procs:
                return

    def _timeout(self) -> float:
        now = time.monotonic()
        when = [now + 1.0]  # a cap, so that nothing depends on a wakeup being seen
        when.extend(t for t in self._restart_at if t is not None)
        for worker in self._procs.values():
            if worker.killed:
                continue  # SIGKILLed: only its exit is awaited
            if worker.kill_at is not None:
                when.append(worker.kill_at)
            if not worker.ready and worker.role != "retiring":
                when.append(worker.started + BOOT_TIMEOUT)
        return max(0.0, min(when) - now)

    def _handle_requests(self) -> None:
        while self._requests:
            request = self._requests.popleft()
            if request in (signal.SIGTERM, signal.SIGINT, "stop"):
                if self._state == "stopping" and request != "stop":
                    logger.warning("pulse: second stop signal: killing the workers now")
                    self._force()
                else:
                    self._begin_stop()
            elif request in (signal.SIGQUIT, "kill"):
                self._begin_stop()
                self._force()
            elif request in (signal.SIGHUP, "reload"):
                self._begin_reload()

    def _read_status(self, worker: _Worker) -> None:
        """Read a worker's status pipe: ``R`` (accepting) or ``E<error>``."""
        while worker.status_fd >= 0:
            try:
                chunk = os.read(worker.status_fd, 4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._close_status(worker)
                return
            worker.buffer += chunk
            while b"\n" in worker.buffer:
                line, _, worker.buffer = worker.buffer.partition(b"\n")
                if line == b"R":
                    self._on_ready(worker)
                elif line.startswith(b"E"):
                    worker.error = line[1:].decode("utf-8", "replace")

    def _close_status(self, worker: _Worker) -> None:
        if worker.status_fd >= 0:
            if self._selector is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(worker.status_fd)
            os.close(worker.status_fd)
            worker.status_fd = -1

    def _on_ready(self, worker: _Worker) -> None:
        worker.ready = True
        if worker.role == "candidate" and self._state == "running":
            self._promote(worker)
        elif self._state == "starting":
            if all(w is not None and w.ready for w in self._slots):
                self._state = "running"
                logger.info("pulse: %d worker%s serving (pids %s); supervisor pid %d",
                            self.workers, "s" if self.workers > 1 else "",
                            " ".join(str(w.pid) for w in self._slots if w is not None), self._pid)
        elif worker.role == "current" and self._state == "running":
            logger.info("pulse: %s is serving", worker)

    def _reap(self) -> None:
        for pid, worker in list(self._procs.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0  # reaped elsewhere (SIGCHLD ignored by the caller?)
            if not done:
                continue
            self._read_status(worker)
            self._close_status(worker)
            del self._procs[pid]
            self._on_exit(worker, status)

    def _on_exit(self, worker: _Worker, status: int) -> None:
        how = describe_exit(status)
        uptime = time.monotonic() - worker.started
        clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        if worker.role == "candidate":
            self._candidate = None
            if self._state == "stopping":
                logger.info("pulse: %s %s", worker, how)
                return
            logger.error("pulse: reload: the new %s %s before it was serving%s; keeping the "
                         "old worker%s and stopping the reload", worker, how,
                         ": " + worker.error if worker.error else "",
                         "" if self._slots[worker.slot] is not None else " (restarting it)")
            self._reload_queue = []
            self._reload_again = False
            if self._slots[worker.slot] is None and self._restart_at[worker.slot] is None:
                self._restart_at[worker.slot] = time.monotonic()
            return
        if worker.role == "retiring" or self._state == "stopping":
            if self._boot_error is not None:
                log = logger.debug  # the start-up failure is the one message that matters
            else:
                log = logger.info if clean else logger.warning
            log("pulse: %s %s", worker, how)
            return
        self._slots[worker.slot] = None
        if self._state == "starting" and not worker.ready:
            self._boot_error = "worker {} failed to start: {}".format(
                worker.slot + 1, worker.error or how)
            self._begin_stop(quiet=True)
            return
        self._schedule_restart(worker, how, uptime)

    def _schedule_restart(self, worker: _Worker, how: str, uptime: float) -> None:
        slot = worker.slot
        if uptime >= STABLE_UPTIME:
            self._crashes[slot] = 0
        self._crashes[slot] += 1
        delay = restart_delay(self._crashes[slot])
        why = ": " + worker.error if worker.error else ""
        if worker.error or not worker.ready:
            what = "failed to start{}".format(why) if worker.error else how + " before serving"
        else:
            what = how
        if self._candidate is not None and self._candidate.slot == slot:
            logger.error("pulse: %s %s after %.1f s; its reload replacement takes over",
                         worker, what, uptime)
            return
        if delay:
            logger.error("pulse: %s %s after %.1f s; crash loop (%d quick exits in a row), "
                         "restarting in %.1f s", worker, what, uptime, self._crashes[slot], delay)
            self._suspend_slot(slot)
        else:
            clean = what == "exited with status 0"
            (logger.warning if clean else logger.error)(
                "pulse: %s %s after %.1f s; restarting it now", worker, what, uptime)
        self._restart_at[slot] = time.monotonic() + delay

    def _suspend_slot(self, slot: int) -> None:
        """Close a crash-looping slot's own sockets while another worker serves.

        The kernel keeps hashing new connections to a socket nobody accepts
        from; closed, they go to the other workers instead.  (The first restart
        is immediate, so its socket stays open and keeps its queue.)
        """
        others = any(w is not None and w.ready for i, w in enumerate(self._slots) if i != slot)
        socks = self._slot_socks[slot]
        if not others or not any(socks):
            return
        for index, sock in enumerate(socks):
            if sock is not None:
                sock.close()
                socks[index] = None
        logger.warning("pulse: slot %d is down: its listening socket is closed until it "
                       "restarts, the other workers take its connections", slot + 1)

    def _run_due(self) -> None:
        now = time.monotonic()
        for slot, when in enumerate(self._restart_at):
            if when is None or when > now or self._state not in ("running", "starting"):
                continue
            self._restart_at[slot] = None
            try:
                self._slots[slot] = self._spawn(slot)
            except OSError as exc:
                self._crashes[slot] += 1
                delay = max(0.5, restart_delay(self._crashes[slot]))
                logger.error("pulse: cannot restart worker %d: %s; retrying in %.1f s",
                             slot + 1, exc, delay)
                self._restart_at[slot] = now + delay
        for worker in list(self._procs.values()):
            if worker.killed:
                continue
            if worker.kill_at is not None and now >= worker.kill_at:
                logger.warning("pulse: %s did not finish within the graceful timeout "
                               "(%.1f s); killing it", worker, self.options.shutdown_timeout)
                self._kill(worker)
            elif not worker.ready and worker.role != "retiring" and \
                    now - worker.started >= BOOT_TIMEOUT:
                worker.error = worker.error or "not serving {:.0f} s after start".format(
                    BOOT_TIMEOUT)
                logger.error("pulse: %s is not serving %.0f s after its start; killing it",
                             worker, BOOT_TIMEOUT)
                self._kill(worker)

    def _kill(self, worker: _Worker) -> None:
        worker.killed = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)

    def _retire(self, worker: _Worker) -> None:
        """Ask a worker to stop gracefully; the SIGKILL backstop comes later."""
        worker.role = "retiring"
        worker.kill_at = time.monotonic() + self.options.shutdown_timeout + KILL_GRACE
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGTERM)

    # -- stop and reload ----------------------------------------------------

    def _begin_stop(self, quiet: bool = False) -> None:
        if self._state == "stopping":
            return
        self._state = "stopping"
        if not quiet:
            logger.info("pulse: stopping %d worker%s (graceful timeout %.1f s)", len(self._procs),
                        "s" if len(self._procs) != 1 else "", self.options.shutdown_timeout)
        self._restart_at = [None] * self.workers
        self._candidate = None
        self._reload_queue = []
        self._reload_again = False
        for worker in self._procs.values():
            if worker.role != "retiring":
                self._retire(worker)
        # The workers close their descriptors as they stop accepting; once ours
        # are closed too the sockets are gone and new connections are refused.
        self._close_listeners()

    def _force(self) -> None:
        for worker in self._procs.values():
            if not worker.killed:
                self._kill(worker)

    def _begin_reload(self) -> None:
        if self._state != "running":
            logger.warning("pulse: reload ignored: the supervisor is %s", self._state)
            return
        if self._candidate is not None or self._reload_queue:
            logger.info("pulse: reload already in progress; another one follows it")
            self._reload_again = True
            return
        logger.info("pulse: reload: replacing %d worker%s one at a time", self.workers,
                    "s" if self.workers > 1 else "")
        self._reload_queue = list(range(self.workers))
        self._reload_next()

    def _reload_next(self) -> None:
        while self._reload_queue:
            slot = self._reload_queue.pop(0)
            if self._slots[slot] is None:
                continue  # down and about to restart: it comes back new anyway
            try:
                worker = self._spawn(slot)
            except OSError as exc:
                logger.error("pulse: reload: cannot start a new worker %d: %s; reload stopped",
                             slot + 1, exc)
                self._reload_queue = []
                return
            worker.role = "candidate"
            self._candidate = worker
            return
        logger.info("pulse: reload done: %d worker%s serving (pids %s)", self.workers,
                    "s" if self.workers > 1 else "",
                    " ".join(str(w.pid) for w in self._slots if w is not None))
        if self._reload_again:
            self._reload_again = False
            self._begin_reload()

    def _promote(self, worker: _Worker) -> None:
        """A reload replacement is accepting: it takes the slot, the old worker retires."""
        slot = worker.slot
        old = self._slots[slot]
        worker.role = "current"
        self._slots[slot] = worker
        self._candidate = None
        self._restart_at[slot] = None
        if old is not None:
            logger.info("pulse: reload: %s replaces pid %d, which finishes its connections",
                        worker, old.pid)
            self._retire(old)
        self._reload_next()

    # -- tearing down -------------------------------------------------------

    def _kill_and_reap_all(self) -> None:
        """The last word: no worker outlives ``run()``, whatever happened."""
        for worker in list(self._procs.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
        for pid in list(self._procs):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self._close_status(self._procs.pop(pid))

    def _close_listeners(self) -> None:
        for socks in self._slot_socks:
            for index, sock in enumerate(socks):
                if sock is not None:
                    sock.close()
                    socks[index] = None
        for sock in self._shared:
            sock.close()

    def _close_all(self) -> None:
        self._close_listeners()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._unix_paths = []
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        for name in ("_wake_r", "_wake_w", "_lifeline_r", "_lifeline_w"):
            fd = getattr(self, name)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)


def serve(handler: Any, address: Any = None, *, workers: Union[int, str] = 1,
          fds: Sequence[int] = (), graceful_timeout: Optional[float] = None,
          stats_interval: Optional[float] = None, reuse_port: Optional[bool] = None,
          **options: Any) -> None:
    """Serve ``handler`` on ``address`` with ``workers`` reactor processes.

    ``handler`` is a handler class, instance or factory (called once in each
    worker); ``address`` one address or a list of them (``"host:port"``,
    ``"unix:/path"``, a listening ``socket.socket``, ...); ``fds`` inherited
    listening fds (``--fd``, systemd); ``workers`` a number or ``"auto"`` (one
    per core).  Other keywords are ``Server`` options; ``graceful_timeout``
    sets ``shutdown_timeout``, the time a stopping worker gives its
    connections.  ``stats_interval`` logs each worker's connections, bytes,
    CPU and RSS every so many seconds.  ``reuse_port`` (default: on Linux)
    gives each worker its own ``SO_REUSEPORT`` socket instead of one shared.
    Blocks in the main thread until SIGTERM/SIGINT; SIGHUP replaces the
    workers one at a time.  Start-up failures raise (see ``Supervisor.run``).
    """
    Supervisor(handler, address, workers=workers, fds=fds, graceful_timeout=graceful_timeout,
               stats_interval=stats_interval, reuse_port=reuse_port, **options).run()
