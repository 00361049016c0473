"""The backends side by side: portable against the native one, and backend choice.

Three layers:

1. the conformance suite (``test_conformance.py``) runs again in a
   subprocess with ``PULSE_BACKEND=portable`` (and once more on its
   ``select()`` code path, the one Windows takes);
2. record-level tests feed the same bytes to every backend's ``poll_read``,
   ``WriteBatch`` and socket calls and compare what comes back, so a
   difference shows up as a diff of records rather than as a hung server;
3. backend selection: a bad name is a clear ``ValueError``, and
   ``pulse.BACKEND`` and the server's log line name the backend in use.

Every socket is on 127.0.0.1 and every wait is bounded.
"""

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, List, Optional, Tuple

import pytest

import pulse
from pulse import _sys
from pulse._sys import portable
from pulse._sys.flags import EOF, ERROR, HUP, MORE, READ, SPECIAL, UNREAD, WRITABLE
from support import ServerThread, echo_many, pattern, recv_exactly, recv_until_eof

ROOT = Path(__file__).resolve().parent.parent
NATIVE_NAME = _sys.native_backend()
NATIVE = _sys.load(NATIVE_NAME) if NATIVE_NAME else None
BACKENDS = [portable] + ([NATIVE] if NATIVE is not None else [])
BACKEND_IDS = [backend.NAME for backend in BACKENDS]
HAS_UNIX = hasattr(socket, "AF_UNIX")

needs_native = pytest.mark.skipif(NATIVE is None, reason="no native backend on this platform")


# -- helpers --------------------------------------------------------------

def tcp_pair() -> Tuple[socket.socket, socket.socket]:
    """``(client, server)`` connected over 127.0.0.1; the server side is non-blocking."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname(), timeout=10)
        server, _ = listener.accept()
    server.setblocking(False)
    return client, server


def stream_pair() -> Tuple[socket.socket, socket.socket]:
    """A pair with a fixed buffer (AF_UNIX where there is one): deterministic fills."""
    if HAS_UNIX:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        b.setblocking(False)
        return a, b
    return tcp_pair()


def wait_buffered(sock: socket.socket, size: int, timeout: float = 5.0) -> None:
    """Wait until ``size`` bytes are queued for reading on the non-blocking ``sock``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            queued = len(sock.recv(size, socket.MSG_PEEK))
        except BlockingIOError:
            queued = 0
        if queued >= size:
            time.sleep(0.02)  # and whatever travels behind the data (a FIN)
            return
        assert time.monotonic() < deadline, "only {} of {} bytes arrived".format(queued, size)
        time.sleep(0.005)


def fill(sock: socket.socket, limit: int = 64 << 20) -> int:
    """Send on the non-blocking ``sock`` until the kernel refuses; bytes queued."""
    sock.setblocking(False)
    chunk = b"f" * 65536
    total = 0
    while total < limit:
        try:
            total += sock.send(chunk)
        except BlockingIOError:
            return total
    raise AssertionError("the socket never filled up")


def records(arena: Any, count: int) -> List[Tuple[int, int, int, int]]:
    """The first ``count`` records of ``arena`` as tuples."""
    flat = arena.records[:4 * count].tolist()
    return [tuple(flat[k:k + 4]) for k in range(0, 4 * count, 4)]  # type: ignore[misc]


def normal(arena: Any, record: Tuple[int, int, int, int]) -> Tuple[int, Any]:
    """A record without what may differ between backends: READ -> its bytes;
    the raw event mask of SPECIAL and cap-UNREAD records is dropped, and so
    is HUP (a hint from the kernel that a selector cannot give)."""
    _fd, flags, offset, length = record
    flags &= ~HUP
    if flags & READ:
        return flags, bytes(arena.data[offset:offset + length])
    if flags & (SPECIAL | UNREAD):
        return flags, None
    return flags, length


