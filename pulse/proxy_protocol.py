"""The PROXY protocol (HAProxy's, versions 1 and 2), parsed with no I/O in it.

A load balancer that passes TCP through (HAProxy ``send-proxy``, AWS NLB,
nginx ``proxy_protocol``) sends one header before the client's bytes,
naming the client's address: the connection pulse sees comes from the
balancer.  ``parse(data)`` reads that header from the bytes received so far
and returns ``NEED_MORE``, a ``ProxyHeader`` (``length`` says where the
client's bytes begin), or raises ``ProxyProtocolError``; ``ProxyParser``
accumulates the chunks for you.  Like h11, it knows nothing of sockets, so
every byte split and every malformed header can be tested exhaustively
(``tests/test_proxy_protocol.py``); ``proxy_gate.py`` puts it in front of
accepted connections.

The rules, from https://www.haproxy.org/download/2.8/doc/proxy-protocol.txt:

- version 1 is one text line, ``PROXY TCP4|TCP6 src dst sport dport\\r\\n``
  or ``PROXY UNKNOWN ...\\r\\n``, at most 107 bytes with its CRLF.  Exactly
  one space between fields, IPv4 as four decimal numbers without leading
  zeros, ports 0-65535 without leading zeros, IPv6 in any RFC 4291 text
  form (what ``inet_pton`` takes: HAProxy writes it compressed, Java's
  senders do not), reported in the compressed form ``inet_ntop`` gives;
- version 2 is binary: a 12-byte signature, version 2 and a command (LOCAL:
  a health check by the balancer itself, whose block is skipped unread, as
  the spec says; PROXY), a family and protocol byte, a 16-bit length, then
  the addresses and TLVs (type-length-value extensions, returned raw; a
  PP2_TYPE_CRC32C one is verified, as the spec requires of a receiver that
  can).  ``max_v2_length`` caps that length;
- an UNKNOWN (v1) or UNSPEC (v2) header is valid and carries no address:
  the connection's real addresses stand.

Anything else is refused as soon as the bytes in hand show it (a first byte
that starts neither version, a wrong signature byte, a letter in a port),
rather than after 107 bytes of garbage: the spec asks receivers to abort
"as soon as possible", and a plaintext client on the port learns at once.
"""

import enum
import os
import re
import socket
import struct
from typing import Any, List, Literal, NamedTuple, Optional, Tuple, Union

#: The longest version 1 line, CRLF included ("PROXY UNKNOWN" with two full
#: IPv6 addresses and ports, section 2.1 of the spec).
V1_MAX_LENGTH = 107
#: The version 2 signature: CRLF CRLF NUL CR LF "QUIT" LF.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: The fixed part of a version 2 header: signature, version/command, family, length.
V2_HEADER = 16
#: The default cap on a version 2 header's length field (the bytes after its
#: first 16).  The spec allows 65535, but real senders stay far below: the
#: largest address block is 216 bytes (two Unix paths) and HAProxy's TLVs
#: (ALPN, SNI, TLS version, cipher, client CN, unique id) a few hundred more,
#: while every connection's pending header costs this much memory.
MAX_V2_LENGTH = 4096

# The whole-line fast path: one match for the usual case, a header that
# came in one piece and is valid (the field-by-field checks below cost three
# times as much, and are kept for partial lines and for precise errors).
_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rb"(?:" + _OCTET + rb"\.){3}" + _OCTET
_PORT = (rb"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}"
         rb"|[1-9][0-9]{0,3}|0)")
_IPV6_TEXT = rb"[0-9a-fA-F:.]{2,45}"  # then inet_pton decides
_V1_LINE = re.compile(rb"PROXY (?:TCP4 (" + _IPV4 + rb") (" + _IPV4 + rb")|TCP6 (" + _IPV6_TEXT
                      + rb") (" + _IPV6_TEXT + rb")) (" + _PORT + rb") (" + _PORT + rb")\r\n")
