"""The low level: one backend module per OS, chosen at import or per loop.

``pulse._sys`` is public for people who experiment with syscalls.  It
re-exports the default backend for this platform, so ``from pulse._sys import
Poller, Waker, recv_into, send`` works everywhere:

- ``linux`` (``"epoll"``): epoll + eventfd over the compiled cffi module;
- ``darwin`` (``"kqueue"``): kqueue + EVFILT_USER over the compiled module;
- ``portable`` (``"portable"``): the standard ``selectors`` module and the
  ``socket`` module, for platforms with neither (Windows), and selectable
  anywhere for comparison.

The environment variable ``PULSE_BACKEND`` (or the ``backend=`` option of
``Server``) forces one; ``BACKEND`` names the default.

Record flags reported by ``Poller.poll_read`` for each ``(fd, flags, offset,
length)`` record are in ``flags``: ``READ`` (bytes in the arena at
offset/length), ``EOF``, ``ERROR`` (length is ``-errno``), ``WRITABLE``,
``MORE`` (the read cap was reached; edge mode must read again), ``SPECIAL`` (a
listener or waker, reported not read), ``UNREAD`` (the arena was full), ``HUP``.
"""

import importlib
import os
import sys
from types import ModuleType
from typing import Optional

from .flags import EOF, ERROR, HUP, MORE, READ, SPECIAL, UNREAD, WRITABLE  # noqa: F401

#: Backend names and the module that implements each.
BACKENDS = {"epoll": "linux", "kqueue": "darwin", "portable": "portable"}


def native_backend() -> Optional[str]:
    """The native backend of this platform, or None when it has none."""
    if sys.platform.startswith("linux"):
        return "epoll"
    if sys.platform == "darwin" or "bsd" in sys.platform or sys.platform.startswith("dragonfly"):
        return "kqueue"
    return None


def check_backend_name(name: str) -> str:
    """Return ``name`` if it is a backend usable here, else raise ``ValueError``."""
    if name not in BACKENDS:
        raise ValueError("backend must be one of {}, got {!r}".format(
            ", ".join(sorted(BACKENDS)), name))
    native = native_backend()
    if name != "portable" and name != native:
        raise ValueError("backend {!r} is not available on {} (use {})".format(
            name, sys.platform, "{!r} or 'portable'".format(native) if native else "'portable'"))
    return name


def load(name: Optional[str] = None) -> ModuleType:
    """The backend module for ``name`` (default: ``PULSE_BACKEND`` or the native one)."""
    if name is None:
        name = os.environ.get("PULSE_BACKEND")
        if name:
            try:
                check_backend_name(name)
            except ValueError as exc:
                raise ValueError("PULSE_BACKEND: {}".format(exc)) from None
        name = name or native_backend() or "portable"
    check_backend_name(name)
    return importlib.import_module("." + BACKENDS[name], __name__)


backend = load()
BACKEND: str = backend.NAME
Poller = backend.Poller
Waker = backend.Waker
ReadArena = backend.ReadArena
WriteBatch = backend.WriteBatch
accept_batch = backend.accept_batch
close = backend.close
getsockopt_int = backend.getsockopt_int
recv = backend.recv
recv_into = backend.recv_into
send = backend.send
setsockopt_int = backend.setsockopt_int
shutdown = backend.shutdown
sockaddr = backend.sockaddr
writev = backend.writev
if BACKEND == "epoll":
    from .linux import (EPOLLERR, EPOLLET, EPOLLHUP, EPOLLIN, EPOLLONESHOT,  # noqa: F401
                        EPOLLOUT, EPOLLRDHUP)
