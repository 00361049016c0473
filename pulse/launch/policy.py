"""Restart, reload and stop policy: which worker serves each slot, and what
happens when one starts serving, dies, or takes too long.

``WorkerPolicy`` owns the table of worker processes and every decision about
them; it never waits, reads a pipe or forks itself.  The supervisor feeds it
what happened (a status message, an exit status, a request, the time) and
gives it one way to start a worker (``spawn``) and the listener set, whose
sockets it closes when a slot is down or the workers are stopping.
"""

import contextlib
import enum
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from ..errors import ServerStateError
from .listeners import ListenerSet
from .status import StatusKind, StatusMessage, StatusReader
from .worker import BOOT_TIMEOUT

logger = logging.getLogger("pulse")

#: A worker that ran this long before dying was not crash-looping: its
#: replacement starts at once and the back-off starts over.
STABLE_UPTIME = 5.0
#: Restart back-off for a crash-looping slot: 0, 0.5, 1, 2, ... up to this.
MAX_RESTART_DELAY = 30.0
#: The supervisor's SIGKILL backstop fires this long after the graceful
#: timeout, which the worker enforces itself first (``shutdown_timeout``).
KILL_GRACE = 2.0


def restart_delay(crashes: int) -> float:
    """Seconds to wait before restarting a slot whose worker died ``crashes``
    times in a row, each within ``STABLE_UPTIME`` of its start: the first
    restart is immediate, then 0.5 s doubling up to ``MAX_RESTART_DELAY``."""
    if crashes <= 1:
        return 0.0
    return min(MAX_RESTART_DELAY, 0.5 * 2.0 ** (crashes - 2))


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


class State(enum.Enum):
    """Where a supervisor is in its life (``run()`` goes through them in order)."""

    NEW = "new"
    STARTING = "starting"  #: forking the first workers, until every one accepts
    RUNNING = "running"
    STOPPING = "stopping"  #: the workers were asked to stop; waiting for their exits
    STOPPED = "stopped"


class Role(enum.Enum):
    """What a worker process is to its slot."""

    CURRENT = "current"      #: the slot's worker
    CANDIDATE = "candidate"  #: a SIGHUP replacement, not yet accepting
    RETIRING = "retiring"    #: asked to stop; finishing its connections


class Request(enum.Enum):
    """What a signal or a call from another thread asks the supervisor to do."""

    STOP = "stop"            #: stop(): graceful
    STOP_SIGNAL = "signal"   #: SIGTERM/SIGINT: graceful, and a second one kills
    KILL = "kill"            #: SIGQUIT, stop(graceful=False)
    RELOAD = "reload"        #: SIGHUP, reload()


@dataclass
class WorkerRecord:
    """The supervisor's record of one worker process."""

    slot: int
    pid: int
    status: StatusReader
    started: float
    role: Role = Role.CURRENT
    ready: bool = False
    kill_at: Optional[float] = None
    killed: bool = False
    error: Optional[str] = None

    def __str__(self) -> str:
        return "worker {} (pid {})".format(self.slot + 1, self.pid)


