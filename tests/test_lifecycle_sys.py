"""Connection lifecycle, the low level's part (issue 12, findings 17 and 19).

Each backend's ``pulse._sys`` calls on their own, without a loop:

- 17: ``Waker.wake()`` from another thread never writes into an fd number
  that ``close()`` gave back to the kernel and something else got;
- 19a/b: the three formatters of an address (the raw parser of what
  ``accept_batch`` keeps, the C ``pulse_sockaddr`` behind ``sockaddr``, the
  portable backend's) agree, IPv6 scope ids and abstract Unix names included;
- 19c: ``accept_batch(errors=...)`` reports the accepted sockets it had to
  close because registering them failed;
- 19d: the pollers refuse an absurd ``max_events`` as the option does.

Every socket is on loopback (127.0.0.1, ::1, ff02::1%lo bound but never
sent to) or an abstract Unix name, and every wait is bounded.
"""

import errno
import os
import socket
import struct
import sys
import threading
import time
import types
from typing import Any, List, Tuple

import pytest

import pulse
from pulse import _sys
from pulse._sys import _portable_io, portable
from pulse._sys.contract import MAX_EVENTS
from pulse._sys.raw_sockaddr import parse_sockaddr

pytestmark = pytest.mark.timeout(60)

LINUX = sys.platform.startswith("linux")
NATIVE_NAME = _sys.native_backend()
NATIVE = _sys.load(NATIVE_NAME) if NATIVE_NAME else None
BACKENDS = [portable] + ([NATIVE] if NATIVE is not None else [])
BACKEND_IDS = [backend.NAME for backend in BACKENDS]


def formatted(peer: Any) -> Any:
    """A peer from ``accept_batch``: the compiled backends keep raw bytes."""
    return parse_sockaddr(peer) if isinstance(peer, bytes) else peer


def readable_bytes(fds: List[int]) -> int:
    """How many bytes wait, without blocking, in the readable ones of ``fds``."""
    total = 0
    for fd in fds:
        blocking = os.get_blocking(fd)
        os.set_blocking(fd, False)
        try:
            while True:
                try:
                    chunk = os.read(fd, 4096)
                except (BlockingIOError, OSError):
                    break
                if not chunk:
                    break
                total += len(chunk)
        finally:
            os.set_blocking(fd, blocking)
    return total


# -- finding 17: the waker and a reused fd --------------------------------

@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_a_closed_waker_never_writes_into_its_reused_number(backend: Any) -> None:
    """Sequential: close a loop's waker, let a pipe take its number, wake: the
    pipe stays empty (the colleague's brief; it passes before the fix too,
    since close() already set the fd to -1: the race needs the test below)."""
    poller = backend.Poller(8)
    waker = backend.Waker()
    pipes: List[Tuple[int, int]] = []
    try:
        waker.attach(poller)
        number = waker.fileno()
        waker.close()
        for _ in range(64):
            pipes.append(os.pipe())
            if number in pipes[-1]:
                break
        assert number < 0 or any(number in pair for pair in pipes), \
            "no pipe got the waker's number {}".format(number)
        waker.wake()
        assert readable_bytes([r for r, _w in pipes]) == 0
    finally:
        for pair in pipes:
            for fd in pair:
                os.close(fd)
        poller.close()
        waker.close()


