"""The PROXY protocol on accepted connections: the header first, then the rest.

With ``proxy_protocol=`` on a server, each accepted connection starts with
a ``ProxyGate`` in the place of a TLS session (``Lifecycle._tls``, the layer
that the loop hands every byte read, on its own thread in every task
mode).  It speaks the same small interface (``start``, ``feed``,
``raw_eof``, ``handshaking``, ``cancel``, ...), so that the loop's hot path
has no check of its own for it, and like an accepted TLS connection the
connection is "quiet" meanwhile: no ``on_open`` yet, and a failure closes it
with one debug line and no callback at all.  The failures: a peer outside
``proxy_protocol_trusted`` (closed at once, before a byte is read), a
malformed or oversized header (``proxy_protocol.py`` refuses it at its
first wrong byte), a FIN before the header's end, and no header within
``proxy_protocol_timeout``.  A connection that ends otherwise before its
header (a reset, ``idle_timeout``, the server stopping) gets the same one
debug line.

Once the header is in, the gate steps aside: the connection reports the
addresses it carried (``Proxied``, a base of ``Conn``), then either TLS
takes its place and is fed exactly the bytes after the header, or
``on_open`` runs and the rest of the chunk is the first ``on_data`` (or
goes to the TLS that an ``on_open`` calling ``start_tls()`` started).
"""

import logging
from typing import TYPE_CHECKING, Any, Iterable, List, Optional, Tuple, Union

from .address import Address
from .errors import ConnClosedError
from .proxy_protocol import NEED_MORE, ProxyHeader, ProxyParser, ProxyProtocolError

if TYPE_CHECKING:  # pragma: no cover
    from ssl import SSLContext, SSLObject

    from .conn import Conn
    from .loop import EventLoop
    from .timers import TimerHandle
    from .tls import TLS

logger = logging.getLogger("pulse")


