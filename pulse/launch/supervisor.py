"""The supervisor: opens the listeners, forks the workers and runs the select loop.

It runs in the main thread, with no threads of its own, a ``select`` loop
over a signal wakeup pipe and the workers' status pipes (and, with
``metrics``, the metrics endpoint's sockets: ``metrics.py`` says why there).  What it sees
(signals, status messages, ``waitpid`` statuses, the time) it hands to its
``WorkerPolicy``, which decides what to start, stop or kill; the supervisor
owns the processes' plumbing: pipes, signal handlers, the signal mask around
``fork`` and the reaping.
"""

import collections
import contextlib
import dataclasses
import logging
import os
import selectors
import signal
import threading
import time
from typing import Any, Deque, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from ..address import parse_address
from ..errors import LaunchError
from ..options import Options, check_seconds
from .app import handler_factory, resolve_workers
from .endpoint import MetricsEndpoint
from .listeners import ListenerSet, check_listen_args, default_reuse_port
from .metrics import CONTENT_TYPE, REPORT_INTERVAL, MetricsBoard
from .policy import Request, WorkerPolicy, WorkerRecord
from .status import StatusKind, StatusReader
from .worker import WorkerSpec, WorkerStart, load_libc, worker_process

logger = logging.getLogger("pulse")


def _signal_requests() -> Dict[int, Optional[Request]]:
    """The signals the supervisor handles and what each asks for; built when
    the handlers are installed, because Windows' ``signal`` has no SIGHUP,
    SIGQUIT or SIGCHLD.  SIGCHLD asks for nothing: it only wakes the loop to
    reap."""
    requests: Dict[int, Optional[Request]] = {
        signal.SIGTERM: Request.STOP_SIGNAL, signal.SIGINT: Request.STOP_SIGNAL}
    for name, request in (("SIGHUP", Request.RELOAD), ("SIGQUIT", Request.KILL),
                          ("SIGCHLD", None)):
        signum = getattr(signal, name, None)
        if signum is not None:
            requests[signum] = request
    return requests


