"""Connection lifecycle, closing (issue 12, section 2): lingering close,
half-close, early writes on a dial, and abort.

Findings covered: 7 (a graceful ``close()`` with unread input resets the
connection and eats the reply; ``linger_timeout``), 8 (half-close:
``conn.write_eof()``, the optional ``on_eof`` handler method, and the proxy
example forwarding EOF), 11 (``dial()``, ``write()``, ``close()`` before the
connect completes) and 15 (``abort()`` still sends this iteration's writes and
ends with FIN).

The new API these tests use (``write_eof``, ``on_eof``, ``linger_timeout``)
does not exist before the fix: those tests fail today with AttributeError /
TypeError, or because ``on_eof`` is never called.  Every test runs over
edge/level trigger x loop/pool/thread task mode.  Every client talks to
127.0.0.1 and every wait has a deadline.
"""

import errno
import socket
import threading
import time
from typing import Any, List, Optional

import pytest

import pulse
from lifecycle_support import (Book, PlainPeer, connected_client, counter_bytes, describe,
                               expect_stream, loop_stalled, pipeline_behind_the_reply,
                               read_to_end, running_client, start_proxy, stop_proxy)
from support import MODE_IDS, MODES, ServerThread, free_port, no_leaks, on_loop, wait_for

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.parametrize("trigger,task_type", MODES, ids=MODE_IDS)]

MiB = 1024 * 1024


class ReplyThenClose(Book):
    """On the first ``on_data``: write ``reply``, then ``close()`` (a server that
    answers one request and hangs up, like HTTP/1.0 or an error reply)."""

    def __init__(self, reply: bytes) -> None:
        super().__init__()
        self.reply = reply
        self.replied = threading.Event()
        self.closed_at: Optional[float] = None

    def on_data(self, conn: Any, data: bytes) -> None:
        first = not conn.session.data
        super().on_data(conn, data)
        if first:
            conn.write(self.reply)
            conn.close()
            self.closed_at = time.monotonic()
            self.replied.set()


# -- finding 7: lingering close -------------------------------------------------


def test_graceful_close_with_unread_input_delivers_the_whole_reply(
        trigger: str, task_type: str) -> None:
    """Finding 7: ``close()`` after a 1 MiB reply, while the peer has sent a
    pipelined request that pulse never read.

    The client (64 KiB receive buffer, so the reply waits in pulse's backlog)
    sends a request, waits until the server replied and closed, sends two
    pipelined requests, then reads.  Today pulse stops reading at ``close()``
    and closes the fd with unread input once the backlog is in the kernel:
    Linux answers with RST and drops the unsent tail, so the client gets about
    128,000 bytes, then ECONNRESET.

    Expected (lingering close, default ``linger_timeout`` 5 s): the whole
    1 MiB, then EOF; the pipelined requests never reach ``on_data``; once the
    client closes, the server ends the linger at the client's EOF (well before
    5 s) and ``on_close(conn, None)`` runs once.
    """
    reply = counter_bytes(MiB, 7)
    handler = ReplyThenClose(reply)
    with no_leaks():
        with ServerThread(handler, trigger=trigger, task_type=task_type) as srv:
            sock = connected_client(srv.address, 64 * 1024)
            try:
                rec = handler.record_for(sock)
                data, how = pipeline_behind_the_reply(
                    sock, handler.replied, b"GET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n")
                expect_stream(data, how, reply)
            finally:
                sock.close()
            closed = time.monotonic()
            handler.wait_closed(rec, 4)  # a linger cut short by the peer's EOF
            assert rec.closed_at is not None and rec.closed_at - closed < 2.0, \
                "on_close ran {:.2f} s after the client closed".format(rec.closed_at - closed)
            assert rec.closes == [None]
            assert bytes(rec.data) == b"GET /1 HTTP/1.1\r\n\r\n", \
                "on_data after close(): {!r}".format(bytes(rec.data))
        handler.check()


