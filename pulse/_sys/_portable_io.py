"""The portable backend's socket calls, over the standard ``socket`` module.

Sockets are plain fds, as elsewhere.  The socket module needs a
``socket.socket`` object to call ``recv_into``/``send``, so each connection fd
registered with a ``Poller`` (or accepted by ``accept_batch``) gets one cached
wrapper, dropped with ``detach()`` -- never closed by the garbage collector --
when the fd is forgotten, unregistered or closed through ``close()``.  Other
fds get a temporary wrapper per call.  Measured here: a cached wrapper's
``recv_into`` costs the same as ``os.readv`` on CPython, PyPy has no
``os.readv`` at all, and a temporary wrapper doubles the cost of a call.

``close(fd)`` also removes the fd from every live portable poller (kept in
``_pollers``), as closing an fd removes it from an epoll or kqueue set.
"""

import atexit
import errno
import os
import selectors
import socket
import sys
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .contract import registration_error
from .raw_sockaddr import parse_sockaddr, scoped_host, unix_name  # noqa: F401  (parse_sockaddr: re-exported by portable)

Buffer = Union[bytes, bytearray, memoryview]

_LINUX = sys.platform.startswith("linux")
_PYPY = sys.implementation.name == "pypy"
# PyPy's socket module lacks MSG_NOSIGNAL; the kernel does not: 0x4000 on Linux.
_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0x4000 if _LINUX else 0)
# macOS has no MSG_NOSIGNAL in older SDKs and Python does not export
# SO_NOSIGPIPE: set it by number on accepted sockets, as the C backend does.
_SO_NOSIGPIPE = getattr(socket, "SO_NOSIGPIPE", 0x1022 if sys.platform == "darwin" else 0)
_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
_HAS_SENDMSG = hasattr(socket.socket, "sendmsg")

def raise_errno(code: int, what: str = "") -> None:
    """Raise the ``OSError`` subclass for a positive errno ``code``."""
    message = os.strerror(code)
    if what:
        message = "{}: {}".format(what, message)
    raise OSError(code, message)


def _code(exc: OSError) -> int:
    """The errno of ``exc`` (EIO when the platform gave none)."""
    return exc.errno or errno.EIO


# -- socket wrappers ------------------------------------------------------

#: fd -> the cached ``socket.socket`` of a connection fd (see the module notes).
_sockets: Dict[int, socket.socket] = {}


def _wrap(fd: int) -> socket.socket:
    """A ``socket.socket`` over ``fd`` that leaves the fd's blocking mode as it was.

    CPython's constructor leaves the fd alone when no default timeout is set;
    PyPy's makes the fd blocking (and a default timeout makes it non-blocking
    with an internal wait), so there the mode is read first and put back.
    """
    if fd < 0:
        raise_errno(errno.EBADF, "fd {}".format(fd))
    if not _PYPY and socket.getdefaulttimeout() is None:
        return socket.socket(fileno=fd)
    if os.name == "posix":
        blocking = os.get_blocking(fd)
        sock = socket.socket(fileno=fd)
        sock.setblocking(blocking)
    else:
        # Windows cannot query a socket's mode: never wait inside a call.
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
    return sock


def _cache(fd: int) -> socket.socket:
    """The cached wrapper of a connection fd, made on first use."""
    sock = _sockets.get(fd)
    if sock is None:
        sock = _sockets[fd] = _wrap(fd)
    return sock


def _uncache(fd: int) -> None:
    """Drop the cached wrapper of ``fd`` without closing the fd."""
    sock = _sockets.pop(fd, None)
    if sock is not None:
        sock.detach()


@atexit.register
def _detach_all() -> None:
    # At exit the interpreter would finalize cached wrappers, closing fd
    # numbers that a stale entry may no longer own.
    while _sockets:
        _sockets.popitem()[1].detach()


class _Borrowed:
    """``with _Borrowed(fd) as sock``: the cached wrapper, or a temporary one."""

    __slots__ = ("fd", "temp")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.temp: Optional[socket.socket] = None

    def __enter__(self) -> socket.socket:
        sock = _sockets.get(self.fd)
        if sock is None:
            sock = self.temp = _wrap(self.fd)
        return sock

    def __exit__(self, *exc: Any) -> None:
        if self.temp is not None:
            self.temp.detach()


# -- the poller -----------------------------------------------------------

#: Live pollers, so that ``close(fd)`` removes the fd from each, as closing an
#: fd removes it from an epoll or kqueue set.
_pollers: Dict[int, Any] = {}
_pollers_lock = threading.Lock()


# -- socket calls ---------------------------------------------------------

