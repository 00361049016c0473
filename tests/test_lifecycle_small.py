"""Connection lifecycle, the small findings (issue 12, section 2, finding 19).

IPv6 addresses lose their scope id; abstract Unix addresses read as ""; a
failed ``epoll_ctl`` while accepting closes the connection without a log
line; ``max_events`` has no upper bound.

Addresses are compared with what Python's ``socket`` module reports for the
same socket, in pulse's forms: pulse keeps reporting ``(host, port)`` for
IPv6 (the README documents it, and ``parse_address``/``dial`` take it back),
so the socket module's ``(host, port, flowinfo, scope_id)`` becomes
``(host, port)`` with a non-zero scope id appended to the host in RFC 4007's
text form, ``"fe80::1%lo"`` (``scoped``; flow info is dropped); an abstract
Unix name is a ``str`` with its leading NUL.  Every socket here is on the
loopback interface (127.0.0.1, ::1) or an abstract Unix name, and every wait
has a deadline.
"""

import contextlib
import logging
import os
import socket
import struct
import sys
import threading
import time
from typing import Any, Dict, Iterator, List

import pytest

import pulse
from lifecycle_support import read_to_end, running_client
from support import ServerThread, no_leaks, recv_exactly, wait_for

pytestmark = pytest.mark.timeout(60)

LINUX = sys.platform.startswith("linux")


class Addresses(pulse.Handler):
    """Records each connection's addresses as ``on_open`` sees them; echoes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: List[Dict[str, Any]] = []
        self.closes = 0

    def on_open(self, conn: Any) -> None:
        entry: Dict[str, Any] = {}
        for name in ("local_address", "remote_address"):
            try:
                entry[name] = getattr(conn, name)
            except Exception as exc:  # noqa: BLE001 - recorded for the assertion
                entry[name] = exc
        with self.lock:
            self.seen.append(entry)

    def on_data(self, conn: Any, data: bytes) -> None:
        conn.write(data)

    def on_close(self, conn: Any, err: Any) -> None:
        with self.lock:
            self.closes += 1


@contextlib.contextmanager
def serving(handler: Any, listen: Any, **options: Any) -> Iterator[pulse.Server]:
    """A ``pulse.Server`` on ``listen`` (an address or a listening socket), in a thread."""
    server = pulse.Server(handler, **options)
    server.listen(listen)
    thread = threading.Thread(target=server.serve, name="pulse-test-server", daemon=True)
    thread.start()
    try:
        assert server.wait_started(10), "the server did not start"
        yield server
    finally:
        server.stop()
        thread.join(15)
    assert not thread.is_alive(), "serve() did not return after stop()"


def _ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip("no IPv6 loopback (::1) on this host: {}".format(exc))


def _zone(scope_id: int) -> str:
    """The RFC 4007 zone of a scope id: the interface's name, else its number."""
    try:
        return socket.if_indextoname(scope_id)
    except (AttributeError, OSError):  # PyPy has no if_indextoname
        pass
    for index, name in getattr(socket, "if_nameindex", lambda: [])():
        if index == scope_id:
            return name
    try:  # Linux, where the socket module cannot say (PyPy)
        for name in os.listdir("/sys/class/net"):
            with open("/sys/class/net/{}/ifindex".format(name)) as file:
                if int(file.read()) == scope_id:
                    return name
    except OSError:
        pass
    return str(scope_id)


def scoped(address: Any) -> Any:
    """A ``socket``-module address in pulse's form: an IPv6 4-tuple becomes
    ``(host, port)``, with ``%zone`` appended to the host when the scope id is
    not 0 (a host that already carries one, as PyPy's do, is kept)."""
    if isinstance(address, tuple) and len(address) == 4:
        host, port, _flowinfo, scope_id = address
        if scope_id and "%" not in host:
            host = "{}%{}".format(host, _zone(scope_id))
        return (host, port)
    return address


def _raw_sockaddr_in6(host: str, port: int, flowinfo: int, scope_id: int) -> bytes:
    """A ``struct sockaddr_in6`` as ``accept`` fills it in (Linux or BSD layout)."""
    addr = socket.inet_pton(socket.AF_INET6, host)
    if LINUX:
        head = struct.pack("=H", socket.AF_INET6)
    else:
        head = struct.pack("=BB", 28, socket.AF_INET6)  # sin6_len, sin6_family
    return head + struct.pack("!HI", port, flowinfo) + addr + struct.pack("=I", scope_id)


