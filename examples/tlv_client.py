"""TLV client on pulse.Client: pipelines frames to a TLV echo server and checks every reply.

Each connection keeps ``--pipeline`` frames in flight: it sends that many in
one write, and for every echoed frame that comes back (checked byte for byte
against what was sent) it sends the next one, until ``--frames`` frames made
the round trip.  It is the client side of ``examples/tlv_server.py`` and
shows the outgoing half of pulse: ``pulse.Client().dial(...)`` gives a
``Conn`` driven by the same three callbacks as a server's connections, and a
failed connect arrives as ``on_close(conn, err)`` without ``on_open``.

    python examples/tlv_client.py --port 8090 [--connections 4] [--frames 1000]
        [--size 64] [--pipeline 16] [--timeout 10]
        [--tls [--cafile ca.pem] [--server-hostname localhost]]

``--tls`` dials over TLS (``dial(..., ssl=context)``, the context
``ssl.create_default_context(cafile=...)``): the server's certificate is
checked against ``--cafile`` (default: the system's CAs) and
``--server-hostname`` (default: ``--host``); a failed handshake is a failed
connect.  The server side is ``examples/tlv_server.py --certfile ...``.

Prints one summary line and exits 0 when every frame came back intact, 1
otherwise (with the reason on stderr).
"""

import argparse
import collections
import logging
import ssl
import sys
import threading
import time
from typing import Callable, Deque, List, Optional

import pulse
from protocols import tlv

#: The server's error frame type (see ``examples/tlv_server.py``).
ERROR_TYPE = 0xFFFF


def make_frame(conn_id: int, seq: int, size: int) -> tlv.Frame:
    """The ``seq``-th frame of connection ``conn_id``: a type below ``ERROR_TYPE``
    and a ``size``-byte value that names its connection and sequence number
    (so a reply routed to the wrong connection or reordered is caught)."""
    label = b"%d:%d:" % (conn_id, seq)
    value = (label + b"." * size)[:size]
    return seq % ERROR_TYPE, value


class FrameSession:
    """Per-connection state: the decoder, the frames in flight, the counters."""

    __slots__ = ("conn_id", "decoder", "in_flight", "sent", "received", "error")

    def __init__(self, conn_id: int, max_frame_size: int) -> None:
        self.conn_id = conn_id
        self.decoder = tlv.Decoder(max_frame_size)
        self.in_flight: Deque[tlv.Frame] = collections.deque()
        self.sent = 0
        self.received = 0
        self.error: Optional[str] = None