def test_linger_timeout_zero_closes_at_once(trigger: str, task_type: str) -> None:
    """Finding 7, ``linger_timeout=0``: close at once once the backlog is in the
    kernel, without waiting for the peer's EOF.

    The client sends a request and then neither reads nor closes; the server
    writes a 1,000-byte reply and closes.  Expected: ``on_close(conn, None)``
    within 1 s while the client is still idle (with the default linger the
    server would wait for the client's EOF, up to 5 s), and the client then
    reads the reply and EOF (no input was left unread, so the kernel sends a
    FIN).  Fails today with TypeError (no ``linger_timeout`` option).
    """
    reply = counter_bytes(1000, 71)
    handler = ReplyThenClose(reply)
    with no_leaks():
        with ServerThread(handler, trigger=trigger, task_type=task_type,
                          linger_timeout=0) as srv:
            sock = connected_client(srv.address)
            try:
                rec = handler.record_for(sock)
                sock.sendall(b"request")
                assert handler.replied.wait(10), "the server never answered"
                handler.wait_closed(rec, 1.0)
                data, how = read_to_end(sock, time.monotonic() + 10)
                expect_stream(data, how, reply)
            finally:
                sock.close()
            assert rec.closes == [None]
        handler.check()


def test_linger_timeout_zero_with_unread_input_is_the_plain_close(
        trigger: str, task_type: str) -> None:
    """Finding 7, ``linger_timeout=0`` with unread input: documents what the peer
    sees when lingering is turned off.

    Same scenario as the default-linger test (1 MiB reply, two pipelined
    requests left unread), with ``linger_timeout=0``.  Expected: the server
    closes as soon as the backlog is in the kernel, without waiting for the
    client (``on_close`` has run by the time the client finished reading);
    the client gets a prefix of the reply and then either EOF or, as Linux
    does for a socket closed with unread input, ECONNRESET, which throws away
    the unsent tail (measured today: about 128,000 bytes, then ECONNRESET).
    That is the price of ``linger_timeout=0``.  Fails today with TypeError.
    """
    reply = counter_bytes(MiB, 72)
    handler = ReplyThenClose(reply)
    with no_leaks():
        with ServerThread(handler, trigger=trigger, task_type=task_type,
                          linger_timeout=0) as srv:
            sock = connected_client(srv.address, 64 * 1024)
            try:
                rec = handler.record_for(sock)
                data, how = pipeline_behind_the_reply(
                    sock, handler.replied, b"GET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n")
                if not (how in ("eof", "reset") and reply.startswith(data)):
                    raise AssertionError("the client got " + describe(data, reply, how))
                handler.wait_closed(rec, 1.0)  # closed without waiting for the client
            finally:
                sock.close()
            assert rec.closes == [None]
        handler.check()


def test_lingering_close_ends_after_linger_timeout_without_peer_eof(
        trigger: str, task_type: str) -> None:
    """Finding 7: a peer that never sends EOF is closed after ``linger_timeout``.

    ``linger_timeout=0.5``; the server writes a 1 MiB reply and closes; the
    client pipelines a second request, reads the whole reply and the server's
    EOF (its write side was shut down), then stays connected without sending
    its own EOF.  Expected: the client gets the whole reply then EOF (no
    reset); ``on_close(conn, None)`` runs exactly once, 0.2 to 2 s after the
    client saw EOF (the linger timeout, not at once and not never); the
    pipelined request is read and discarded, never given to ``on_data``.
    Fails today with TypeError (no ``linger_timeout`` option).
    """
    reply = counter_bytes(MiB, 73)
    handler = ReplyThenClose(reply)
    with no_leaks():
        with ServerThread(handler, trigger=trigger, task_type=task_type,
                          linger_timeout=0.5) as srv:
            sock = connected_client(srv.address, 64 * 1024)
            try:
                rec = handler.record_for(sock)
                data, how = pipeline_behind_the_reply(sock, handler.replied,
                                                      b"GET /2 HTTP/1.1\r\n\r\n")
                eof_at = time.monotonic()
                expect_stream(data, how, reply)
                handler.wait_closed(rec, 3.0)
                lingered = rec.closed_at - eof_at
                assert 0.2 <= lingered <= 2.0, \
                    "on_close ran {:.2f} s after the client saw EOF".format(lingered)
                time.sleep(0.2)
            finally:
                sock.close()
            assert rec.closes == [None]
            assert bytes(rec.data) == b"GET /1 HTTP/1.1\r\n\r\n"
        handler.check()


