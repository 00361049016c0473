"""The low level: one backend module per OS over the compiled cffi module.

``pulse._sys`` is public for people who experiment with syscalls.  It
re-exports the backend for this platform (``linux`` for epoll, ``darwin`` for
kqueue), so ``from pulse._sys import Poller, Waker, recv_into, send`` works on
both.  ``BACKEND`` names the active one.

Record flags reported by ``Poller.poll_read`` for each ``(fd, flags, offset,
length)`` record: ``READ`` (bytes in the arena at offset/length), ``EOF`` (the
peer closed its write side), ``ERROR`` (length is ``-errno``), ``WRITABLE``,
``MORE`` (the per-call read cap was reached; edge mode must read again),
``SPECIAL`` (a listener or waker, reported not read), ``UNREAD`` (the arena was
full; the fd was not read), ``HUP``.
"""

import sys

if sys.platform.startswith("linux"):
    from . import linux as backend
    from .linux import *  # noqa: F401,F403
elif sys.platform == "darwin" or "bsd" in sys.platform:
    from . import darwin as backend
    from .darwin import *  # noqa: F401,F403
else:  # pragma: no cover - no native backend here yet
    raise ImportError("pulse has no native backend for {}".format(sys.platform))

from ._common import (  # noqa: F401,E402
    EOF, ERROR, HUP, MORE, READ, SPECIAL, UNREAD, WRITABLE, ReadArena, WriteBatch,
    accept_batch, close, getsockopt_int, recv, recv_into, send, setsockopt_int,
    shutdown, sockaddr, writev,
)

BACKEND: str = backend.NAME
Poller = backend.Poller
Waker = backend.Waker
