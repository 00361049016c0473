"""Echo server: every byte received is written back.

    python examples/echo_server.py --port 8080 [--host 127.0.0.1] [--trigger edge|level]
                                   [--workers N|auto]

With ``--workers`` it runs that many reactor processes on the port
(``pulse.launcher.serve``: SIGHUP replaces them one at a time, a dead one is
restarted); without it, one ``pulse.Server`` in this process.
"""

import argparse
import logging
import signal

import pulse
import pulse.launcher


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
    parser.add_argument("--workers", metavar="N|auto",
                        help="reactor processes sharing the port (default: one, in this process)")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(message)s")
    if args.workers is not None:
        # Echo is defined in this script; fork hands it to the workers as is.
        pulse.launcher.serve(Echo, (args.host, args.port), workers=args.workers,
                             trigger=args.trigger, task_type=args.task_type)
        return
    server = pulse.Server(Echo(), trigger=args.trigger, task_type=args.task_type)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    server.serve((args.host, args.port))


if __name__ == "__main__":
    main()
