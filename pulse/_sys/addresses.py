"""Formatting of raw socket addresses kept by ``accept_batch`` (pure Python)."""

import socket
import sys
from typing import Optional, Tuple, Union


def parse_sockaddr(raw: bytes) -> Optional[Union[Tuple[str, int], str]]:
    """Format a raw ``sockaddr`` kept by ``accept_batch``; ``None`` if not IPv4/IPv6.

    The family field is native-endian on Linux and preceded by a length byte
    on the BSDs, so both layouts are recognised.
    """
    if sys.platform.startswith("linux"):
        family = int.from_bytes(raw[0:2], sys.byteorder)
    else:
        family = raw[1]
    if family == socket.AF_INET:
        return (socket.inet_ntop(socket.AF_INET, raw[4:8]), int.from_bytes(raw[2:4], "big"))
    if family == socket.AF_INET6:
        return (socket.inet_ntop(socket.AF_INET6, raw[8:24]), int.from_bytes(raw[2:4], "big"))
    return None
