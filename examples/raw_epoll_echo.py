"""An echo server written with nothing but ``pulse._sys``: the low level by hand.

Shows the syscall layer on its own: a poller, accept, recv_into, send.  It is
level-triggered and deliberately simple; ``pulse.Server`` is the fast path.

    python examples/raw_epoll_echo.py --port 8081 [--host 127.0.0.1] [--max-seconds N]
"""

import argparse
import socket
import time
from typing import Dict

from pulse import _sys


def serve(host: str, port: int, max_seconds: float = 0.0) -> None:
    """Echo on ``host:port`` until interrupted (or for ``max_seconds`` when > 0)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(128)
    listener.setblocking(False)
    print("raw echo listening on {}:{}".format(*listener.getsockname()), flush=True)
    poller = _sys.Poller()
    lfd = listener.fileno()
    poller.add_special(lfd)
    buffer = bytearray(65536)
    view = memoryview(buffer)
    pending: Dict[int, bytes] = {}  # fd -> bytes the socket did not take yet
    deadline = time.monotonic() + max_seconds if max_seconds > 0 else None
    try:
        while deadline is None or time.monotonic() < deadline:
            for fd, _events in poller.poll(0.2):
                if fd == lfd:
                    # accept_batch also registers each new fd for reads.
                    _sys.accept_batch(lfd, poller, True, False)
                    continue
                if fd in pending:  # writable again: send what is left first
                    rest = pending.pop(fd)
                    sent = _sys.send(fd, rest) or 0
                    if sent < len(rest):
                        pending[fd] = rest[sent:]
                        continue
                    poller.watch(fd, read=True, write=False, edge=False)
                try:
                    count = _sys.recv_into(fd, view)
                except OSError:
                    count = 0
                if count is None:
                    continue
                if count == 0:
                    pending.pop(fd, None)
                    # Closing removes the fd from the kernel's set, but not
                    # from the poller's own books (kqueue's remembers which
                    # fds it watches for writes): a reused number would
                    # inherit the stale entry.
                    poller.forget(fd)
                    _sys.close(fd)
                    continue
                data = bytes(view[:count])
                sent = _sys.send(fd, data) or 0
                if sent < count:
                    pending[fd] = data[sent:]
                    poller.watch(fd, read=False, write=True, edge=False)
    except KeyboardInterrupt:
        pass
    finally:
        poller.close()
        listener.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="echo server on pulse._sys only")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--max-seconds", type=float, default=0.0)
    args = parser.parse_args()
    serve(args.host, args.port, args.max_seconds)


if __name__ == "__main__":
    main()
