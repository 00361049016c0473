"""The HTTP/1.1 hello server of ``http_server.py`` on uvloop, as a measuring stick.

Same parser (``protocols/http.py``), same ``HelloApp`` producing the same
bytes, same one-write-per-read and close-on-error rules; only the I/O layer
differs: an ``asyncio.Protocol`` on uvloop (libuv) instead of a pulse
handler.  So ``wrk`` against both servers, pinned to the same core, measures
the two event loops and nothing else.

    python examples/uvloop_http_server.py --port 8081 [--loop uvloop|asyncio]
    wrk -c 100 -d 5 http://127.0.0.1:8081/

``--certfile cert.pem --keyfile key.pem`` serves HTTPS through asyncio's own
TLS (``create_server(ssl=...)``), with the context ``pulse.server_context``
builds for ``http_server.py``, so the two compare TLS with TLS.
"""

import argparse
import asyncio
import logging
import signal
import ssl
import sys
from typing import Optional

import pulse
from http_server import HelloApp
from protocols import http


class HelloProtocol(asyncio.Protocol):
    """One connection: parser per connection, one ``transport.write`` per read."""

    __slots__ = ("app", "max_head_size", "parser", "transport")

    def __init__(self, app: HelloApp, max_head_size: int) -> None:
        self.app = app
        self.max_head_size = max_head_size
        self.transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.parser = http.RequestParser(max_head_size=self.max_head_size,
                                         max_body_size=64 * 1024)

    def data_received(self, data: bytes) -> None:
        out, close = self.app.answer(self.parser, data)
        if out:
            self.transport.write(out)
        if close:
            self.transport.close()


async def serve(host: str, port: int, max_head_size: int,
                context: Optional[ssl.SSLContext] = None) -> None:
    loop = asyncio.get_running_loop()
    app = HelloApp(server_name=b"uvloop")
    server = await loop.create_server(lambda: HelloProtocol(app, max_head_size), host, port,
                                      backlog=1024, ssl=context)
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    logging.getLogger("uvloop_http").info("serving on %s:%d", host, port)
    async with server:
        await stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--max-head-size", type=int, default=http.DEFAULT_MAX_HEAD_SIZE)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--certfile", metavar="PEM", help="serve HTTPS with this certificate")
    parser.add_argument("--keyfile", metavar="PEM", help="its private key (else in --certfile)")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(message)s")
    if args.keyfile and not args.certfile:
        parser.error("--keyfile needs --certfile")
    try:
        context = pulse.server_context(args.certfile, args.keyfile) if args.certfile else None
    except ValueError as exc:
        sys.exit("uvloop_http_server.py: error: {}".format(exc))
    if args.loop == "uvloop":
        import uvloop  # only this server needs it (pip install uvloop)
        uvloop.run(serve(args.host, args.port, args.max_head_size, context))
    else:
        asyncio.run(serve(args.host, args.port, args.max_head_size, context))


if __name__ == "__main__":
    main()
