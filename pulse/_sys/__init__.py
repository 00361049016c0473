"""The low level: one backend module per OS, chosen in one place.

``pulse._sys`` is public for people who experiment with syscalls.  It
re-exports the default backend for this machine, so ``from pulse._sys import
Poller, Waker, recv_into, send`` works everywhere.  The backends, all
registered in ``registry.py`` and all following ``contract.py``:

- ``linux`` (``"epoll"``): epoll + eventfd over the compiled cffi module;
- ``darwin`` (``"kqueue"``): kqueue + EVFILT_USER over the compiled module;
- ``portable`` (``"portable"``): the standard ``selectors`` module and the
  ``socket`` module, for platforms with neither (Windows), and selectable
  anywhere for comparison.

The environment variable ``PULSE_BACKEND`` (or the ``backend=`` option of
``Server``) forces one; ``BACKEND`` names the default.  Nothing is imported
until a backend is first used, so ``import pulse._sys`` never fails: without
the compiled module the default is the portable backend (one warning says
why), and naming a compiled backend raises ``BackendUnavailableError``.

The record flags of ``Poller.poll_read``'s ``(fd, flags, offset, length)``
records are in ``flags`` (one table for every backend and the C helpers).
"""

from types import ModuleType
from typing import Any

from .flags import (DIRECT_FDS, EOF, ERROR, HUP, MORE, READ, READY,  # noqa: F401
                    SPECIAL, UNREAD, WRITABLE)
from .registry import (BACKENDS, BackendInfo, BackendUnavailableError,  # noqa: F401
                       available, backend_names, check_backend_name, load, native_backend)

#: Names re-exported from the default backend on first access.
_REEXPORTED = frozenset((
    "Poller", "Waker", "ReadArena", "WriteBatch", "accept_batch", "close", "getsockopt_int",
    "recv", "recv_into", "send", "setsockopt_int", "shutdown", "sockaddr", "writev",
    "SHUT_RD", "SHUT_WR", "SHUT_RDWR", "CAPABILITIES",
    "EPOLLERR", "EPOLLET", "EPOLLHUP", "EPOLLIN", "EPOLLONESHOT", "EPOLLOUT", "EPOLLRDHUP",
))


def __getattr__(name: str) -> Any:
    # PEP 562: ``backend`` and ``BACKEND`` load the default backend the first
    # time they (or one of its names) are asked for, not at import.
    if name == "backend":
        module: ModuleType = load()
        globals()["backend"] = module
        return module
    if name == "BACKEND":
        return __getattr__("backend").NAME
    if name in _REEXPORTED:
        try:
            return getattr(__getattr__("backend"), name)
        except AttributeError:
            pass  # an epoll constant asked of another backend
    raise AttributeError("module {!r} has no attribute {!r}".format(__name__, name))