def recv_into(fd: int, buffer: Buffer, nbytes: int = 0) -> Optional[int]:
    """Read into a writable buffer; bytes read, 0 at EOF, ``None`` on EAGAIN."""
    try:
        with _Borrowed(fd) as sock:
            return sock.recv_into(buffer, nbytes or len(buffer))
    except BlockingIOError:
        return None
    except OSError as exc:
        raise_errno(_code(exc), "recv")
    return None  # unreachable; keeps type checkers content


def recv(fd: int, nbytes: int) -> Optional[bytes]:
    """Read up to ``nbytes``; ``b""`` at EOF, ``None`` on EAGAIN."""
    try:
        with _Borrowed(fd) as sock:
            return sock.recv(nbytes)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise_errno(_code(exc), "recv")
    return None


def send(fd: int, data: Buffer) -> Optional[int]:
    """Send without raising SIGPIPE; bytes sent, or ``None`` on EAGAIN."""
    try:
        with _Borrowed(fd) as sock:
            return sock.send(data, _NOSIGNAL)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise_errno(_code(exc), "send")
    return None


def writev(fd: int, buffers: Sequence[Buffer]) -> Optional[int]:
    """Gather-write ``buffers`` in one call; bytes sent, or ``None`` on EAGAIN."""
    try:
        with _Borrowed(fd) as sock:
            if _HAS_SENDMSG:
                return sock.sendmsg(buffers, (), _NOSIGNAL)
            return sock.send(b"".join(buffers))  # Windows: no sendmsg
    except BlockingIOError:
        return None
    except OSError as exc:
        raise_errno(_code(exc), "writev")
    return None


def close(fd: int) -> None:
    """Close ``fd`` and forget it in every poller; EINTR is not retried."""
    with _pollers_lock:
        pollers = list(_pollers.values())
    for poller in pollers:
        if fd in poller._interest:
            poller.unregister(fd)
    sock = _sockets.pop(fd, None)
    try:
        if sock is not None:
            sock.close()
        else:
            socket.close(fd)
    except InterruptedError:
        pass  # the fd is gone anyway (Linux), retrying could close a stranger's
    except OSError as exc:
        raise_errno(_code(exc), "close")


def shutdown(fd: int, how: int) -> None:
    """Shut down one or both directions (``SHUT_RD``, ``SHUT_WR``, ``SHUT_RDWR``)."""
    try:
        with _Borrowed(fd) as sock:
            sock.shutdown(how)
    except OSError as exc:
        raise_errno(_code(exc), "shutdown")


def setsockopt_int(fd: int, level: int, name: int, value: int) -> None:
    """Set an integer socket option."""
    try:
        with _Borrowed(fd) as sock:
            sock.setsockopt(level, name, value)
    except OSError as exc:
        raise_errno(_code(exc), "setsockopt")


def getsockopt_int(fd: int, level: int, name: int) -> int:
    """Read an integer socket option."""
    try:
        with _Borrowed(fd) as sock:
            return sock.getsockopt(level, name)
    except OSError as exc:
        raise_errno(_code(exc), "getsockopt")
    return 0


def _format_address(address: Any) -> Union[Tuple[str, int], str]:
    """A socket-module address in the C helper's forms (``raw_sockaddr``'s notes):
    ``(host, port)`` with an IPv6 scope id as ``%zone``, or a Unix path or name."""
    if isinstance(address, tuple):
        if len(address) >= 4:  # IPv6: (host, port, flowinfo, scope_id)
            return (scoped_host(address[0], address[3]), address[1])
        return (address[0], address[1])
    if isinstance(address, bytes):
        # The socket module hands a Linux abstract name over as bytes.
        return unix_name(address)
    return address


def sockaddr(fd: int, peer: bool) -> Union[Tuple[str, int], str]:
    """The socket's local or peer address: ``(host, port)`` or a Unix path.

    Always through a fresh wrapper: the address family comes from the kernel,
    not from a cached object whose fd number might have been reused.
    """
    what = "getpeername" if peer else "getsockname"
    sock = None
    try:
        sock = _wrap(fd)
        address = sock.getpeername() if peer else sock.getsockname()
    except OSError as exc:
        raise_errno(_code(exc), what)
    finally:
        if sock is not None:
            sock.detach()
    return _format_address(address)


