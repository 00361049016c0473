"""uvloop echo server, a peer in the pulse benchmarks: the asyncio Protocol
from ``asyncio_echo.py`` run on uvloop's event loop.

Run as ``python bench/servers/uvloop_echo.py --port P [--certfile PEM --keyfile
PEM]``; with ``--certfile`` it serves TLS through uvloop's SSL layer (its
Cython port of asyncio's).
"""

import asyncio
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import uvloop  # noqa: E402

from asyncio_echo import parse_args, serve, tls_context  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    """Run the shared asyncio echo server on a uvloop event loop until
    interrupted and return the process exit status."""
    args = parse_args(argv)
    context = tls_context(args.certfile, args.keyfile)
    try:
        if hasattr(uvloop, "run"):
            uvloop.run(serve(args.host, args.port, context))
        else:  # uvloop < 0.18
            uvloop.install()
            asyncio.run(serve(args.host, args.port, context))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