def record_stream(poller: Any, arena: Any, fd: int, read_size: int, max_reads: int,
                  edge: bool, calls: int = 12) -> List[Tuple[int, Any]]:
    """What ``poll_read`` says about ``fd`` over successive calls, as the loop drives it.

    In edge mode MORE/UNREAD carry the fd to the next call, as the loop does,
    ``~fd`` when HUP came with them (level mode relies on the poller
    reporting it again); the stream ends at
    the first EOF/ERROR, or when a call has nothing to say.  Call boundaries
    are not compared: a backend may see a FIN one call later.
    """
    out: List[Tuple[int, Any]] = []
    carry: List[int] = []
    for call in range(calls):
        count = poller.poll_read(2000 if call == 0 else 0, arena, carry, read_size, max_reads)
        carry = []
        for record in records(arena, count):
            if record[0] != fd:
                continue
            out.append(normal(arena, record))
            if edge and record[1] & (MORE | UNREAD):
                carry = [~fd if record[1] & HUP else fd]
        for index, (flags, _value) in enumerate(out):
            if flags & (EOF | ERROR):
                return out[:index + 1]
        if not count and not carry:
            break
    return out


def run_scenario(backend: Any, edge: bool, scenario: str) -> List[Tuple[int, Any]]:
    """Play one scenario against ``backend``; the record stream of the server fd."""
    read_size, max_reads, arena_size, max_records = 8192, 3, 1 << 20, 64
    if scenario == "arena-full":
        arena_size, read_size = 8192, 65536
    if scenario == "record-cap":
        read_size, max_reads, max_records = 1024, 8, 4
    poller = backend.Poller(64)
    arena = backend.ReadArena(arena_size, max_records)
    client, server = tcp_pair()
    try:
        poller.add(server.fileno(), True, False, edge)
        payload = {"small": pattern(100, 1), "burst": pattern(60000, 2),
                   "fin": pattern(100, 3), "burst-fin": pattern(60000, 4), "fin-only": b"",
                   "arena-full": pattern(20000, 5), "record-cap": pattern(10000, 6)}.get(scenario)
        if scenario == "reset":
            import struct
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            time.sleep(0.05)
        else:
            client.sendall(payload)
            if scenario in ("fin", "burst-fin", "fin-only"):
                client.shutdown(socket.SHUT_WR)
            if payload:
                wait_buffered(server, len(payload))
            else:
                time.sleep(0.05)
        return record_stream(poller, arena, server.fileno(), read_size, max_reads, edge)
    finally:
        poller.unregister(server.fileno())
        poller.close()
        client.close()
        server.close()


# -- 1. the conformance suite on the portable backend ----------------------

def run_pytest(extra_env: dict, *args: str, timeout: float = 900) -> None:
    env = dict(os.environ, **extra_env)
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
               str(ROOT / "tests" / "test_conformance.py")] + list(args)
    proc = subprocess.run(command, cwd=str(ROOT), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=timeout)
    output = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0, "conformance suite failed with {}:\n{}".format(
        extra_env, output[-6000:])


@pytest.mark.skipif(os.environ.get("PULSE_BACKEND") == "portable",
                    reason="this whole run already uses the portable backend")
def test_conformance_suite_on_the_portable_backend() -> None:
    run_pytest({"PULSE_BACKEND": "portable"})


@pytest.mark.skipif(os.name != "posix", reason="select() is the default selector there already")
def test_conformance_core_on_the_select_code_path() -> None:
    # select() is what Windows gets; on POSIX it is limited to fds < 1024,
    # so only the lifecycle tests (few sockets) run on it.
    run_pytest({"PULSE_BACKEND": "portable", "PULSE_PORTABLE_SELECTOR": "select"},
               "-k", "lifecycle or fin or half_close or stop_closes or close_from")


# -- 2. records, writes and socket calls, backend against backend ------------

SCENARIOS = ["small", "burst", "fin", "burst-fin", "fin-only", "reset", "arena-full",
             "record-cap"]


