"""pulse: a minimal, fast asynchronous network library.

Three callbacks (``on_open``, ``on_data``, ``on_close``) over an
edge-triggered epoll/kqueue reactor driven through cffi::

    import pulse

    class Echo(pulse.Handler):
        def on_data(self, conn, data):
            conn.write(data)

    pulse.Server(Echo()).serve("127.0.0.1:8080")

``pulse._sys`` is the documented low-level layer (poller and socket calls).
"""

from typing import TYPE_CHECKING, Any

from ._sys.registry import BackendUnavailableError
from .address import Address, AddressLike, parse_address
from .client import Client
from .conn import Conn
from .errors import (ConnClosedError, LaunchError, PulseError, ServerStateError,
                     WriteBufferFullError)
from .handler import Handler, HandlerProtocol, callbacks
from .loop import EventLoop
from .options import Options
from .server import Server
from .stats import Stats
from .timers import TimerHandle

if TYPE_CHECKING:  # pragma: no cover
    from .launch import serve
    from .tlsconfig import server_context

__version__ = "0.1.0"

__all__ = [
    "Address", "AddressLike", "BACKEND", "BackendUnavailableError", "Client", "Conn",
    "ConnClosedError", "EventLoop", "Handler", "HandlerProtocol", "LaunchError", "Options",
    "PulseError", "Server", "ServerStateError", "Stats", "TimerHandle", "WriteBufferFullError",
    "callbacks", "parse_address", "serve", "server_context", "__version__",
]


def __getattr__(name: str) -> Any:
    """Names imported on first use, so that ``import pulse`` never fails and
    stays light: ``pulse.BACKEND`` loads the backend (which may fall back to
    the portable one, with a warning), ``pulse.serve`` the launcher (which
    needs POSIX signals), ``pulse.server_context`` the TLS files' context."""
    if name == "BACKEND":
        from . import _sys
        return _sys.BACKEND
    if name == "serve":
        from .launch import serve
        globals()["serve"] = serve  # once: later lookups find it without this hook
        return serve
    if name == "server_context":
        from .tlsconfig import server_context
        globals()["server_context"] = server_context
        return server_context
    raise AttributeError("module {!r} has no attribute {!r}".format(__name__, name))
