"""TLV framing for the pulse examples: a sans-I/O incremental decoder and an encoder.

Wire format of one frame::

    +----------------+--------------------+------------------+
    | type: uint16 BE | length: uint32 BE  | value: length B  |
    +----------------+--------------------+------------------+

The decoder never holds more than one partial frame: complete frames are
returned as soon as they are fed, and a declared length above
``max_frame_size`` is rejected as soon as its 6-byte header arrives, before any
of the value is buffered.
"""

from __future__ import annotations

import struct
from typing import List, Optional, Tuple, Union

from .errors import ProtocolError, _rearm

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "HEADER_SIZE",
    "MAX_TYPE",
    "Decoder",
    "Frame",
    "FrameTooLarge",
    "ProtocolError",
    "encode",
]

#: Size in bytes of the type + length header.
HEADER_SIZE = 6
#: Default largest accepted value length (1 MiB).
DEFAULT_MAX_FRAME_SIZE = 1 << 20
#: Largest frame type (the type field is an unsigned 16-bit integer).
MAX_TYPE = 0xFFFF
#: Largest value length the 32-bit length field can express.
MAX_LENGTH = 0xFFFFFFFF

#: A decoded frame: ``(type, value)``.
Frame = Tuple[int, bytes]
BytesLike = Union[bytes, bytearray, memoryview]

_HEADER = struct.Struct(">HI")
_unpack_header = _HEADER.unpack_from
_pack_header = _HEADER.pack


class FrameTooLarge(ProtocolError):
    """Raised when a frame header declares a value longer than ``max_frame_size``."""


def encode(frame_type: int, value: BytesLike) -> bytes:
    """Return the wire bytes of one frame: 2-byte big-endian ``frame_type``, 4-byte
    big-endian length of ``value``, then ``value`` itself; raises ``ValueError`` if
    the type is outside 0..65535 or the value is longer than 2**32 - 1 bytes.
    """
    if type(value) is not bytes:
        value = bytes(value)
    if not 0 <= frame_type <= MAX_TYPE:
        raise ValueError("frame type %r outside 0..%d" % (frame_type, MAX_TYPE))
    if len(value) > MAX_LENGTH:
        raise ValueError("frame value of %d bytes does not fit a 32-bit length" % len(value))
    return _pack_header(frame_type, len(value)) + value


class Decoder:
    """Incremental TLV decoder: ``feed()`` it received bytes, get complete frames.

    Each ``feed(data)`` call returns every frame completed by ``data`` (possibly
    none) as ``(type, value)`` tuples and keeps the trailing partial frame for the
    next call.  A header whose length exceeds ``max_frame_size`` (default 1 MiB)
    raises :class:`FrameTooLarge`; after that the decoder is broken and every
    further ``feed()`` raises too.  Work per call is linear in the bytes fed: a
    large frame arriving in many chunks is accumulated, never re-scanned.
    """

    __slots__ = ("max_frame_size", "_buf", "_type", "_need", "_error")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if not 0 <= max_frame_size <= MAX_LENGTH:
            raise ValueError("max_frame_size must be within 0..2**32-1")
        self.max_frame_size = max_frame_size
        # Bytes of the partial item: header bytes while self._type < 0, else
        # value bytes of a frame whose header (type self._type) was consumed.
        self._buf = bytearray()
        self._type = -1
        self._need = HEADER_SIZE  # len(self._buf) at which the partial item completes
        self._error: Optional[ProtocolError] = None

    @property
    def buffered(self) -> int:
        """Number of received bytes held for the incomplete frame (0 at a frame boundary)."""
        return len(self._buf) + (HEADER_SIZE if self._type >= 0 else 0)

    def feed(self, data: BytesLike) -> List[Frame]:
        """Consume ``data`` and return the list of frames it completed, oldest first.

        Raises :class:`FrameTooLarge` (a :class:`ProtocolError`) on an oversized
        declared length; frames completed earlier in the same call are attached
        to the exception as ``completed``.
        """
        if self._error is not None:
            raise _rearm(self._error)
        if type(data) is not bytes:
            data = bytes(data)
        frames: List[Frame] = []
        end = len(data)
        pos = 0
        buf = self._buf
        if self._type >= 0 or buf:
            # Finish the partial frame first, copying only the bytes it needs.
            while True:
                missing = self._need - len(buf)
                if end - pos < missing:
                    buf += data[pos:]
                    return frames
                buf += data[pos : pos + missing]
                pos += missing
                if self._type < 0:
                    ftype, length = _unpack_header(buf)
                    del buf[:]
                    if length > self.max_frame_size:
                        self._fail(length, frames)
                    if length:
                        self._type = ftype
                        self._need = length
                        continue
                    frames.append((ftype, b""))
                else:
                    frames.append((self._type, bytes(buf)))
                    del buf[:]
                    self._type = -1
                    self._need = HEADER_SIZE
                break
        # Fast path: decode straight from ``data``; slices of bytes are bytes.
        max_size = self.max_frame_size
        while end - pos >= HEADER_SIZE:
            ftype, length = _unpack_header(data, pos)
            if length > max_size:
                self._fail(length, frames)
            start = pos + HEADER_SIZE
            stop = start + length
            if stop > end:
                self._type = ftype
                self._need = length
                buf += data[start:]
                return frames
            frames.append((ftype, data[start:stop]))
            pos = stop
        if pos < end:
            buf += data[pos:]
        return frames

    def eof(self) -> None:
        """Declare the end of the stream; raises ``ProtocolError`` if a frame is incomplete."""
        if self._error is not None:
            raise _rearm(self._error)
        if self.buffered:
            raise ProtocolError("stream ended inside a frame (%d bytes buffered)" % self.buffered)

    def _fail(self, length: int, frames: List[Frame]) -> None:
        exc = FrameTooLarge(
            "frame length %d exceeds max_frame_size %d" % (length, self.max_frame_size), frames
        )
        self._error = exc
        self._buf = bytearray()
        self._type = -1
        raise exc