@pytest.mark.parametrize("edge", [True, False], ids=["edge", "level"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_portable_records_match_the_native_backend(scenario: str, edge: bool) -> None:
    """Same bytes in, same record stream out (data, MORE, UNREAD, EOF, ERROR)."""
    got = run_scenario(portable, edge, scenario)
    assert got, "portable reported nothing for {}".format(scenario)
    if NATIVE is None:
        return
    want = run_scenario(NATIVE, edge, scenario)
    assert got == want, "{} vs {}".format(
        [(f, v if not isinstance(v, bytes) else len(v)) for f, v in got],
        [(f, v if not isinstance(v, bytes) else len(v)) for f, v in want])


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("edge", [True, False], ids=["edge", "level"])
def test_fin_behind_a_carried_burst_is_reported(backend: Any, edge: bool) -> None:
    """Data + FIN larger than one turn (max_reads): the FIN must not be stranded.

    In edge mode the FIN's edge fired with the data, so the call that reads
    the carried rest must read on to EOF (pulse_read_carried in csrc/pulse.h:
    carried fds are read as if hung up).
    """
    flags = [f for f, _ in run_scenario(backend, edge, "burst-fin")]
    assert flags and flags[-1] == EOF, flags
    assert sum(len(v) for f, v in run_scenario(backend, edge, "burst-fin") if f & READ) == 60000


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_scenarios_give_the_documented_records(backend: Any) -> None:
    """The record semantics spelled out, not just compared."""
    assert run_scenario(backend, True, "small") == [(READ, pattern(100, 1))]
    burst = run_scenario(backend, True, "burst")
    assert [f for f, _ in burst] == [READ, READ, READ | MORE, READ, READ, READ | MORE, READ, READ]
    assert b"".join(v for _, v in burst) == pattern(60000, 2)
    assert run_scenario(backend, False, "fin") == [(READ, pattern(100, 3)), (EOF, 0)]
    assert run_scenario(backend, True, "fin-only") == [(EOF, 0)]
    (flags, code), = run_scenario(backend, True, "reset")
    assert flags == ERROR and -code in (errno_of("ECONNRESET"), errno_of("EPIPE"))
    full = run_scenario(backend, True, "arena-full")
    assert [f for f, _ in full] == [READ, UNREAD, READ, UNREAD, READ]
    assert [len(v) for f, v in full if f & READ] == [8192, 8192, 3616]
    cap = run_scenario(backend, True, "record-cap")
    assert [f for f, _ in cap[:4]] == [READ, READ, READ, UNREAD]


BOUND_SCRIPT = r"""
import socket, sys, time
from pulse._sys import load
from pulse._sys.flags import HUP, MORE, READ, UNREAD
backend = load(sys.argv[1])
poller = backend.Poller(64)
arena = backend.ReadArena(1 << 20, 4)
pairs = [socket.socketpair() for _ in range(3)]
for a, b in pairs:
    a.setblocking(False)
    poller.add(a.fileno(), True, False, True)
    b.sendall(b"z" * 10000)
time.sleep(0.05)
fds = [a.fileno() for a, _ in pairs]
carry, got, worst = list(fds), dict.fromkeys(fds, 0), 0
for call in range(200):
    count = poller.poll_read(0, arena, carry, 1024, 8)
    worst = max(worst, count)
    flat = arena.records[:4 * min(count, arena.max_records)].tolist()
    seen = {flat[k] for k in range(0, len(flat), 4)}
    if call == 0:
        print("every carried fd has a record:", seen >= set(carry))
    carry = []
    for k in range(0, len(flat), 4):
        fd, flags, length = flat[k], flat[k + 1], flat[k + 3]
        if flags & READ:
            got[fd] += length
        if flags & (MORE | UNREAD) and fd not in carry and ~fd not in carry:
            carry.append(~fd if flags & HUP else fd)
    if not carry and all(v == 10000 for v in got.values()):
        break
print("most records in one call:", worst, "of", arena.max_records)
print("bytes:", sorted(got.values()))
"""


@pytest.mark.skipif(not HAS_UNIX, reason="uses AF_UNIX socket pairs")
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_records_never_pass_the_arena(backend: Any) -> None:
    """Carried fds and events past a full record array: no overflow, none dropped.

    Each carried fd keeps a slot for its UNREAD (else edge mode strands it)
    and no more records are written than ``max_records`` (the C helper wrote
    past the array).  In a subprocess: an overflow corrupts the heap.
    """
    proc = subprocess.run([sys.executable, "-c", BOUND_SCRIPT, backend.NAME],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    output = proc.stdout.decode()
    assert proc.returncode == 0, output
    assert "every carried fd has a record: True" in output, output
    assert "most records in one call: 4 of 4" in output, output
    assert "bytes: [10000, 10000, 10000]" in output, output


@needs_native
def test_native_reads_start_on_64_byte_boundaries() -> None:
    """Every READ record of the compiled backend starts on a 64-byte boundary
    of memory, however odd the lengths before it, and the bytes are exact.

    The kernel copies into an unaligned destination at about half the speed
    (``ReadArena`` in ``_common.py``); malloc alone gives 16-byte alignment.
    """
    from pulse._sys._common import ffi
    assert NATIVE is not None
    poller = NATIVE.Poller(64)
    arena = NATIVE.ReadArena(1 << 16, 64)
    base = int(ffi.cast("uintptr_t", arena.cbuf))
    assert base % 64 == 0 and len(arena.data) == 1 << 16
    pairs = [stream_pair() for _ in range(4)]
    try:
        sent = {}
        for i, (peer, ours) in enumerate(pairs):
            poller.add(ours.fileno(), True, False, True)
            sent[ours.fileno()] = payload = pattern(1000 * i + 77 + i, seed=i)
            peer.sendall(payload)
            wait_buffered(ours, len(payload))
        got = {fd: b"" for fd in sent}
        carry: List[int] = []
        deadline = time.monotonic() + 10
        while any(len(got[fd]) < len(sent[fd]) for fd in sent):
            assert time.monotonic() < deadline, {fd: len(v) for fd, v in got.items()}
            count = poller.poll_read(500, arena, carry, 333, 64)
            carry = []
            for fd, flags, offset, length in records(arena, count):
                if flags & READ:
                    assert (base + offset) % 64 == 0, (offset, length)
                    got[fd] += bytes(arena.data[offset:offset + length])
                if flags & (MORE | UNREAD) and fd not in carry:
                    carry.append(fd)
        assert got == sent
    finally:
        poller.close()
        for peer, ours in pairs:
            peer.close()
            ours.close()


@needs_native
def test_arena_read_behaves_as_os_read() -> None:
    """``ReadArena.read`` (the direct reads on PyPy) returns what ``os.read``
    would: the bytes in order across a growing scratch, ``BlockingIOError``
    when nothing waits, ``b""`` at EOF and ``OSError`` on a bad fd."""
    assert NATIVE is not None
    arena = NATIVE.ReadArena(1 << 16, 8)
    peer, ours = stream_pair()
    try:
        with pytest.raises(BlockingIOError):
            arena.read(ours.fileno(), 4096)
        payload = pattern(300000, seed=7)
        sender = threading.Thread(target=peer.sendall, args=(payload,))
        sender.start()
        got = b""
        deadline = time.monotonic() + 10
        sizes = [100, 65536, 1000, 131072]
        while len(got) < len(payload):
            assert time.monotonic() < deadline, len(got)
            try:
                chunk = arena.read(ours.fileno(), sizes[len(got) % 4])
            except BlockingIOError:
                time.sleep(0.001)
                continue
            assert type(chunk) is bytes and 0 < len(chunk) <= 131072
            got += chunk
        sender.join(10)
        assert got == payload
        peer.shutdown(socket.SHUT_WR)
        wait_buffered(ours, 0)
        assert arena.read(ours.fileno(), 4096) == b""
    finally:
        peer.close()
        ours.close()
    with pytest.raises(OSError) as caught:
        arena.read(ours.fileno(), 4096)  # closed: EBADF
    assert caught.value.errno == errno_of("EBADF")


def errno_of(name: str) -> int:
    import errno
    return getattr(errno, name)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_writable_and_special_records(backend: Any) -> None:
    poller = backend.Poller(16)
    arena = backend.ReadArena(1 << 16, 16)
    client, server = tcp_pair()
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.setblocking(False)
        poller.add(server.fileno(), False, True, True)
        count = poller.poll_read(2000, arena, [], 4096, 4)
        assert records(arena, count) == [(server.fileno(), WRITABLE, 0, 0)]
        poller.watch(server.fileno(), False, False, True)
        poller.add_special(listener.fileno())
        extra = socket.create_connection(listener.getsockname(), timeout=10)
        count = poller.poll_read(2000, arena, [], 4096, 4)
        got = records(arena, count)
        assert [(fd, flags) for fd, flags, _o, _l in got] == [(listener.fileno(), SPECIAL)]
        extra.close()
        poller.unregister(listener.fileno())
    finally:
        poller.close()
        for sock in (client, server, listener):
            sock.close()


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_connecting_socket_is_reported_special(backend: Any) -> None:
    poller = backend.Poller(16)
    arena = backend.ReadArena(1 << 16, 16)
    listener = socket.socket()
    dialer = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        dialer.setblocking(False)
        dialer.connect_ex(listener.getsockname())
        poller.add_connecting(dialer.fileno())
        count = poller.poll_read(2000, arena, [], 4096, 4)
        assert [(fd, flags) for fd, flags, _o, _l in records(arena, count)] == [
            (dialer.fileno(), SPECIAL)]
        assert backend.getsockopt_int(dialer.fileno(), socket.SOL_SOCKET, socket.SO_ERROR) == 0
        poller.connected(dialer.fileno(), True)
        peer, _ = listener.accept()
        peer.sendall(b"hello")
        count = poller.poll_read(2000, arena, [], 4096, 4)
        assert [normal(arena, r) for r in records(arena, count)] == [(READ, b"hello")]
        peer.close()
        poller.unregister(dialer.fileno())
    finally:
        poller.close()
        listener.close()
        dialer.close()


def write_batch_results(backend: Any) -> Tuple[int, List[int]]:
    """One batch over a full socket, a free one and a dead one; (short, results)."""
    full_a, full_b = stream_pair()
    free_a, free_b = stream_pair()
    dead_a, dead_b = stream_pair()
    try:
        fill(full_b)
        dead_a.close()
        batch = backend.WriteBatch(1 << 16, 16)
        big = pattern(5000, 9)
        batch.arena[0:300] = b"x" * 300
        batch.arena[300:5300] = big
        items = [
            (full_b.fileno(), 0, 100),              # refused: 0
            (free_b.fileno(), 100, 50),             # sent
            (full_b.fileno(), 150, 10),             # same fd after a refusal: skipped, 0
            (free_b.fileno(), 300, 5000),           # sent, after the first in order
            (dead_b.fileno(), 160, 20),             # the peer is gone: -EPIPE (or reset)
        ]
        for i, (fd, offset, length) in enumerate(items):
            batch.items[3 * i] = fd
            batch.items[3 * i + 1] = offset
            batch.items[3 * i + 2] = length
        short = batch.send(len(items))
        results = batch.results[:len(items)].tolist()
        free_a.settimeout(5)
        assert recv_exactly(free_a, 5050, time.monotonic() + 5) == b"x" * 50 + big
        return short, results
    finally:
        for sock in (full_a, full_b, free_a, free_b, dead_b):
            sock.close()


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_write_batch_semantics(backend: Any) -> None:
    short, results = write_batch_results(backend)
    assert short == 3
    assert results[:4] == [0, 50, 0, 5000]
    assert -results[4] in (errno_of("EPIPE"), errno_of("ECONNRESET"))
    if NATIVE is not None and backend is portable:
        assert (short, results) == write_batch_results(NATIVE)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_socket_call_conventions(backend: Any) -> None:
    """EAGAIN is None, EOF is b""/0, errors raise OSError with the errno."""
    a, b = stream_pair()
    try:
        a.setblocking(False)
        assert backend.recv_into(a.fileno(), bytearray(10)) is None
        assert backend.recv(a.fileno(), 10) is None
        assert backend.send(b.fileno(), b"hello") == 5
        wait_buffered(a, 5)
        assert backend.recv(a.fileno(), 10) == b"hello"
        assert backend.writev(b.fileno(), [b"ab", bytearray(b"cd"), memoryview(b"ef")]) == 6
        wait_buffered(a, 6)
        buf = bytearray(10)
        assert backend.recv_into(a.fileno(), buf) == 6 and bytes(buf[:6]) == b"abcdef"
        backend.setsockopt_int(a.fileno(), socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        assert backend.getsockopt_int(a.fileno(), socket.SOL_SOCKET, socket.SO_SNDBUF) > 0
        backend.shutdown(b.fileno(), socket.SHUT_WR)
        time.sleep(0.02)
        assert backend.recv(a.fileno(), 10) == b""
        assert backend.recv_into(a.fileno(), bytearray(4)) == 0
        for call in (lambda: backend.send(-1, b"x"), lambda: backend.recv(-1, 1),
                     lambda: backend.close(-1)):
            with pytest.raises(OSError) as info:
                call()
            assert info.value.errno == errno_of("EBADF")
    finally:
        a.close()
        b.close()


@pytest.mark.skipif(os.name != "posix", reason="os.get_blocking needs POSIX fds")
def test_portable_calls_leave_the_blocking_mode_alone() -> None:
    """PyPy's socket(fileno=) makes an fd blocking: the portable backend undoes it."""
    a, b = stream_pair()
    try:
        a.setblocking(False)
        b.setblocking(True)
        portable.send(b.fileno(), b"x")
        wait_buffered(a, 1)
        assert portable.recv(a.fileno(), 1) == b"x"
        assert portable.recv(a.fileno(), 1) is None  # still non-blocking: no hang
        assert not os.get_blocking(a.fileno())
        assert os.get_blocking(b.fileno())
    finally:
        a.close()
        b.close()


@needs_native
def test_sockaddr_matches_the_native_backend() -> None:
    client, server = tcp_pair()
    try:
        for fd in (client.fileno(), server.fileno()):
            for peer in (False, True):
                assert portable.sockaddr(fd, peer) == NATIVE.sockaddr(fd, peer)
        assert portable.sockaddr(server.fileno(), True) == client.getsockname()
    finally:
        client.close()
        server.close()
    if HAS_UNIX:
        a, b = socket.socketpair()
        try:
            assert portable.sockaddr(a.fileno(), True) == NATIVE.sockaddr(a.fileno(), True) == ""
        finally:
            a.close()
            b.close()


def peer_of(backend: Any, peer: Any) -> Any:
    """A peer address from ``accept_batch`` formatted (native ones are raw bytes)."""
    if isinstance(peer, bytes):
        from pulse._sys.raw_sockaddr import parse_sockaddr
        return parse_sockaddr(peer)
    return peer


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("edge", [True, False], ids=["edge", "level"])
def test_accept_batch_registers_each_connection(backend: Any, edge: bool) -> None:
    poller = backend.Poller(16)
    arena = backend.ReadArena(1 << 16, 32)
    listener = socket.socket()
    clients: List[socket.socket] = []
    accepted: List[int] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.setblocking(False)
        clients = [socket.create_connection(listener.getsockname(), timeout=10)
                   for _ in range(3)]
        deadline = time.monotonic() + 5
        while len(accepted) < 3 and time.monotonic() < deadline:
            pairs = backend.accept_batch(listener.fileno(), poller, True, edge, 64)
            accepted += [fd for fd, _peer in pairs]
            peers = [peer_of(backend, peer) for _fd, peer in pairs]
            assert all(peer in [c.getsockname() for c in clients] for peer in peers), peers
            time.sleep(0.01)
        assert len(accepted) == 3
        assert backend.accept_batch(listener.fileno(), poller, True, edge, 64) == []
        for fd in accepted:
            assert backend.getsockopt_int(fd, socket.IPPROTO_TCP, socket.TCP_NODELAY)
            if os.name == "posix":
                assert not os.get_blocking(fd)
        clients[1].sendall(b"ping")
        count = poller.poll_read(2000, arena, [], 4096, 4)
        got = [(fd, normal(arena, (fd, f, o, n))) for fd, f, o, n in records(arena, count)]
        assert len(got) == 1 and got[0][1] == (READ, b"ping")
        assert backend.sockaddr(got[0][0], True) == clients[1].getsockname()
    finally:
        for fd in accepted:
            backend.close(fd)
        for sock in clients + [listener]:
            sock.close()
        poller.close()


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_accept_batch_raises_on_the_first_failure(backend: Any) -> None:
    poller = backend.Poller(4)
    not_listening = socket.socket()
    try:
        not_listening.bind(("127.0.0.1", 0))
        with pytest.raises(OSError) as info:
            backend.accept_batch(not_listening.fileno(), poller, True, True, 8)
        assert info.value.errno == errno_of("EINVAL")
    finally:
        not_listening.close()
        poller.close()


EMFILE_SCRIPT = r"""
import errno, os, resource, socket, sys
from pulse._sys import load
backend = load(sys.argv[1])
poller = backend.Poller(8)
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(8)
listener.setblocking(False)
client = socket.create_connection(listener.getsockname(), timeout=10)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
hog = []
try:
    while True:
        hog.append(os.dup(0))
except OSError as exc:
    assert exc.errno == errno.EMFILE
try:
    backend.accept_batch(listener.fileno(), poller, True, True, 8)
except OSError as exc:
    print("raised", exc.errno == errno.EMFILE)
else:
    print("accepted")
for fd in hog[:4]:
    os.close(fd)
print("recovered", len(backend.accept_batch(listener.fileno(), poller, True, True, 8)))
"""


@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_NOFILE is POSIX")
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_accept_batch_reports_emfile_and_recovers(backend: Any) -> None:
    proc = subprocess.run([sys.executable, "-c", EMFILE_SCRIPT, backend.NAME],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    output = proc.stdout.decode()
    assert proc.returncode == 0, output
    assert "raised True" in output and "recovered 1" in output, output


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_waker_interrupts_a_blocking_poll_and_never_spins(backend: Any) -> None:
    poller = backend.Poller(8)
    waker = backend.Waker()
    arena = backend.ReadArena(1 << 16, 16)
    try:
        waker.attach(poller)
        timer = threading.Timer(0.1, waker.wake)
        timer.start()
        start = time.monotonic()
        count = poller.poll_read(10000, arena, [], 4096, 4)
        elapsed = time.monotonic() - start
        timer.join(5)
        assert elapsed < 5, "the wake-up did not interrupt the wait"
        assert [(fd, flags) for fd, flags, _o, _l in records(arena, count)] == [
            (waker.fileno(), SPECIAL)]
        waker.drain()
        start = time.monotonic()
        assert poller.poll_read(150, arena, [], 4096, 4) == 0
        assert time.monotonic() - start >= 0.1, "the drained waker still fires: a spin"
        for _ in range(10000):  # many wakes before a drain: coalesced, never an error
            waker.wake()
        assert poller.poll_read(2000, arena, [], 4096, 4) == 1
        waker.drain()
    finally:
        waker.close()
        waker.wake()  # after close: a harmless no-op
        poller.close()


def test_portable_close_forgets_the_fd_in_its_poller() -> None:
    """As with epoll and kqueue, closing an fd removes it; its number can be reused."""
    poller = portable.Poller(8)
    arena = portable.ReadArena(1 << 16, 16)
    client, server = tcp_pair()
    try:
        fd = server.detach()
        poller.add(fd, True, False, True)
        portable.close(fd)
        assert fd not in poller._interest and fd not in portable._sockets
        client.close()
        client, server = tcp_pair()  # very likely the same fd number again
        poller.add(server.fileno(), True, False, True)
        client.sendall(b"again")
        count = poller.poll_read(2000, arena, [], 4096, 4)
        assert [normal(arena, r) for r in records(arena, count)] == [(READ, b"again")]
        poller.forget(server.fileno())
        assert server.fileno() not in portable._sockets
    finally:
        poller.close()
        client.close()
        server.close()


def test_select_poller_survives_an_fd_closed_behind_its_back() -> None:
    """select() fails as a whole on a closed fd: the dead one is reported, not fatal."""
    poller = portable.Poller(8, selector="select")
    arena = portable.ReadArena(1 << 16, 16)
    client, server = tcp_pair()
    other_client, other = tcp_pair()
    try:
        poller.add(server.fileno(), True, False, True)
        poller.add(other.fileno(), True, False, True)
        dead = server.fileno()
        portable._uncache(dead)
        server.close()  # not through portable.close: the poller does not know
        other_client.sendall(b"alive")
        got = []
        for _ in range(3):
            count = poller.poll_read(500, arena, [], 4096, 4)
            got += [(fd, normal(arena, (fd, f, o, n))) for fd, f, o, n in records(arena, count)]
            if (other.fileno(), (READ, b"alive")) in got:
                break
        assert (dead, (ERROR, -errno_of("EBADF"))) in got
        assert (other.fileno(), (READ, b"alive")) in got
    finally:
        poller.close()
        for sock in (client, other_client, other):
            sock.close()


def test_portable_rejects_a_bad_selector_name() -> None:
    with pytest.raises(ValueError, match="PULSE_PORTABLE_SELECTOR.*'nope'"):
        portable.Poller(8, selector="nope")


# -- 3. backend selection ---------------------------------------------------

def python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=str(ROOT),
                          env=dict(os.environ, **env), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=120)


def test_bad_backend_option_is_a_clear_value_error() -> None:
    with pytest.raises(ValueError) as info:
        pulse.Server(pulse.Handler(), backend="nope")
    message = str(info.value)
    assert "backend" in message and "'nope'" in message
    for name in ("epoll", "kqueue", "portable"):
        assert name in message


def test_foreign_native_backend_is_refused() -> None:
    foreign = "kqueue" if NATIVE_NAME == "epoll" else "epoll"
    with pytest.raises(ValueError, match="not available"):
        pulse.Server(pulse.Handler(), backend=foreign)


def test_bad_backend_environment_variable_fails_at_first_use() -> None:
    """``import pulse`` never fails (backends load lazily); the first loop does."""
    proc = python("import pulse; print('imported'); pulse.EventLoop()", PULSE_BACKEND="nope")
    stderr = proc.stderr.decode()
    assert proc.returncode != 0 and proc.stdout.decode().startswith("imported")
    assert "ValueError: PULSE_BACKEND" in stderr and "'nope'" in stderr, stderr


def test_environment_variable_selects_portable_without_cffi() -> None:
    code = ("import sys, pulse; print(pulse.BACKEND); "
            "print(sorted(m for m in sys.modules if m == 'cffi' or m.endswith('_pulse_ffi')))")
    proc = python(code, PULSE_BACKEND="portable")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().split("\n")[:2] == ["portable", "[]"]


def test_pulse_backend_names_the_default() -> None:
    assert pulse.BACKEND == _sys.BACKEND
    assert pulse.BACKEND == (os.environ.get("PULSE_BACKEND") or NATIVE_NAME or "portable")


@pytest.mark.parametrize("backend", [None, "portable"], ids=["default", "portable"])
def test_server_log_line_names_the_backend(backend: Optional[str],
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pulse")
    options = {} if backend is None else {"backend": backend}
    with ServerThread(pulse.callbacks(on_data=lambda conn, data: conn.write(data)),
                      **options) as srv:
        name = srv.server.loop.backend.NAME
        sock = srv.connect()
        sock.sendall(b"hi")
        assert recv_exactly(sock, 2, time.monotonic() + 10) == b"hi"
        sock.close()
    assert name == (backend or pulse.BACKEND)
    lines = [r.getMessage() for r in caplog.records if "serving on" in r.getMessage()]
    assert lines and all(name in line for line in lines), lines


@pytest.mark.parametrize("trigger", ["edge", "level"])
@pytest.mark.parametrize("selector", ["default", "select"])
def test_portable_server_end_to_end(trigger: str, selector: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A quick in-process echo on the portable backend (the full suite runs above)."""
    monkeypatch.setenv("PULSE_PORTABLE_SELECTOR", selector)
    handler = pulse.callbacks(on_data=lambda conn, data: conn.write(data))
    with ServerThread(handler, trigger=trigger, backend="portable", read_buffer_size=4096,
                      max_reads_per_event=2) as srv:
        assert srv.server.loop._poller.selector_name == selector
        echo_many(srv.address, [pattern(size, size) for size in (1, 5000, 300000)], timeout=60)
        sock = srv.connect()
        sock.sendall(pattern(70000, 1))
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock, time.monotonic() + 20) == pattern(70000, 1)
        sock.close()