class TLVClient(pulse.Handler):
    """Sends ``frames`` frames of ``size`` bytes per connection, ``pipeline`` at a
    time, and verifies the echoes; ``on_done(failures)`` runs once every dialed
    connection has closed, with one message per connection that failed."""

    def __init__(self, frames: int, size: int, pipeline: int, timeout: float,
                 connections: int, on_done: Callable[[List[str]], None]) -> None:
        self.frames = frames
        self.size = size
        self.pipeline = pipeline
        self.timeout = timeout
        self.on_done = on_done
        self.failures: List[str] = []
        self._open = connections
        self._next_id = 0
        # In pool/thread mode callbacks of different connections run in
        # parallel threads: the shared counters need a lock.
        self._lock = threading.Lock()

    def on_open(self, conn: pulse.Conn) -> None:
        with self._lock:
            conn_id = self._next_id
            self._next_id += 1
        # Echoes are at most ``size`` bytes; anything larger is a server bug.
        session = FrameSession(conn_id, max(self.size, 64))
        conn.session = session
        # Deadlines are absolute: this bounds the whole exchange, not each read.
        conn.set_read_deadline(self.timeout)
        self._send(conn, session, min(self.pipeline, self.frames))

    def on_data(self, conn: pulse.Conn, data: bytes) -> None:
        session: FrameSession = conn.session
        try:
            replies = session.decoder.feed(data)
        except tlv.ProtocolError as exc:
            session.error = "bad reply stream: %s" % exc
            conn.close()
            return
        in_flight = session.in_flight
        for frame in replies:
            if frame[0] == ERROR_TYPE:
                session.error = "server error frame: %s" % frame[1].decode(errors="replace")
            elif not in_flight:
                session.error = "unsolicited frame of type %d" % frame[0]
            elif in_flight.popleft() != frame:
                session.error = "frame %d came back altered" % session.received
            if session.error is not None:
                conn.close()
                return
            session.received += 1
        if session.received == self.frames:
            conn.close()
        elif replies:
            # Refill the window: one new frame per echo, in one write.
            self._send(conn, session, min(len(replies), self.frames - session.sent))

    def on_close(self, conn: pulse.Conn, err: Optional[BaseException]) -> None:
        session: Optional[FrameSession] = conn.session
        failure = None
        if session is None:  # the connect or the TLS handshake failed: on_open never ran
            failure = "connect failed: %s: %s" % (type(err).__name__, err)
        elif session.error is not None:
            failure = "connection %d: %s" % (session.conn_id, session.error)
        elif session.received != self.frames:
            failure = "connection %d: closed after %d of %d frames (%s)" % (
                session.conn_id, session.received, self.frames, err or "server closed")
        with self._lock:
            if failure is not None:
                self.failures.append(failure)
            self._open -= 1
            done = self._open == 0
        if done:
            self.on_done(self.failures)

    def _send(self, conn: pulse.Conn, session: FrameSession, count: int) -> None:
        out = []
        for _ in range(count):
            frame = make_frame(session.conn_id, session.sent, self.size)
            session.in_flight.append(frame)
            session.sent += 1
            out.append(tlv.encode(*frame))
        if out:
            conn.write(b"".join(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--connections", type=int, default=4, help="parallel connections")
    parser.add_argument("--frames", type=int, default=1000, help="frames per connection")
    parser.add_argument("--size", type=int, default=64, help="value bytes per frame")
    parser.add_argument("--pipeline", type=int, default=16, help="frames in flight per connection")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds for the whole run")
    parser.add_argument("--trigger", choices=["edge", "level"], default="edge")
    parser.add_argument("--task-type", choices=["loop", "pool", "thread"], default="loop")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--tls", action="store_true", help="dial over TLS")
    parser.add_argument("--cafile", metavar="PEM",
                        help="with --tls: CA the server's certificate is checked against")
    parser.add_argument("--server-hostname", metavar="NAME",
                        help="with --tls: name the certificate must match (default: --host)")
    args = parser.parse_args()
    if min(args.connections, args.frames, args.pipeline) < 1 or args.size < 0:
        parser.error("--connections, --frames and --pipeline must be >= 1, --size >= 0")
    if not args.tls and (args.cafile or args.server_hostname):
        parser.error("--cafile and --server-hostname need --tls")
    context = None
    if args.tls:
        try:
            context = ssl.create_default_context(cafile=args.cafile)
        except (OSError, ssl.SSLError) as exc:
            parser.error("--cafile %s: %s" % (args.cafile, exc))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(message)s")

    client = pulse.Client(trigger=args.trigger, task_type=args.task_type)
    result: List[List[str]] = []

    def on_done(failures: List[str]) -> None:
        result.append(failures)
        client.stop()  # safe from a callback: run() returns once the loop winds down

    handler = TLVClient(args.frames, args.size, args.pipeline, args.timeout,
                        args.connections, on_done)
    started = time.perf_counter()
    for _ in range(args.connections):
        client.dial((args.host, args.port), handler, timeout=args.timeout, ssl=context,
                    server_hostname=args.server_hostname)
    client.run()
    elapsed = time.perf_counter() - started
    failures = result[0] if result else ["the client loop stopped early"]
    if failures:
        for failure in failures:
            print("tlv_client: " + failure, file=sys.stderr)
        sys.exit(1)
    total = args.connections * args.frames
    print("%d frames of %d bytes over %d connections in %.3f s (%.0f frames/s), all verified"
          % (total, args.size, args.connections, elapsed, total / elapsed))


if __name__ == "__main__":
    main()
