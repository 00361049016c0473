"""The command line every example server shares: common flags, one or many processes.

``parser()`` builds the flags (``--host``, ``--port``, ``--trigger``,
``--task-type``, ``--workers``, ``--log-level``, and the TLS ones:
``--certfile``, ``--keyfile``, ``--ca-certs``, ``--alpn``); an example adds
its own and hands the parsed arguments and its handler to ``run()``.
"""

import argparse
import functools
import logging
import os
import signal
import ssl
import sys
from typing import Any, Optional

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
    tls = result.add_argument_group("TLS", "with --certfile the port serves TLS only")
    tls.add_argument("--certfile", metavar="PEM",
                     help="certificate chain (and the private key, unless --keyfile)")
    tls.add_argument("--keyfile", metavar="PEM", help="private key (unencrypted)")
    tls.add_argument("--ca-certs", metavar="PEM",
                     help="CA that client certificates (optional ones) are checked against")
    tls.add_argument("--alpn", metavar="PROTOCOLS",
                     help="ALPN protocols offered, in order of preference, e.g. http/1.1")
    return result


def tls_context(args: argparse.Namespace) -> Optional[ssl.SSLContext]:
    """The server context the TLS flags ask for (``None`` without ``--certfile``);
    ``ValueError`` naming the file or the flag when they are wrong."""
    if args.certfile is None:
        for flag in ("keyfile", "ca_certs", "alpn"):
            if getattr(args, flag) is not None:
                raise ValueError("--{} needs --certfile".format(flag.replace("_", "-")))
        return None
    return pulse.server_context(args.certfile, args.keyfile, ca_certs=args.ca_certs,
                                alpn=args.alpn)


def run(handler: Any, args: argparse.Namespace, **options: Any) -> None:
    """Serve ``handler`` on ``--host:--port`` in this process, or in ``--workers`` processes.

    With one worker the server runs here and SIGTERM/SIGINT stop it; with
    more, the launcher supervises forked workers (the handler reaches them as
    it is), and SIGHUP reads the TLS files again for the replaced workers.
    """
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(message)s")
    try:
        # Built here once even with --workers, so a bad file is one line, not a traceback.
        context = tls_context(args)
    except ValueError as exc:
        sys.exit("{}: error: {}".format(os.path.basename(sys.argv[0]), exc))
    options.update(trigger=args.trigger, task_type=args.task_type)
    address = (args.host, args.port)
    if args.workers != "1":
        # A factory, not the context: the launcher calls it again on SIGHUP.
        source = functools.partial(tls_context, args) if context is not None else None
        pulse.serve(handler, address, workers=args.workers, ssl=source, **options)
        return
    server = pulse.Server(handler, ssl=context, **options)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    server.serve(address)