_V1_PREFIX = b"PROXY "
_V1_PROTOCOLS = (b"TCP4", b"TCP6", b"UNKNOWN")
_V2_COMMANDS = {0: "LOCAL", 1: "PROXY"}
#: The TLV type of a checksum of the whole header.
PP2_TYPE_CRC32C = 0x03
# v2 family nibble -> (socket family, bytes of the address block).
_V2_FAMILIES = {0x1: (socket.AF_INET, 12), 0x2: (socket.AF_INET6, 36), 0x3: (socket.AF_UNIX, 216)}
_V2_PROTOCOLS = {0x1: socket.SOCK_STREAM, 0x2: socket.SOCK_DGRAM}
_IPV4_CHARS = frozenset(b"0123456789.")
_IPV6_CHARS = frozenset(b"0123456789abcdefABCDEF:.")
_DIGITS = frozenset(b"0123456789")
# The longest text form of each field: "255.255.255.255", an IPv6 address
# with an embedded IPv4 one ("ffff:...:ffff:255.255.255.255"), "65535".
_MAX_FIELD = {"ipv4": 15, "ipv6": 45, "port": 5}

#: A host and port, or (AF_UNIX) a path: the forms ``Conn.remote_address`` has.
Address = Union[Tuple[str, int], str]


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY protocol header; the message says what is wrong."""


class _Need(enum.Enum):
    MORE = "NEED_MORE"

    def __repr__(self) -> str:
        return "NEED_MORE"

    __str__ = __repr__


#: What ``parse`` returns while the bytes so far are a valid beginning of a header.
NEED_MORE = _Need.MORE


class ProxyHeader(NamedTuple):
    """A parsed PROXY protocol header.

    ``version`` is 1 or 2; ``command`` ``"PROXY"`` (relayed for a client) or
    ``"LOCAL"`` (v2: the balancer's own connection, a health check);
    ``family`` ``socket.AF_INET``, ``AF_INET6``, ``AF_UNIX`` or ``None``
    (UNKNOWN, UNSPEC, LOCAL: no address carried, the real ones stand);
    ``protocol`` ``socket.SOCK_STREAM``, ``SOCK_DGRAM`` or ``None``;
    ``source`` and ``destination`` the client's address and the one it
    connected to (``(host, port)``, a path for AF_UNIX, or ``None``);
    ``tlvs`` the v2 extensions as ``(type, value)`` pairs in order; ``length``
    the header's size in bytes: the client's data starts there.
    """

    version: int
    command: str
    family: Optional[int]
    protocol: Optional[int]
    source: Optional[Address]
    destination: Optional[Address]
    tlvs: List[Tuple[int, bytes]]
    length: int


Versions = Union[bool, str]


def check_versions(versions: Versions, name: str = "versions") -> Versions:
    """``versions`` as the parser takes it: ``True`` (either; ``"any"`` says the
    same), ``"v1"`` or ``"v2"``; anything else raises naming ``name``."""
    if versions is True or versions == "any":
        return True
    if isinstance(versions, str) and versions in ("v1", "v2"):
        return versions
    raise ValueError("{} must be True (or 'any'), 'v1' or 'v2', got {!r}".format(name, versions))


def parse(data: Union[bytes, bytearray, memoryview], versions: Versions = True,
          max_v2_length: int = MAX_V2_LENGTH) -> Union[ProxyHeader, "Literal[_Need.MORE]"]:
    """Parse the PROXY header at the start of ``data`` (the bytes received so far).

    Returns ``NEED_MORE`` while ``data`` is a valid beginning of a header,
    the ``ProxyHeader`` once it holds a whole one (bytes past
    ``header.length`` are the client's and are never looked at), and raises
    ``ProxyProtocolError`` as soon as ``data`` cannot begin a valid header of
    the accepted ``versions`` (``True``, ``"v1"`` or ``"v2"``).
    ``NEED_MORE`` is only returned for fewer than 107 bytes (v1) or than
    ``16 + max_v2_length`` (v2), so a caller's buffer stays bounded.
    """
    versions = check_versions(versions)
    first = bytes(data[:1])
    if not first:
        return NEED_MORE
    # No more than the longest header is ever looked at (or copied).
    if first == b"P" and versions != "v2":
        return _parse_v1(bytes(data[:V1_MAX_LENGTH]))
    if first == b"\r" and versions != "v1":
        return _parse_v2(bytes(data[:V2_HEADER + max_v2_length]), max_v2_length)
    wanted = {True: "a PROXY protocol header", "v1": "a PROXY protocol v1 header ('PROXY ...')",
              "v2": "a PROXY protocol v2 header (its binary signature)"}[versions]
    raise ProxyProtocolError("expected {}, got {!r}...".format(wanted, bytes(data[:16])))


class ProxyParser:
    """Feed chunks as they arrive; ``feed`` answers as ``parse`` does.

    Once it returned the header, ``rest`` holds the bytes that came after it
    (the client's first data) and the parser is done: further ``feed``
    calls raise ``ValueError``.  It keeps at most one header's worth of
    bytes (plus what arrived in the chunk that completed it).
    """

    def __init__(self, versions: Versions = True, max_v2_length: int = MAX_V2_LENGTH) -> None:
        self.versions = check_versions(versions)
        if isinstance(max_v2_length, bool) or not isinstance(max_v2_length, int) or not (
                0 <= max_v2_length <= 65535):
            raise ValueError("max_v2_length must be an int from 0 to 65535, got {!r}".format(
                max_v2_length))
        self.max_v2_length = max_v2_length
        self._buffer = bytearray()
        #: The header, once parsed.
        self.header: Optional[ProxyHeader] = None
        #: The bytes after the header, once it was parsed.
        self.rest = b""

    def feed(self, data: Union[bytes, bytearray, memoryview]) -> Union[
            ProxyHeader, "Literal[_Need.MORE]"]:
        """Add ``data``; return ``NEED_MORE`` or the header, or raise ``ProxyProtocolError``."""
        if self.header is not None:
            raise ValueError("the PROXY header was already parsed; the rest is the client's")
        # Most headers come whole in the first chunk: parse it where it is,
        # and copy only what a header cut in pieces needs to keep.
        source: Union[bytes, bytearray, memoryview] = data
        if self._buffer:
            self._buffer += data
            source = self._buffer
        result = parse(source, self.versions, self.max_v2_length)
        if result is NEED_MORE:
            if source is data:
                self._buffer = bytearray(data)
            return result
        assert isinstance(result, ProxyHeader)
        self.header = result
        self.rest = bytes(source[result.length:])
        self._buffer = bytearray()
        return result


# -- version 1 ---------------------------------------------------------------


def _v1_error(what: str, line: bytes) -> ProxyProtocolError:
    return ProxyProtocolError("PROXY protocol v1: {} in {!r}".format(what, line))


def _parse_v1(data: bytes) -> Union[ProxyHeader, "Literal[_Need.MORE]"]:
    match = _V1_LINE.match(data)
    if match is not None:
        four = match.group(1) is not None
        try:
            if four:
                source, destination = match.group(1).decode(), match.group(2).decode()
            else:
                source = _host(match.group(3), socket.AF_INET6)
                destination = _host(match.group(4), socket.AF_INET6)
        except (OSError, ValueError):
            pass  # not IPv6 after all: the checks below say what is wrong
        else:
            return ProxyHeader(1, "PROXY", socket.AF_INET if four else socket.AF_INET6,
                               socket.SOCK_STREAM, (source, int(match.group(5))),
                               (destination, int(match.group(6))), [], match.end())
    size = len(_V1_PREFIX)
    if not _V1_PREFIX.startswith(data[:size]):
        raise _v1_error("the line must start with 'PROXY '", data)
    end = data.find(b"\r\n")
    complete = end >= 0
    if not complete and len(data) >= V1_MAX_LENGTH:
        raise _v1_error("no CRLF in the first {} bytes".format(V1_MAX_LENGTH), data)
    line = data[:end] if complete else data
    # A last CR may get its LF in the next chunk: the line's fields are
    # whole then, as they are once the CRLF is in.
    whole = complete or line.endswith(b"\r")
    if whole and not complete:
        line = line[:-1]
    if b"\r" in line or b"\n" in line:
        # "The receiver must not tolerate a single CR or LF character to
        # end the line."
        raise _v1_error("a CR or LF that is not the line's CRLF", data)
    if len(data) < size:
        return NEED_MORE
    fields = line[size:].split(b" ")
    protocol = fields[0]
    if len(fields) == 1 and not whole:
        if not any(name.startswith(protocol) for name in _V1_PROTOCOLS):
            raise _v1_error("an unknown protocol (TCP4, TCP6 or UNKNOWN)", data)
        return NEED_MORE  # the protocol's name is still arriving
    if protocol not in _V1_PROTOCOLS:
        raise _v1_error("an unknown protocol (TCP4, TCP6 or UNKNOWN)", data)
    if protocol == b"UNKNOWN":
        # "The receiver must ignore anything presented before the CRLF."
        if not complete:
            return NEED_MORE
        return ProxyHeader(1, "PROXY", None, None, None, None, [], end + 2)
    kind = "ipv4" if protocol == b"TCP4" else "ipv6"
    values = fields[1:]
    kinds = (kind, kind, "port", "port")
    names = ("source address", "destination address", "source port", "destination port")
    for index, value in enumerate(values[:4]):
        # Every field but the last one in hand is whole; the last one is
        # whole only once the line's end was seen.
        partial = index == len(values) - 1 and not whole
        _check_field(value, kinds[index], names[index], partial, data)
    if len(values) > 4:
        raise _v1_error("more than 4 fields after the protocol", data)
    if whole and len(values) < 4:
        raise _v1_error("the line ends before its {}".format(names[len(values)]), data)
    if not complete:
        return NEED_MORE
    family = socket.AF_INET if kind == "ipv4" else socket.AF_INET6
    source = (_host(values[0], family), int(values[2]))
    destination = (_host(values[1], family), int(values[3]))
    return ProxyHeader(1, "PROXY", family, socket.SOCK_STREAM, source, destination, [],
                       end + 2)


def _check_field(value: bytes, kind: str, name: str, partial: bool, line: bytes) -> None:
    """Raise unless ``value`` is a valid field of ``kind`` (or, ``partial``,
    the beginning of one)."""
    if not value:
        if partial:
            return
        raise _v1_error("an empty {} (a doubled space?)".format(name), line)
    if len(value) > _MAX_FIELD[kind]:
        raise _v1_error("a {} too long".format(name), line)
    if kind == "port":
        if not _DIGITS.issuperset(value):
            raise _v1_error("a {} that is not a decimal number".format(name), line)
        if len(value) > 1 and value[:1] == b"0":
            raise _v1_error("a {} with a leading zero".format(name), line)
        if int(value) > 65535:
            raise _v1_error("a {} above 65535".format(name), line)
        return
    if kind == "ipv4":
        if not _IPV4_CHARS.issuperset(value):
            raise _v1_error("a {} that is not an IPv4 address".format(name), line)
        parts = value.split(b".")
        if len(parts) > 4 or (not partial and len(parts) != 4):
            raise _v1_error("a {} that is not four numbers".format(name), line)
        for position, part in enumerate(parts):
            if not part:
                if partial and position == len(parts) - 1:
                    continue
                raise _v1_error("a {} with an empty number".format(name), line)
            if len(part) > 3 or int(part) > 255:
                raise _v1_error("a {} with a number above 255".format(name), line)
            if len(part) > 1 and part[:1] == b"0":
                raise _v1_error("a {} with a leading zero (octal?)".format(name), line)
        return
    if not _IPV6_CHARS.issuperset(value):
        raise _v1_error("a {} that is not an IPv6 address".format(name), line)
    if not partial:
        try:
            socket.inet_pton(socket.AF_INET6, value.decode("ascii"))
        except (OSError, ValueError):
            raise _v1_error("a {} that is not an IPv6 address".format(name), line) from None


def _host(value: bytes, family: int) -> str:
    """The host as pulse reports addresses (``inet_ntop``'s compressed IPv6 form)."""
    text = value.decode("ascii")
    if family == socket.AF_INET:
        return text  # already canonical: checked digit by digit
    return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, text))


# -- version 2 ---------------------------------------------------------------


def _parse_v2(data: bytes, max_length: int) -> Union[ProxyHeader, "Literal[_Need.MORE]"]:
    signature = data[:len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(signature):
        raise ProxyProtocolError("PROXY protocol v2: a wrong signature: {!r}".format(signature))
    if len(data) > 12:
        version, command = data[12] >> 4, data[12] & 0xF
        if version != 2:
            raise ProxyProtocolError(
                "PROXY protocol v2: version {} in the version byte 0x{:02x} (must be 2)".format(
                    version, data[12]))
        if command not in _V2_COMMANDS:
            raise ProxyProtocolError(
                "PROXY protocol v2: unknown command {} (0: LOCAL, 1: PROXY)".format(command))
    local = len(data) > 12 and data[12] & 0xF == 0
    family_byte = data[13] if len(data) > 13 else 0
    family, protocol = family_byte >> 4, family_byte & 0xF
    if len(data) > 13 and not local:
        if family not in _V2_FAMILIES and family != 0:
            raise ProxyProtocolError(
                "PROXY protocol v2: unknown address family {} in 0x{:02x}".format(
                    family, family_byte))
        if protocol not in _V2_PROTOCOLS and protocol != 0:
            raise ProxyProtocolError(
                "PROXY protocol v2: unknown transport protocol {} in 0x{:02x}".format(
                    protocol, family_byte))
    if len(data) < V2_HEADER:
        return NEED_MORE
    length = struct.unpack_from("!H", data, 14)[0]
    if length > max_length:
        raise ProxyProtocolError(
            "PROXY protocol v2: a header of {} bytes after its first 16, over the limit of "
            "{}".format(length, max_length))
    unspec = local or family == 0 or protocol == 0
    size = 0 if unspec else _V2_FAMILIES[family][1]
    if length < size:
        raise ProxyProtocolError(
            "PROXY protocol v2: a length of {} is too short for its addresses ({} bytes)".format(
                length, size))
    total = V2_HEADER + length
    if len(data) < total:
        return NEED_MORE
    command_name = _V2_COMMANDS[data[12] & 0xF]
    if unspec:
        # LOCAL: "discard the protocol block including the family"; UNSPEC:
        # "the receiver should ignore address information" (and without an
        # address size nobody knows where TLVs would start).
        return ProxyHeader(2, command_name, None, None, None, None, [], total)
    sock_family = _V2_FAMILIES[family][0]
    block = data[V2_HEADER:total]
    source, destination = _v2_addresses(sock_family, block)
    tlvs = _v2_tlvs(block[size:])
    for kind, value in tlvs:
        if kind == PP2_TYPE_CRC32C:
            _check_crc32c(data[:total], value, size)
            break  # (a second one would be the sender's bug: the first is checked)
    return ProxyHeader(2, command_name, sock_family, _V2_PROTOCOLS[protocol], source,
                       destination, tlvs, total)


def _v2_addresses(family: int, block: bytes) -> Tuple[Address, Address]:
    if family == socket.AF_INET:
        source_port, destination_port = struct.unpack_from("!HH", block, 8)
        return ((socket.inet_ntop(family, block[0:4]), source_port),
                (socket.inet_ntop(family, block[4:8]), destination_port))
    if family == socket.AF_INET6:
        source_port, destination_port = struct.unpack_from("!HH", block, 32)
        return ((socket.inet_ntop(family, block[0:16]), source_port),
                (socket.inet_ntop(family, block[16:32]), destination_port))
    return _unix_path(block[0:108]), _unix_path(block[108:216])


def _unix_path(raw: bytes) -> str:
    """A ``sun_path`` as pulse reports Unix addresses: the path up to its NUL,
    or a Linux abstract name (leading NUL) without the padding NULs."""
    if raw[:1] == b"\x00":
        return "\x00" + os.fsdecode(raw[1:].rstrip(b"\x00"))
    return os.fsdecode(raw.split(b"\x00", 1)[0])


def _crc32c_table() -> Tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return tuple(table)


_CRC32C = _crc32c_table()
_compiled_crc32c: Any = None  # see _load_compiled_crc32c


def crc32c(data: bytes) -> int:
    """The CRC32c (Castagnoli, RFC 4960 appendix B) of ``data``."""
    global _compiled_crc32c
    if _compiled_crc32c is None:
        _compiled_crc32c = _load_compiled_crc32c()
    if _compiled_crc32c is not False:
        return int(_compiled_crc32c(data, len(data)))
    return _python_crc32c(data)


def _load_compiled_crc32c() -> Any:
    """The C checksum (a 4 KiB header: ~22 us instead of ~0.6 ms of Python,
    which any peer could make us spend), or False without the compiled module.  Loaded
    at the first checksum: ``import pulse`` loads no backend."""
    try:
        from ._sys._pulse_ffi import lib
        return lib.pulse_crc32c
    except (ImportError, AttributeError):  # no compiled module (or an older build of it)
        return False


def _python_crc32c(data: bytes) -> int:
    """``crc32c`` without the compiled module (the portable backend's installs)."""
    crc = 0xFFFFFFFF
    table = _CRC32C
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _check_crc32c(header: bytes, value: bytes, address_size: int) -> None:
    """Verify a PP2_TYPE_CRC32C TLV: the CRC32c of the whole header with the
    TLV's value zeroed (spec section 2.2.3)."""
    if len(value) != 4:
        raise ProxyProtocolError("PROXY protocol v2: a CRC32C TLV of {} bytes (must be 4)".format(
            len(value)))
    # Where the value sits: found again by walking the TLVs (the first CRC one).
    pos = V2_HEADER + address_size
    while header[pos] != PP2_TYPE_CRC32C:
        pos += 3 + ((header[pos + 1] << 8) | header[pos + 2])
    zeroed = header[:pos + 3] + b"\x00\x00\x00\x00" + header[pos + 7:]
    expected = struct.unpack("!I", value)[0]
    actual = crc32c(zeroed)  # once: any peer may send 4 KiB
    if actual != expected:
        raise ProxyProtocolError("PROXY protocol v2: the CRC32C TLV says 0x{:08x}, the header's "
                                 "checksum is 0x{:08x}".format(expected, actual))


def _v2_tlvs(data: bytes) -> List[Tuple[int, bytes]]:
    tlvs = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 3:
            raise ProxyProtocolError(
                "PROXY protocol v2: {} stray bytes after the last TLV".format(len(data) - pos))
        kind = data[pos]
        size = (data[pos + 1] << 8) | data[pos + 2]
        end = pos + 3 + size
        if end > len(data):
            raise ProxyProtocolError(
                "PROXY protocol v2: TLV 0x{:02x} of {} bytes runs past the header's end".format(
                    kind, size))
        tlvs.append((kind, data[pos + 3:end]))
        pos = end
    return tlvs
