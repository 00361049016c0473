"""Tests for the sans-I/O protocol parsers in ``examples/protocols`` (TLV, RESP, HTTP).

Unit tests pin exact wire bytes and parse results; hypothesis property tests
check that every way of splitting a stream into ``feed()`` calls yields the
same items (and the same error), that garbage either raises ``ProtocolError``
or waits for more data, and that buffered memory stays within the limits.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from protocols import http, resp, tlv  # noqa: E402
from protocols.errors import ProtocolError  # noqa: E402

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]
# Applied per test (not loaded globally, so other test modules keep their settings).
# PROTOCOLS_HYPOTHESIS_PROFILE=thorough runs a long bug hunt; the default stays well under 20 s.
prop = settings(
    deadline=None,
    max_examples=5000 if os.environ.get("PROTOCOLS_HYPOTHESIS_PROFILE") == "thorough" else 100,
    suppress_health_check=_HEALTH,
)

Outcome = Tuple[List[Any], Optional[type]]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def run(parser: Any, chunks: Sequence[bytes], bound: Optional[int] = None) -> Outcome:
    """Feed ``chunks`` in order; return (all items incl. ``exc.completed``, error class)."""
    items: List[Any] = []
    for chunk in chunks:
        try:
            items.extend(parser.feed(chunk))
        except ProtocolError as exc:
            items.extend(exc.completed)
            return items, type(exc)
        if bound is not None:
            assert parser.buffered <= bound, (parser.buffered, bound)
    return items, None


def run_strict(parser: Any, chunks: Sequence[bytes]) -> List[Any]:
    """Feed chunks, letting ``ProtocolError`` propagate."""
    out: List[Any] = []
    for chunk in chunks:
        out.extend(parser.feed(chunk))
    return out


def split(blob: bytes, cuts: Sequence[int]) -> List[bytes]:
    points = sorted(cuts)
    return [blob[a:b] for a, b in zip([0] + points, points + [len(blob)])]


def draw_chunks(data: st.DataObject, blob: bytes, max_cuts: int = 12) -> List[bytes]:
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=max_cuts), label="cuts")
    return split(blob, cuts)


def bytewise(blob: bytes) -> List[bytes]:
    return [blob[i : i + 1] for i in range(len(blob))]


def assert_split_invariant(
    factory: Callable[[], Any], blob: bytes, chunks: List[bytes], bound: Optional[int] = None
) -> Outcome:
    whole = run(factory(), [blob], bound)
    assert run(factory(), chunks, bound) == whole
    if len(blob) <= 256:
        assert run(factory(), bytewise(blob), bound) == whole
    return whole


def soup(fragments: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    """Byte strings glued from protocol-ish fragments and random bytes."""
    piece = st.one_of(st.sampled_from(fragments), st.binary(max_size=12))
    return st.lists(piece, max_size=40).map(b"".join)


def mutated(valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """A valid stream with a few bytes overwritten, inserted or deleted."""

    @st.composite
    def build(draw: Callable[..., Any]) -> bytes:
        blob = bytearray(draw(valid))
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["set", "insert", "delete"]))
            at = draw(st.integers(0, len(blob)))
            if op == "insert":
                blob[at:at] = draw(st.binary(min_size=1, max_size=4))
            elif at < len(blob):
                if op == "set":
                    blob[at] = draw(st.integers(0, 255))
                else:
                    del blob[at]
        return bytes(blob)

    return build()


def timed(fn: Callable[[], Any], limit: float = 5.0) -> Any:
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    assert elapsed < limit, "took %.2fs, quadratic behaviour?" % elapsed
    return result


# ===========================================================================
# TLV
# ===========================================================================


class TestTLV:
    def test_encode_exact(self) -> None:
        assert tlv.encode(1, b"abc") == b"\x00\x01\x00\x00\x00\x03abc"
        assert tlv.encode(0xFFFF, b"") == b"\xff\xff\x00\x00\x00\x00"
        assert tlv.encode(0x1234, bytearray(b"\x00")) == b"\x12\x34\x00\x00\x00\x01\x00"
        assert tlv.encode(7, memoryview(b"xy")) == b"\x00\x07\x00\x00\x00\x02xy"

    @pytest.mark.parametrize("frame_type", [-1, 0x10000, 1 << 40])
    def test_encode_bad_type(self, frame_type: int) -> None:
        with pytest.raises(ValueError):
            tlv.encode(frame_type, b"")

    def test_decode_one_shot(self) -> None:
        stream = tlv.encode(1, b"abc") + tlv.encode(2, b"") + tlv.encode(0xFFFF, b"z" * 300)
        dec = tlv.Decoder()
        assert dec.feed(stream) == [(1, b"abc"), (2, b""), (0xFFFF, b"z" * 300)]
        assert dec.buffered == 0
        dec.eof()

    def test_values_are_bytes(self) -> None:
        dec = tlv.Decoder()
        stream = tlv.encode(1, b"abc") + tlv.encode(2, b"de")
        frames = dec.feed(stream[:4]) + dec.feed(stream[4:8]) + dec.feed(bytearray(stream[8:]))
        assert frames == [(1, b"abc"), (2, b"de")]
        assert all(type(value) is bytes for _, value in frames)

    def test_partial_header_and_value(self) -> None:
        dec = tlv.Decoder()
        frame = tlv.encode(5, b"hello")
        assert dec.feed(frame[:3]) == []
        assert dec.buffered == 3
        assert dec.feed(frame[3:6]) == []
        assert dec.buffered == 6
        assert dec.feed(frame[6:8]) == []
        assert dec.buffered == 8
        assert dec.feed(frame[8:] + frame[:2]) == [(5, b"hello")]
        assert dec.buffered == 2
        assert dec.feed(frame[2:]) == [(5, b"hello")]
        assert dec.buffered == 0

    def test_every_complete_frame_per_feed_after_partial(self) -> None:
        dec = tlv.Decoder()
        frames = [(i, bytes([i]) * i) for i in range(20)]
        stream = b"".join(tlv.encode(t, v) for t, v in frames)
        assert dec.feed(stream[:10]) == frames[:1]
        assert dec.feed(stream[10:]) == frames[1:]

    def test_zero_length_frame_split_header(self) -> None:
        dec = tlv.Decoder()
        assert dec.feed(b"\x00\x09\x00") == []
        assert dec.feed(b"\x00\x00\x00") == [(9, b"")]
        assert dec.buffered == 0

    def test_empty_feed(self) -> None:
        dec = tlv.Decoder()
        assert dec.feed(b"") == []
        dec.feed(b"\x00")
        assert dec.feed(b"") == []
        assert dec.buffered == 1

    def test_max_frame_size_boundary(self) -> None:
        dec = tlv.Decoder(max_frame_size=10)
        assert dec.feed(tlv.encode(1, b"x" * 10)) == [(1, b"x" * 10)]
        with pytest.raises(tlv.FrameTooLarge):
            dec.feed(b"\x00\x01\x00\x00\x00\x0b")  # rejected from the header alone

    def test_default_max_frame_size(self) -> None:
        assert tlv.DEFAULT_MAX_FRAME_SIZE == 1 << 20
        dec = tlv.Decoder()
        with pytest.raises(ProtocolError):
            dec.feed(b"\x00\x01" + ((1 << 20) + 1).to_bytes(4, "big"))
        dec = tlv.Decoder()
        assert dec.feed(b"\x00\x01" + (1 << 20).to_bytes(4, "big")) == []

    def test_too_large_in_slow_path_header(self) -> None:
        dec = tlv.Decoder(max_frame_size=3)
        dec.feed(b"\x00\x01\x00")
        with pytest.raises(tlv.FrameTooLarge):
            dec.feed(b"\x00\x00\x04")

    def test_error_carries_completed_and_breaks_decoder(self) -> None:
        dec = tlv.Decoder(max_frame_size=4)
        with pytest.raises(tlv.FrameTooLarge) as info:
            dec.feed(tlv.encode(1, b"ok") + tlv.encode(2, b"x") + b"\x00\x03\x00\x00\x00\x05")
        assert info.value.completed == [(1, b"ok"), (2, b"x")]
        assert isinstance(info.value, ProtocolError)
        with pytest.raises(tlv.FrameTooLarge) as again:
            dec.feed(tlv.encode(1, b"ok"))
        assert again.value.completed == []
        with pytest.raises(ProtocolError):
            dec.eof()

    def test_eof_inside_frame(self) -> None:
        dec = tlv.Decoder()
        dec.feed(tlv.encode(1, b"abc")[:-1])
        with pytest.raises(ProtocolError):
            dec.eof()

    def test_bad_constructor(self) -> None:
        with pytest.raises(ValueError):
            tlv.Decoder(max_frame_size=-1)

    def test_large_frame_in_small_chunks_is_linear(self) -> None:
        size = 8 << 20
        frame = tlv.encode(3, bytes(size))
        dec = tlv.Decoder(max_frame_size=size)

        def go() -> List[tlv.Frame]:
            out: List[tlv.Frame] = []
            for i in range(0, len(frame), 1024):
                out.extend(dec.feed(frame[i : i + 1024]))
                assert dec.buffered <= size + tlv.HEADER_SIZE
            return out

        out = timed(go)
        assert len(out) == 1 and out[0][0] == 3 and len(out[0][1]) == size

    frames_st = st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=200)), max_size=12)

    @prop
    @given(frames=frames_st, data=st.data())
    def test_property_any_split_same_frames(
        self, frames: List[tlv.Frame], data: st.DataObject
    ) -> None:
        blob = b"".join(tlv.encode(t, v) for t, v in frames)
        chunks = draw_chunks(data, blob)
        items, err = assert_split_invariant(tlv.Decoder, blob, chunks)
        assert err is None and items == frames

    @prop
    @given(blob=st.binary(max_size=400), max_size=st.integers(0, 64), data=st.data())
    def test_property_garbage(self, blob: bytes, max_size: int, data: st.DataObject) -> None:
        bound = tlv.HEADER_SIZE + max_size
        items, err = assert_split_invariant(
            lambda: tlv.Decoder(max_frame_size=max_size), blob, draw_chunks(data, blob), bound
        )
        assert err in (None, tlv.FrameTooLarge)
        for frame_type, value in items:
            assert 0 <= frame_type <= 0xFFFF and len(value) <= max_size
        if err is None:
            # Everything not returned is a (bounded) partial frame.
            consumed = sum(tlv.HEADER_SIZE + len(v) for _, v in items)
            dec = tlv.Decoder(max_frame_size=max_size)
            dec.feed(blob)
            assert dec.buffered == len(blob) - consumed < bound


# ===========================================================================
# RESP requests
# ===========================================================================


def cmd(*args: bytes) -> bytes:
    return resp.encode_command(list(args))


inline_token = (
    st.binary(min_size=1, max_size=12)
    .map(lambda b: bytes(c for c in b if c not in b" \t\r\n\x0b\x0c"))
    .filter(bool)
)


@st.composite
def request_stream(draw: Callable[..., Any]) -> Tuple[bytes, List[List[bytes]]]:
    parts: List[bytes] = []
    expected: List[List[bytes]] = []
    for _ in range(draw(st.integers(0, 10))):
        kind = draw(st.sampled_from(["multi", "multi", "inline", "noop"]))
        if kind == "multi":
            args = draw(st.lists(st.binary(max_size=40), min_size=1, max_size=6))
            parts.append(resp.encode_command(args))
            expected.append(args)
        elif kind == "inline":
            args = draw(st.lists(inline_token, min_size=1, max_size=5))
            if args[0].startswith(b"*"):
                args[0] = b"x" + args[0]
            seps = [draw(st.sampled_from([b" ", b"  ", b"\t", b" \t "])) for _ in args]
            line = b"".join(s + a for s, a in zip(seps, args))[len(seps[0]) :]
            line += draw(st.sampled_from([b"", b" ", b"\t"]))
            parts.append(line + draw(st.sampled_from([b"\r\n", b"\n"])))
            expected.append(args)
        else:
            parts.append(draw(st.sampled_from([b"*0\r\n", b"*-1\r\n", b"\r\n", b"\n", b" \r\n"])))
    return b"".join(parts), expected


class TestRESPRequests:
    def test_multibulk(self) -> None:
        p = resp.RequestParser()
        assert p.feed(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n") == [[b"GET", b"k"]]
        assert p.buffered == 0

    def test_inline(self) -> None:
        p = resp.RequestParser()
        assert p.feed(b"PING\r\n") == [[b"PING"]]
        assert p.feed(b"SET  key\tvalue \r\n") == [[b"SET", b"key", b"value"]]
        assert p.feed(b"ECHO x\n") == [[b"ECHO", b"x"]]

    def test_inline_no_quote_processing(self) -> None:
        p = resp.RequestParser()
        assert p.feed(b'SET k "a b"\r\n') == [[b"SET", b"k", b'"a', b'b"']]

    def test_empty_lines_and_empty_arrays_are_skipped(self) -> None:
        p = resp.RequestParser()
        assert p.feed(b"\r\n\n   \r\n*0\r\n*-1\r\nPING\r\n") == [[b"PING"]]

    def test_pipeline_mixed(self) -> None:
        p = resp.RequestParser()
        stream = cmd(b"SET", b"a", b"1") + b"PING\r\n" + cmd(b"GET", b"a") + b"QUIT\n"
        assert p.feed(stream) == [[b"SET", b"a", b"1"], [b"PING"], [b"GET", b"a"], [b"QUIT"]]

    def test_binary_safe_bulk(self) -> None:
        p = resp.RequestParser()
        value = b"\r\n*1\r\n$0\r\n\x00\xff"
        assert p.feed(cmd(b"SET", b"k", value)) == [[b"SET", b"k", value]]
        assert p.feed(b"*1\r\n$0\r\n\r\n") == [[b""]]

    def test_args_are_bytes(self) -> None:
        p = resp.RequestParser()
        stream = cmd(b"SET", b"key", b"value") + b"PING\r\n"
        out: List[List[bytes]] = []
        for piece in (stream[:7], stream[7:20], bytearray(stream[20:]), memoryview(b"")):
            out.extend(p.feed(piece))
        assert out == [[b"SET", b"key", b"value"], [b"PING"]]
        assert all(type(a) is bytes for c in out for a in c)

    def test_partial_states_and_buffered(self) -> None:
        p = resp.RequestParser()
        assert p.feed(b"*2\r\n$3\r") == []
        assert p.buffered == 3
        assert p.feed(b"\nGET\r\n$5\r\nhel") == []
        assert p.buffered == 3 + 7  # "GET" held + "$5\r\nhel" unparsed
        assert p.feed(b"lo\r") == []
        assert p.feed(b"\n") == [[b"GET", b"hello"]]
        assert p.buffered == 0

    @pytest.mark.parametrize(
        "stream",
        [
            b"*abc\r\n",
            b"*-2\r\n",
            b"*+1\r\n",
            b"* 1\r\n",
            b"*01\r\n",
            b"*\r\n",
            b"*1\r\n:1\r\n",
            b"*1\r\n+OK\r\n",
            b"*1\r\n$-1\r\n",
            b"*1\r\n$\r\n",
            b"*1\r\n$ 1\r\na\r\n",
            b"*1\r\n$01\r\na\r\n",
            b"*1\r\n$1x\r\na\r\n",
            b"*1\r\n$3\r\nabcXY",
            b"*1\r\n$3\r\nabc\rX",
            b"*1\r\n$3\r\nabc\n\r",
        ],
    )
    def test_malformed(self, stream: bytes) -> None:
        with pytest.raises(ProtocolError):
            resp.RequestParser().feed(stream)
        p = resp.RequestParser()
        with pytest.raises(ProtocolError):
            run_strict(p, bytewise(stream))

    def test_expected_dollar_message(self) -> None:
        with pytest.raises(ProtocolError, match="expected '\\$', got ':'"):
            resp.RequestParser().feed(b"*1\r\n:1\r\n")

    def test_limits_bulk(self) -> None:
        p = resp.RequestParser(max_bulk_length=5)
        assert p.feed(cmd(b"12345")) == [[b"12345"]]
        with pytest.raises(ProtocolError, match="invalid bulk length"):
            p.feed(b"*1\r\n$6\r\n")  # rejected before the payload arrives

    def test_default_limits(self) -> None:
        p = resp.RequestParser()
        assert (p.max_bulk_length, p.max_array_length, p.max_inline_length) == (
            512 * 1024 * 1024,
            1024 * 1024,
            64 * 1024,
        )
        assert p.feed(b"*1\r\n$536870912\r\n") == []
        with pytest.raises(ProtocolError):
            resp.RequestParser().feed(b"*1\r\n$536870913\r\n")
        assert resp.RequestParser().feed(b"*1048576\r\n") == []
        with pytest.raises(ProtocolError):
            resp.RequestParser().feed(b"*1048577\r\n")

    def test_limits_array(self) -> None:
        p = resp.RequestParser(max_array_length=3)
        assert p.feed(cmd(b"a", b"b", b"c")) == [[b"a", b"b", b"c"]]
        with pytest.raises(ProtocolError, match="multibulk length"):
            p.feed(b"*4\r\n")

    def test_limits_command_size(self) -> None:
        p = resp.RequestParser(max_command_size=10)
        assert p.feed(cmd(b"12345", b"67890")) == [[b"12345", b"67890"]]
        with pytest.raises(ProtocolError, match="max_command_size"):
            p.feed(b"*3\r\n$5\r\n12345\r\n$5\r\n67890\r\n$1\r\n")

    def test_limits_inline_exact_boundary(self) -> None:
        p = resp.RequestParser(max_inline_length=10)
        assert p.feed(b"A" * 10) == []
        assert p.feed(b"\n") == [[b"A" * 10]]
        assert p.feed(b"B" * 9 + b"\r\n") == [[b"B" * 9]]
        with pytest.raises(ProtocolError, match="too big inline request"):
            p.feed(b"C" * 11)
        p = resp.RequestParser(max_inline_length=10)
        with pytest.raises(ProtocolError, match="too big inline request"):
            p.feed(b"C" * 10 + b"\r\n")  # the "\r" makes the line 11 bytes
        p = resp.RequestParser(max_inline_length=10)
        with pytest.raises(ProtocolError):
            run_strict(p, bytewise(b"D" * 11))

    def test_count_line_without_crlf_is_bounded(self) -> None:
        with pytest.raises(ProtocolError):
            resp.RequestParser().feed(b"*" + b"1" * 100)
        p = resp.RequestParser()
        with pytest.raises(ProtocolError):
            run_strict(p, bytewise(b"*2\r\n$" + b"9" * 100))
        assert resp.RequestParser().feed(b"*" + b"1" * 20) == []

    def test_error_carries_completed_and_breaks(self) -> None:
        p = resp.RequestParser()
        with pytest.raises(ProtocolError) as info:
            p.feed(b"PING\r\n" + cmd(b"GET", b"k") + b"*x\r\n" + b"PING\r\n")
        assert info.value.completed == [[b"PING"], [b"GET", b"k"]]
        with pytest.raises(ProtocolError) as again:
            p.feed(b"PING\r\n")
        assert again.value.completed == []
        assert p.buffered == 0

    def test_big_bulk_in_small_chunks_is_linear(self) -> None:
        size = 8 << 20
        stream = cmd(b"SET", b"k", bytes(size))
        p = resp.RequestParser()

        def go() -> List[List[bytes]]:
            out: List[List[bytes]] = []
            for i in range(0, len(stream), 1024):
                out.extend(p.feed(stream[i : i + 1024]))
            return out

        out = timed(go)
        assert len(out) == 1 and out[0][:2] == [b"SET", b"k"] and len(out[0][2]) == size

    def test_slow_inline_bytewise_is_linear(self) -> None:
        p = resp.RequestParser()
        line = b"X" * (64 * 1024)

        def go() -> Outcome:
            return run(p, bytewise(line) + [b"\n"])

        items, err = timed(go)
        assert err is None and items == [[line]]

    def test_huge_garbage_fails_fast(self) -> None:
        for blob in (b"A" * (16 << 20), b"*" + b"9" * (16 << 20), b"*1\r\n$" + b"9" * (16 << 20)):
            with pytest.raises(ProtocolError):
                timed(lambda blob=blob: resp.RequestParser().feed(blob), 2.0)

    def test_many_tiny_commands(self) -> None:
        stream = cmd(b"GET", b"k") * 20000
        out = timed(lambda: resp.RequestParser().feed(stream))
        assert out == [[b"GET", b"k"]] * 20000

    # --- properties -------------------------------------------------------

    @prop
    @given(stream=request_stream(), data=st.data())
    def test_property_any_split_same_commands(
        self, stream: Tuple[bytes, List[List[bytes]]], data: st.DataObject
    ) -> None:
        blob, expected = stream
        items, err = assert_split_invariant(resp.RequestParser, blob, draw_chunks(data, blob))
        assert err is None and items == expected

    @prop
    @given(args=st.lists(st.one_of(st.binary(), st.text(), st.integers()), min_size=1, max_size=8))
    def test_property_encode_command_roundtrip(self, args: List[Any]) -> None:
        expected = [
            a.encode() if isinstance(a, str) else (b"%d" % a if isinstance(a, int) else a)
            for a in args
        ]
        assert resp.RequestParser().feed(resp.encode_command(args)) == [expected]

    limits = dict(max_bulk_length=24, max_array_length=5, max_inline_length=40, max_command_size=48)
    fragments = [
        b"*",
        b"$",
        b"\r\n",
        b"\r",
        b"\n",
        b"-1",
        b"0",
        b"1",
        b"3",
        b"*2\r\n",
        b"$3\r\n",
        b"*1\r\n$1\r\nx\r\n",
        b"PING\r\n",
        b" ",
        b"abc",
        b"99",
        b"*5\r\n",
        b"$24\r\n",
    ]

    def _check_garbage(self, blob: bytes, data: st.DataObject) -> None:
        bound = max(self.limits["max_inline_length"], self.limits["max_command_size"] + 40)
        items, err = assert_split_invariant(
            lambda: resp.RequestParser(**self.limits), blob, draw_chunks(data, blob), bound
        )
        assert err in (None, ProtocolError)
        for command in items:
            assert 1 <= len(command) <= self.limits["max_array_length"] or command[0][:1] != b"*"
            assert all(type(a) is bytes for a in command)

    @prop
    @given(blob=soup(fragments), data=st.data())
    def test_property_garbage_soup(self, blob: bytes, data: st.DataObject) -> None:
        self._check_garbage(blob, data)

    @prop
    @given(blob=st.binary(max_size=300), data=st.data())
    def test_property_garbage_random(self, blob: bytes, data: st.DataObject) -> None:
        self._check_garbage(blob, data)

    @prop
    @given(blob=mutated(request_stream().map(lambda s: s[0])), data=st.data())
    def test_property_garbage_mutated(self, blob: bytes, data: st.DataObject) -> None:
        self._check_garbage(blob, data)

    @staticmethod
    def _outcome(parser: "resp.RequestParser", blob: bytes) -> Tuple[Any, ...]:
        try:
            return ("ok", parser.feed(blob), parser.buffered)
        except ProtocolError as exc:
            return ("error", str(exc), exc.completed)

    @prop
    @given(blob=st.one_of(mutated(request_stream().map(lambda s: s[0])),
                          soup(fragments + [b"$01\r\n", b"*1\r\n$3\r\na\r\nb\r\n"])))
    def test_property_fast_path_agrees_with_general_parser(self, blob: bytes) -> None:
        # The fast path (whole lines compared with precomputed ones) must see
        # exactly the commands, errors and leftovers the general parser sees.
        general = resp.RequestParser()
        general._fast = False
        assert self._outcome(resp.RequestParser(), blob) == self._outcome(general, blob)


# ===========================================================================
# RESP replies
# ===========================================================================


def typed(value: Any) -> Any:
    """Structure with types made explicit, for exact reply comparisons."""
    if isinstance(value, list):
        return ("list", [typed(v) for v in value])
    return (type(value).__name__, value)


replies_st = st.recursive(
    st.one_of(
        st.binary(max_size=30)
        .filter(lambda b: b"\r" not in b and b"\n" not in b)
        .map(resp.SimpleString),
        st.binary(max_size=30)
        .filter(lambda b: b"\r" not in b and b"\n" not in b)
        .map(resp.ErrorReply),
        st.integers(-(2**63), 2**63 - 1),
        st.binary(max_size=60),
        st.none(),
    ),
    lambda children: st.lists(children, max_size=5),
    max_leaves=25,
)


class TestRESPReplies:
    def test_encoders_exact(self) -> None:
        assert resp.encode_simple("OK") == b"+OK\r\n"
        assert resp.encode_simple(b"PONG") == b"+PONG\r\n"
        assert resp.encode_error("ERR unknown command") == b"-ERR unknown command\r\n"
        assert resp.encode_integer(0) == b":0\r\n"
        assert resp.encode_integer(-42) == b":-42\r\n"
        assert resp.encode_bulk(b"ab") == b"$2\r\nab\r\n"
        assert resp.encode_bulk(b"") == b"$0\r\n\r\n"
        assert resp.encode_bulk("é") == b"$2\r\n\xc3\xa9\r\n"
        assert resp.encode_bulk(bytearray(b"a\r\nb")) == b"$4\r\na\r\nb\r\n"
        assert resp.encode_bulk(None) == b"$-1\r\n"
        assert resp.encode_array([]) == b"*0\r\n"
        assert resp.encode_array(None) == b"*-1\r\n"
        assert resp.encode_array([b"a", 1, None, [b"b"], resp.SimpleString(b"OK")]) == (
            b"*5\r\n$1\r\na\r\n:1\r\n$-1\r\n*1\r\n$1\r\nb\r\n+OK\r\n"
        )
        assert resp.encode_array(iter([b"x"])) == b"*1\r\n$1\r\nx\r\n"
        assert resp.encode_reply(resp.ErrorReply(b"ERR x")) == b"-ERR x\r\n"
        assert (
            resp.encode_command(["SET", b"k", 10]) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n10\r\n"
        )

    @pytest.mark.parametrize("fn", [resp.encode_simple, resp.encode_error])
    @pytest.mark.parametrize("text", ["a\r\nb", "a\nb", b"a\rb"])
    def test_line_replies_reject_crlf(self, fn: Callable[[Any], bytes], text: Any) -> None:
        with pytest.raises(ValueError):
            fn(text)

    def test_encode_reply_type_error(self) -> None:
        with pytest.raises(TypeError):
            resp.encode_reply(1.5)

    def test_reply_parser_types(self) -> None:
        p = resp.ReplyParser()
        out = p.feed(
            b"+OK\r\n-ERR bad\r\n:-7\r\n$3\r\nfoo\r\n$-1\r\n*-1\r\n*0\r\n"
            b"*2\r\n*1\r\n:1\r\n$0\r\n\r\n"
        )
        assert [typed(v) for v in out] == [
            ("SimpleString", b"OK"),
            ("ErrorReply", b"ERR bad"),
            ("int", -7),
            ("bytes", b"foo"),
            ("NoneType", None),
            ("NoneType", None),
            ("list", []),
            ("list", [("list", [("int", 1)]), ("bytes", b"")]),
        ]
        assert repr(out[0]) == "SimpleString(b'OK')" and repr(out[1]) == "ErrorReply(b'ERR bad')"

    def test_reply_parser_partial(self) -> None:
        p = resp.ReplyParser()
        assert p.feed(b"*2\r\n$5\r\nhel") == []
        assert p.feed(b"lo\r\n:4") == []
        assert p.feed(b"2\r\n+") == [[b"hello", 42]]
        assert p.buffered == 1
        assert p.feed(b"OK\r\n") == [b"OK"]

    @pytest.mark.parametrize(
        "stream",
        [
            b"?x\r\n",
            b"!",
            b":abc\r\n",
            b":\r\n",
            b"$x\r\n",
            b"$-2\r\n",
            b"*x\r\n",
            b"$3\r\nabcde",
            b"+" + b"x" * 70000,
            b":" + b"1" * 40,
        ],
    )
    def test_reply_parser_malformed(self, stream: bytes) -> None:
        with pytest.raises(ProtocolError):
            resp.ReplyParser().feed(stream)

    def test_reply_parser_limits(self) -> None:
        with pytest.raises(ProtocolError):
            resp.ReplyParser(max_bulk_length=3).feed(b"$4\r\n")
        with pytest.raises(ProtocolError):
            resp.ReplyParser(max_array_length=3).feed(b"*4\r\n")
        with pytest.raises(ProtocolError):
            resp.ReplyParser(max_depth=3).feed(b"*1\r\n" * 4)
        assert resp.ReplyParser(max_depth=3).feed(b"*1\r\n" * 3 + b":1\r\n") == [[[[1]]]]
        with pytest.raises(ProtocolError) as info:
            resp.ReplyParser().feed(b"+OK\r\n:1\r\n?")
        assert info.value.completed == [b"OK", 1]

    @prop
    @given(values=st.lists(replies_st, max_size=6), data=st.data())
    def test_property_roundtrip_any_split(self, values: List[Any], data: st.DataObject) -> None:
        blob = b"".join(resp.encode_reply(v) for v in values)
        items, err = assert_split_invariant(resp.ReplyParser, blob, draw_chunks(data, blob))
        assert err is None
        assert [typed(v) for v in items] == [typed(v) for v in values]

    @prop
    @given(
        blob=st.one_of(
            soup(
                [
                    b"*",
                    b"$",
                    b"+",
                    b"-",
                    b":",
                    b"\r\n",
                    b"1",
                    b"-1",
                    b"*1\r\n",
                    b"$2\r\nab\r\n",
                    b"3",
                ]
            ),
            mutated(
                st.lists(replies_st, max_size=4).map(
                    lambda vs: b"".join(map(resp.encode_reply, vs))
                )
            ),
        ),
        data=st.data(),
    )
    def test_property_garbage(self, blob: bytes, data: st.DataObject) -> None:
        def factory() -> resp.ReplyParser:
            return resp.ReplyParser(
                max_bulk_length=20, max_array_length=5, max_line_length=30, max_depth=4
            )

        items, err = assert_split_invariant(factory, blob, draw_chunks(data, blob), bound=60)
        assert err in (None, ProtocolError)

        def valid(value: Any, depth: int = 0) -> bool:
            if isinstance(value, list):
                return depth < 4 and len(value) <= 5 and all(valid(v, depth + 1) for v in value)
            return value is None or isinstance(value, (bytes, int))

        assert all(valid(v) for v in items)


# ===========================================================================
# HTTP
# ===========================================================================


def get(target: bytes = b"/", *extra: bytes, version: bytes = b"1.1") -> bytes:
    lines = [b"GET " + target + b" HTTP/" + version, b"Host: example.com", *extra]
    return b"\r\n".join(lines) + b"\r\n\r\n"


token_st = st.text(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    min_size=1,
    max_size=10,
).map(str.encode)
target_st = (
    st.binary(min_size=1, max_size=30)
    .map(lambda b: bytes(c for c in b if 0x21 <= c != 0x7F))
    .filter(bool)
)
value_st = st.binary(max_size=30).map(
    lambda b: bytes(c for c in b if c == 9 or 0x20 <= c != 0x7F).strip(b" \t")
)


@st.composite
def http_stream(draw: Callable[..., Any]) -> Tuple[bytes, List[http.Request]]:
    parts: List[bytes] = []
    expected: List[http.Request] = []
    for _ in range(draw(st.integers(0, 6))):
        parts.append(draw(st.sampled_from([b"", b"", b"\r\n"])))
        method = draw(token_st)
        target = draw(target_st)
        version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
        headers: List[Tuple[bytes, bytes]] = []
        raw: List[bytes] = []
        if version == b"1.1" or draw(st.booleans()):
            headers.append((b"host", b"h"))
            raw.append(b"HoSt: h")
        for _ in range(draw(st.integers(0, 4))):
            name = draw(token_st)
            if name.lower() in (b"host", b"content-length", b"transfer-encoding", b"connection"):
                name = b"x-" + name
            value = draw(value_st)
            headers.append((name.lower(), value))
            raw.append(name + b":" + draw(st.sampled_from([b"", b" ", b" \t"])) + value)
        conn = draw(st.sampled_from([None, b"close", b"keep-alive", b"Keep-Alive, x"]))
        if conn is not None:
            headers.append((b"connection", conn))
            raw.append(b"Connection: " + conn)
        body = draw(st.binary(max_size=50))
        if body or draw(st.booleans()):
            headers.append((b"content-length", b"%d" % len(body)))
            raw.append(b"Content-Length: %d" % len(body))
        keep = conn != b"close" if version == b"1.1" else conn in (b"keep-alive", b"Keep-Alive, x")
        parts.append(b"%s %s HTTP/%s\r\n" % (method, target, version))
        parts.append(b"".join(h + b"\r\n" for h in raw) + b"\r\n" + body)
        if not expected or expected[-1].keep_alive:
            expected.append(http.Request(method, target, version, headers, body, keep))
    return b"".join(parts), expected


class TestHTTPRequests:
    def test_simple_get(self) -> None:
        p = http.RequestParser()
        [req] = p.feed(b"GET /index.html?q=1 HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n")
        assert req.method == b"GET"
        assert req.target == b"/index.html?q=1"
        assert req.version == b"1.1"
        assert req.headers == [(b"host", b"example.com"), (b"accept", b"*/*")]
        assert req.body == b""
        assert req.keep_alive is True
        assert req.header("HOST") == b"example.com" and req.header(b"accept") == b"*/*"
        assert req.header("missing") is None and req.header("missing", b"d") == b"d"
        assert p.buffered == 0 and not p.closed

    def test_header_values_stripped_names_lowered(self) -> None:
        [req] = http.RequestParser().feed(get(b"/", b"X-Thing: \t a  b \t", b"Empty:", b"ETag:x"))
        assert req.headers[1:] == [(b"x-thing", b"a  b"), (b"empty", b""), (b"etag", b"x")]

    def test_obs_text_value_allowed(self) -> None:
        [req] = http.RequestParser().feed(get(b"/", b"X-Latin: caf\xe9"))
        assert req.header("x-latin") == b"caf\xe9"

    def test_post_body_and_pipelining(self) -> None:
        stream = (
            b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
            + get(b"/b")
            + b"PUT /c HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n"
        )
        reqs = http.RequestParser().feed(stream)
        assert [(r.method, r.target, r.body) for r in reqs] == [
            (b"POST", b"/a", b"hello"),
            (b"GET", b"/b", b""),
            (b"PUT", b"/c", b""),
        ]
        assert type(reqs[0].body) is bytes

    def test_body_split_and_buffered(self) -> None:
        p = http.RequestParser()
        head = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n"
        assert p.feed(head[:20]) == []
        assert p.buffered == 20
        assert p.feed(head[20:] + b"0123") == []
        assert p.buffered == 4
        assert p.feed(b"456") == []
        reqs = p.feed(bytearray(b"789") + get())
        assert [r.body for r in reqs] == [b"0123456789", b""]
        assert p.buffered == 0

    def test_body_may_contain_crlfcrlf(self) -> None:
        body = b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"
        head = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(body)
        stream = head + body + get(b"/n")
        reqs = http.RequestParser().feed(stream)
        assert [r.body for r in reqs] == [body, b""] and reqs[1].target == b"/n"

    @pytest.mark.parametrize(
        "version, connection, keep_alive",
        [
            (b"1.1", None, True),
            (b"1.1", b"close", False),
            (b"1.1", b"Close", False),
            (b"1.1", b"keep-alive", True),
            (b"1.1", b"Upgrade, close", False),
            (b"1.0", None, False),
            (b"1.0", b"keep-alive", True),
            (b"1.0", b"Keep-Alive", True),
            (b"1.0", b"foo ,\tkeep-alive", True),
            (b"1.0", b"keep-alive, close", False),
            (b"1.2", None, True),
        ],
    )
    def test_keep_alive(
        self, version: bytes, connection: Optional[bytes], keep_alive: bool
    ) -> None:
        extra = [b"Connection: " + connection] if connection is not None else []
        [req] = http.RequestParser().feed(get(b"/", *extra, version=version))
        assert req.keep_alive is keep_alive
        assert req.version == version

    def test_http10_without_host(self) -> None:
        [req] = http.RequestParser().feed(b"GET / HTTP/1.0\r\n\r\n")
        assert req.headers == [] and req.keep_alive is False

    def test_close_stops_parsing(self) -> None:
        p = http.RequestParser()
        reqs = p.feed(
            get(b"/1") + get(b"/2", b"Connection: close") + get(b"/3") + b"garbage\x00\r\n\r\n"
        )
        assert [r.target for r in reqs] == [b"/1", b"/2"]
        assert p.closed and p.buffered == 0
        assert p.feed(get(b"/4")) == []

    def test_leading_empty_lines_ignored(self) -> None:
        p = http.RequestParser()
        assert p.feed(b"\r\n\r\n") == []
        assert p.feed(b"\r") == []
        assert [r.target for r in p.feed(b"\n" + get(b"/x") + b"\r\n" + get(b"/y"))] == [
            b"/x",
            b"/y",
        ]

    def test_methods_and_targets(self) -> None:
        p = http.RequestParser()
        stream = (
            b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n"
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
            b"GET http://h/p?x=%20 HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        assert [(r.method, r.target) for r in p.feed(stream)] == [
            (b"OPTIONS", b"*"),
            (b"CONNECT", b"example.com:443"),
            (b"GET", b"http://h/p?x=%20"),
        ]

    @pytest.mark.parametrize(
        "stream",
        [
            b"GET\r\n\r\n",
            b"GET /\r\nHost: h\r\n\r\n",
            b"GET / HTTP/1.1 extra\r\nHost: h\r\n\r\n",
            b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET / http/1.1\r\nHost: h\r\n\r\n",
            b"GET / HTTP/1\r\nHost: h\r\n\r\n",
            b"GET / HTTP/11.1\r\nHost: h\r\n\r\n",
            b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET /a\x7fb HTTP/1.1\r\nHost: h\r\n\r\n",
            b" GET / HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : h\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nNoColon\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\n: empty-name\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\tfolded\r\n\r\n",
            b"GET / HTTP/1.1\nHost: h\n\n",
            b"GET / HTTP/1.1\r\nHost: h\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: abc\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: +1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1,1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1 1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length:\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n",
        ],
    )
    def test_bad_request_400(self, stream: bytes) -> None:
        with pytest.raises(http.BadRequest) as info:
            http.RequestParser().feed(stream)
        assert info.value.status_code == 400
        with pytest.raises(http.BadRequest):
            run_strict(http.RequestParser(), bytewise(stream))

    def test_duplicate_equal_content_length_ok(self) -> None:
        [req] = http.RequestParser().feed(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab"
        )
        assert req.body == b"ab"

    def test_bare_lf_request_fails_before_head_limit(self) -> None:
        with pytest.raises(http.BadRequest):
            http.RequestParser().feed(b"GET / HTTP/1.1\nHost: h\n")
        p = http.RequestParser()
        assert p.feed(b"GET / HTTP/1.1\r\nHost: h\r") == []
        with pytest.raises(http.BadRequest):
            p.feed(b"\nX: y\n")

    @pytest.mark.parametrize("te", [b"chunked", b"gzip, chunked", b"identity"])
    def test_transfer_encoding_501(self, te: bytes) -> None:
        with pytest.raises(http.UnsupportedTransferEncoding) as info:
            http.RequestParser().feed(
                b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: " + te + b"\r\n\r\n"
            )
        assert info.value.status_code == 501

    def test_version_505(self) -> None:
        with pytest.raises(http.VersionNotSupported) as info:
            http.RequestParser().feed(b"GET / HTTP/2.0\r\nHost: h\r\n\r\n")
        assert info.value.status_code == 505

    def test_head_size_limit_431_exact_boundary(self) -> None:
        base = get(b"/")
        pad = 100 - len(base)
        exact = get(b"/" + b"a" * pad)
        assert len(exact) == 100
        assert len(http.RequestParser(max_head_size=100).feed(exact)) == 1
        over = get(b"/" + b"a" * (pad + 1))
        with pytest.raises(http.HeadersTooLarge) as info:
            http.RequestParser(max_head_size=100).feed(over)
        assert info.value.status_code == 431
        with pytest.raises(http.HeadersTooLarge):
            run_strict(http.RequestParser(max_head_size=100), bytewise(over))

    def test_head_size_limit_without_terminator(self) -> None:
        assert http.DEFAULT_MAX_HEAD_SIZE == 8192
        p = http.RequestParser()
        assert p.feed(b"GET / HTTP/1.1\r\nX: " + b"a" * 8000) == []
        with pytest.raises(http.HeadersTooLarge):
            p.feed(b"a" * 200)
        with pytest.raises(http.HeadersTooLarge):
            timed(lambda: http.RequestParser().feed(b"x" * (16 << 20)), 2.0)

    def test_many_headers_431(self) -> None:
        headers = [b"X-%d: v" % i for i in range(2000)]
        with pytest.raises(http.HeadersTooLarge):
            http.RequestParser().feed(get(b"/", *headers))

    def test_body_limit_413(self) -> None:
        p = http.RequestParser(max_body_size=10)
        [req] = p.feed(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n0123456789")
        assert req.body == b"0123456789"
        with pytest.raises(http.PayloadTooLarge) as info:
            p.feed(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n")
        assert info.value.status_code == 413
        with pytest.raises(http.PayloadTooLarge):
            http.RequestParser().feed(
                b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: " + b"9" * 50 + b"\r\n\r\n"
            )

    def test_error_hierarchy(self) -> None:
        for cls in (
            http.BadRequest,
            http.HeadersTooLarge,
            http.PayloadTooLarge,
            http.UnsupportedTransferEncoding,
            http.VersionNotSupported,
        ):
            assert issubclass(cls, http.HTTPError) and issubclass(cls, ProtocolError)
        assert http.HeadersTooLarge.status_code == 431
        assert not issubclass(http.HeadersTooLarge, http.BadRequest)

    def test_error_carries_completed_and_breaks(self) -> None:
        p = http.RequestParser()
        with pytest.raises(http.BadRequest) as info:
            p.feed(get(b"/ok") + b"BAD\r\n\r\n")
        assert [r.target for r in info.value.completed] == [b"/ok"]
        with pytest.raises(http.BadRequest) as again:
            p.feed(get(b"/ok"))
        assert again.value.completed == []

    def test_big_body_in_small_chunks_is_linear(self) -> None:
        size = 8 << 20
        stream = (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % size + bytes(size) + get()
        )
        p = http.RequestParser(max_body_size=size)
        items, err = timed(lambda: run(p, split(stream, list(range(0, len(stream), 1024)))))
        assert err is None and len(items) == 2 and len(items[0].body) == size

    def test_slow_head_bytewise_is_linear(self) -> None:
        head = get(b"/", *[b"X-%d: %s" % (i, b"v" * 40) for i in range(150)])
        assert len(head) < 8192
        items, err = timed(lambda: run(http.RequestParser(), bytewise(head)))
        assert err is None and len(items) == 1 and len(items[0].headers) == 151

    def test_many_pipelined_requests(self) -> None:
        stream = get(b"/", b"User-Agent: bench", b"Accept: */*") * 5000
        out = timed(lambda: http.RequestParser().feed(stream))
        assert len(out) == 5000 and out[0] == out[-1]

    # --- properties -------------------------------------------------------

    @prop
    @given(stream=http_stream(), data=st.data())
    def test_property_any_split_same_requests(
        self, stream: Tuple[bytes, List[http.Request]], data: st.DataObject
    ) -> None:
        blob, expected = stream
        items, err = assert_split_invariant(http.RequestParser, blob, draw_chunks(data, blob))
        assert err is None and items == expected

    fragments = [
        b"GET / HTTP/1.1\r\n",
        b"Host: h\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
        b"\r\n",
        b"\r\n\r\n",
        b"\n",
        b"\r",
        b"Content-Length: 3\r\n",
        b"Content-Length: 99\r\n",
        b"Connection: close\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"POST /x HTTP/1.0\r\n",
        b": ",
        b" ",
        b"abc",
    ]

    def _check_garbage(self, blob: bytes, data: st.DataObject) -> None:
        items, err = assert_split_invariant(
            lambda: http.RequestParser(max_head_size=64, max_body_size=32),
            blob,
            draw_chunks(data, blob),
            bound=64,
        )
        assert err is None or issubclass(err, http.HTTPError)
        assert all(isinstance(r, http.Request) and len(r.body) <= 32 for r in items)

    @prop
    @given(blob=soup(fragments), data=st.data())
    def test_property_garbage_soup(self, blob: bytes, data: st.DataObject) -> None:
        self._check_garbage(blob, data)

    @prop
    @given(blob=st.binary(max_size=300), data=st.data())
    def test_property_garbage_random(self, blob: bytes, data: st.DataObject) -> None:
        self._check_garbage(blob, data)

    @prop
    @given(blob=mutated(http_stream().map(lambda s: s[0])), data=st.data())
    def test_property_garbage_mutated(self, blob: bytes, data: st.DataObject) -> None:
        _, err = assert_split_invariant(
            http.RequestParser, blob, draw_chunks(data, blob), bound=8192
        )
        assert err is None or issubclass(err, http.HTTPError)


class TestHTTPResponses:
    def test_basic(self) -> None:
        assert http.build_response(200, b"hello", [("Content-Type", "text/plain")]) == (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
        )

    def test_defaults_and_unknown_status(self) -> None:
        assert http.build_response(404) == b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        assert http.build_response(299) == b"HTTP/1.1 299 \r\nContent-Length: 0\r\n\r\n"
        assert (
            http.build_response(200, reason="Fine")
            == b"HTTP/1.1 200 Fine\r\nContent-Length: 0\r\n\r\n"
        )

    def test_connection_headers(self) -> None:
        assert http.build_response(200, b"", keep_alive=False) == (
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        assert http.build_response(200, b"", request_version=b"1.0") == (
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n"
        )
        assert http.build_response(200, b"", [(b"connection", b"upgrade")], keep_alive=False) == (
            b"HTTP/1.1 200 OK\r\nconnection: upgrade\r\nContent-Length: 0\r\n\r\n"
        )

    def test_explicit_content_length_kept(self) -> None:
        # e.g. a HEAD response announcing the GET body length
        assert http.build_response(200, b"", [("Content-Length", "42")]) == (
            b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n"
        )

    def test_no_body_statuses(self) -> None:
        assert http.build_response(204) == b"HTTP/1.1 204 No Content\r\n\r\n"
        assert http.build_response(304) == b"HTTP/1.1 304 Not Modified\r\n\r\n"
        assert http.build_response(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        with pytest.raises(ValueError):
            http.build_response(204, b"x")

    @pytest.mark.parametrize(
        "kwargs",
        [
            dict(headers=[("X", "a\r\nSet-Cookie: evil")]),
            dict(headers=[("X", "a\nb")]),
            dict(headers=[("X", "a\x00")]),
            dict(headers=[("Bad Name", "v")]),
            dict(headers=[("", "v")]),
            dict(reason="OK\r\nX: y"),
            dict(status=99),
            dict(status=1000),
        ],
    )
    def test_rejects_injection(self, kwargs: dict) -> None:
        status = kwargs.pop("status", 200)
        with pytest.raises(ValueError):
            http.build_response(status, **kwargs)

    def test_date_header(self) -> None:
        out = http.build_response(200, date=True)
        assert out.startswith(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nDate: ")
        date_line = out.split(b"\r\n")[2]
        assert date_line.endswith(b" GMT") and len(date_line) == len(
            b"Date: Sun, 06 Nov 1994 08:49:37 GMT"
        )

    def test_error_response(self) -> None:
        out = http.error_response(http.HeadersTooLarge("too big"))
        assert out == (
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 36\r\n"
            b"Connection: close\r\n\r\n431 Request Header Fields Too Large\n"
        )

    @prop
    @given(
        status=st.sampled_from([200, 201, 404, 500]),
        body=st.binary(max_size=100),
        keep=st.booleans(),
    )
    def test_property_response_is_parseable_framing(
        self, status: int, body: bytes, keep: bool
    ) -> None:
        out = http.build_response(status, body, [("X-Id", "1")], keep_alive=keep)
        head, _, rest = out.partition(b"\r\n\r\n")
        assert rest == body
        lines = head.split(b"\r\n")
        assert lines[0].startswith(b"HTTP/1.1 %d " % status)
        assert b"Content-Length: %d" % len(body) in lines
        assert (b"Connection: close" in lines) is (not keep)
