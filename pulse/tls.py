"""TLS on a connection: an ``ssl.SSLObject`` over two memory BIOs.

``TLS`` sits between a connection's socket and its handler.  Ciphertext the
loop read is fed in (``feed``); the plaintext comes out through the
connection's ordinary delivery (``Lifecycle._deliver``: pauses, held data
and the task modes behave as without TLS).  Plaintext the handler writes is
encrypted at once (``write``) and the records go out through the ordinary
write path (``Lifecycle._raw_write``: the write batch, the backlog and its
water marks count ciphertext).  Everything here runs on the loop's thread,
in every task mode: an ``SSLObject`` is not thread-safe, and ``Conn`` hands
the workers' calls to the loop as it does without TLS.

The handshake comes first.  An accepted connection is "quiet" until it
completes: ``on_open`` runs after it, and a failed handshake (a port
scanner, a plaintext client, a bad certificate, ``ssl_handshake_timeout``)
closes the socket with one debug line and no callback at all.  A dial or a
``start_tls`` reports a failed handshake to ``on_close`` instead.  Writes,
``write_eof`` and ``close`` made before the handshake completed wait for it.

How a TLS connection ends: ``close()`` sends close_notify after every byte
written, then the socket closes as a plain one does (our FIN, then a
lingering read, bounded by ``ssl_shutdown_timeout``, that ends at the peer's
close_notify or FIN).  ``write_eof()`` sends close_notify and keeps reading.
The peer's close_notify is its EOF (``on_eof`` decides, as for a FIN).  A
FIN without close_notify is a truncation, which is reported thus: if it cut
a record or the handshake short, bytes the peer sent were lost and
``on_close`` gets ``ssl.SSLEOFError``; if it came between records (what
many HTTP clients do) it is an EOF like any other, ``on_close`` gets
``None`` and ``conn.tls_truncated`` says it happened.  The rule follows
Python's ``suppress_ragged_eofs`` and Go's crypto/tls: only the application
protocol knows whether a message ended there, and HTTP/1.1, RESP and the
like frame their own messages; a cut record is never complete.
"""

import logging
import ssl
from typing import TYPE_CHECKING, Any, List, Optional, Union

from .states import OPEN
from .tlsbuffers import bio_input, drain, read_buffer

if TYPE_CHECKING:  # pragma: no cover
    from .conn import Conn
    from .timers import TimerHandle

logger = logging.getLogger("pulse")

# While the incoming BIO holds at most one record (16 KiB of plaintext plus
# at most 256 bytes of expansion), its plaintext, never larger, is read
# straight into the bytes object on_data gets, sized by it: no copy out of
# the buffer (16 KiB x 50 echo: 0.93x and 0.99x the server CPU of the
# buffered read in two runs, within their spread), the same one on_data
# per read.  More than a record goes through the buffer, delivered at once.
DIRECT_READ_MAX = 16 * 1024 + 256
# A large write is encrypted this much at a time, so that its ciphertext
# reaches the socket (or the backlog) in pieces instead of one more copy of
# the whole payload in the outgoing BIO.
ENCRYPT_CHUNK = 256 * 1024
# A TLS record header: type (1), version (2), length (2).
RECORD_HEADER = 5


def check_context(context: Any, server_side: bool, server_hostname: Optional[str] = None,
                  what: str = "") -> ssl.SSLContext:
    """``context`` if it is an ``ssl.SSLContext`` for this side (and, for a
    client ``what`` that checks host names, ``server_hostname`` is given);
    else ``TypeError`` or ``ValueError``."""
    if not isinstance(context, ssl.SSLContext):
        raise TypeError("ssl must be an ssl.SSLContext, got {!r}".format(context))
    if server_side and context.protocol == ssl.PROTOCOL_TLS_CLIENT:
        raise ValueError("a server needs a server-side SSLContext "
                         "(ssl.PROTOCOL_TLS_SERVER or ssl.create_default_context("
                         "ssl.Purpose.CLIENT_AUTH)), got a PROTOCOL_TLS_CLIENT one")
    if not server_side and context.protocol == ssl.PROTOCOL_TLS_SERVER:
        raise ValueError("a client needs a client-side SSLContext "
                         "(ssl.create_default_context()), got a PROTOCOL_TLS_SERVER one")
    if what and not server_side and context.check_hostname and not server_hostname:
        raise ValueError("{} needs server_hostname when the context checks host names "
                         "(context.check_hostname)".format(what))
    return context


def upgrade(conn: "Conn", context: ssl.SSLContext, server_side: bool,
            server_hostname: Optional[str], buffered: bytes) -> None:
    """``Conn.start_tls`` on the loop: TLS from here on, fed first with
    ``buffered`` and every chunk read after the upgrade's point."""
    chunks, eof = conn._take_input()
    if conn._state != OPEN or conn._close_called:
        return  # closed meanwhile: nothing to upgrade
    try:
        conn._use_tls(context, server_side, server_hostname)
    except (ValueError, OSError) as exc:  # the context refused (no host name, ...)
        conn._fail(exc)
        return
    tls = conn._tls
    assert tls is not None
    tls.start(conn.loop.options.ssl_handshake_timeout)
    for chunk in [buffered] + chunks if buffered else chunks:
        tls.feed(chunk)
    if eof:
        tls.raw_eof()
    conn._update_interest()  # the handshake reads through a pause


