"""The status pipe: how a new worker tells its supervisor it is accepting, or why
it failed, and (with ``--metrics``) how it reports its counters.

Each worker gets the write end of its own pipe.  A message is one line: a
kind byte (``StatusKind``), then for ``ERROR`` the text (UTF-8, newlines
flattened), for ``STATS`` a JSON object (``pulse.Stats.as_dict()``).  The
worker closes the pipe after ``READY``, unless it reports stats, so EOF
before ``READY`` means it died while booting.  A stats line is written
without blocking and under ``PIPE_BUF`` bytes, so it arrives whole or not
at all: a supervisor that falls behind costs a report, never a stalled
worker.  ``StatusWriter`` is the worker's end and ``StatusReader`` the
supervisor's; nothing else reads or writes the pipe.
"""

import contextlib
import enum
import json
import os
import select
import threading
from typing import Any, Dict, List, NamedTuple, Tuple


class StatusKind(enum.Enum):
    """What a status line says."""

    READY = b"R"  #: the worker is accepting connections
    ERROR = b"E"  #: the worker failed to start; the text says why
    STATS = b"S"  #: the worker's counters, a JSON object


class StatusMessage(NamedTuple):
    """One status line: its kind and, for ``ERROR``, the text."""

    kind: StatusKind
    text: str = ""


def encode(message: StatusMessage) -> bytes:
    """The line that carries ``message``."""
    text = message.text.replace("\n", " ")
    return message.kind.value + text.encode("utf-8", "replace") + b"\n"


def parse(buffer: bytes) -> Tuple[List[StatusMessage], bytes]:
    """The complete lines at the start of ``buffer`` as messages, and the rest
    (a partial line); lines of no known kind are skipped."""
    messages: List[StatusMessage] = []
    while b"\n" in buffer:
        line, _, buffer = buffer.partition(b"\n")
        if line == StatusKind.READY.value:
            messages.append(StatusMessage(StatusKind.READY))
        elif line.startswith(StatusKind.ERROR.value):
            messages.append(StatusMessage(StatusKind.ERROR, line[1:].decode("utf-8", "replace")))
        elif line.startswith(StatusKind.STATS.value):
            messages.append(StatusMessage(StatusKind.STATS, line[1:].decode("utf-8", "replace")))
    return messages, buffer


class StatusWriter:
    """The worker's end of its status pipe; safe from any thread.

    ``ready()`` sends ``READY`` once and closes the pipe; after that the
    supervisor hears nothing more (``error()`` does nothing).  With
    ``keep_open`` the pipe stays open, non-blocking, for ``stats()``.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._ready = False

    @property
    def ready_sent(self) -> bool:
        """True once ``READY`` went out."""
        return self._ready

    def error(self, text: str) -> None:
        """Tell the supervisor why the worker failed to start."""
        with self._lock:
            self._send(StatusMessage(StatusKind.ERROR, text))

    def ready(self, keep_open: bool = False) -> None:
        """Tell the supervisor the worker is accepting, and close the pipe
        (``keep_open``: leave it open for ``stats()``)."""
        with self._lock:
            self._send(StatusMessage(StatusKind.READY))
            if self._fd >= 0 and keep_open:
                os.set_blocking(self._fd, False)  # stats never block the worker's loop
            elif self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self._ready = True

    def stats(self, snapshot: Dict[str, Any]) -> bool:
        """Send the counters ``snapshot`` (JSON numbers); False when it was
        dropped (the pipe is full or gone, or the line is too long)."""
        line = StatusKind.STATS.value + json.dumps(snapshot, separators=(",", ":")).encode() + b"\n"
        if len(line) > select.PIPE_BUF:
            return False  # a longer write may arrive in pieces
        with self._lock:
            if self._fd < 0:
                return False
            try:
                return os.write(self._fd, line) == len(line)
            except OSError:  # EAGAIN: the supervisor is behind; the next report catches up
                return False

    def close(self) -> None:
        """Close the pipe (the worker is exiting); again is harmless."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _send(self, message: StatusMessage) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self._fd, encode(message))


class StatusReader:
    """The supervisor's end of one worker's status pipe (non-blocking)."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self._buffer = b""

    def read(self) -> Tuple[List[StatusMessage], bool]:
        """The messages that arrived, and whether the pipe reached EOF (or
        broke); reads until the pipe is empty."""
        messages: List[StatusMessage] = []
        while self.fd >= 0:
            try:
                chunk = os.read(self.fd, 4096)
            except (BlockingIOError, InterruptedError):
                return messages, False
            except OSError:
                chunk = b""
            if not chunk:
                return messages, True
            more, self._buffer = parse(self._buffer + chunk)
            messages.extend(more)
        return messages, True

    def close(self) -> None:
        """Close the pipe (again is harmless)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