def test_ipv6_addresses_match_the_socket_module() -> None:
    """Finding 19, IPv6: pulse reports an IPv6 address as the ``socket``
    module does, in pulse's ``(host, port)`` form (``scoped``: a non-zero
    scope id goes into the host as ``%zone``, so that a link-local peer's is
    not dropped).

    Checked over ::1 (the one IPv6 address every host has on loopback; its
    scope id is 0): for an accepted connection, ``remote_address`` must equal
    the client's ``getsockname()`` and ``local_address`` its
    ``getpeername()``; for a dialed one, ``remote_address`` must equal the
    listener's ``getsockname()``.  (Decided: pulse keeps its 2-tuples; the
    colleague's first version pinned the socket module's 4-tuples.  The
    scope id itself is checked by the parser test below.)
    """
    _ipv6_loopback()
    handler = Addresses()
    with no_leaks():
        with serving(handler, "[::1]:0") as server:
            port = server.address[1]
            with socket.create_connection(("::1", port), timeout=10) as sock:
                wait_for(lambda: handler.seen, 10, "on_open")
                accepted = handler.seen[0]
                client_side = {"remote_address": scoped(sock.getsockname()),
                               "local_address": scoped(sock.getpeername())}
            assert accepted == client_side, \
                "accepted connection: pulse says {}, socket says {}".format(accepted, client_side)

        listener = socket.socket(socket.AF_INET6)
        listener.bind(("::1", 0))
        listener.listen(4)
        listener.settimeout(10)
        dialed = Addresses()
        try:
            with running_client() as client:
                conn = client.dial(listener.getsockname()[:2], dialed)
                peer, _ = listener.accept()
                with peer:
                    wait_for(lambda: dialed.seen, 10, "on_open of the dialed connection")
                    expected = {"remote_address": scoped(listener.getsockname()),
                                "local_address": scoped(peer.getpeername())}
                    conn.close()
                    read_to_end(peer, time.monotonic() + 5)
        finally:
            listener.close()
        assert dialed.seen[0] == expected, \
            "dialed connection: pulse says {}, socket says {}".format(dialed.seen[0], expected)


def test_ipv6_scope_id_survives_the_accept_address_parser() -> None:
    """Finding 19, IPv6 scope id: the raw peer address kept by ``accept_batch``
    (``pulse._sys.raw_sockaddr.parse_sockaddr``) for a link-local peer
    ``fe80::1%lo`` must keep its scope id, as ``("fe80::1%lo", port)``.

    The expected value is Python's own form for that address
    (``socket.getaddrinfo("fe80::1%lo", ...)``: ``('fe80::1', port, 0,
    index of lo)``, the form ``getpeername()`` would return) in pulse's
    form (``scoped``), and ``getaddrinfo`` must take pulse's host back to the
    same scope id.  Before the fix the parser returned ``('fe80::1', port)``:
    the scope id, without which the address cannot be used again, was gone.
    (The colleague's version imported ``pulse._sys.addresses``; the module is
    ``raw_sockaddr``.)
    """
    from pulse._sys.raw_sockaddr import parse_sockaddr
    try:
        scope = socket.if_nametoindex("lo")
    except (AttributeError, OSError):
        pytest.skip("no interface named lo (or no if_nametoindex)")
    info = socket.getaddrinfo("fe80::1%lo", 4242, socket.AF_INET6, socket.SOCK_STREAM)[0][4]
    expected = scoped(info)
    raw = _raw_sockaddr_in6("fe80::1", 4242, 0, scope)
    got = parse_sockaddr(raw)
    assert got == expected == ("fe80::1%lo", 4242), \
        "parse_sockaddr gave {!r}, Python's socket module {!r}".format(got, info)
    assert got is not None and not isinstance(got, str)
    back = socket.getaddrinfo(got[0], got[1], socket.AF_INET6, socket.SOCK_STREAM)[0][4]
    assert back[3] == scope, "getaddrinfo({!r}) gave {!r}".format(got[0], back)
    # Without a zone the address stays as it was.
    assert parse_sockaddr(_raw_sockaddr_in6("fe80::1", 4242, 0, 0)) == ("fe80::1", 4242)


def test_ipv6_link_local_peer_keeps_its_scope_id_end_to_end() -> None:
    """Finding 19, IPv6 scope id over a real connection to a link-local address
    on the loopback interface: ``remote_address`` and ``local_address`` must
    equal what the client socket reports, scope id included.

    Needs a link-local (fe80::/10) address on ``lo``; hosts normally have none
    and adding one needs CAP_NET_ADMIN and changes the host's network
    configuration, so the test is skipped then (the parser test above covers
    the accept path).  Other interfaces are not used: the suite stays on
    loopback.
    """
    address = None
    try:
        with open("/proc/net/if_inet6") as table:
            for line in table:
                fields = line.split()
                if fields[-1] == "lo" and fields[0].startswith("fe8"):
                    hexaddr = fields[0]
                    address = ":".join(hexaddr[i:i + 4] for i in range(0, 32, 4))
                    break
    except OSError:
        pass
    if address is None:
        pytest.skip("no link-local IPv6 address on lo (adding one needs CAP_NET_ADMIN and "
                    "would change the host's network configuration)")
    host = "{}%lo".format(socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6,
                                                                               address)))
    handler = Addresses()
    with serving(handler, "[{}]:0".format(host)) as server:
        port = server.address[1]
        with socket.create_connection((host, port), timeout=10) as sock:
            wait_for(lambda: handler.seen, 10, "on_open")
            expected = {"remote_address": scoped(sock.getsockname()),
                        "local_address": scoped(sock.getpeername())}
    assert handler.seen[0] == expected


