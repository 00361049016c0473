"""The PROXY protocol parser, byte by byte: both versions, every split, every refusal.

``pulse.proxy_protocol`` has no I/O, so these tests feed it bytes directly:
valid headers of each kind, cut at every point and fed one byte at a time
(the result and the bytes after it must not change), malformed ones (each
refused with a message that names the fault, and as soon as the faulty
byte is in), and hypothesis for what no table covers: arbitrary bytes never
make it raise anything but ``ProxyProtocolError`` nor read past a header,
and generated headers parse back to what was encoded.
"""

import random
import re
import socket
import struct
from typing import Any, List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy_support import SIGNATURE, splits, v1, v2
from pulse.proxy_protocol import (MAX_V2_LENGTH, NEED_MORE, V1_MAX_LENGTH, ProxyHeader,
                                  ProxyParser, ProxyProtocolError, check_versions, parse)

INET, INET6, UNIX = socket.AF_INET, socket.AF_INET6, socket.AF_UNIX
STREAM, DGRAM = socket.SOCK_STREAM, socket.SOCK_DGRAM

# (header bytes, what it must parse to, minus the length, which is len(header)).
VALID = [
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
     (1, "PROXY", INET, STREAM, ("192.168.0.1", 56324), ("192.168.0.11", 443), [])),
    (b"PROXY TCP4 255.255.255.255 0.0.0.0 65535 0\r\n",
     (1, "PROXY", INET, STREAM, ("255.255.255.255", 65535), ("0.0.0.0", 0), [])),
    (b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n",
     (1, "PROXY", INET6, STREAM, ("2001:db8::1", 1), ("::1", 2), [])),
    # Any RFC 4291 form is taken, and reported compressed and in lower case.
    (b"PROXY TCP6 0:0:0:0:0:0:0:1 2001:DB8:0:0:0:0:0:FF 80 8080\r\n",
     (1, "PROXY", INET6, STREAM, ("::1", 80), ("2001:db8::ff", 8080), [])),
    (b"PROXY TCP6 ::ffff:10.0.0.1 ::ffff:10.0.0.2 80 81\r\n",
     (1, "PROXY", INET6, STREAM, ("::ffff:10.0.0.1", 80), ("::ffff:10.0.0.2", 81), [])),
    (b"PROXY UNKNOWN\r\n", (1, "PROXY", None, None, None, None, [])),
    (b"PROXY UNKNOWN ffff:f::f ffff::f 65535 65535\r\n",
     (1, "PROXY", None, None, None, None, [])),
    (b"PROXY UNKNOWN " + b"x" * 90 + b"\r\n", (1, "PROXY", None, None, None, None, [])),
    (v2(("10.1.2.3", 4000), ("10.9.8.7", 80)),
     (2, "PROXY", INET, STREAM, ("10.1.2.3", 4000), ("10.9.8.7", 80), [])),
    (v2(("10.1.2.3", 53), ("10.9.8.7", 53), dgram=True),
     (2, "PROXY", INET, DGRAM, ("10.1.2.3", 53), ("10.9.8.7", 53), [])),
    (v2(("2001:db8::5", 65535), ("fe80::1", 0), tlvs=[(0x01, b"h2"), (0x02, b"example.org"),
                                                       (0x04, b""), (0xE0, b"\x00" * 300)]),
     (2, "PROXY", INET6, STREAM, ("2001:db8::5", 65535), ("fe80::1", 0),
      [(0x01, b"h2"), (0x02, b"example.org"), (0x04, b""), (0xE0, b"\x00" * 300)])),
    (v2(unix=(b"/run/client.sock", b"\x00abstract")),
     (2, "PROXY", UNIX, STREAM, "/run/client.sock", "\x00abstract", [])),
    (v2(), (2, "PROXY", None, None, None, None, [])),
    # LOCAL: a health check; the block (whatever the family says) is skipped.
    (v2(command=0), (2, "LOCAL", None, None, None, None, [])),
    (SIGNATURE + b"\x20\x11\x00\x0c" + b"\x7f\x00\x00\x01" * 2 + b"\x00\x01\x00\x02",
     (2, "LOCAL", None, None, None, None, [])),
    (SIGNATURE + b"\x20\xff\x00\x03abc", (2, "LOCAL", None, None, None, None, [])),
]
VALID_IDS = [repr(header[:24]) + "-{}".format(i) for i, (header, _) in enumerate(VALID)]


