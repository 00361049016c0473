"""The command line every example server shares: common flags, one or many processes.

``parser()`` builds the flags (``--host``, ``--port``, ``--trigger``,
``--task-type``, ``--workers``, ``--log-level``); an example adds its own and
hands the parsed arguments and its handler to ``run()``.
"""

import argparse
import logging
import signal
from typing import Any

import pulse


def parser(doc: str, port: int) -> argparse.ArgumentParser:
    """An argument parser with the flags common to every example server."""
    result = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    result.add_argument("--host", default="127.0.0.1")
    result.add_argument("--port", type=int, default=port)
    result.add_argument("--trigger", choices=["edge", "level"], default="edge")
    result.add_argument("--task-type", choices=["loop", "pool", "thread"], default="loop")
    result.add_argument("--workers", metavar="N|auto", default="1",
                        help="reactor processes sharing the port (default 1: this process)")
    result.add_argument("--log-level", default="INFO")
    return result


def run(handler: Any, args: argparse.Namespace, **options: Any) -> None:
    """Serve ``handler`` on ``--host:--port`` in this process, or in ``--workers`` processes.

    With one worker the server runs here and SIGTERM/SIGINT stop it; with
    more, the launcher supervises forked workers (the handler reaches them as
    it is).
    """
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(message)s")
    options.update(trigger=args.trigger, task_type=args.task_type)
    address = (args.host, args.port)
    if args.workers != "1":
        pulse.serve(handler, address, workers=args.workers, **options)
        return
    server = pulse.Server(handler, **options)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    server.serve(address)