def parse_networks(value: Any, name: str = "proxy_protocol_trusted") -> Optional[Tuple[Any, ...]]:
    """``value`` as a tuple of ``ipaddress`` networks: ``None`` (every peer),
    an iterable of networks or their text (``"10.0.0.0/8"``, ``"::1"``), or
    one string of them separated by commas.  Raises ``ValueError`` or
    ``TypeError`` naming ``name``; an empty list is refused (it would
    refuse every connection: ``None`` trusts every peer)."""
    import ipaddress
    if value is None:
        return None
    items: Iterable[Any] = value.split(",") if isinstance(value, str) else value
    try:
        items = list(items)
    except TypeError:
        raise TypeError("{} must be a list of IP networks ('10.0.0.0/8', ...) or None, got "
                        "{!r}".format(name, value)) from None
    networks = []
    for item in items:
        if isinstance(item, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            networks.append(item)
            continue
        if not isinstance(item, str):
            raise TypeError("{} must hold IP networks as strings or ipaddress networks, got "
                            "{!r}".format(name, item))
        if not item.strip():
            continue  # "a,,b" or a trailing comma
        try:
            networks.append(ipaddress.ip_network(item.strip()))
        except ValueError as exc:
            raise ValueError("{}: {}".format(name, exc)) from None
    if not networks:
        raise ValueError("{} is empty: no peer could connect (None trusts every peer)".format(
            name))
    return tuple(networks)


def is_trusted(peer: Address, networks: Optional[Tuple[Any, ...]]) -> bool:
    """Whether ``peer`` (the socket's real peer) may send a PROXY header.
    Unix-socket peers always may: only local processes the socket's file
    permissions let in can connect, as the balancer in front does."""
    import ipaddress
    if networks is None or not isinstance(peer, tuple):
        return True
    address: Any = ipaddress.ip_address(peer[0].partition("%")[0])  # a zone is not an address
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:10.0.0.1 on a dual-stack socket
    return any(address in net or (mapped is not None and mapped in net) for net in networks)


class ProxyGate:
    """A connection's PROXY header, while it is pending (loop thread only)."""

    __slots__ = ("_conn", "_loop", "_ssl", "_parser", "_timer", "obj", "handshaking",
                 "failed", "truncated")

    def __init__(self, conn: "Conn", ssl: Optional["SSLContext"]) -> None:
        self._conn = conn
        self._loop: "EventLoop" = conn.loop
        self._ssl = ssl  # TLS after the header, with this context
        self._parser = ProxyParser(self._loop.options.proxy_protocol)
        self._timer: Optional["TimerHandle"] = None
        # What the TLS layer has, for the code that reads the slot (no
        # session yet, not done, no truncation).
        self.obj: Optional["SSLObject"] = None
        self.handshaking = True
        self.failed = False
        self.truncated = False

    def start(self, timeout: float) -> None:
        """Called where a TLS handshake starts (``Lifecycle._opened``): refuse
        an untrusted peer at once, else arm ``proxy_protocol_timeout``
        (``timeout`` is the TLS handshake's, which starts after the header)."""
        options = self._loop.options
        trusted = options.proxy_protocol_trusted
        if trusted is not None and not is_trusted(self._conn.remote_address, trusted):
            self._refuse(PermissionError("the peer is not in proxy_protocol_trusted"))
            return
        limit = options.proxy_protocol_timeout
        if limit > 0:
            self._timer = self._loop.call_later(limit, self._timed_out, limit)

    def _timed_out(self, limit: float) -> None:
        self._timer = None
        if self.handshaking and not self.failed:
            self._refuse(TimeoutError("no PROXY protocol header in {:g} s "
                                      "(proxy_protocol_timeout)".format(limit)))

    def feed(self, data: Union[bytes, memoryview]) -> None:
        """Bytes read from the socket: the header, and maybe what follows it."""
        if self.failed:
            return
        try:
            header = self._parser.feed(data)
        except ProxyProtocolError as exc:
            self._refuse(exc)
            return
        if header is not NEED_MORE:
            assert isinstance(header, ProxyHeader)
            self._passed(header)

    def _passed(self, header: ProxyHeader) -> None:
        """The header is in: step aside for TLS or for the handler."""
        self.handshaking = False
        self.cancel()
        conn = self._conn
        loop = self._loop
        rest = self._parser.rest
        tls = conn._header_read(header, self._ssl)  # the gate is out of the slot now
        if tls is not None:
            tls.start(loop.options.ssl_handshake_timeout)
            if rest:
                tls.feed(rest)  # a ClientHello that came in the header's segment
            return
        conn._announce()
        if rest and not conn.closed:
            # As a read would be: an on_open that called start_tls() put TLS
            # in the slot, and the rest (its ClientHello) is TLS's, not on_data's.
            conn._received(memoryview(rest) if loop.zero_copy and loop.runner is None else rest)

    def _refuse(self, exc: BaseException) -> None:
        """Close without a callback, logged at debug level: a port scanner or a
        misconfigured balancer must not flood the log."""
        self.failed = True
        self.cancel()
        conn = self._conn
        logger.debug("pulse: PROXY protocol header from %s refused: %s", self._peer(), exc)
        conn._fail(exc)

    def _peer(self) -> Any:
        """The socket's peer, for the log line (``"?"`` if it cannot be read)."""
        try:
            return self._conn.remote_address
        except OSError:  # not kept from accept, and the socket is gone
            return "?"

    def raw_eof(self) -> None:
        """The peer's FIN came before the whole header."""
        if not self.failed:
            self._refuse(ConnectionError("the peer closed the connection before its PROXY "
                                         "protocol header was complete"))

    def feed_lingering(self, data: Union[bytes, memoryview]) -> None:
        """Never lingering: a refused header aborts the connection."""

    def write(self, data: Any) -> None:
        """Unreachable: no handler has the connection before ``on_open``, which
        runs once the gate stepped aside."""
        raise ConnClosedError("write() before the connection's PROXY header was read")

    def send_close_notify(self) -> None:
        """No TLS session yet: nothing to notify."""

    def cancel(self) -> None:
        """The header was read, or the connection is closing: no timer outlives it."""
        if self.handshaking and not self.failed:
            # Closed from outside before the header's end (the peer's reset, a
            # read error, idle_timeout, the server stopping): the same one debug
            # line as a refusal.  (Lifecycle._close_err: the reason it closed.)
            self.failed = True  # nothing more is read
            logger.debug("pulse: connection from %s closed before its PROXY protocol header "
                         "was complete: %s", self._peer(), self._conn._close_err)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Proxied:
    """What a ``Conn`` knows of its PROXY header (a base of ``Conn``)."""

    __slots__ = ()

    # Fields and methods of Conn (which owns them: this base only reads).
    _proxy: Optional[Tuple[Address, ProxyHeader]]
    _loop: "EventLoop"

    if TYPE_CHECKING:  # pragma: no cover
        def _set_layer(self, layer: Optional[Union["TLS", ProxyGate]], quiet: bool) -> None: ...

        def _use_tls(self, context: "SSLContext", server_side: bool,
                     server_hostname: Optional[str], quiet: bool = False) -> None: ...

    @property
    def proxy_header(self) -> Optional[ProxyHeader]:
        """The PROXY protocol header this connection started with (a
        ``pulse.proxy_protocol.ProxyHeader``), or ``None`` without one."""
        return self._proxy[1] if self._proxy is not None else None

    @property
    def proxy_address(self) -> Optional[Address]:
        """The balancer's address (the socket's real peer) on a connection that
        came with a PROXY header, else ``None``; ``remote_address`` and
        ``local_address`` are then the ones the header carried (unless it was
        LOCAL or UNKNOWN).  Safe from any thread."""
        return self._proxy[0] if self._proxy is not None else None

    @property
    def proxy_tlvs(self) -> List[Tuple[int, bytes]]:
        """The PROXY v2 header's TLVs, ``(type, value)`` in order, unparsed
        (``[]`` for v1 or without a header).  Safe from any thread."""
        return list(self._proxy[1].tlvs) if self._proxy is not None else []

    def _accept_layers(self, ssl: Optional["SSLContext"]) -> None:
        """An accepted connection's layers before the handler: the PROXY header
        first when the server reads one, then TLS with ``ssl``."""
        if self._loop.options.proxy_protocol:
            self._set_layer(ProxyGate(self, ssl), quiet=True)  # type: ignore[arg-type]
        elif ssl is not None:
            self._use_tls(ssl, True, None, quiet=True)
