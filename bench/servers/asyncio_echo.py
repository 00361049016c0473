"""asyncio echo server (Protocol based), a peer in the pulse benchmarks.

Run as ``python bench/servers/asyncio_echo.py --port P [--certfile PEM
--keyfile PEM]``; bench/run.py starts it and detects readiness by connecting.
With ``--certfile`` the port serves TLS (asyncio's SSL layer over the
transport). ``uvloop_echo.py`` reuses this Protocol and these flags.
"""

import argparse
import asyncio
import ssl
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


def tls_context(certfile: Optional[str], keyfile: Optional[str]) -> Optional[ssl.SSLContext]:
    """The server context for ``--certfile``/``--keyfile`` (None without a
    certificate): the same settings as ``pulse.server_context``, i.e. Python's
    default server context with TLS 1.2 at least, so every server in a TLS
    case negotiates the same protocol, cipher and key exchange."""
    if certfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if context.minimum_version.value < ssl.TLSVersion.TLSv1_2.value:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    return context


async def serve(host: str, port: int, context: Optional[ssl.SSLContext] = None) -> None:
    """Listen on ``host:port`` with :class:`EchoProtocol` (over TLS when
    ``context`` is given) and serve until the process is stopped; the listening
    socket uses a large backlog so thousands of simultaneous connects (the
    idle-memory case) are not dropped."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, host, port, backlog=BACKLOG, reuse_address=True,
                                      ssl=context)
    async with server:
        await server.serve_forever()


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the command line shared by the asyncio and uvloop echo servers:
    ``--port`` (required), ``--host`` (default 127.0.0.1) and, for TLS,
    ``--certfile`` with an optional ``--keyfile``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--certfile", metavar="PEM", help="serve TLS with this certificate (chain)")
    parser.add_argument("--keyfile", metavar="PEM", help="its private key, if not in --certfile")
    args = parser.parse_args(argv)
    if args.keyfile is not None and args.certfile is None:
        parser.error("--keyfile needs --certfile")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    """Run the echo server on the default asyncio event loop until interrupted
    and return the process exit status."""
    args = parse_args(argv)
    context = tls_context(args.certfile, args.keyfile)
    try:
        asyncio.run(serve(args.host, args.port, context))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
