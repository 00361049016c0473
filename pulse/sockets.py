"""Two socket options the connection's close paths need, beside the backend.

``unread_bytes`` tells a stopping server whether a peer was still sending
(so that only those connections get a lingering close); ``reset_on_close``
makes ``abort()`` end with a reset.  Both work on a plain fd through the
standard library, so every backend shares them.
"""

import socket
import struct

# SO_LINGER on, 0 s: close() then sends a reset and drops what is unsent.
_LINGER_RESET = struct.pack("ii", 1, 0)


def unread_bytes(fd: int) -> int:
    """Bytes waiting in the socket's receive queue (0 where FIONREAD is missing)."""
    try:
        import fcntl
        import termios
        raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except (ImportError, OSError, AttributeError):
        return 0
    return int(struct.unpack("i", raw)[0])


def reset_on_close(fd: int) -> None:
    """Make the coming close(fd) send a reset and drop unsent bytes (SO_LINGER 0)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    finally:
        sock.detach()