# -- finding 8: half-close ------------------------------------------------------


def test_write_eof_shuts_our_side_and_keeps_reading(trigger: str, task_type: str) -> None:
    """Finding 8 (a): ``conn.write_eof()`` after a reply.

    The server answers the first request with 1 MiB (more than the client's
    64 KiB receive buffer, so ``write_eof`` waits for the backlog), calls
    ``write_eof()`` twice (idempotent) and then tries ``write()``.  Expected:
    that write raises ``ConnClosedError``; the client reads the whole reply,
    then EOF; data the client sends afterwards still reaches ``on_data``; when
    the client closes too, the connection closes by itself and
    ``on_close(conn, None)`` runs once.  In pool/thread mode the calls come
    from a worker thread.  Fails today with AttributeError (no ``write_eof``).
    """
    reply = counter_bytes(MiB, 81)

    class HalfCloser(Book):
        def on_data(self, conn: Any, data: bytes) -> None:
            first = not conn.session.data
            super().on_data(conn, data)
            if not first:
                return
            try:
                conn.write(reply)
                conn.write_eof()
                conn.write_eof()  # idempotent
            except BaseException as exc:
                conn.session.notes.append(exc)
                raise
            try:
                conn.write(b"after write_eof")
            except pulse.ConnClosedError as exc:
                conn.session.notes.append(exc)
            else:
                conn.session.notes.append("write() after write_eof() did not raise")

    handler = HalfCloser()
    with no_leaks():
        with ServerThread(handler, trigger=trigger, task_type=task_type) as srv:
            sock = connected_client(srv.address, 64 * 1024)
            try:
                rec = handler.record_for(sock)
                sock.sendall(b"request")
                handler.wait(lambda: rec.notes, 5, "the handler to reply")
                assert isinstance(rec.notes[0], pulse.ConnClosedError), \
                    "write() after write_eof(): {!r}".format(rec.notes)
                data, how = read_to_end(sock, time.monotonic() + 10)
                expect_stream(data, how, reply)
                sock.sendall(b" and more after the server's EOF")
                handler.wait(lambda: len(rec.data) >= 39, 5, "the data sent after the EOF")
                assert bytes(rec.data) == b"request and more after the server's EOF"
                assert not rec.closes, "closed before the client closed: {!r}".format(rec.closes)
            finally:
                sock.close()
            handler.wait_closed(rec, 5)
            assert rec.closes == [None]
            assert len(rec.notes) == 1 and isinstance(rec.notes[0], pulse.ConnClosedError), \
                "write() after write_eof(): {!r}".format(rec.notes)
        handler.check()


