"""gevent echo server (StreamServer, one greenlet per connection), a peer in
the pulse benchmarks.

Run as ``python bench/servers/gevent_echo.py --port P``.
"""

import argparse
import socket
import sys
from typing import Any, List, Optional, Tuple

from gevent.server import StreamServer

BACKLOG = 4096
READ_SIZE = 65536


def handle(sock: Any, address: Tuple[str, int]) -> None:
    """Echo everything received on ``sock`` until the peer closes; TCP_NODELAY is
    set to match the other servers (asyncio and uvloop set it by default), and
    socket errors simply end the connection."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    recv = sock.recv
    sendall = sock.sendall
    try:
        while True:
            data = recv(READ_SIZE)
            if not data:
                break
            sendall(data)
    except OSError:
        pass
    finally:
        sock.close()


def main(argv: Optional[List[str]] = None) -> int:
    """Parse ``--host``/``--port``, start a gevent StreamServer with a large
    backlog and serve until interrupted, returning the exit status."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    server = StreamServer((args.host, args.port), handle, backlog=BACKLOG)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