@pytest.mark.skipif(NATIVE_NAME != "epoll", reason="interposes on linux.Waker's os.write")
def test_a_wake_racing_close_never_reaches_the_reused_number(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 17, deterministic: a wake on another thread has read the
    eventfd's number and is about to write when the loop's thread closes the
    waker and a pipe gets the number.  The write must not land after close()
    returned.

    The race is made certain by interposing on ``linux.os.write``: the wake's
    write first starts the closer (close, then ``os.pipe`` until a pipe has
    the number) and gives it 0.5 s.  Before the fix close() returned at once
    and the write went to the pipe's number; with the fix close() waits for
    the wake in flight (the wait times out), and the write reaches the
    eventfd, still open.
    """
    from pulse._sys import linux
    waker = linux.Waker()
    number = waker.fileno()
    pipes: List[Tuple[int, int]] = []
    closed = threading.Event()
    reused = threading.Event()
    late: List[bool] = []

    def close_and_reuse() -> None:
        waker.close()
        closed.set()
        for _ in range(64):
            pipes.append(os.pipe())
            if number in pipes[-1]:
                reused.set()
                return

    closer = threading.Thread(target=close_and_reuse, name="waker-closer", daemon=True)

    def write(fd: int, data: bytes) -> int:
        if fd == number and not late:
            closer.start()
            reused.wait(0.5)
            late.append(closed.is_set())
        return os.write(fd, data)

    monkeypatch.setattr(linux, "os", types.SimpleNamespace(write=write, read=os.read))
    try:
        waker.wake()
        closer.join(5)
        assert not closer.is_alive(), "close() never returned"
        assert late == [False], "the wake's write ran after close() returned"
        assert readable_bytes([r for r, _w in pipes]) == 0, "the write landed in the pipe"
    finally:
        monkeypatch.undo()
        waker.close()
        for pair in pipes:
            for fd in pair:
                os.close(fd)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_waking_in_a_tight_loop_while_wakers_close_and_numbers_are_reused(
        backend: Any) -> None:
    """Finding 17, stress: one thread wakes the current waker in a tight loop
    while this one, for 0.5 s, makes a waker current, closes it and opens a
    socket pair (which takes the freed numbers; both ends of a pair are
    writable, so a stray wake lands in the other end whichever number it hit),
    lets the waking thread run, then checks the pair: no byte may arrive.  A
    short GIL switch interval makes the waking thread stop between reading
    the fd and writing often."""
    current = [backend.Waker()]
    stop = threading.Event()
    errors: List[BaseException] = []

    def waking() -> None:
        try:
            while not stop.is_set():
                current[0].wake()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    thread = threading.Thread(target=waking, name="waker-stress", daemon=True)
    stray = rounds = 0
    try:
        thread.start()
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            waker = backend.Waker()
            current[0] = waker
            time.sleep(0)  # the waking thread picks this waker up
            waker.close()
            a, b = socket.socketpair()
            try:
                time.sleep(0)  # a wake that read the old number writes now
                stray += readable_bytes([a.fileno(), b.fileno()])
            finally:
                a.close()
                b.close()
            rounds += 1
    finally:
        stop.set()
        thread.join(5)
        sys.setswitchinterval(interval)
        current[0].close()
    assert not thread.is_alive() and not errors, errors
    assert rounds > 10
    assert stray == 0, "{} stray bytes landed in reused fds over {} rounds".format(stray, rounds)


# -- finding 19a/b: addresses ----------------------------------------------

def _zone(scope_id: int) -> str:
    try:
        return socket.if_indextoname(scope_id)
    except (AttributeError, OSError):  # PyPy has no if_indextoname
        return str(scope_id)


def test_the_ipv6_scope_id_is_the_zone_of_the_host_in_every_formatter() -> None:
    """The C ``pulse_sockaddr``, the portable formatter and the raw parser give
    a socket bound to the link-local multicast group ff02::1 on ``lo`` (the
    one scoped IPv6 address a host without link-local addresses can bind:
    nothing is sent) as ``("ff02::1%lo", port)``, which getaddrinfo takes back."""
    try:
        scope = socket.if_nametoindex("lo")
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    except (AttributeError, OSError) as exc:
        pytest.skip("no IPv6 or no interface lo: {}".format(exc))
    with sock:
        try:
            sock.bind(("ff02::1", 0, 0, scope))
        except OSError as exc:
            pytest.skip("cannot bind ff02::1%lo: {}".format(exc))
        host, port, _flow, scope_id = sock.getsockname()
        assert scope_id == scope
        expected = ("ff02::1%" + _zone(scope), port)
        for backend in BACKENDS:
            assert backend.sockaddr(sock.fileno(), False) == expected, backend.NAME
        back = socket.getaddrinfo(expected[0], port, socket.AF_INET6, socket.SOCK_DGRAM)[0][4]
        assert back[3] == scope
    fmt = _portable_io._format_address
    assert fmt(("fe80::1", 80, 7, scope)) == ("fe80::1%" + _zone(scope), 80)
    assert fmt(("fe80::1%lo", 80, 0, scope)) == ("fe80::1%lo", 80)  # PyPy's hosts have it
    assert fmt(("::1", 80, 0, 0)) == ("::1", 80)
    # A scope id no interface has: its number.
    unknown = 0x7FFFFFF0
    raw = struct.pack("=H" if LINUX else "=BB", *((socket.AF_INET6,) if LINUX
                                                 else (28, socket.AF_INET6)))
    raw += struct.pack("!HI", 80, 0) + socket.inet_pton(socket.AF_INET6, "fe80::1")
    raw += struct.pack("=I", unknown)
    assert parse_sockaddr(raw) == ("fe80::1%{}".format(unknown), 80)


@pytest.mark.skipif(not LINUX, reason="abstract Unix socket names are Linux-only")
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_abstract_unix_names_read_the_same_everywhere(backend: Any) -> None:
    """An abstract name (a NUL inside, a byte that is not UTF-8) is a ``str``
    with its leading NUL from ``sockaddr`` (local and peer) and from the
    address ``accept_batch`` keeps; an unnamed peer is ``""``; a path socket
    is its path."""
    name = b"\0pulse-sys-" + str(os.getpid()).encode() + b"\xff\0end"
    text = name.decode("utf-8", "surrogateescape")
    poller = backend.Poller(8)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    clients: List[socket.socket] = []
    accepted: List[int] = []
    try:
        listener.bind(name)
        listener.listen(4)
        listener.setblocking(False)
        assert backend.sockaddr(listener.fileno(), False) == text
        named = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        clients.append(named)
        named.bind(name + b"-client")
        named.connect(name)
        unnamed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        clients.append(unnamed)
        unnamed.connect(name)
        peers = []
        deadline = time.monotonic() + 5
        while len(peers) < 2 and time.monotonic() < deadline:
            for fd, peer in backend.accept_batch(listener.fileno(), poller, True, True, 8):
                accepted.append(fd)
                peers.append((formatted(peer), backend.sockaddr(fd, True),
                              backend.sockaddr(fd, False)))
            time.sleep(0.01)
        assert sorted(peers) == sorted([(text + "-client", text + "-client", text),
                                        ("", "", text)])
    finally:
        for fd in accepted:
            backend.close(fd)
        for sock in clients + [listener]:
            sock.close()
        poller.close()


# -- finding 19c: accept_batch reports what it closed ------------------------

def _connected_clients(listener: socket.socket, count: int) -> List[socket.socket]:
    clients = [socket.create_connection(listener.getsockname(), timeout=10)
               for _ in range(count)]
    time.sleep(0.05)  # in the accept queue
    return clients


@pytest.mark.skipif(NATIVE is None, reason="no compiled backend here")
def test_native_accept_batch_reports_sockets_it_could_not_register() -> None:
    """The C helper gets a pipe instead of the poller fd (as the colleague's loop
    test does), so registering each accepted socket fails (EINVAL from
    epoll_ctl, EBADF from kevent): ``accept_batch`` returns nothing, closes
    them (the clients see EOF), and appends one ``OSError`` with that errno
    and the count to ``errors``."""
    assert NATIVE is not None
    read_end, write_end = os.pipe()
    listener = socket.socket()
    clients: List[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        clients = _connected_clients(listener, 2)
        errors: List[OSError] = []
        assert NATIVE.accept_batch(listener.fileno(), read_end, True, True, 8,
                                   errors=errors) == []
        assert len(errors) == 1, errors
        assert errors[0].errno in (errno.EINVAL, errno.EBADF), errors[0]
        assert "closed 2 accepted connections" in str(errors[0]), str(errors[0])
        for client in clients:
            assert client.recv(1) == b""  # closed, not left hanging
        # Without errors (the old call), the same drops go unreported, silently.
        clients += _connected_clients(listener, 1)
        assert NATIVE.accept_batch(listener.fileno(), read_end, True, True, 8) == []
        # Nothing dropped: nothing appended.
        assert NATIVE.accept_batch(listener.fileno(), read_end, True, True, 8,
                                   errors=errors) == [] and len(errors) == 1
    finally:
        for sock in clients + [listener]:
            sock.close()
        os.close(read_end)
        os.close(write_end)


def test_portable_accept_batch_reports_sockets_it_could_not_register(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same in the portable backend, whose registration is the selector's:
    it fails (ENOSPC, as a full epoll set says) for the first socket only,
    so one connection is accepted and one error names the other."""
    poller = portable.Poller(8)
    listener = socket.socket()
    clients: List[socket.socket] = []
    accepted: List[int] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        clients = _connected_clients(listener, 2)
        real_apply = poller._apply
        failures = [OSError(errno.ENOSPC, "full")]

        def apply(*args: Any, **kwargs: Any) -> None:
            if failures:
                raise failures.pop()
            real_apply(*args, **kwargs)

        monkeypatch.setattr(poller, "_apply", apply)
        errors: List[OSError] = []
        pairs = portable.accept_batch(listener.fileno(), poller, True, True, 8, errors=errors)
        accepted = [fd for fd, _peer in pairs]
        assert len(pairs) == 1
        assert len(errors) == 1 and errors[0].errno == errno.ENOSPC, errors
        assert "closed 1 accepted connection:" in str(errors[0]), str(errors[0])
    finally:
        for fd in accepted:
            portable.close(fd)
        for sock in clients + [listener]:
            sock.close()
        poller.close()


# -- finding 19d: max_events ------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_pollers_bound_max_events_as_the_option_does(backend: Any) -> None:
    poller = backend.Poller(MAX_EVENTS)
    poller.close()
    for bad in (MAX_EVENTS + 1, 10 ** 9):
        with pytest.raises(ValueError) as info:
            backend.Poller(bad)
        message = "max_events must be <= {}, got {}".format(MAX_EVENTS, bad)
        assert str(info.value) == message
        with pytest.raises(ValueError) as info:
            pulse.Options(max_events=bad)
        assert str(info.value) == message
    with pytest.raises(ValueError, match="max_events must be > 0"):
        backend.Poller(0)