def accept_batch(listen_fd: int, poller: Any, nodelay: bool, edge: bool,
                 maximum: int = 64,
                 errors: Optional[List[OSError]] = None) -> List[Tuple[int, Any]]:
    """Accept up to ``maximum`` connections and register each for reading.

    Each new fd is non-blocking and close-on-exec, has TCP_NODELAY when asked
    (best effort), and is already watched for reads by ``poller`` (a
    ``Poller``, or its ``fileno()``).  Returns ``(fd, peer_address)`` pairs
    (empty on EAGAIN); the address is already formatted (``(host, port)`` or
    a Unix name, in ``raw_sockaddr``'s forms), where the C backends hand back
    raw bytes for ``parse_sockaddr``.  Raises ``OSError`` when the first accept fails
    (``EMFILE`` and ``ENFILE`` among them).  As in the C backends, an
    accepted socket that cannot be set up and registered is closed, and when
    any was and ``errors`` is a list, one ``OSError`` (``registration_error``:
    the last errno, the count in its message) is appended to it.
    """
    if isinstance(poller, int):
        with _pollers_lock:
            found = [p for p in _pollers.values() if p.fileno() == poller and poller >= 0]
        if not found:
            raise ValueError("accept_batch: no portable Poller with fileno {!r}".format(poller))
        poller = found[0]
    out: List[Tuple[int, Any]] = []
    listener = None
    dropped = 0
    last_code = 0
    try:
        listener = _wrap(listen_fd)
        family, kind, proto = listener.family, listener.type, listener.proto
        while len(out) < maximum:
            try:
                fd, address = listener._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                break
            except (InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:
                if out:
                    break
                raise_errno(_code(exc), "accept")
            sock = socket.socket(family, kind, proto, fileno=fd)
            try:
                sock.setblocking(False)
                if nodelay and family in _TCP_FAMILIES:
                    try:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    except OSError:
                        pass
                if _SO_NOSIGPIPE:
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, _SO_NOSIGPIPE, 1)
                    except OSError:
                        pass
                old = _sockets.get(fd)
                if old is not None:
                    old.detach()  # a stale wrapper: this number was closed behind our back
                _sockets[fd] = sock
                poller._apply(fd, selectors.EVENT_READ, False, fresh=True)
            except (OSError, ValueError) as exc:
                # ValueError: the poller was closed (nothing else raises it here).
                dropped += 1
                last_code = _code(exc) if isinstance(exc, OSError) else errno.EBADF
                _sockets.pop(fd, None)
                sock.close()
                continue
            out.append((fd, _format_address(address)))
    finally:
        if listener is not None:
            listener.detach()
        # Here, so that a raise after some were closed reports them too.
        if dropped and errors is not None:
            errors.append(registration_error(dropped, last_code))
    return out


# -- the write batch ------------------------------------------------------

# Like pulse_send_batch: at most this many refusing fds are remembered per batch.
_MAX_BLOCKED = 64


class WriteBatch:
    """Writes of one loop iteration, sent together by ``send``.

    Writes are copied into ``arena`` (large ones are sent at once by the
    loop instead).  ``items`` holds ``(fd, offset, length)`` triples,
    ``offset`` a position in ``arena``.
    """

    def __init__(self, size: int, max_items: int) -> None:
        self.size = size
        self.max_items = max_items
        self.arena = memoryview(bytearray(size))
        self.items = memoryview(bytearray(12 * max_items)).cast("i")
        self.results = memoryview(bytearray(4 * max_items)).cast("i")

    def send(self, count: int) -> int:
        """Send ``count`` items; results land in ``results``; returns how many were short.

        As ``pulse_send_batch``: ``results[i]`` is the bytes sent or -errno;
        once a socket refuses bytes, later items of the same fd are skipped
        (result 0) so the caller can queue them in order; past 64 refusing
        fds the rest of the batch is reported unsent.
        """
        items = self.items
        results = self.results
        arena = self.arena
        sockets = _sockets
        flags = _NOSIGNAL
        blocked: Optional[set] = None
        incomplete = 0
        for i in range(count):
            k = 3 * i
            fd = items[k]
            if blocked is not None and fd in blocked:
                results[i] = 0
                incomplete += 1
                continue
            offset = items[k + 1]
            length = items[k + 2]
            view = arena[offset:offset + length]
            done = 0
            temp = None
            try:
                sock = sockets.get(fd)
                if sock is None:
                    sock = temp = _wrap(fd)
                while done < length:
                    sent = sock.send(view[done:] if done else view, flags)
                    if sent <= 0:
                        break
                    done += sent
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                done = -_code(exc)
            finally:
                if temp is not None:
                    temp.detach()
            results[i] = done
            if done != length:
                incomplete += 1
                if blocked is None:
                    blocked = set()
                if len(blocked) < _MAX_BLOCKED:
                    blocked.add(fd)
                else:
                    for j in range(i + 1, count):
                        results[j] = 0
                        incomplete += 1
                    break
        return incomplete
