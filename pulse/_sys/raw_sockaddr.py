"""Parsing of the raw ``struct sockaddr`` bytes that ``accept_batch`` keeps.

The compiled backends hand each accepted connection's peer address on as the
bytes the kernel wrote (as many as its length said), and
``Conn.remote_address`` parses them only when asked: most servers never look.
Pure Python, shared by every backend.

The forms are the ones the C helper ``pulse_sockaddr`` (``csrc/common.c``)
and the portable backend's ``_format_address`` produce, so that an address
reads the same whichever backend and whichever path (kept at accept, or asked
of the kernel later) it came from:

- ``(host, port)`` for IPv4 and IPv6; an IPv6 address with a non-zero scope
  id carries it in RFC 4007's text form, ``"fe80::1%lo"`` (the interface's
  name, or its number when it has none), which ``socket.getaddrinfo`` and
  ``connect`` accept back: a link-local address without its zone names no
  interface.  Flow info is dropped, as it always was;
- a ``str`` for a Unix socket: its path, ``""`` when unnamed, or on Linux an
  abstract name with its leading ``"\\x00"`` (every byte the kernel counted,
  NULs included, as Python's ``socket`` module reports it), decoded with
  ``surrogateescape`` like paths so that ``os.fsencode`` gives the bytes back.
"""

import socket
import sys
from typing import Optional, Tuple, Union

_LINUX = sys.platform.startswith("linux")
# Where the path starts in a sockaddr_un: after the 2-byte family on Linux,
# after the length and family bytes on the BSDs.
_SUN_PATH = 2


def interface_name(index: int) -> str:
    """The name of network interface ``index`` (``"lo"``), or its number as text
    when it has none: the zone of an IPv6 scope id, as ``if_indextoname`` says.

    The socket module's ``if_indextoname`` where it has one; PyPy's has not,
    and then the compiled module's (the same libc call), so that the C helper
    and this parser agree wherever the compiled module is.
    """
    try:
        return socket.if_indextoname(index)
    except AttributeError:
        pass  # PyPy: no if_indextoname in its socket module
    except (OSError, OverflowError, ValueError):
        return str(index)  # no such interface (any more)
    try:
        from ._pulse_ffi import ffi, lib
    except ImportError:
        return str(index)
    name = ffi.new("char[]", lib.IF_NAMESIZE)
    if lib.if_indextoname(index, name) == ffi.NULL:
        return str(index)
    return ffi.string(name).decode("ascii", "surrogateescape")


def scoped_host(host: str, scope_id: int) -> str:
    """``host`` with ``%zone`` appended for a non-zero IPv6 ``scope_id`` (RFC 4007);
    a host that already has a zone (PyPy's socket module adds one) is kept."""
    if not scope_id or "%" in host:
        return host
    return "{}%{}".format(host, interface_name(scope_id))


def unix_name(path: bytes) -> str:
    """The text of a ``sun_path`` of exactly the length the kernel gave: a Linux
    abstract name (leading NUL) whole, a path up to its NUL, ``""`` unnamed."""
    if not (_LINUX and path[:1] == b"\0"):
        path = path.split(b"\0", 1)[0]
    return path.decode("utf-8", "surrogateescape")


# The shape of ``pulse.address.Address``, spelled out: this layer does not
# import the one above it.
def parse_sockaddr(raw: bytes) -> Optional[Union[Tuple[str, int], str]]:
    """An address from raw ``sockaddr`` bytes as long as the kernel's length said:
    ``(host, port)`` for IPv4/IPv6 (a scope id as ``%zone``), a ``str`` for a
    Unix socket (see the module's notes), ``None`` for any other family.

    The family field is native-endian on Linux and preceded by a length byte
    on the BSDs, so both layouts are recognised.
    """
    if len(raw) < 2:
        return None
    if _LINUX:
        family = int.from_bytes(raw[0:2], sys.byteorder)
    else:
        family = raw[1]
    if family == socket.AF_INET:
        return (socket.inet_ntop(socket.AF_INET, raw[4:8]), int.from_bytes(raw[2:4], "big"))
    if family == socket.AF_INET6:
        host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        scope_id = int.from_bytes(raw[24:28], sys.byteorder) if len(raw) >= 28 else 0
        return (scoped_host(host, scope_id), int.from_bytes(raw[2:4], "big"))
    if family == getattr(socket, "AF_UNIX", None):
        return unix_name(raw[_SUN_PATH:])
    return None
