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
- The listening sockets belong to the supervisor and outlive its workers
  (``listeners``); workers never outlive the supervisor (``worker``).

Where things are: ``app`` loads the application, ``listeners`` opens the
sockets, ``worker`` is the child's code, ``status`` the pipe on which a
child reports that it serves (and its counters), ``policy`` decides
restarts, reloads and stops, ``metrics`` and ``endpoint`` serve the
workers' counters over HTTP, and ``supervisor`` runs the loop that ties
them together.
"""

from ..errors import LaunchError
from .app import cpu_count, handler_factory, load_target, resolve_workers
from .listeners import SD_LISTEN_FDS_START, adopt_listener, systemd_listen_fds
from .policy import (KILL_GRACE, MAX_RESTART_DELAY, STABLE_UPTIME, describe_exit,
                     restart_delay)
from .supervisor import Supervisor, serve
from .worker import BOOT_ERROR, BOOT_TIMEOUT

__all__ = [
    "BOOT_ERROR", "BOOT_TIMEOUT", "KILL_GRACE", "LaunchError", "MAX_RESTART_DELAY",
    "SD_LISTEN_FDS_START", "STABLE_UPTIME", "Supervisor", "adopt_listener", "cpu_count",
    "describe_exit", "handler_factory", "load_target", "resolve_workers", "restart_delay",
    "serve", "systemd_listen_fds",
]
