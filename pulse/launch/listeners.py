"""The supervisor's listening sockets: opened once, kept across worker restarts.

The supervisor owns the listening sockets and keeps them open across worker
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
"""

import contextlib
import logging
import os
import socket
import sys
from typing import Any, List, Optional, Sequence, Tuple

from ..address import format_address, open_listener, parse_address

logger = logging.getLogger("pulse")

#: The first fd that systemd passes (``SD_LISTEN_FDS_START``).
SD_LISTEN_FDS_START = 3


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


def default_reuse_port() -> bool:
    """Whether the workers get one ``SO_REUSEPORT`` socket each by default."""
    # Only Linux spreads connections over SO_REUSEPORT sockets; BSD and
    # macOS hand them all to one, so there the workers share one socket.
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def check_listen_args(address: Any, fds: Sequence[int]) -> Tuple[List[Any], List[int]]:
    """``address`` (one or a list) and ``fds`` as lists, checked before anything
    is opened: ``ValueError`` with the address parser's message, for a bad
    fd, or when there is nothing to listen on."""
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
    return addresses, list(fds)


class ListenerSet:
    """The listening sockets of ``slots`` workers: each slot's own
    ``SO_REUSEPORT`` sockets (one per TCP address, when ``reuse_port``) and
    the sockets every worker shares.  A slot's sockets may be closed while it
    is down (``suspend``) and are reopened on the same port for its next
    worker (``for_slot``)."""

    def __init__(self, slots: int, backlog: int, reuse_port: bool) -> None:
        self.backlog = backlog
        self.reuse_port = reuse_port
        self._reuse_addrs: List[Tuple[str, int]] = []
        self._slot_socks: List[List[Optional[socket.socket]]] = [[] for _ in range(slots)]
        self._shared: List[socket.socket] = []
        self._unix_paths: List[str] = []

    @property
    def addresses(self) -> List[Any]:
        """Bound addresses of the listeners (slot 1's own ones, then the shared ones)."""
        socks = [s for s in self._slot_socks[0] if s is not None] + self._shared
        return [sock.getsockname() for sock in socks if sock.fileno() >= 0]

    def open(self, addresses: Sequence[Any], fds: Sequence[int]) -> None:
        """Open (or adopt) every listener and log where it listens; ``OSError``
        names an address that cannot be listened on."""
        for item in addresses:
            if isinstance(item, socket.socket):
                item.setblocking(False)
                self._shared.append(item)
                continue
            family, _ = parse_address(item)
            if family == socket.AF_UNIX or not self.reuse_port:
                sock = open_listener(item, self.backlog, reuse_port=False)
                self._shared.append(sock)
                if family == socket.AF_UNIX:
                    self._unix_paths.append(sock.getsockname())
                continue
            # One SO_REUSEPORT socket per slot, all on the port the first one got
            # (so that port 0 works).
            first = open_listener(item, self.backlog, reuse_port=True)
            self._slot_socks[0].append(first)
            host, port = first.getsockname()[:2]
            self._reuse_addrs.append((host, port))
            for socks in self._slot_socks[1:]:
                socks.append(open_listener((host, port), self.backlog, True))
        for fd in fds:
            self._shared.append(adopt_listener(fd))
        for address in self._reuse_addrs:
            logger.info("pulse: listening on %s (SO_REUSEPORT: one socket per worker)",
                        format_address(address))
        for sock in self._shared:
            logger.info("pulse: listening on %s (one socket shared by the workers)",
                        format_address(sock.getsockname()))

    def for_slot(self, slot: int) -> List[socket.socket]:
        """The slot's SO_REUSEPORT sockets (reopened if suspended) and the shared ones."""
        socks = self._slot_socks[slot]
        for index, sock in enumerate(socks):
            if sock is None:
                socks[index] = open_listener(self._reuse_addrs[index], self.backlog, True)
        return [s for s in socks if s is not None] + self._shared

    def of_other_slots(self, slot: int) -> List[socket.socket]:
        """The open sockets of every slot but ``slot`` (a new worker closes them)."""
        return [sock for index, socks in enumerate(self._slot_socks) if index != slot
                for sock in socks if sock is not None]

    def suspend(self, slot: int) -> bool:
        """Close the slot's own sockets; False when it had none open."""
        socks = self._slot_socks[slot]
        if not any(socks):
            return False
        for index, sock in enumerate(socks):
            if sock is not None:
                sock.close()
                socks[index] = None
        return True

    def close(self) -> None:
        """Close every listener (workers still holding one keep it open)."""
        for slot in range(len(self._slot_socks)):
            self.suspend(slot)
        for sock in self._shared:
            sock.close()

    def remove_unix_paths(self) -> None:
        """Unlink the Unix socket files this set created."""
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._unix_paths = []