@pytest.mark.parametrize("finish", ["close", "write_eof"])
@pytest.mark.parametrize("via", ["timer", "thread"])
def test_on_eof_true_keeps_the_connection_open_for_a_late_reply(
        trigger: str, task_type: str, via: str, finish: str) -> None:
    """Finding 8 (b): a handler whose ``on_eof`` returns True answers after the
    peer's FIN.

    The client sends a 100 KiB request and shuts down its write side.
    ``on_eof`` must run once, after all 100 KiB reached ``on_data``; it returns
    True and the reply (300 KiB) is written 0.2 s later, from a
    ``conn.call_later`` timer (``via=timer``; in pool/thread mode it is
    scheduled from the worker) or from another thread (``via=thread``), and
    the handler then calls ``close()`` or ``write_eof()``.  Expected: the
    client gets the whole reply, then EOF; ``on_close(conn, None)`` runs once
    (with ``write_eof`` both directions are shut, so the connection closes by
    itself once the backlog is sent).  Fails today: ``on_eof`` is never called
    and the connection closes at the FIN.
    """
    request = counter_bytes(100 * 1024, 82)
    reply = counter_bytes(300 * 1024, 83)

    class LateReply(Book):
        def __init__(self) -> None:
            super().__init__()
            self.timers: List[threading.Timer] = []

        def respond(self, conn: Any) -> None:
            try:
                conn.write(reply)
                getattr(conn, finish)()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                conn.session.notes.append(exc)

        def on_eof(self, conn: Any) -> bool:
            self.note_eof(conn)
            if via == "timer":
                conn.call_later(0.2, self.respond, conn)
            else:
                timer = threading.Timer(0.2, self.respond, (conn,))
                self.timers.append(timer)
                timer.start()
            return True

    handler = LateReply()
    with no_leaks():
        with ServerThread(handler, trigger=trigger, task_type=task_type) as srv:
            sock = connected_client(srv.address)
            try:
                rec = handler.record_for(sock)
                sock.sendall(request)
                sock.shutdown(socket.SHUT_WR)
                data, how = read_to_end(sock, time.monotonic() + 5)
                expect_stream(data, how, reply,
                              "the client (on_eof calls: {}, errors: {!r})".format(
                                  len(rec.eofs), rec.notes))
            finally:
                sock.close()
                for timer in handler.timers:
                    timer.join(5)
            handler.wait_closed(rec, 5)
            assert rec.closes == [None]
            assert not rec.notes, "the late reply failed: {!r}".format(rec.notes)
            assert [seen for _, seen in rec.eofs] == [len(request)], \
                "on_eof calls (bytes delivered before each): {}".format(rec.eofs)
            assert bytes(rec.data) == request
        handler.check()


@pytest.mark.parametrize("style", ["no_on_eof", "on_eof_false"])
def test_without_on_eof_the_fin_still_closes(trigger: str, task_type: str, style: str) -> None:
    """Finding 8 (b), today's behaviour kept: without ``on_eof`` (or when it
    returns a false value) the peer's FIN closes the connection once the
    backlog is sent, and a reply produced later fails with ``ConnClosedError``.

    The client sends a request and shuts down its write side; 0.2 s later
    another thread tries to reply.  Expected: that write raises
    ``ConnClosedError``, the client sees EOF and no data, ``on_close(conn,
    None)`` runs once, and a defined ``on_eof`` ran exactly once, after the
    request reached ``on_data``.  ``no_on_eof`` passes today (it guards the
    default); ``on_eof_false`` fails today because ``on_eof`` is never called.
    """
    class NoHalfClose(Book):
        def __init__(self) -> None:
            super().__init__()
            self.timers: List[threading.Timer] = []

        def on_data(self, conn: Any, data: bytes) -> None:
            first = not conn.session.data
            super().on_data(conn, data)
            if first:
                timer = threading.Timer(0.2, self.respond, (conn,))
                self.timers.append(timer)
                timer.start()

        def respond(self, conn: Any) -> None:
            try:
                conn.write(b"too late")
            except pulse.ConnClosedError as exc:
                conn.session.notes.append(exc)
            else:
                conn.session.notes.append("the write after the FIN did not raise")

    if style == "on_eof_false":
        def on_eof(self: Any, conn: Any) -> bool:
            self.note_eof(conn)
            return False
        NoHalfClose.on_eof = on_eof  # type: ignore[attr-defined]

    handler = NoHalfClose()
    with no_leaks():
        with ServerThread(handler, trigger=trigger, task_type=task_type) as srv:
            sock = connected_client(srv.address)
            try:
                rec = handler.record_for(sock)
                sock.sendall(b"request")
                sock.shutdown(socket.SHUT_WR)
                data, how = read_to_end(sock, time.monotonic() + 5)
                assert (data, how) == (b"", "eof")
                handler.wait_closed(rec, 5)
                for timer in handler.timers:
                    timer.join(5)
            finally:
                sock.close()
            assert rec.closes == [None]
            assert len(rec.notes) == 1 and isinstance(rec.notes[0], pulse.ConnClosedError), \
                "the reply after the FIN: {!r}".format(rec.notes)
            if style == "on_eof_false":
                assert [seen for _, seen in rec.eofs] == [len(b"request")], \
                    "on_eof calls (bytes delivered before each): {}".format(rec.eofs)
        handler.check()


