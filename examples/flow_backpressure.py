"""Backpressure demo (the Go library's flow example): every read is answered with 10 KB.

A client that sends fast and reads slowly makes the server's write backlog
pass ``write_buffer_high_water``; pulse then stops reading that connection
until the client catches up, so the server's memory stays bounded.

    python examples/flow_backpressure.py --port 8082 [--host ...] [--trigger ...] [--task-type ...]
"""

import logging

import example_cli
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
    parser = example_cli.parser(__doc__, 8082)
    example_cli.run(Flow(), parser.parse_args())


if __name__ == "__main__":
    main()
