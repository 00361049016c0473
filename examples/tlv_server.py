"""TLV echo server: a custom binary protocol (the Go library's custom-protocol example).

Every frame is a 2-byte big-endian type, a 4-byte big-endian length and that
many bytes of value (``examples/protocols/tlv.py``).  The server answers each
frame with the same frame, so ``examples/tlv_client.py`` can check every
byte it gets back.

What this example shows:

* the partial frame lives in the connection's session (a ``tlv.Decoder``), so
  a frame split over any number of reads is reassembled;
* one ``on_data`` answers *every* complete frame it received, with one write:
  the Go example decodes a single frame per call, so a client that pipelines
  frames stalls once the rest of its input is parked in the buffer with no
  new read to trigger the next decode;
* a frame declaring more than ``--max-frame-size`` bytes is refused as soon as
  its 6-byte header arrives: the frames before it are answered, then one
  error frame (type ``ERROR_TYPE``, value the reason) is sent and the
  connection closes.

    python examples/tlv_server.py --port 8090 [--max-frame-size BYTES] [--workers N|auto]
"""

import logging
from typing import Optional

import example_cli
import pulse
from protocols import tlv

#: Frame type of the error frame sent before closing on a protocol error.
ERROR_TYPE = 0xFFFF


class TLVEcho(pulse.Handler):
    """Answers each TLV frame with the same frame; one decoder per connection."""

    def __init__(self, max_frame_size: int = tlv.DEFAULT_MAX_FRAME_SIZE) -> None:
        tlv.Decoder(max_frame_size)  # a bad limit fails here, at start, not per connection
        self.max_frame_size = max_frame_size

    def on_open(self, conn: pulse.Conn) -> None:
        conn.session = tlv.Decoder(self.max_frame_size)

    def on_data(self, conn: pulse.Conn, data: bytes) -> None:
        try:
            frames = conn.session.feed(data)
        except tlv.ProtocolError as exc:
            # Answer what was complete before the bad header, then say why we close.
            out = [tlv.encode(ftype, value) for ftype, value in exc.completed]
            out.append(tlv.encode(ERROR_TYPE, str(exc).encode()))
            conn.write(b"".join(out))
            conn.close()
            return
        if frames:
            # One write for the whole batch: one send per read, however many frames.
            conn.write(b"".join([tlv.encode(ftype, value) for ftype, value in frames]))

    def on_close(self, conn: pulse.Conn, err: Optional[BaseException]) -> None:
        if err is not None:
            logging.getLogger("tlv").debug("%r closed: %s", conn, err)


def main() -> None:
    parser = example_cli.parser(__doc__, 8090)
    parser.add_argument("--max-frame-size", type=int, default=tlv.DEFAULT_MAX_FRAME_SIZE,
                        help="largest accepted value length in bytes (default 1 MiB)")
    args = parser.parse_args()
    example_cli.run(TLVEcho(args.max_frame_size), args)


if __name__ == "__main__":
    main()
