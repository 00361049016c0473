"""asyncio echo server (Protocol based), a peer in the pulse benchmarks.

Run as ``python bench/servers/asyncio_echo.py --port P``; bench/run.py starts it
and detects readiness by connecting. ``uvloop_echo.py`` reuses this Protocol.
"""

import argparse
import asyncio
import sys
from typing import List, Optional

BACKLOG = 4096


class EchoProtocol(asyncio.Protocol):
    """Writes every received chunk straight back on the same transport and, when
    the transport's write buffer passes its high-water mark, pauses reading until
    it drains again, so a slow reader cannot make the server buffer without bound;
    the connection is closed when the peer half-closes or disconnects."""

    def __init__(self) -> None:
        self.transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.transport = None


async def serve(host: str, port: int) -> None:
    """Listen on ``host:port`` with :class:`EchoProtocol` and serve until the
    process is stopped; the listening socket uses a large backlog so thousands of
    simultaneous connects (the idle-memory case) are not dropped."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, host, port, backlog=BACKLOG, reuse_address=True)
    async with server:
        await server.serve_forever()


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the command line shared by the asyncio and uvloop echo servers:
    ``--port`` (required) and ``--host`` (default 127.0.0.1)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the echo server on the default asyncio event loop until interrupted
    and return the process exit status."""
    args = parse_args(argv)
    try:
        asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