def _as_bytes(address: Any) -> Any:
    return os.fsencode(address) if isinstance(address, str) else address


@pytest.mark.skipif(not LINUX, reason="abstract Unix socket names are Linux-only")
def test_abstract_unix_addresses_match_the_socket_module() -> None:
    """Finding 19, abstract Unix addresses: a server listening on the abstract
    name ``"\\0pulse-test-..."`` must report that name as a connection's
    ``local_address``, as Python's ``socket`` module does
    (``b"\\x00pulse-test-..."``), in pulse's form: a ``str`` with its leading
    NUL, decoded with ``surrogateescape`` like paths (decided; the
    colleague's version accepted bytes too).  ``remote_address`` of an
    unnamed client is ``""``, as ``socket`` says; of a client bound to an
    abstract name (with a NUL inside and a byte that is not UTF-8) it is that
    name, whole: this one comes from the raw address ``accept`` kept.
    Before the fix the C formatter stopped at the leading NUL:
    ``local_address`` was ``""``.
    """
    name = "\0pulse-test-{}-{}".format(os.getpid(), time.monotonic_ns())
    client_name = b"\0pulse-client-" + str(os.getpid()).encode() + b"\xff\0tail"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(name)
    listener.listen(8)
    handler = Addresses()
    expected = []
    with no_leaks():
        with serving(handler, listener):
            for bind in (None, client_name):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    if bind is not None:
                        sock.bind(bind)
                    sock.settimeout(10)
                    sock.connect(name)
                    count = len(expected) + 1
                    wait_for(lambda: len(handler.seen) >= count, 10, "on_open")  # noqa: B023
                    expected.append((sock.getpeername(), sock.getsockname()))
                    sock.sendall(b"ping")
                    assert recv_exactly(sock, 4, time.monotonic() + 5) == b"ping"
    assert expected[0] == (os.fsencode(name), "")
    assert expected[1] == (os.fsencode(name), client_name)
    for seen, (expected_local, expected_remote) in zip(handler.seen, expected):
        for what, value, want in (("local_address", seen["local_address"], expected_local),
                                  ("remote_address", seen["remote_address"], expected_remote)):
            assert isinstance(value, str) and _as_bytes(value) == _as_bytes(want), \
                "{} is {!r}; the socket module says {!r}".format(what, value, want)


def test_failed_registration_of_an_accepted_socket_is_logged(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Finding 19, accept: when registering an accepted socket with the poller
    fails, the connection is closed and a warning (or error) is logged on the
    ``pulse`` logger, and the server keeps serving.

    Simulated: the loop's ``backend.accept_batch`` is wrapped to hand the C
    helper a pipe instead of the epoll fd, so its ``epoll_ctl(ADD)`` fails
    with EINVAL for every accepted socket.  (If the fix moves the
    registration out of ``accept_batch``, make the registration call fail
    here instead.)  Today the C helper closes the socket and says nothing:
    the client sees EOF and no log line is written.
    """
    caplog.set_level(logging.WARNING, logger="pulse")
    handler = Addresses()
    read_end, write_end = os.pipe()
    try:
        with no_leaks():
            with ServerThread(handler) as srv:
                backend = srv.server.loop.backend
                original = backend.accept_batch

                def accept_batch(listen_fd: int, poller: Any, *args: Any, **kwargs: Any) -> Any:
                    return original(listen_fd, read_end, *args, **kwargs)  # not an epoll fd

                with monkeypatch.context() as patch:
                    patch.setattr(backend, "accept_batch", accept_batch)
                    with srv.connect() as sock:
                        data, how = read_to_end(sock, time.monotonic() + 5)
                    assert how in ("eof", "reset") and data == b"", \
                        "the unregistered connection was not closed: {!r}, {}".format(data, how)
                    deadline = time.monotonic() + 2
                    while time.monotonic() < deadline and not [
                            r for r in caplog.records
                            if r.name.startswith("pulse") and r.levelno >= logging.WARNING]:
                        time.sleep(0.02)
                # The server still serves once registration works again.
                with srv.connect() as sock:
                    sock.sendall(b"still serving")
                    assert recv_exactly(sock, 13, time.monotonic() + 5) == b"still serving"
    finally:
        os.close(read_end)
        os.close(write_end)
    logged = [r for r in caplog.records
              if r.name.startswith("pulse") and r.levelno >= logging.WARNING]
    assert logged, "no warning was logged when an accepted socket could not be registered"
    assert handler.closes == len(handler.seen), "on_close count differs from on_open count"


def test_max_events_has_an_upper_bound() -> None:
    """Finding 19, ``max_events``: an absurd value must be refused at
    construction with a ValueError that names the option, not accepted and
    then fail (or allocate gigabytes) when the loop sizes its event and
    record arrays (4 records per event).  Today ``Options(max_events=10**9)``
    is accepted.
    """
    pulse.Options(max_events=4096)  # a sane value still works
    with pytest.raises(ValueError, match="max_events"):
        pulse.Options(max_events=10 ** 9)
    with pytest.raises(ValueError, match="max_events"):
        pulse.Server(pulse.Handler(), max_events=10 ** 9)