def _count_then_answer(sock: socket.socket, peer: PlainPeer) -> None:
    """Upstream script: read to EOF, then answer with the byte count and close."""
    peer.received, peer.how = read_to_end(sock, time.monotonic() + peer.timeout)
    if peer.how == "eof":
        sock.sendall("got {} bytes".format(len(peer.received)).encode())


def _banner_then_read(sock: socket.socket, peer: PlainPeer) -> None:
    """Upstream script: send a banner, shut down our write side, read to EOF."""
    sock.sendall(b"banner from upstream")
    sock.shutdown(socket.SHUT_WR)
    peer.received, peer.how = read_to_end(sock, time.monotonic() + peer.timeout)


def test_proxy_forwards_the_clients_eof_and_returns_the_answer(
        trigger: str, task_type: str) -> None:
    """Finding 8 (c): ``examples/proxy.py`` forwards the client's EOF upstream.

    The upstream (plain sockets) counts bytes until EOF and only then
    answers.  The client sends 100 KiB through the proxy and shuts down its
    write side.  Expected: the upstream sees all 100 KiB then EOF, and the
    client gets the answer through the proxy, then EOF.  Today the proxy
    closes both sides at the client's FIN, so the answer is lost.
    """
    request = counter_bytes(100 * 1024, 84)
    upstream = PlainPeer(_count_then_answer, timeout=5)
    proc, port = start_proxy(upstream.address, trigger, task_type)
    try:
        sock = connected_client(("127.0.0.1", port))
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            data, how = read_to_end(sock, time.monotonic() + 5)
        finally:
            sock.close()
        upstream.join(10)
        expect_stream(upstream.received, upstream.how, request, "the upstream")
        expected = "got {} bytes".format(len(request)).encode()
        assert (data, how) == (expected, "eof"), "the client got {!r}, then {}".format(data, how)
    finally:
        stop_proxy(proc)
        upstream.close()


def test_proxy_forwards_the_upstreams_eof_and_keeps_carrying_the_client(
        trigger: str, task_type: str) -> None:
    """Finding 8 (c), the other direction: the upstream sends a banner and shuts
    down its write side, then keeps reading.

    Expected: the client gets the banner, then EOF; what the client sends
    afterwards still reaches the upstream, followed by EOF when the client
    shuts down its write side.  Today the proxy closes the client at the
    upstream's FIN, so the upstream never gets the client's data.
    """
    upstream = PlainPeer(_banner_then_read, timeout=5)
    proc, port = start_proxy(upstream.address, trigger, task_type)
    try:
        sock = connected_client(("127.0.0.1", port))
        try:
            data, how = read_to_end(sock, time.monotonic() + 5)
            assert (data, how) == (b"banner from upstream", "eof"), \
                "the client got {!r}, then {}".format(data, how)
            try:
                sock.sendall(b"sent after the upstream's EOF")
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                raise AssertionError("the proxy closed the client: {!r}".format(exc)) from None
            upstream.join(10)
        finally:
            sock.close()
        assert (upstream.received, upstream.how) == (b"sent after the upstream's EOF", "eof"), \
            "the upstream got {!r}, then {}".format(upstream.received, upstream.how)
    finally:
        stop_proxy(proc)
        upstream.close()


# -- finding 11: writes before the connect completes ----------------------------


