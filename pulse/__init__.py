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

from ._sys import BACKEND
from .address import parse_address
from .client import Client
from .conn import Conn
from .errors import ConnClosedError, PulseError, ServerStateError, WriteBufferFullError
from .handler import Handler, callbacks
from .launcher import LaunchError, serve
from .loop import EventLoop
from .options import Options
from .server import Server
from .timers import TimerHandle

__version__ = "0.1.0"

__all__ = [
    "BACKEND", "Client", "Conn", "ConnClosedError", "EventLoop", "Handler", "LaunchError", "Options", "PulseError",
    "Server", "ServerStateError", "TimerHandle", "WriteBufferFullError", "callbacks",
    "parse_address", "serve", "__version__",
]
