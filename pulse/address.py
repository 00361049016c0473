"""Addresses: the forms users write, parsing them, and opening listeners.

Accepted forms (``AddressLike``): ``"host:port"``, ``":port"`` (host
127.0.0.1: a library opens every interface only when asked, with
``"0.0.0.0:port"`` or ``"[::]:port"``), ``"[::1]:port"``, ``(host, port)``, a
bare port number, and ``"unix:/path"``.  What pulse reports back is an
``Address``.
"""

import errno
import os
import socket
import stat
from typing import Any, Tuple, Union

DEFAULT_HOST = "127.0.0.1"

#: A socket address as pulse reports it (``Conn.local_address``,
#: ``Conn.remote_address``, ``Server.listen``): ``(host, port)``, or the path
#: of a Unix socket.
Address = Union[Tuple[str, int], str]

#: An address as users may write it to listen on or dial (see the module's
#: docstring); ``parse_address`` turns it into an ``Address``.
AddressLike = Union[str, Tuple[str, int], int]


def parse_address(address: AddressLike) -> Tuple[int, Address]:
    """Return ``(family, sockaddr)`` for ``address``, or raise ``ValueError``/``TypeError``."""
    if isinstance(address, tuple):
        if len(address) != 2:
            raise ValueError("address tuple must be (host, port), got {!r}".format(address))
        host, port = address
        if not isinstance(host, str):
            raise TypeError("address host must be a str, got {!r}".format(host))
        return _inet(host or DEFAULT_HOST, _port(port, address))
    if isinstance(address, int) and not isinstance(address, bool):
        return _inet(DEFAULT_HOST, _port(address, address))
    if not isinstance(address, str):
        raise TypeError("address must be 'host:port', (host, port) or 'unix:/path', got {!r}"
                        .format(address))
    if address.startswith("unix:"):
        path = address[5:]
        if not path:
            raise ValueError("unix address needs a path: 'unix:/path', got {!r}".format(address))
        return socket.AF_UNIX, path
    if address.startswith("["):
        end = address.find("]")
        if end < 0 or not address[end + 1:].startswith(":"):
            raise ValueError("IPv6 address must look like '[::1]:port', got {!r}".format(address))
        return _inet(address[1:end], _port(address[end + 2:], address))
    host, sep, port_text = address.rpartition(":")
    if not sep:
        raise ValueError("address must be 'host:port' or ':port', got {!r}".format(address))
    if ":" in host:
        raise ValueError("IPv6 hosts need brackets: '[{}]:{}', got {!r}".format(
            host, port_text, address))
    return _inet(host or DEFAULT_HOST, _port(port_text, address))


def _port(value: Any, address: Any) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ValueError("port must be a number 0-65535 in {!r}".format(address)) from None
    if isinstance(value, bool) or not 0 <= port <= 65535:
        raise ValueError("port must be 0-65535, got {!r} in {!r}".format(value, address))
    return port


def _inet(host: str, port: int) -> Tuple[int, Address]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, port)


def format_address(sockaddr: Address) -> str:
    """The printable form of a socket address (``host:port``, ``[v6]:port``, ``unix:/p``)."""
    if isinstance(sockaddr, str):
        return "unix:" + sockaddr
    host, port = sockaddr[0], sockaddr[1]
    return "[{}]:{}".format(host, port) if ":" in host else "{}:{}".format(host, port)


def open_listener(address: AddressLike, backlog: int = 1024,
                  reuse_port: bool = False) -> socket.socket:
    """Create a non-blocking listening socket; ``OSError`` names the address on failure."""
    family, sockaddr = parse_address(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_UNIX:
            _remove_stale_unix_socket(str(sockaddr))
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                if not hasattr(socket, "SO_REUSEPORT"):
                    raise OSError("SO_REUSEPORT is not available on this platform")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, "cannot listen on {}: {}".format(
            format_address(sockaddr), exc.strerror or exc)) from exc
    return sock


def _remove_stale_unix_socket(path: str) -> None:
    """Remove a socket file left by a dead server; refuse to touch a live one."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, "{} exists and is not a socket".format(path))
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a leftover
    else:
        raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
    finally:
        probe.close()