def expected(header: bytes, fields: tuple) -> ProxyHeader:
    return ProxyHeader(*fields, length=len(header))


@pytest.mark.parametrize("header,fields", VALID, ids=VALID_IDS)
def test_valid_headers_parse(header: bytes, fields: tuple) -> None:
    assert parse(header) == expected(header, fields)
    version = "v{}".format(fields[0])
    assert parse(header, versions=version) == expected(header, fields)


@pytest.mark.parametrize("header,fields", VALID, ids=VALID_IDS)
def test_every_prefix_needs_more(header: bytes, fields: tuple) -> None:
    for cut in range(len(header)):
        assert parse(header[:cut]) is NEED_MORE, header[:cut]


@pytest.mark.parametrize("header,fields", VALID, ids=VALID_IDS)
def test_every_split_gives_the_same_header_and_payload(header: bytes, fields: tuple) -> None:
    payload = b"GET / HTTP/1.1\r\n\r\n\x00\r\n"  # the client's bytes, CRLFs and all
    for chunks in splits(header + payload):
        parser = ProxyParser()
        cut = 0
        while True:
            result = parser.feed(chunks[cut])
            if result is not NEED_MORE:
                break
            cut += 1
        # It answers with the chunk that completes the header, not before.
        assert sum(len(c) for c in chunks[:cut]) < len(header) <= sum(
            len(c) for c in chunks[:cut + 1])
        assert result == expected(header, fields)
        assert parser.rest + b"".join(chunks[cut + 1:]) == payload
        with pytest.raises(ValueError, match="already parsed"):
            parser.feed(b"more")


@pytest.mark.parametrize("header,fields", VALID, ids=VALID_IDS)
def test_trailing_bytes_are_never_read(header: bytes, fields: tuple) -> None:
    # Whatever follows, even garbage or another header, belongs to the client.
    for tail in (b"", b"\r\n", b"PROXY TCP4 ", SIGNATURE, b"\xff" * 5000):
        result = parse(header + tail)
        assert result == expected(header, fields)


