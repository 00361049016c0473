"""Exceptions that pulse raises or hands to ``on_close``."""

import os


class PulseError(Exception):
    """Base class of pulse's own exceptions."""


class ConnClosedError(ConnectionError, PulseError):
    """The connection is closed (or closing): it accepts no more writes."""


class WriteBufferFullError(ConnectionError, PulseError):
    """The write buffer passed its hard cap (``write_buffer_limit``); the connection was closed."""


class ServerStateError(RuntimeError, PulseError):
    """The server or loop is in the wrong state for the call (serve twice, ...)."""


class LaunchError(PulseError, RuntimeError):
    """The launcher could not start: an application that does not import, a
    worker that failed to boot, ...  The message says what and why."""


def os_error(code: int) -> OSError:
    """An ``OSError`` of the right subclass (``ConnectionResetError``, ...) for errno ``code``."""
    return OSError(code, os.strerror(code))
