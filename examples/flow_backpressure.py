"""Backpressure demo (the Go library's flow example): every read is answered with 10 KB.

A client that sends fast and reads slowly makes the server's write backlog
pass ``write_buffer_high_water``; pulse then stops reading that connection
until the client catches up, so the server's memory stays bounded.

    python examples/flow_backpressure.py --port 8082 [--host ...] [--trigger ...] [--task-type ...]
"""

import argparse
import logging
import signal

import pulse

REPLY = b"x" * 10_000


class Flow(pulse.Handler):
    """Answers every chunk received with 10 KB; logs backpressure transitions."""

    def on_data(self, conn: pulse.Conn, data: bytes) -> None:
        conn.write(REPLY)

    def on_pause_writing(self, conn: pulse.Conn) -> None:
        logging.getLogger("flow").debug("%r: backlog %d bytes, reading paused",
                                        conn, conn.write_buffer_size)

    def on_resume_writing(self, conn: pulse.Conn) -> None:
        logging.getLogger("flow").debug("%r: drained, reading resumed", conn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8082)
    parser.add_argument("--trigger", choices=["edge", "level"], default="edge")
    parser.add_argument("--task-type", choices=["loop", "pool", "thread"], default="loop")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(message)s")
    server = pulse.Server(Flow(), trigger=args.trigger, task_type=args.task_type)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    server.serve((args.host, args.port))


if __name__ == "__main__":
    main()