def _tls_context(source: Any) -> Any:
    """The server ``SSLContext`` that ``ssl`` gives: itself, or what the
    factory returns; checked here, in the supervisor, so a wrong one fails
    before any worker exists."""
    if source is None:
        return None
    context = source() if callable(source) else source
    from ..tls import check_context
    return check_context(context, server_side=True)


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
                 ssl: Any = None, metrics: Any = None, **options: Any) -> None:
        self._factory = handler_factory(handler)
        self._ssl_source = ssl
        self._ssl = _tls_context(ssl)
        self.workers = resolve_workers(workers)
        if graceful_timeout is not None:
            options["shutdown_timeout"] = graceful_timeout
        options.pop("reuse_port", None)  # the launcher owns the listeners (see reuse_port)
        self.options = Options(**options)
        self.stats_interval = check_seconds("stats_interval", stats_interval, allow_none=True,
                                            positive=True)
        self._addresses, self._fds = check_listen_args(address, fds)
        self.reuse_port = default_reuse_port() if reuse_port is None else bool(reuse_port)
        self._listeners = ListenerSet(self.workers, self.options.backlog, self.reuse_port)
        shutdown_timeout = self.options.shutdown_timeout
        assert shutdown_timeout is not None  # Options never allows None here
        self._policy = WorkerPolicy(self.workers, shutdown_timeout, self._spawn, self._listeners)
        self._requests: Deque[Optional[Request]] = collections.deque()
        self._signal_requests: Dict[int, Optional[Request]] = {}
        self._spec: Optional[WorkerSpec] = None
        self._selector: Optional[selectors.BaseSelector] = None
        self._wake_r = self._wake_w = -1
        self._lifeline_r = self._lifeline_w = -1
        self._board = MetricsBoard(self.workers)
        self._endpoint: Optional[MetricsEndpoint] = None
        if metrics is not None:
            try:
                parse_address(metrics)  # a bad address fails here, before anything opens
            except (TypeError, ValueError) as exc:
                raise ValueError("metrics address: {}".format(exc)) from None
            self._endpoint = MetricsEndpoint(metrics, self._board.render, CONTENT_TYPE)

    # -- public --------------------------------------------------------------

    @property
    def addresses(self) -> List[Any]:
        """Bound addresses of the listeners (after ``run()`` opened them)."""
        return self._listeners.addresses

    def stop(self, graceful: bool = True) -> None:
        """Stop as SIGTERM does (``graceful=False``: as SIGQUIT, killing the
        workers at once); safe from another thread."""
        self._request(Request.STOP if graceful else Request.KILL)

    def reload(self) -> None:
        """Replace the workers one at a time, as SIGHUP does; safe from another thread."""
        self._request(Request.RELOAD)

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
        self._policy.begin()
        try:
            self._listeners.open(self._addresses, self._fds)
            self._open_pipes()
            if self._endpoint is not None:
                assert self._selector is not None
                self._endpoint.open(self._selector)
            with self._signal_handlers():
                self._spec = WorkerSpec(
                    factory=self._factory, options=self.options,
                    stats_interval=self.stats_interval, supervisor_pid=os.getpid(),
                    supervisor_signals=tuple(self._signal_requests),
                    lifeline_fd=self._lifeline_r, libc=load_libc(), ssl=self._ssl,
                    report_interval=REPORT_INTERVAL if self._endpoint is not None else None)
                self._policy.start_all()
                self._main_loop()
        finally:
            self._policy.finish()
            self._kill_and_reap_all()
            self._close_all()
        if self._policy.boot_error is not None:
            raise LaunchError(self._policy.boot_error)

    # -- setting up ----------------------------------------------------------

    def _open_pipes(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._lifeline_r, self._lifeline_w = os.pipe()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        self._signal_requests = _signal_requests()
        previous: Dict[int, Any] = {}
        try:
            old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        except TypeError:  # an interpreter without the keyword
            old_wakeup = signal.set_wakeup_fd(self._wake_w)
        try:
            for signum in self._signal_requests:
                previous[signum] = signal.signal(signum, self._on_signal)
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
            signal.set_wakeup_fd(old_wakeup)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # The wakeup fd already woke the main loop; it acts on the queue.
        self._requests.append(self._signal_requests.get(signum))

    def _request(self, request: Request) -> None:
        self._requests.append(request)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    # -- forking -------------------------------------------------------------

    def _spawn(self, slot: int) -> WorkerRecord:
        """Fork a worker for ``slot`` (the policy's one way to start one)."""
        assert self._spec is not None and self._selector is not None
        socks = self._listeners.for_slot(slot)
        status_r, status_w = os.pipe()
        # Signals stay blocked across fork so that the child cannot run the
        # supervisor's handlers before it has installed its own.
        mask = None
        if hasattr(signal, "pthread_sigmask"):
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, self._spec.supervisor_signals)
        try:
            pid = os.fork()
        except BaseException:
            os.close(status_r)
            os.close(status_w)
            if mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            raise
        if pid == 0:  # the worker: never returns
            inherited = (status_r, self._wake_r, self._wake_w, self._lifeline_w) + tuple(
                w.status.fd for w in self._policy.procs.values()) + self._endpoint_fds()
            worker_process(self._spec, WorkerStart(
                slot=slot, listeners=tuple(socks), status_fd=status_w, inherited_fds=inherited,
                inherited_objects=(self._selector, *self._listeners.of_other_slots(slot)),
                signal_mask=mask))
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(status_w)
        worker = WorkerRecord(slot, pid, StatusReader(status_r), started=time.monotonic())
        self._selector.register(status_r, selectors.EVENT_READ, worker)
        return worker

    def _endpoint_fds(self) -> Tuple[int, ...]:
        return self._endpoint.fds() if self._endpoint is not None else ()

    # -- the supervisor's loop ---------------------------------------------

    def _main_loop(self) -> None:
        assert self._selector is not None
        while True:
            for key, events in self._selector.select(self._policy.timeout(time.monotonic())):
                if key.data is None:
                    with contextlib.suppress(OSError):
                        while os.read(self._wake_r, 512):
                            pass
                elif isinstance(key.data, WorkerRecord):
                    self._read_status(key.data)
                else:
                    key.data(events)  # the metrics endpoint's sockets
            if self._endpoint is not None:
                self._endpoint.expire(time.monotonic())
            while self._requests:
                request = self._requests.popleft()
                if request is Request.RELOAD:
                    self._reload_tls()
                if request is not None:
                    self._policy.handle(request)
            self._reap()
            self._policy.run_due(time.monotonic())
            if self._policy.done:
                return

    def _reload_tls(self) -> None:
        """SIGHUP with ``ssl`` given as a factory: the next workers serve a
        context built anew (renewed certificates); if that fails, they keep
        the old one and the error is logged, the service stays up."""
        if not callable(self._ssl_source) or self._spec is None:
            return
        try:
            context = _tls_context(self._ssl_source)
        except Exception as exc:  # noqa: BLE001 - the factory may raise anything
            logger.error("pulse: reload: TLS certificates not reloaded, keeping the "
                         "old ones: %s", exc)
            return
        self._spec = dataclasses.replace(self._spec, ssl=context)
        logger.info("pulse: reload: TLS certificates reloaded")

    def _read_status(self, worker: WorkerRecord) -> None:
        """Hand what a worker said on its status pipe to the policy."""
        messages, eof = worker.status.read()
        for message in messages:
            if message.kind is StatusKind.STATS:
                self._board.report(worker.slot, worker.pid, message.text)
            self._policy.on_message(worker, message)
        if eof:
            self._close_status(worker)

    def _close_status(self, worker: WorkerRecord) -> None:
        if worker.status.fd >= 0:
            if self._selector is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(worker.status.fd)
            worker.status.close()

    def _reap(self) -> None:
        for pid, worker in list(self._policy.procs.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0  # reaped elsewhere (SIGCHLD ignored by the caller?)
            if not done:
                continue
            self._read_status(worker)
            self._close_status(worker)
            self._board.exited(worker.pid)
            self._policy.on_exit(worker, status)

    # -- tearing down -------------------------------------------------------

    def _kill_and_reap_all(self) -> None:
        """The last word: no worker outlives ``run()``, whatever happened."""
        procs = self._policy.procs
        for worker in list(procs.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
        for pid in list(procs):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self._close_status(procs.pop(pid))

    def _close_all(self) -> None:
        if self._endpoint is not None:
            self._endpoint.close()
        self._listeners.close()
        self._listeners.remove_unix_paths()
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
          ssl: Any = None, metrics: Any = None, **options: Any) -> None:
    """Serve ``handler`` on ``address`` with ``workers`` reactor processes.

    ``handler`` is a handler class, instance or factory (called once in each
    worker); ``address`` one address or a list of them (``"host:port"``,
    ``"unix:/path"``, a listening ``socket.socket``, ...); ``fds`` inherited
    listening fds (``--fd``, systemd); ``workers`` a number or ``"auto"`` (one
    per core).  Other keywords are ``Server`` options; ``graceful_timeout``
    sets ``shutdown_timeout``, the time a stopping worker gives its
    connections.  ``stats_interval`` logs each worker's ``stats()``, CPU
    and RSS every so many seconds, one line.  ``reuse_port`` (default: on Linux)
    gives each worker its own ``SO_REUSEPORT`` socket instead of one shared.
    ``ssl`` serves TLS: a server-side ``ssl.SSLContext``, or a function
    returning one (``functools.partial(pulse.server_context, "cert.pem")``),
    which SIGHUP calls again so renewed certificates are picked up.
    ``metrics`` (an address, ``"127.0.0.1:9100"``) serves the workers'
    counters at ``http://ADDR/metrics`` in the Prometheus text format.
    Blocks in the main thread until SIGTERM/SIGINT; SIGHUP replaces the
    workers one at a time.  Start-up failures raise (see ``Supervisor.run``).
    """
    Supervisor(handler, address, workers=workers, fds=fds, graceful_timeout=graceful_timeout,
               stats_interval=stats_interval, reuse_port=reuse_port, ssl=ssl, metrics=metrics,
               **options).run()
