"""The command line: ``pulse serve MODULE:ATTR --bind ADDR --workers N|auto``.

Also reachable as ``python -m pulse``.  It parses the flags, imports the
application in this process (so that a broken import fails before any worker
exists), picks up systemd's sockets, and hands everything to
``pulse.launch.serve``.  Every start-up failure ends with one line on
stderr, ``pulse: error: ...``, and a non-zero exit status (2 for a bad flag,
1 for the rest), the way operators expect from gunicorn or nginx.
"""

import argparse
import functools
import logging
import os
import sys
import traceback
from typing import Any, Dict, List, NoReturn, Optional, Sequence

from . import __version__
from .launch import LaunchError, load_target, serve, systemd_listen_fds
from .options import FIELDS, Field, check_seconds

#: Where to listen when neither --bind, --fd nor systemd says (gunicorn's default).
DEFAULT_BIND = "127.0.0.1:8000"
#: Seconds a stopping worker gives its connections before closing them
#: (gunicorn's default; systemd's own stop timeout is 90 s).
DEFAULT_GRACEFUL_TIMEOUT = 30.0
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
#: What ``--proxy-protocol`` takes (``any``: either version).
PROXY_VERSIONS = ("v1", "v2", "any")

#: The level ``--log-level`` sets when not given (the workers' and the supervisor's).
DEFAULT_LOG_LEVEL = "info"

#: The ``pulse.Options`` fields that are "server options" flags, and
#: (``SERVER_OPTIONS``) the keyword names they are passed on as: every field
#: but those the launcher has flags of its own for (``reuse_port``:
#: ``--reuse-port``; ``shutdown_timeout``: ``--graceful-timeout``).
SERVER_FIELDS = tuple(field for field in FIELDS if field.cli)
SERVER_OPTIONS = tuple(field.name for field in SERVER_FIELDS)


def backend_choices() -> List[str]:
    """The ``--backend`` choices: every registered backend, in order of preference."""
    from ._sys import backend_names
    return list(backend_names())


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``pulse serve: error: ...``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, "{}: error: {} (see '{} --help')\n".format(self.prog, message, self.prog))


def _workers(text: str) -> str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError("must be a number >= 1 or 'auto', got {!r}".format(text))
    return str(value)


def _to_seconds(text: str, positive: bool) -> float:
    """``text`` as seconds by ``check_seconds``, the rule of every duration in pulse."""
    try:
        value: Any = float(text)
    except ValueError:
        value = text  # not a number: check_seconds says so
    try:
        return check_seconds("the value", value, positive=positive)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_seconds(text: str) -> float:
    return _to_seconds(text, positive=True)


def _seconds(text: str) -> float:
    return _to_seconds(text, positive=False)


def _fd(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError("must be a file descriptor number, got {!r}".format(text))
    return value


class _ProxyProtocolFlag(argparse.Action):
    """``--proxy-protocol [v1|v2|any]``: the version may be left out (``any``).

    An optional value makes argparse take the next word for it, so in
    ``pulse serve --proxy-protocol myapp:App`` a word with a colon is not
    a version but the application, kept for ``main`` (``displaced_app``).
    """

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: Optional[str] = None) -> None:
        if values is None:
            values = "any"
        elif values not in PROXY_VERSIONS:
            if ":" not in values:
                raise argparse.ArgumentError(self, "must be one of {}, got {!r}".format(
                    ", ".join(PROXY_VERSIONS), values))
            namespace.displaced_app = values
            values = "any"
        setattr(namespace, self.dest, True if values == "any" else values)