# (bytes, a piece of the error message).  Each is refused as soon as its last
# byte is in: test_refused_as_soon_as_possible checks that no prefix is.
INVALID = [
    (b"G", "expected a PROXY protocol header"),
    (b"\x16", "expected a PROXY protocol header"),  # a TLS ClientHello
    (b"PROXX", "must start with 'PROXY '"),
    (b"p", "expected a PROXY protocol header"),
    (b"PROXy", "must start with 'PROXY '"),
    (b"PROXY  ", "unknown protocol"),
    (b"PROXY TCP5", "unknown protocol"),
    (b"PROXY UD", "unknown protocol"),
    (b"PROXY TCP4\r", "ends before its source address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r", "ends before its destination port"),
    (b"PROXY TCP4  ", "empty source address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 80  ", "empty destination port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443 ", "more than 4 fields"),
    (b"PROXY TCP4 01", "leading zero"),
    (b"PROXY TCP4 1.2.3.00", "leading zero"),
    (b"PROXY TCP4 256", "above 255"),
    (b"PROXY TCP4 1.2.3.4.", "not four numbers"),
    (b"PROXY TCP4 1.2.3 ", "not four numbers"),
    (b"PROXY TCP4 1..", "empty number"),
    (b"PROXY TCP4 1.2.3.4a", "not an IPv4 address"),
    (b"PROXY TCP4 :", "not an IPv4 address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 08", "leading zero"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536", "above 65535"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 -", "not a decimal number"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 8x", "not a decimal number"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\n", "CR or LF"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\r\r", "CR or LF"),
    (b"PROXY TCP4 1.2.3.4\r", "ends before its destination address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\r\x00", "CR or LF"),
    (b"PROXY TCP6 1.2.3.4 ", "not an IPv6 address"),
    (b"PROXY TCP6 ::1%", "not an IPv6 address"),
    (b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ", "not an IPv6 address"),
    (b"PROXY TCP6 ::g", "not an IPv6 address"),
    (b"PROXY UNKNOWN\n", "CR or LF"),
    (b"PROXY UNKNOWNX", "unknown protocol"),
    (b"PROXY UNKNOWN " + b"a" * (V1_MAX_LENGTH - 14), "no CRLF in the first 107 bytes"),
    (b"PROXY TCP6 " + b"1" * 46, "too long"),
    (b"\r\n\r\n\x01", "wrong signature"),
    (b"\r\x00", "wrong signature"),
    (SIGNATURE + b"\x10", "version 1"),
    (SIGNATURE + b"\x22", "unknown command 2"),
    (SIGNATURE + b"\x21\x41", "unknown address family 4"),
    (SIGNATURE + b"\x21\x13", "unknown transport protocol 3"),
    (SIGNATURE + b"\x21\x11\x00\x0b", "too short for its addresses (12 bytes)"),
    (SIGNATURE + b"\x21\x21\x00\x23", "too short for its addresses (36 bytes)"),
    (SIGNATURE + b"\x21\x31\x00\xd7", "too short for its addresses (216 bytes)"),
    (SIGNATURE + b"\x21\x11\x10\x01", "over the limit of 4096"),
    (SIGNATURE + b"\x20\x00\xff\xff", "over the limit of 4096"),
    (SIGNATURE + b"\x21\x11\x00\x0e" + b"\x00" * 12 + b"\x01\x00",
     "2 stray bytes after the last TLV"),
    (SIGNATURE + b"\x21\x11\x00\x10" + b"\x00" * 12 + b"\x01\x00\x02x",
     "TLV 0x01 of 2 bytes runs past"),
]


@pytest.mark.parametrize("data,message", INVALID, ids=[repr(d[:30]) for d, _ in INVALID])
def test_refused_as_soon_as_possible(data: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(data)
    # Not a byte earlier: every shorter prefix is still a valid beginning.
    for cut in range(len(data)):
        assert parse(data[:cut]) is NEED_MORE, data[:cut]


def test_garbage_is_refused_at_its_first_byte() -> None:
    # A plaintext client (or a TLS one) on the PROXY port learns at once.
    for data in (b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00", b"SSH-2.0-OpenSSH\r\n"):
        with pytest.raises(ProxyProtocolError):
            parse(data[:1])


def test_versions_restrict_the_accepted_format() -> None:
    with pytest.raises(ProxyProtocolError, match="v1 header"):
        parse(SIGNATURE[:1], versions="v1")
    with pytest.raises(ProxyProtocolError, match="v2 header"):
        parse(b"P", versions="v2")
    assert parse(b"PROXY UNKNOWN\r\n", versions="any").version == 1
    for bad in (False, None, "v3", "V1", 1, 2):
        with pytest.raises(ValueError, match="versions must be"):
            check_versions(bad)  # type: ignore[arg-type]


def test_the_v2_length_cap_is_configurable() -> None:
    header = v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=[(0xE1, b"x" * 5000)])
    with pytest.raises(ProxyProtocolError, match="5015 bytes after its first 16, over the limit"):
        parse(header[:16])
    assert parse(header, max_v2_length=65535).tlvs == [(0xE1, b"x" * 5000)]
    with pytest.raises(ProxyProtocolError, match="over the limit of 11"):
        parse(header[:16], max_v2_length=11)
    assert ProxyParser(max_v2_length=65535).feed(header).length == len(header)
    for bad in (-1, 65536, 1.5, True):
        with pytest.raises(ValueError, match="max_v2_length"):
            ProxyParser(max_v2_length=bad)  # type: ignore[arg-type]
    assert MAX_V2_LENGTH == 4096


def test_need_more_is_only_said_below_the_longest_header() -> None:
    # The caller's buffer stays bounded: 106 bytes of a v1 line at most.
    line = b"PROXY UNKNOWN " + b"a" * (V1_MAX_LENGTH - 15)
    assert len(line) == V1_MAX_LENGTH - 1 and parse(line) is NEED_MORE
    assert parse(line[:-1] + b"\r") is NEED_MORE
    assert parse(line[:-1] + b"\r\n").length == V1_MAX_LENGTH


def test_the_parser_accepts_memoryviews_and_bytearrays() -> None:
    header = v1(("1.2.3.4", 5), ("6.7.8.9", 10))
    assert parse(memoryview(header + b"x")).length == len(header)
    parser = ProxyParser()
    assert parser.feed(memoryview(header[:5])) is NEED_MORE
    assert parser.feed(bytearray(header[5:] + b"rest")).source == ("1.2.3.4", 5)
    assert parser.rest == b"rest"


# -- hypothesis --------------------------------------------------------------

BEGINNINGS = st.sampled_from([b"", b"P", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ",
                              b"PROXY UNKNOWN", SIGNATURE, SIGNATURE + b"\x21",
                              SIGNATURE + b"\x21\x11", SIGNATURE + b"\x20",
                              SIGNATURE + b"\x21\x21\x00\x24", SIGNATURE + b"\x21\x11\x00\x10"])
ALPHABET = st.sampled_from(list(b"0123456789abcdefABCDEF.: \r\n\x00PROXYTCUNKW") + [0xFF, 0x16])


@settings(max_examples=2000, deadline=None)
@given(BEGINNINGS, st.lists(ALPHABET, max_size=120).map(bytes), st.binary(max_size=40),
       st.sampled_from([True, "v1", "v2"]))
def test_any_bytes_parse_or_fail_cleanly(start: bytes, middle: bytes, tail: bytes,
                                         versions: str) -> None:
    data = start + middle + tail
    try:
        result = parse(data, versions=versions)
    except ProxyProtocolError:
        return
    if result is NEED_MORE:
        assert len(data) < max(V1_MAX_LENGTH, 16 + MAX_V2_LENGTH)
        return
    assert isinstance(result, ProxyHeader)
    assert 0 < result.length <= len(data)
    # What it returned depends on the header only, not on the bytes after it.
    assert parse(data[:result.length], versions=versions) == result
    # And a whole header is never reported early: no prefix of it is one.
    assert all(parse(data[:cut], versions=versions) is NEED_MORE
               for cut in range(result.length))


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=300))
def test_random_bytes_behind_a_signature_never_crash(body: bytes) -> None:
    for data in (SIGNATURE + body, b"PROXY " + body, body):
        try:
            result = parse(data)
        except ProxyProtocolError:
            continue
        if result is not NEED_MORE:
            assert isinstance(result, ProxyHeader) and result.length <= len(data)


PORTS = st.integers(0, 65535)
IPV4 = st.ip_addresses(v=4).map(str)
IPV6 = st.ip_addresses(v=6).map(lambda a: socket.inet_ntop(INET6, a.packed))
# Any type but PP2_TYPE_CRC32C (0x03), whose value the parser checks.
TLVS = st.lists(st.tuples(st.integers(0, 255).filter(lambda t: t != 0x03),
                          st.binary(max_size=64)), max_size=6)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.tuples(IPV4, IPV4), st.tuples(IPV6, IPV6)), PORTS, PORTS,
       st.binary(max_size=50))