class TLS:
    """One connection's TLS session (loop thread only; ``Lifecycle`` owns it).

    Of its ``Conn`` it reads ``_loop``, ``_state`` and ``_close_called`` (and
    ``upgrade`` the ``_tls`` it just set) and changes it only through its methods.
    """

    __slots__ = ("_conn", "_loop", "_incoming", "_outgoing", "obj", "handshaking",
                 "_pending", "_notify_wanted", "_notify_sent", "_eof_fed", "_timer",
                 "_record_left", "_head", "peer_notified", "truncated", "failed")

    def __init__(self, conn: "Conn", context: ssl.SSLContext, server_side: bool,
                 server_hostname: Optional[str]) -> None:
        self._conn = conn
        self._loop = conn._loop
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        #: The ``ssl.SSLObject`` (certificate, ALPN, version and cipher once established).
        self.obj = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                    server_hostname=server_hostname)
        self.handshaking = True
        self._pending: List[bytes] = []  # plaintext written before the handshake completed
        self._notify_wanted = False  # write_eof() before the handshake completed
        self._notify_sent = False
        self._eof_fed = False  # the peer's FIN was written into the incoming BIO
        self._timer: Optional["TimerHandle"] = None
        # Where the incoming stream stands between records: bytes still owed
        # to the current record, or the part of a header received so far.
        self._record_left = 0
        self._head = b""
        #: True once the peer's close_notify arrived.
        self.peer_notified = False
        #: True if the peer's FIN came without a close_notify before it.
        self.truncated = False
        #: True once the handshake failed (or the connection closed for good).
        self.failed = False

    # -- the handshake ------------------------------------------------------

    def start(self, timeout: float) -> None:
        """Begin the handshake (a client sends its hello now) and arm its timeout."""
        if timeout > 0:
            self._timer = self._loop.call_later(timeout, self._timed_out, timeout)
        self._handshake()

    def _timed_out(self, timeout: float) -> None:
        self._timer = None
        if self.handshaking and not self.failed:
            self._handshake_failed(TimeoutError(
                "TLS handshake not completed in {:g} s (ssl_handshake_timeout)".format(timeout)),
                linger=False)

    def _handshake(self) -> None:
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, ssl.CertificateError, ValueError) as exc:
            self._handshake_failed(exc)
            return
        self.handshaking = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._flush()  # our Finished (and a server's session tickets)
        conn = self._conn
        pending, self._pending = self._pending, []
        for data in pending:
            self._encrypt(data)
        if self._notify_wanted:
            self.send_close_notify()  # write_eof() came first
        conn._announce()
        if conn._state == OPEN and not self.failed:
            self._read_plain()  # application data that came with the handshake

    def _handshake_failed(self, exc: BaseException, linger: bool = True) -> None:
        """Log it (debug: a port scanner must not flood the log) and close:
        after sending OpenSSL's alert (``linger``), or at once (a timed-out
        peer said nothing worth a lingering close, and must not hold the fd
        for ``linger_timeout`` more)."""
        self.failed = True
        self.handshaking = False
        conn = self._conn
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            peer: Any = conn.remote_address
        except OSError:
            peer = "?"
        logger.debug("pulse: TLS handshake with %s failed: %s", peer, exc)
        # The alert OpenSSL wrote (unknown CA, certificate required, ...)
        # tells the peer why: send it, then close.
        if not linger:
            conn._fail(exc)
            return
        self._flush()
        conn._note_error(exc)  # for on_close, where the handler knows the connection
        conn._begin_close()

    # -- ciphertext in ------------------------------------------------------

    def feed(self, data: Union[bytes, memoryview]) -> None:
        """Ciphertext read from the socket: run the handshake or deliver plaintext."""
        if self.failed:
            return
        self._track(data)
        self._incoming.write(bio_input(data))
        if self.handshaking:
            self._handshake()
        else:
            self._read_plain()

    def _track(self, data: Union[bytes, memoryview]) -> None:
        """Follow the record boundaries (to tell, at the peer's FIN, whether it cut one)."""
        size = len(data)
        left = self._record_left
        if left >= size:
            self._record_left = left - size
            return
        pos = left
        head = self._head
        while pos < size:
            if head or size - pos < RECORD_HEADER:
                piece = bytes(data[pos:pos + RECORD_HEADER - len(head)])
                head += piece
                pos += len(piece)  # (not past the end: the rest of the header comes next)
                if len(head) < RECORD_HEADER:
                    break
                pos += (head[3] << 8) | head[4]
                head = b""
            else:
                pos += RECORD_HEADER + ((data[pos + 3] << 8) | data[pos + 4])
        self._head = head
        self._record_left = pos - size if pos > size else 0

    def _read_plain(self) -> None:
        """Decrypt what the incoming BIO holds and deliver it in large chunks."""
        conn = self._conn
        loop = self._loop
        view = read_buffer()
        room = len(view)
        obj = self.obj
        incoming = self._incoming
        zero_copy = loop.zero_copy and loop.runner is None
        got = 0
        eof = False
        while True:
            want = 0 if got or zero_copy else incoming.pending + obj.pending()
            try:
                if 0 < want <= DIRECT_READ_MAX:
                    data = obj.read(want)
                    count = len(data)
                else:
                    data = None
                    # (typeshed allows a bytearray only; a memoryview works, at an offset)
                    count = obj.read(room - got, view[got:])  # type: ignore[arg-type,assignment]
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                eof = True
                break
            except ssl.SSLError as exc:
                if self._eof_fed and isinstance(exc, ssl.SSLEOFError):
                    break  # (CPython) the FIN without close_notify: raw_eof decides
                self._flush()  # the alert, if OpenSSL wrote one
                conn._fail(exc)
                return
            if not count:
                eof = not self._eof_fed  # 0 before the FIN: close_notify (PyPy says it so)
                break
            if data is not None:
                if conn._state == OPEN and not conn._close_called:  # no on_data after close()
                    conn._deliver(data)
            else:
                got += count
                if got == room:
                    self._deliver(conn, view, got, zero_copy)
                    got = 0
            if not incoming.pending and not obj.pending():
                break  # all read: skip the read that would raise SSLWantReadError
        if got:
            self._deliver(conn, view, got, zero_copy)
        self._flush()  # a key update or a session ticket may need an answer
        if eof and not self.peer_notified:
            self.peer_notified = True
            conn._eof_received()

    @staticmethod
    def _deliver(conn: "Conn", view: memoryview, size: int, zero_copy: bool) -> None:
        if conn._state != OPEN or conn._close_called:
            return  # no on_data after close()
        conn._deliver(view[:size] if zero_copy else view[:size].tobytes())

    def raw_eof(self) -> None:
        """The peer's FIN arrived (the socket has no more ciphertext)."""
        conn = self._conn
        if self.failed:
            return
        if self.peer_notified:
            return  # its EOF was the close_notify, already reported
        self._eof_fed = True
        self._incoming.write_eof()
        if self.handshaking:
            self._handshake_failed(ssl.SSLEOFError(
                "the peer closed the connection during the TLS handshake"))
            return
        self._read_plain()
        if self.peer_notified or self.failed or conn._state != OPEN:
            return
        self.truncated = True
        if self._record_left or self._head:
            conn._note_error(ssl.SSLEOFError(
                "the peer's FIN cut a TLS record short: the end of its data was lost"))
        conn._eof_received()

    def feed_lingering(self, data: Union[bytes, memoryview]) -> None:
        """Ciphertext read while the close lingers: discarded, but the peer's
        close_notify ends the wait as its FIN would."""
        if self.failed or self.peer_notified:
            return
        self._incoming.write(bio_input(data))
        view = read_buffer()
        while True:
            try:
                if not self.obj.read(len(view), view):  # type: ignore[arg-type]
                    break
            except ssl.SSLWantReadError:
                return
            except ssl.SSLError:
                break
        self.peer_notified = True
        self._conn._eof_received()

    # -- plaintext out ------------------------------------------------------

    def write(self, data: Any) -> None:
        """Encrypt and send ``data`` (queued until the handshake completed)."""
        if type(data) is not bytes:
            if not isinstance(data, (bytearray, memoryview)):
                raise TypeError("write() takes bytes, bytearray or memoryview, got {}".format(
                    type(data).__name__))
            if self.handshaking:
                data = bytes(data)  # the caller may reuse its buffer
        if not len(data) or self.failed:
            return
        if self.handshaking:
            self._pending.append(data)
            return
        self._encrypt(data)

    def _encrypt(self, data: Any) -> None:
        obj = self.obj
        size = len(data)
        try:
            if size <= ENCRYPT_CHUNK:
                obj.write(data)
                self._flush()
                return
            view = memoryview(data)
            for start in range(0, size, ENCRYPT_CHUNK):
                obj.write(view[start:start + ENCRYPT_CHUNK])
                self._flush()
                if self._conn._dropping():
                    return
        except ssl.SSLError as exc:
            self._conn._fail(exc)

    def send_close_notify(self) -> None:
        """Queue our close_notify behind everything written (once)."""
        if self.handshaking:
            self._notify_wanted = True  # after the handshake and its pending writes
            return
        if self._notify_sent or self.failed:
            return
        self._notify_sent = True
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            pass  # sent; the peer's close_notify is not awaited here
        except ssl.SSLError as exc:
            logger.debug("pulse: TLS close_notify on %r: %s", self._conn, exc)
        self._flush()

    def _flush(self) -> None:
        """Hand the records the SSLObject produced to the socket's write path."""
        out = self._outgoing
        if out.pending:
            self._conn._raw_write(drain(out))

    def cancel(self) -> None:
        """The connection is closing for good: no timer outlives it."""
        self.failed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