def build_parser() -> argparse.ArgumentParser:
    """The ``pulse`` argument parser (its ``serve`` subcommand holds the flags)."""
    parser = _Parser(prog="pulse", description="pulse: a minimal, fast async TCP server.")
    parser.add_argument("--version", action="version", version="pulse " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve_cmd = commands.add_parser(
        "serve", help="serve a handler with one or more reactor processes",
        description="Serve MODULE:ATTR (a handler class, a handler instance or a factory "
                    "returning one) with reactor processes that share the listening port. "
                    "SIGTERM/SIGINT stop gracefully, SIGHUP replaces the workers one at a "
                    "time, SIGQUIT stops at once.")
    serve_cmd.set_defaults(serve_parser=serve_cmd)  # its errors say "pulse serve: error"
    # nargs="?" only for --proxy-protocol's sake (see _ProxyProtocolFlag):
    # main() still demands it.
    serve_cmd.add_argument("app", metavar="MODULE:ATTR", nargs="?",
                           help="what to serve, e.g. myapp:Echo or myapp:make_handler")
    where = serve_cmd.add_argument_group("listening and processes")
    where.add_argument("-b", "--bind", action="append", metavar="ADDR",
                       help="address to listen on: host:port, :port, [::1]:port or unix:/path; "
                            "repeat for several (default: {}, unless --fd or systemd passes "
                            "sockets)".format(DEFAULT_BIND))
    where.add_argument("--fd", action="append", type=_fd, default=[], metavar="N",
                       help="serve the inherited listening socket N; repeatable (systemd "
                            "sockets, LISTEN_FDS, are picked up without it)")
    where.add_argument("-w", "--workers", type=_workers, default="1", metavar="N|auto",
                       help="reactor processes; 'auto' is one per core (default: 1)")
    where.add_argument("--graceful-timeout", type=_seconds, default=DEFAULT_GRACEFUL_TIMEOUT,
                       metavar="S", help="seconds a stopping worker lets its connections "
                       "finish before closing them (default: %(default)s)")
    where.add_argument("--stats-interval", type=_positive_seconds, metavar="S",
                       help="log each worker's stats (connections, bytes in/out, loop "
                            "utilisation, errors, CPU, RSS) every S seconds")
    where.add_argument("--metrics", metavar="ADDR",
                       help="serve the workers' counters in the Prometheus text format at "
                            "http://ADDR/metrics, e.g. 127.0.0.1:9100")
    where.add_argument("--reuse-port", action=argparse.BooleanOptionalAction, default=None,
                       help="one SO_REUSEPORT socket per worker, the kernel spreading "
                            "connections (default: on Linux); --no-reuse-port shares one socket")
    where.add_argument("--app-dir", default=".", metavar="DIR",
                       help="directory put first on sys.path to import MODULE from "
                            "(default: the current directory)")
    tls = serve_cmd.add_argument_group(
        "TLS", "serve TLS on every listener; SIGHUP reloads the files (renewed certificates)")
    tls.add_argument("--certfile", metavar="FILE",
                     help="PEM certificate chain (and the private key, unless --keyfile)")
    tls.add_argument("--keyfile", metavar="FILE", help="PEM private key (unencrypted)")
    tls.add_argument("--ca-certs", metavar="FILE",
                     help="PEM CA certificates that client certificates are checked against")
    tls.add_argument("--require-client-cert", action="store_true",
                     help="mutual TLS: refuse clients without a certificate signed by "
                          "--ca-certs")
    tls.add_argument("--alpn", metavar="PROTOCOLS",
                     help="ALPN protocols offered, in order of preference, e.g. h2,http/1.1")
    opts = serve_cmd.add_argument_group("server options (see pulse.Options)")
    for field in SERVER_FIELDS:
        opts.add_argument("--" + field.name.replace("_", "-"), **_flag(field))
    return parser


def _flag(field: Field[Any]) -> Dict[str, Any]:
    """The ``add_argument`` keywords of the flag for an ``Options`` field.

    A flag left out is not passed on (its default is ``None``), so
    ``pulse.Options`` keeps the one default; ``--log-level`` alone has one of
    its own, since it also sets the supervisor's logging.
    """
    if field.kind == "bool":
        return {"action": argparse.BooleanOptionalAction, "default": None,
                "help": "{} (default: {})".format(field.help, "on" if field.default else "off")}
    if field.kind == "int":
        return {"type": int, "metavar": field.metavar, "help": field.help}
    if field.kind == "seconds":
        return {"type": _positive_seconds if field.positive else _seconds,
                "metavar": field.metavar, "help": field.help}
    if field.kind == "choice":
        return {"choices": field.choices, "help": field.help}
    if field.kind == "backend":
        return {"choices": backend_choices(), "help": field.help}
    if field.kind == "proxy_protocol":
        return {"action": _ProxyProtocolFlag, "nargs": "?", "metavar": field.metavar,
                "help": field.help + " (default: off; the flag alone: any)"}
    if field.kind == "networks":
        return {"metavar": field.metavar, "help": field.help}
    if field.kind == "log_level":
        return {"type": str.lower, "choices": LOG_LEVELS, "default": DEFAULT_LOG_LEVEL,
                "help": "log level of the supervisor and the workers (default: %(default)s)"}
    raise ValueError("no command-line flag for option kind {!r} ({})".format(
        field.kind, field.name))


def server_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The ``Server`` keyword options given on the command line (unset ones omitted)."""
    return {name: getattr(args, name) for name in SERVER_OPTIONS
            if getattr(args, name, None) is not None}


def tls_factory(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Any:
    """What ``--certfile`` and company ask for: a function building the
    ``SSLContext`` (called at start and again on SIGHUP), or ``None``."""
    if args.certfile is None:
        for flag in ("keyfile", "ca_certs", "require_client_cert", "alpn"):
            if getattr(args, flag):
                parser.error("--{} needs --certfile".format(flag.replace("_", "-")))
        return None
    if args.require_client_cert and not args.ca_certs:
        parser.error("--require-client-cert needs --ca-certs")
    from .tlsconfig import parse_alpn, server_context
    try:
        alpn = parse_alpn(args.alpn)
    except ValueError as exc:
        parser.error("--alpn: {}".format(exc))
    return functools.partial(server_context, args.certfile, args.keyfile, ca_certs=args.ca_certs,
                             require_client_cert=args.require_client_cert, alpn=alpn)


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename is None:
        return exc.strerror  # pulse's OSErrors carry the whole sentence here
    return str(exc) or type(exc).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns
    the exit status: 0 after a graceful stop, 1 when start-up failed, 2 for
    bad flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.app is None:
        args.app = getattr(args, "displaced_app", None)
        if args.app is None:
            args.serve_parser.error("the following arguments are required: MODULE:ATTR")
    elif getattr(args, "displaced_app", None) is not None:
        args.serve_parser.error("unrecognized arguments: {}".format(args.displaced_app))
    ssl = tls_factory(args.serve_parser, args)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s [%(process)d] %(levelname)s %(message)s")
    try:
        fds: List[int] = list(args.fd) + systemd_listen_fds()
        addresses = list(args.bind or ([] if fds else [DEFAULT_BIND]))
        app_dir = os.path.abspath(args.app_dir)
        if app_dir not in sys.path:
            sys.path.insert(0, app_dir)
        target = load_target(args.app)
        serve(target, addresses, workers=args.workers, fds=fds,
              graceful_timeout=args.graceful_timeout, stats_interval=args.stats_interval,
              reuse_port=args.reuse_port, ssl=ssl, metrics=args.metrics, **server_options(args))
    except (LaunchError, OSError, ValueError, TypeError) as exc:
        if args.log_level == "debug":
            traceback.print_exc()
        print("pulse: error: {}".format(_message(exc)), file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the supervisor handles signals
        return 130
    return 0
