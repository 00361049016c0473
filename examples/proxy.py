"""A TCP proxy on one event loop, with backpressure in both directions.

Every accepted client gets its own upstream connection, dialed from inside
the server's loop.  When either side cannot keep up (its write backlog passes
the high-water mark) the proxy stops reading the other side until it drains,
so a slow consumer anywhere keeps memory bounded.  A half-close is forwarded:
when one side shuts down its write side (FIN), the proxy shuts down its
writes to the other (``write_eof``) and keeps carrying the other direction;
each connection closes by itself once both of its directions are done.  A
side that closes or fails closes the other once what it sent is forwarded.

    python examples/proxy.py --port 8083 --upstream 127.0.0.1:6379 [--workers N]
"""

import logging
from typing import Optional

import example_cli
import pulse


class Upstream(pulse.Handler):
    """The upstream side of one proxied client connection."""

    def __init__(self, client: pulse.Conn) -> None:
        self.client = client

    def on_data(self, conn: pulse.Conn, data: bytes) -> None:
        if not self.client.closed:
            self.client.write(data)

    def on_eof(self, conn: pulse.Conn) -> bool:
        # The upstream is done sending: so are we, towards the client.
        if not self.client.closed:
            self.client.write_eof()
        return True  # keep forwarding the client's bytes to the upstream

    def on_close(self, conn: pulse.Conn, err: Optional[BaseException]) -> None:
        if err is not None and not conn.opened:
            logging.getLogger("proxy").warning("upstream connect failed: %s", err)
        self.client.close()

    # The upstream is slow to take our writes: stop reading the client.
    def on_pause_writing(self, conn: pulse.Conn) -> None:
        if not self.client.closed:
            self.client.pause_reading()

    def on_resume_writing(self, conn: pulse.Conn) -> None:
        if not self.client.closed:
            self.client.resume_reading()


class Proxy(pulse.Handler):
    """The client side: dials the upstream on open and forwards both ways."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream

    def on_open(self, conn: pulse.Conn) -> None:
        upstream = conn.loop.dial(self.upstream, Upstream(conn))
        # Each side pauses the *other* one when it cannot keep up; pausing a
        # connection's own reads would deadlock two busy directions.
        conn.backpressure_reads = False
        upstream.backpressure_reads = False
        conn.session = upstream

    def on_data(self, conn: pulse.Conn, data: bytes) -> None:
        upstream = conn.session
        if not upstream.closed:
            upstream.write(data)  # queued until the connect completes

    def on_eof(self, conn: pulse.Conn) -> bool:
        # The client is done sending: pass its FIN on, keep the answer coming.
        if not conn.session.closed:
            conn.session.write_eof()  # after what was forwarded (or at connect)
        return True

    def on_close(self, conn: pulse.Conn, err: Optional[BaseException]) -> None:
        conn.session.close()

    # The client is slow to take our writes: stop reading the upstream.
    def on_pause_writing(self, conn: pulse.Conn) -> None:
        if not conn.session.closed:
            conn.session.pause_reading()

    def on_resume_writing(self, conn: pulse.Conn) -> None:
        if not conn.session.closed:
            conn.session.resume_reading()


def main() -> None:
    parser = example_cli.parser(__doc__, 8083)
    parser.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    args = parser.parse_args()
    pulse.parse_address(args.upstream)  # a bad --upstream fails here, before listening
    example_cli.run(Proxy(args.upstream), args)


if __name__ == "__main__":
    main()