class WorkerPolicy:
    """The worker table of one supervisor run and the rules it follows.

    ``spawn(slot)`` forks a worker for the slot and returns its record (or
    raises ``OSError``); ``shutdown_timeout`` is the workers' graceful
    timeout, after which (plus ``KILL_GRACE``) a stopping one is killed.
    """

    def __init__(self, workers: int, shutdown_timeout: float,
                 spawn: Callable[[int], WorkerRecord], listeners: ListenerSet) -> None:
        self.workers = workers
        self.state = State.NEW
        #: Every worker process not yet reaped, by pid.
        self.procs: Dict[int, WorkerRecord] = {}
        #: The boot failure that ends ``run()`` with a ``LaunchError``, if any.
        self.boot_error: Optional[str] = None
        self._shutdown_timeout = shutdown_timeout
        self._spawn = spawn
        self._listeners = listeners
        self._slots: List[Optional[WorkerRecord]] = [None] * workers
        self._crashes = [0] * workers
        self._restart_at: List[Optional[float]] = [None] * workers
        self._candidate: Optional[WorkerRecord] = None
        self._reload_queue: List[int] = []
        self._reload_again = False

    # -- the supervisor's life ----------------------------------------------

    def begin(self) -> None:
        """Enter ``STARTING``; ``ServerStateError`` the second time."""
        if self.state is not State.NEW:
            raise ServerStateError("a Supervisor runs once")
        self.state = State.STARTING

    def start_all(self) -> None:
        """Start one worker in every slot."""
        for slot in range(self.workers):
            self._slots[slot] = self._start(slot)

    def finish(self) -> None:
        """Enter ``STOPPED`` (``run()`` is returning)."""
        self.state = State.STOPPED

    @property
    def done(self) -> bool:
        """True once stopping and every worker was reaped."""
        return self.state is State.STOPPING and not self.procs

    def pids(self) -> str:
        """The pids of the slots' workers, for a log line."""
        return " ".join(str(w.pid) for w in self._slots if w is not None)

    def timeout(self, now: float) -> float:
        """Seconds until something is due (at most 1)."""
        when = [now + 1.0]  # a cap, so that nothing depends on a wakeup being seen
        when.extend(t for t in self._restart_at if t is not None)
        for worker in self.procs.values():
            if worker.killed:
                continue  # SIGKILLed: only its exit is awaited
            if worker.kill_at is not None:
                when.append(worker.kill_at)
            if not worker.ready and worker.role is not Role.RETIRING:
                when.append(worker.started + BOOT_TIMEOUT)
        return max(0.0, min(when) - now)

    def handle(self, request: Request) -> None:
        """Act on a stop, kill or reload request."""
        if request in (Request.STOP_SIGNAL, Request.STOP):
            if self.state is State.STOPPING and request is Request.STOP_SIGNAL:
                logger.warning("pulse: second stop signal: killing the workers now")
                self._force()
            else:
                self._begin_stop()
        elif request is Request.KILL:
            self._begin_stop()
            self._force()
        elif request is Request.RELOAD:
            self._begin_reload()

    # -- workers coming and going --------------------------------------------

    def on_message(self, worker: WorkerRecord, message: StatusMessage) -> None:
        """A worker said something on its status pipe."""
        if message.kind is StatusKind.ERROR:
            worker.error = message.text
        elif message.kind is StatusKind.READY:
            self._on_ready(worker)

    def _on_ready(self, worker: WorkerRecord) -> None:
        worker.ready = True
        if worker.role is Role.CANDIDATE and self.state is State.RUNNING:
            self._promote(worker)
        elif self.state is State.STARTING:
            if all(w is not None and w.ready for w in self._slots):
                self.state = State.RUNNING
                logger.info("pulse: %d worker%s serving (pids %s); supervisor pid %d",
                            self.workers, "s" if self.workers > 1 else "", self.pids(),
                            os.getpid())
        elif worker.role is Role.CURRENT and self.state is State.RUNNING:
            logger.info("pulse: %s is serving", worker)

    def on_exit(self, worker: WorkerRecord, status: int) -> None:
        """A worker was reaped with ``waitpid`` status ``status``."""
        del self.procs[worker.pid]
        how = describe_exit(status)
        uptime = time.monotonic() - worker.started
        clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        if worker.role is Role.CANDIDATE:
            self._candidate = None
            if self.state is State.STOPPING:
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
        if worker.role is Role.RETIRING or self.state is State.STOPPING:
            if self.boot_error is not None:
                log = logger.debug  # the start-up failure is the one message that matters
            else:
                log = logger.info if clean else logger.warning
            log("pulse: %s %s", worker, how)
            return
        self._slots[worker.slot] = None
        if self.state is State.STARTING and not worker.ready:
            self.boot_error = "worker {} failed to start: {}".format(
                worker.slot + 1, worker.error or how)
            self._begin_stop(quiet=True)
            return
        self._schedule_restart(worker, how, uptime)

    def _schedule_restart(self, worker: WorkerRecord, how: str, uptime: float) -> None:
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
        if others and self._listeners.suspend(slot):
            logger.warning("pulse: slot %d is down: its listening socket is closed until it "
                           "restarts, the other workers take its connections", slot + 1)

    def run_due(self, now: float) -> None:
        """Restart the slots whose time came; kill the workers past a deadline."""
        for slot, when in enumerate(self._restart_at):
            if when is None or when > now or self.state not in (State.RUNNING, State.STARTING):
                continue
            self._restart_at[slot] = None
            try:
                self._slots[slot] = self._start(slot)
            except OSError as exc:
                self._crashes[slot] += 1
                delay = max(0.5, restart_delay(self._crashes[slot]))
                logger.error("pulse: cannot restart worker %d: %s; retrying in %.1f s",
                             slot + 1, exc, delay)
                self._restart_at[slot] = now + delay
        for worker in list(self.procs.values()):
            if worker.killed:
                continue
            if worker.kill_at is not None and now >= worker.kill_at:
                logger.warning("pulse: %s did not finish within the graceful timeout "
                               "(%.1f s); killing it", worker, self._shutdown_timeout)
                self._kill(worker)
            elif not worker.ready and worker.role is not Role.RETIRING and \
                    now - worker.started >= BOOT_TIMEOUT:
                worker.error = worker.error or "not serving {:.0f} s after start".format(
                    BOOT_TIMEOUT)
                logger.error("pulse: %s is not serving %.0f s after its start; killing it",
                             worker, BOOT_TIMEOUT)
                self._kill(worker)

    def _start(self, slot: int) -> WorkerRecord:
        worker = self._spawn(slot)
        self.procs[worker.pid] = worker
        return worker

    def _kill(self, worker: WorkerRecord) -> None:
        worker.killed = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)

    def _retire(self, worker: WorkerRecord) -> None:
        """Ask a worker to stop gracefully; the SIGKILL backstop comes later."""
        worker.role = Role.RETIRING
        worker.kill_at = time.monotonic() + self._shutdown_timeout + KILL_GRACE
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGTERM)

    # -- stop and reload ----------------------------------------------------

    def _begin_stop(self, quiet: bool = False) -> None:
        if self.state is State.STOPPING:
            return
        self.state = State.STOPPING
        if not quiet:
            logger.info("pulse: stopping %d worker%s (graceful timeout %.1f s)", len(self.procs),
                        "s" if len(self.procs) != 1 else "", self._shutdown_timeout)
        self._restart_at = [None] * self.workers
        self._candidate = None
        self._reload_queue = []
        self._reload_again = False
        for worker in self.procs.values():
            if worker.role is not Role.RETIRING:
                self._retire(worker)
        # The workers close their descriptors as they stop accepting; once ours
        # are closed too the sockets are gone and new connections are refused.
        self._listeners.close()

    def _force(self) -> None:
        for worker in self.procs.values():
            if not worker.killed:
                self._kill(worker)

    def _begin_reload(self) -> None:
        if self.state is not State.RUNNING:
            logger.warning("pulse: reload ignored: the supervisor is %s", self.state.value)
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
                worker = self._start(slot)
            except OSError as exc:
                logger.error("pulse: reload: cannot start a new worker %d: %s; reload stopped",
                             slot + 1, exc)
                self._reload_queue = []
                return
            worker.role = Role.CANDIDATE
            self._candidate = worker
            return
        logger.info("pulse: reload done: %d worker%s serving (pids %s)", self.workers,
                    "s" if self.workers > 1 else "", self.pids())
        if self._reload_again:
            self._reload_again = False
            self._begin_reload()

    def _promote(self, worker: WorkerRecord) -> None:
        """A reload replacement is accepting: it takes the slot, the old worker retires."""
        slot = worker.slot
        old = self._slots[slot]
        worker.role = Role.CURRENT
        self._slots[slot] = worker
        self._candidate = None
        self._restart_at[slot] = None
        if old is not None:
            logger.info("pulse: reload: %s replaces pid %d, which finishes its connections",
                        worker, old.pid)
            self._retire(old)
        self._reload_next()
