"""Test support: PROXY protocol headers built byte by byte, as a balancer sends them.

Written from the spec (section 2), independently of ``pulse.proxy_protocol``,
so that the round-trip tests compare the parser with a second reading of the
spec rather than with itself.
"""

import socket
import struct
from typing import List, Optional, Sequence, Tuple

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(source: Tuple[str, int], destination: Tuple[str, int]) -> bytes:
    """A version 1 line for TCP over IPv4 or IPv6 (the family from the source host)."""
    family = "TCP6" if ":" in source[0] else "TCP4"
    return "PROXY {} {} {} {} {}\r\n".format(family, source[0], destination[0], source[1],
                                             destination[1]).encode("ascii")


def crc32c(data: bytes) -> int:
    """CRC32c bit by bit (RFC 4960 appendix B), unlike the library's table."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def v2(source: Optional[Tuple[str, int]] = None, destination: Optional[Tuple[str, int]] = None,
       tlvs: Sequence[Tuple[int, bytes]] = (), command: int = 1, dgram: bool = False,
       unix: Optional[Tuple[bytes, bytes]] = None, checksum: bool = False) -> bytes:
    """A version 2 header: TCP (or ``dgram``: UDP) over the source host's family,
    AF_UNIX with ``unix`` (two raw paths), UNSPEC without addresses;
    ``command`` 1 is PROXY, 0 LOCAL; ``checksum`` appends a CRC32C TLV (0x03)."""
    if checksum:
        header = v2(source, destination, list(tlvs) + [(0x03, b"\x00" * 4)], command, dgram,
                    unix)
        return header[:-4] + struct.pack("!I", crc32c(header))
    protocol = 2 if dgram else 1
    if unix is not None:
        block = unix[0].ljust(108, b"\x00") + unix[1].ljust(108, b"\x00")
        family = 0x30 | protocol
    elif source is None or destination is None:
        block, family = b"", 0x00
    else:
        inet = socket.AF_INET6 if ":" in source[0] else socket.AF_INET
        block = (socket.inet_pton(inet, source[0]) + socket.inet_pton(inet, destination[0])
                 + struct.pack("!HH", source[1], destination[1]))
        family = (0x20 if inet == socket.AF_INET6 else 0x10) | protocol
    for kind, value in tlvs:
        block += struct.pack("!BH", kind, len(value)) + value
    return SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(block)) + block


def splits(data: bytes) -> List[List[bytes]]:
    """``data`` cut every way that matters: at each single point, and one byte at a time."""
    cuts = [[data[:i], data[i:]] for i in range(1, len(data))]
    return cuts + [[data[i:i + 1] for i in range(len(data))]]
