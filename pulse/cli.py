"""The command line: ``pulse serve MODULE:ATTR --bind ADDR --workers N|auto``.

Also reachable as ``python -m pulse``.  It parses the flags, imports the
application in this process (so that a broken import fails before any worker
exists), picks up systemd's sockets, and hands everything to
``pulse.launcher.serve``.  Every start-up failure ends with one line on
stderr, ``pulse: error: ...``, and a non-zero exit status (2 for a bad flag,
1 for the rest), the way operators expect from gunicorn or nginx.
"""

import argparse
import logging
import os
import sys
import traceback
from typing import Any, Dict, List, Optional, Sequence

from . import __version__
from .launcher import LaunchError, load_target, serve, systemd_listen_fds

#: Where to listen when neither --bind, --fd nor systemd says (gunicorn's default).
DEFAULT_BIND = "127.0.0.1:8000"
#: Seconds a stopping worker gives its connections before closing them
#: (gunicorn's default; systemd's own stop timeout is 90 s).
DEFAULT_GRACEFUL_TIMEOUT = 30.0
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")

#: The ``Server`` options the command line passes on, by their keyword names.
#: ``reuse_port`` and ``shutdown_timeout`` are the launcher's own flags
#: (``--reuse-port``, ``--graceful-timeout``).
SERVER_OPTIONS = (
    "trigger", "task_type", "pool_size", "read_buffer_size", "max_events",
    "max_reads_per_event", "backlog", "tcp_nodelay", "tcp_keepalive", "zero_copy",
    "write_buffer_high_water", "write_buffer_low_water", "write_buffer_limit",
    "idle_timeout", "log_level", "backend",
)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``pulse serve: error: ...``."""

    def error(self, message: str) -> Any:  # type: ignore[override]
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


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a number of seconds > 0, got {!r}".format(text))
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be a number of seconds >= 0, got {!r}".format(text))
    return value


def _fd(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError("must be a file descriptor number, got {!r}".format(text))
    return value


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
    serve_cmd.add_argument("app", metavar="MODULE:ATTR",
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
                       help="log each worker's connections, bytes in/out, CPU and RSS "
                            "every S seconds")
    where.add_argument("--reuse-port", action=argparse.BooleanOptionalAction, default=None,
                       help="one SO_REUSEPORT socket per worker, the kernel spreading "
                            "connections (default: on Linux); --no-reuse-port shares one socket")
    where.add_argument("--app-dir", default=".", metavar="DIR",
                       help="directory put first on sys.path to import MODULE from "
                            "(default: the current directory)")
    opts = serve_cmd.add_argument_group("server options (see pulse.Options)")
    opts.add_argument("--trigger", choices=["edge", "level"], help="epoll/kqueue trigger mode")
    opts.add_argument("--task-type", choices=["loop", "pool", "thread"],
                      help="where callbacks run: the loop, a thread pool, a thread each")
    opts.add_argument("--pool-size", type=int, metavar="N", help="threads in pool mode")
    opts.add_argument("--read-buffer-size", type=int, metavar="BYTES", help="bytes per read")
    opts.add_argument("--max-events", type=int, metavar="N", help="events per poll")
    opts.add_argument("--max-reads-per-event", type=int, metavar="N",
                      help="reads of one socket per poll round")
    opts.add_argument("--backlog", type=int, metavar="N", help="listen backlog")
    opts.add_argument("--tcp-nodelay", action=argparse.BooleanOptionalAction, default=None,
                      help="TCP_NODELAY on accepted sockets (default: on)")
    opts.add_argument("--tcp-keepalive", action=argparse.BooleanOptionalAction, default=None,
                      help="SO_KEEPALIVE on accepted sockets (default: off)")
    opts.add_argument("--zero-copy", action=argparse.BooleanOptionalAction, default=None,
                      help="on_data gets a memoryview valid during the call (loop mode)")
    opts.add_argument("--write-buffer-high-water", type=int, metavar="BYTES",
                      help="stop reading a connection whose write backlog passes this")
    opts.add_argument("--write-buffer-low-water", type=int, metavar="BYTES",
                      help="resume reading once the backlog falls below this")
    opts.add_argument("--write-buffer-limit", type=int, metavar="BYTES",
                      help="close a connection whose backlog passes this (0: no cap)")
    opts.add_argument("--idle-timeout", type=_positive_seconds, metavar="S",
                      help="close connections idle this long")
    opts.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default="info",
                      help="log level of the supervisor and the workers (default: info)")
    opts.add_argument("--backend", choices=["epoll", "kqueue", "portable"],
                      help="syscall backend (default: this OS's native one)")
    return parser


def server_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The ``Server`` keyword options given on the command line (unset ones omitted)."""
    return {name: getattr(args, name) for name in SERVER_OPTIONS
            if getattr(args, name, None) is not None}


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
              reuse_port=args.reuse_port, **server_options(args))
    except (LaunchError, OSError, ValueError, TypeError) as exc:
        if args.log_level == "debug":
            traceback.print_exc()
        print("pulse: error: {}".format(_message(exc)), file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the supervisor handles signals
        return 130
    return 0