class DialOutcome(pulse.Handler):
    """Client-side handler: counts callbacks, keeps the close error."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.opens = 0
        self.errs: List[Optional[BaseException]] = []

    def on_open(self, conn: Any) -> None:
        with self.lock:
            self.opens += 1

    def on_close(self, conn: Any, err: Optional[BaseException]) -> None:
        with self.lock:
            self.errs.append(err)


@pytest.mark.parametrize("where", ["other_thread", "loop_thread"])
def test_write_and_close_before_the_connect_completes_are_kept(
        trigger: str, task_type: str, where: str) -> None:
    """Finding 11: ``dial()``, ``write(b"early")``, ``close()`` before the connect
    completes.

    ``other_thread``: the client loop is held in a callback while this thread
    dials, writes and closes, so all three reach the loop before it polls the
    connecting socket.  ``loop_thread``: all three run in one callback on the
    loop.  Expected: the far end (plain sockets) receives b"early", then EOF;
    ``on_close(conn, None)`` runs exactly once; the loop ends with no
    connection left.  Today the queued bytes are dropped when the connecting
    socket is closed: the far end gets EOF and nothing; in ``loop_thread``
    the dead connection also stays in the loop's table, so the client's
    ``stop()`` never returns.
    """
    peer = PlainPeer(timeout=5)
    handler = DialOutcome()
    try:
        with no_leaks():
            with running_client(trigger=trigger, task_type=task_type) as client:
                def early() -> Any:
                    conn = client.dial(peer.address, handler)
                    conn.write(b"early")
                    conn.close()
                    return conn

                if where == "other_thread":
                    with loop_stalled(client.loop):
                        early()
                else:
                    on_loop(client.loop, early)
                peer.join(10)
                assert (peer.received, peer.how) == (b"early", "eof"), \
                    "the far end got {!r}, then {}".format(peer.received, peer.how)
                wait_for(lambda: len(handler.errs) >= 1, 5, "on_close")
                wait_for(lambda: client.loop.connections == 0, 5,
                         "the loop to forget the connection")
            assert handler.errs == [None], "on_close: {!r}".format(handler.errs)
    finally:
        peer.close()


def test_close_before_a_refused_connect_reports_the_connect_error(
        trigger: str, task_type: str) -> None:
    """Finding 11: ``dial()`` to a port nobody listens on, then ``write()`` and
    ``close()`` before the connect fails (the loop is held meanwhile).

    Expected: ``on_open`` never runs and ``on_close`` runs once with the
    connect error (``ConnectionRefusedError``), not ``None``: the bytes were
    never sent.  Today ``close()`` wins and ``on_close`` gets ``None``.
    """
    handler = DialOutcome()
    with no_leaks():
        with running_client(trigger=trigger, task_type=task_type) as client:
            with loop_stalled(client.loop):
                conn = client.dial(("127.0.0.1", free_port()), handler)
                conn.write(b"early")
                conn.close()
            wait_for(lambda: len(handler.errs) >= 1, 5, "on_close")
            time.sleep(0.1)
            wait_for(lambda: client.loop.connections == 0, 5, "the loop to forget the connection")
    assert handler.opens == 0
    assert len(handler.errs) == 1, "on_close ran {} times".format(len(handler.errs))
    err = handler.errs[0]
    assert isinstance(err, ConnectionRefusedError) or (
        isinstance(err, OSError) and err.errno == errno.ECONNREFUSED), \
        "on_close got {!r}, not the connect error".format(err)


# -- finding 15: abort ----------------------------------------------------------


def test_abort_drops_the_writes_of_the_same_callback_and_resets(
        trigger: str, task_type: str) -> None:
    """Finding 15: ``conn.write(b"X" * 1000)`` then ``conn.abort()`` in one
    ``on_data``.

    Expected: the client's ``recv`` raises ECONNRESET (SO_LINGER 0: a reset,
    not a FIN) and, in loop mode, none of the 1,000 bytes arrive; ``on_close``
    runs once.  (In the pool and thread modes the write and the abort reach
    the loop one after the other, so a flush may come between them.)
    Today the batched write is still flushed and the connection ends with a
    FIN: the client reads 1,000 bytes of X, then EOF.
    """
    class Aborter(Book):
        def on_data(self, conn: Any, data: bytes) -> None:
            super().on_data(conn, data)
            conn.write(b"X" * 1000)
            conn.abort()

    handler = Aborter()
    with no_leaks():
        with ServerThread(handler, trigger=trigger, task_type=task_type) as srv:
            sock = connected_client(srv.address)
            try:
                rec = handler.record_for(sock)
                sock.sendall(b"go")
                data, how = read_to_end(sock, time.monotonic() + 5)
            finally:
                sock.close()
            if task_type == "loop":
                assert len(data) == 0 and how == "reset", \
                    "after abort() the client got {} bytes ({!r}...), then {}".format(
                        len(data), data[:8], how)
            else:
                # A worker's write reaches the loop before its abort() does,
                # and the loop may flush in between (the callback runs beside
                # the loop, not in it): the bytes may arrive, then the reset.
                assert data in (b"", b"X" * 1000) and how == "reset", (len(data), how)
            handler.wait_closed(rec, 5)
            assert len(rec.closes) == 1
        handler.check()


def test_abort_with_a_backlog_resets_instead_of_finishing_the_stream(
        trigger: str, task_type: str) -> None:
    """Finding 15: ``abort()`` on a connection with a 16 MiB backlog (the client
    does not read).

    ``abort()`` is called from the test thread (it is safe from any thread).
    Expected: the connection is reset: the client may read bytes the kernel
    had already taken, but then ``recv`` raises ECONNRESET, and it never gets
    the whole 16 MiB; ``on_close`` runs once.  Today the fd is closed with a
    plain ``close()``, so the kernel sends what it holds and then a FIN: the
    client sees a truncated stream end like a normal EOF.
    """
    blob = counter_bytes(16 * MiB, 151)

    class Blaster(Book):
        def on_data(self, conn: Any, data: bytes) -> None:
            super().on_data(conn, data)
            conn.write(blob)

    handler = Blaster()
    with no_leaks():
        with ServerThread(handler, trigger=trigger, task_type=task_type) as srv:
            sock = connected_client(srv.address, 64 * 1024)
            try:
                rec = handler.record_for(sock)
                sock.sendall(b"go")
                handler.wait(lambda: rec.conn.write_buffer_size > 0, 5, "a write backlog")
                time.sleep(0.1)
                rec.conn.abort()
                handler.wait_closed(rec, 5)
                data, how = read_to_end(sock, time.monotonic() + 10)
            finally:
                sock.close()
            if not (how == "reset" and len(data) < len(blob) and blob.startswith(data)):
                raise AssertionError("after abort() the client got " + describe(data, blob, how))
            assert len(rec.closes) == 1
        handler.check()


def test_close_from_a_thread_as_the_connect_completes_sends_the_writes_queued_before_it(
        trigger: str, task_type: str) -> None:
    """``close()`` from another thread sets its flag at once and queues the
    close behind the writes it made before; when the connect completes in the
    iteration that then runs them (events are handled before queued calls),
    the connection must not start closing ahead of those writes.  The loop
    once read the cross-thread flag when the connect completed; plain TCP
    survived it (the writes still reached the backlog before the close
    settled), TLS did not (``test_tls``'s ``..._racing_the_handshakes_end...``:
    close_notify went first and the writes failed with PROTOCOL_IS_SHUTDOWN)."""
    peer = PlainPeer(timeout=5)
    handler = DialOutcome()
    try:
        with no_leaks():
            with running_client(trigger=trigger, task_type=task_type) as client:
                # Dial on the loop and hold it in the same callback, so that
                # the next poll sees the completed connect before the calls
                # this thread queues meanwhile.
                dialed: List[pulse.Conn] = []
                entered, release = threading.Event(), threading.Event()

                def dial_and_hold() -> None:
                    dialed.append(client.dial(peer.address, handler))
                    entered.set()
                    release.wait(5)

                client.loop.call_soon_threadsafe(dial_and_hold)
                assert entered.wait(5)
                time.sleep(0.1)  # the connect completes in the kernel meanwhile
                conn = dialed[0]
                conn.write(b"early")
                conn.write(b" and later")
                conn.close()
                release.set()
                peer.join(10)
                assert (peer.received, peer.how) == (b"early and later", "eof"), \
                    "the far end got {!r}, then {}".format(peer.received, peer.how)
                wait_for(lambda: len(handler.errs) >= 1, 5, "on_close")
            assert handler.errs == [None], "on_close: {!r}".format(handler.errs)
    finally:
        peer.close()
