"""Echo server: every byte received is written back.

    python examples/echo_server.py --port 8080 [--host 127.0.0.1] [--trigger edge|level]
"""

import argparse
import logging
import signal

import pulse


class Echo(pulse.Handler):
    """Writes back whatever arrives."""

    def on_data(self, conn: pulse.Conn, data: bytes) -> None:
        conn.write(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--trigger", choices=["edge", "level"], default="edge")
    parser.add_argument("--task-type", choices=["loop", "pool", "thread"], default="loop")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(message)s")
    server = pulse.Server(Echo(), trigger=args.trigger, task_type=args.task_type)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    server.serve((args.host, args.port))


if __name__ == "__main__":
    main()