def test_v1_round_trip(hosts: Tuple[str, str], sport: int, dport: int, payload: bytes) -> None:
    header = v1((hosts[0], sport), (hosts[1], dport))
    result = parse(header + payload)
    assert isinstance(result, ProxyHeader)
    assert (result.source, result.destination) == ((hosts[0], sport), (hosts[1], dport))
    assert result.family == (INET6 if ":" in hosts[0] else INET)
    assert result.length == len(header)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.tuples(IPV4, IPV4), st.tuples(IPV6, IPV6)), PORTS, PORTS, TLVS,
       st.booleans(), st.binary(max_size=50))
def test_v2_round_trip(hosts: Tuple[str, str], sport: int, dport: int,
                       tlvs: List[Tuple[int, bytes]], dgram: bool, payload: bytes) -> None:
    header = v2((hosts[0], sport), (hosts[1], dport), tlvs=tlvs, dgram=dgram)
    parser = ProxyParser()
    middle = len(header) // 2
    assert parser.feed(header[:middle]) is NEED_MORE
    result = parser.feed(header[middle:] + payload)
    assert isinstance(result, ProxyHeader)
    assert (result.source, result.destination) == ((hosts[0], sport), (hosts[1], dport))
    assert result.protocol == (DGRAM if dgram else STREAM)
    assert result.tlvs == tlvs and result.length == len(header)
    assert parser.rest == payload


def test_v2_unix_paths() -> None:
    raw = b"/" + b"p" * 107  # a full sun_path, no NUL at all
    header = v2(unix=(raw, b"/a\x00junk"))
    result = parse(header)
    assert isinstance(result, ProxyHeader)
    assert result.source == raw.decode() and result.destination == "/a"
    assert struct.unpack("!H", header[14:16])[0] == 216


def _slow_parse(data: bytes) -> Any:
    """``parse`` with the whole-line fast path (one regex) turned off."""
    from pulse import proxy_protocol
    fast = proxy_protocol._V1_LINE
    proxy_protocol._V1_LINE = re.compile(b"(?!)")  # never matches
    try:
        return parse(data)
    except ProxyProtocolError:
        return "refused"
    finally:
        proxy_protocol._V1_LINE = fast


def _outcome(data: bytes) -> Any:
    try:
        return parse(data)
    except ProxyProtocolError:
        return "refused"


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from([b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY TCP4 1.2.3.4 5.6.7.8 ",
                        b"PROXY TCP6 ::1 ::2 "]),
       st.lists(ALPHABET, max_size=60).map(bytes), st.sampled_from([b"", b"\r\n", b"\r\nx"]))
def test_the_fast_path_agrees_with_the_field_checks(start: bytes, middle: bytes,
                                                    end: bytes) -> None:
    data = start + middle + end
    assert _outcome(data) == _slow_parse(data)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.tuples(IPV4, IPV4), st.tuples(IPV6, IPV6)), PORTS, PORTS)
def test_the_fast_path_takes_every_canonical_line(hosts: Tuple[str, str], sport: int,
                                                  dport: int) -> None:
    header = v1((hosts[0], sport), (hosts[1], dport))
    from pulse import proxy_protocol
    assert proxy_protocol._V1_LINE.match(header) is not None
    assert _outcome(header) == _slow_parse(header)


def test_the_compiled_crc32c_matches_the_python_one() -> None:
    """The C checksum (a hostile 4 KiB header costs microseconds, not ~0.45 ms
    of Python) is the same function as the Python fallback."""
    pytest.importorskip("pulse._sys._pulse_ffi", reason="no compiled module here")
    from pulse import proxy_protocol
    assert proxy_protocol._load_compiled_crc32c() is not False, \
        "the compiled module lacks pulse_crc32c"
    rng = random.Random(7)
    for size in (0, 1, 9, 255, 4096):
        data = bytes(rng.randrange(256) for _ in range(size))
        assert proxy_protocol.crc32c(data) == proxy_protocol._python_crc32c(data)
    assert proxy_protocol.crc32c(b"123456789") == 0xE3069283


def test_a_crc32c_tlv_is_verified() -> None:
    from pulse.proxy_protocol import crc32c
    assert crc32c(b"123456789") == 0xE3069283  # RFC 3720's check value
    header = v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=[(0x05, b"id-1")], checksum=True)
    result = parse(header)
    assert isinstance(result, ProxyHeader) and [t for t, _ in result.tlvs] == [0x05, 0x03]
    for cut in range(len(header)):
        assert parse(header[:cut]) is NEED_MORE
    # One bit flipped anywhere after the fixed part and the checksum no longer
    # matches, except in the CRC TLV's own type (0x03 -> 0x02: no checksum).
    crc_type = len(header) - 7
    for position in range(16, len(header)):
        if position == crc_type:
            continue
        broken = bytearray(header)
        broken[position] ^= 0x01
        with pytest.raises(ProxyProtocolError):
            parse(bytes(broken))
    with pytest.raises(ProxyProtocolError, match="the CRC32C TLV says 0x00000000"):
        parse(v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=[(0x03, b"\x00" * 4)]))
    with pytest.raises(ProxyProtocolError, match="CRC32C TLV of 3 bytes"):
        parse(v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=[(0x03, b"abc")]))
