"""Review of the connection-lifecycle rewrite (issue 12): regression tests for
bugs found by reading the code.  Each one fails on the code as reviewed.

Every socket talks to 127.0.0.1 (or is a socketpair), every wait is bounded.
"""

import os
import socket
import threading
import time
from typing import Any, List, Optional

import pytest

from pulse.loop import EventLoop
from pulse.options import Options
from pulse.timers import monotonic

from lifecycle_support import Book, read_to_end
from support import ServerThread, on_loop


def _fd_target(fd: int) -> Optional[str]:
    try:
        return os.readlink("/proc/self/fd/{}".format(fd))
    except OSError:
        return None


def _run_loop_in_thread(loop: EventLoop) -> threading.Thread:
    errors: List[BaseException] = []

    def run() -> None:
        try:
            loop.run()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
    thread = threading.Thread(target=run, daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


# -- 1. the loop spins on a level-triggered hang-up it does not consume ------------


class PausedAfterOurEof(Book):
    """Shuts our write side at once and pauses reading (a proxy pausing the
    upstream because the client side is backed up)."""

    def on_open(self, conn: Any) -> None:
        super().on_open(conn)
        conn.write_eof()
        conn.pause_reading()


@pytest.mark.parametrize("task_type", ["loop", "pool"])
def test_level_hangup_while_paused_does_not_spin(task_type: str) -> None:
    book = PausedAfterOurEof()
    with ServerThread(book, trigger="level", task_type=task_type) as server:
        sock = server.connect()
        rec = book.record_for(sock)
        data, how = read_to_end(sock, time.monotonic() + 5)
        assert how == "eof", "our write_eof did not reach the client ({})".format(how)
        sock.shutdown(socket.SHUT_WR)  # both directions shut: EPOLLHUP, always reported
        time.sleep(0.2)
        loop = rec.conn.loop
        before = loop._iteration  # private: the loop's iteration counter
        time.sleep(0.5)
        spins = loop._iteration - before
        on_loop(loop, rec.conn.resume_reading)
        book.wait_closed(rec, 5)
        sock.close()
    assert spins < 50, "the loop ran {} iterations in 0.5 s with nothing to do".format(spins)


# -- 2. a cancelled timer still runs when it was due in the same batch -------------


def test_timer_cancelled_by_an_earlier_timer_of_the_same_batch_does_not_run() -> None:
    loop = EventLoop(Options())
    ran: List[str] = []
    handles: List[Any] = []

    def first() -> None:
        ran.append("first")
        handles[0].cancel()

    def second() -> None:
        ran.append("second")

    def start() -> None:
        when = monotonic() + 0.05
        loop.call_at(when, first)
        handles.append(loop.call_at(when, second))
        loop.call_later(0.3, loop.stop)

    loop.call_soon_threadsafe(start)
    thread = _run_loop_in_thread(loop)
    thread.join(5)
    assert not thread.is_alive()
    assert ran == ["first"], "a cancelled timer ran: {}".format(ran)


class ExtendDeadline(Book):
    """Sets a read deadline and, from a timer due at the same moment, moves it
    later (a keep-alive that extends the deadline)."""

    def on_open(self, conn: Any) -> None:
        super().on_open(conn)

        def extend() -> None:
            conn.set_read_deadline(5.0)
        # Both due 0.1 s from now (the extension a few microseconds first):
        # the poll's timeout rounds up, so one wake-up finds both due.
        conn.call_later(0.1, extend)
        conn.set_read_deadline(0.1)


def test_extending_a_read_deadline_from_a_timer_due_with_it_keeps_the_connection() -> None:
    book = ExtendDeadline()
    with ServerThread(book) as server:
        sock = server.connect()
        rec = book.record_for(sock)
        time.sleep(0.5)
        closes = list(rec.closes)
        sock.close()
        book.wait_closed(rec, 5)
    assert closes == [], "the replaced deadline still fired: on_close({!r})".format(closes)


# -- 3. graceful stop: connections that join in the last iteration ----------------


class RegisterOnClose(Book):
    """From the on_close of a connection closed by stop(), hand the loop a new
    connection (register) and dial another."""

    def __init__(self, pair_end: socket.socket, dial_to: Any) -> None:
        super().__init__()
        self.pair_end = pair_end
        self.dial_to = dial_to
        self.registered: List[Any] = []
        self.dialed: List[Any] = []
        self.other = Book()

    def on_close(self, conn: Any, err: Optional[BaseException]) -> None:
        super().on_close(conn, err)
        if conn.session is not None and not self.registered:
            self.registered.append(conn.loop.register(self.pair_end, self.other))
            self.dialed.append(conn.loop.dial(self.dial_to, self.other))


def test_connection_registered_during_stop_is_closed_before_serve_returns() -> None:
    mine, theirs = socket.socketpair()
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(4)
    book = RegisterOnClose(theirs, target.getsockname())
    server = ServerThread(book)
    with server:
        sock = server.connect()
        book.record_for(sock)
    # serve() returned.
    reg = book.registered[0]
    dialed = book.dialed[0]
    reg_fd, dial_fd = reg._fd, dialed._fd  # private: the fds the loop owned
    reg_open = _fd_target(reg_fd) is not None and reg.fileno() >= 0
    dial_open = _fd_target(dial_fd) is not None and dialed.fileno() >= 0
    opened_reg = [r for r in book.other.records if r.conn is reg]
    for fd, still in ((reg_fd, reg_open), (dial_fd, dial_open)):
        if still:
            os.close(fd)  # clean up what the loop leaked
    mine.close()
    sock.close()
    target.close()
    assert not reg_open and not dial_open, "serve() returned with the registered " \
        "connection open: {} (on_open ran: {}, on_close ran: {}); with the dialed socket " \
        "open: {}".format(reg_open, bool(opened_reg), bool(opened_reg and opened_reg[0].closes),
                          dial_open)


def test_connections_queued_when_run_raises_are_closed() -> None:
    mine, theirs = socket.socketpair()
    fd = theirs.fileno()
    inode = os.fstat(fd).st_ino
    loop = EventLoop(Options())
    box: List[Any] = []

    def boom() -> None:
        box.append(loop.register(theirs, Book()))
        raise KeyboardInterrupt("from a callback")

    loop.call_soon_threadsafe(boom)
    thread = _run_loop_in_thread(loop)
    thread.join(5)
    assert not thread.is_alive()
    assert thread.errors and isinstance(thread.errors[0], KeyboardInterrupt)  # type: ignore
    try:
        still = os.fstat(fd).st_ino == inode
    except OSError:
        still = False
    if still:
        os.close(fd)
    mine.close()
    assert not still, "run() raised and left a connection the loop owned open (fd leak)"


# -- 4. a write accepted before close() is dropped ---------------------------------


class ThreadWriteThenClose(Book):
    """on_data: a small write, then a large write from another thread (joined:
    it returned without error), then close() on the loop."""

    BIG = bytes(range(256)) * 400  # 100 KiB: a "large" write

    def on_data(self, conn: Any, data: bytes) -> None:
        super().on_data(conn, data)
        if self.records[0].notes:
            return
        self.records[0].notes.append("done")
        conn.write(b"head:")
        errors: List[BaseException] = []

        def other() -> None:
            try:
                conn.write(self.BIG)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(5)
        assert not errors, errors
        conn.close()


def test_write_from_a_thread_before_close_is_sent() -> None:
    book = ThreadWriteThenClose()
    with ServerThread(book) as server:
        sock = server.connect()
        sock.sendall(b"go")
        data, how = read_to_end(sock, time.monotonic() + 5)
        sock.close()
    assert data == b"head:" + ThreadWriteThenClose.BIG, \
        "the client got {} of {} bytes, then {}".format(
            len(data), 5 + len(ThreadWriteThenClose.BIG), how)


# -- 5. abort(err) while lingering loses err ---------------------------------------


class CloseThenAbort(Book):
    """close() at once (lingering: the client does not send its FIN), then
    abort(err) from a timer."""

    def on_open(self, conn: Any) -> None:
        super().on_open(conn)
        conn.close()
        conn.loop.call_later(0.2, conn.abort, ValueError("aborted by the handler"))


def test_abort_during_lingering_close_reports_its_error() -> None:
    book = CloseThenAbort()
    with ServerThread(book, linger_timeout=3.0) as server:
        sock = server.connect()
        rec = book.record_for(sock)
        book.wait_closed(rec, 5)
        sock.close()
    err = rec.closes[0]
    assert isinstance(err, ValueError), "abort(err) while lingering: on_close got {!r}".format(err)


# -- 6. an exception out of on_open leaks the rest of the accept burst --------------


class ExitInFirstOpen(Book):
    def on_open(self, conn: Any) -> None:
        super().on_open(conn)
        if len(self.records) == 1:
            raise SystemExit("from on_open")


def test_exception_leaving_run_from_on_open_closes_the_rest_of_the_accept_burst() -> None:
    from lifecycle_support import loop_stalled
    book = ExitInFirstOpen()
    server = ServerThread(book)
    server.__enter__()
    clients: List[socket.socket] = []
    try:
        loop = server.server.loop
        with loop_stalled(loop):
            for _ in range(4):
                clients.append(server.connect())
            time.sleep(0.1)  # all four in the accept queue: one burst takes them
        server.thread.join(10)
        assert not server.thread.is_alive()
        assert isinstance(server.error, SystemExit), server.error
        ends = [read_to_end(c, time.monotonic() + 2)[1] for c in clients]
    finally:
        for c in clients:
            c.close()
    left_open = ends.count("timeout")
    assert left_open == 0, "run() raised and left {} accepted connections open " \
        "(client reads ended: {})".format(left_open, ends)


# -- 7. a graceful close to a peer that never reads never ends ----------------------


class ReplyAndClose(Book):
    def on_open(self, conn: Any) -> None:
        super().on_open(conn)
        conn.write(b"x" * (16 << 20))
        conn.close()


def test_closing_connection_to_a_peer_that_never_reads_is_bounded() -> None:
    book = ReplyAndClose()
    with ServerThread(book, linger_timeout=0.5, write_buffer_high_water=64 << 20) as server:
        sock = server.connect()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        rec = book.record_for(sock)
        time.sleep(3.0)  # six linger timeouts
        closes = list(rec.closes)
        unsent = rec.conn.write_buffer_size
        sock.close()  # the reset ends it
        book.wait_closed(rec, 5)
    assert closes, "3 s after close(), with linger_timeout=0.5 s, the connection is " \
        "still open with {} bytes unsent (the peer never reads)".format(unsent)


# -- 8. pool mode: close() on the loop's thread still lets queued on_data run -------


class SlowFirstChunk(Book):
    def __init__(self) -> None:
        super().__init__()
        self.closed_at: Optional[float] = None

    def on_open(self, conn: Any) -> None:
        super().on_open(conn)

        def close_on_loop() -> None:  # a timer: runs on the loop's thread
            conn.close()
            self.closed_at = time.monotonic()
        conn.call_later(0.3, close_on_loop)

    def on_data(self, conn: Any, data: bytes) -> None:
        super().on_data(conn, data)
        if len(conn.session.data_times) == 1:
            time.sleep(0.6)  # the second chunk waits in the queue meanwhile


def test_pool_close_on_the_loop_thread_stops_queued_on_data() -> None:
    book = SlowFirstChunk()
    with ServerThread(book, task_type="pool", linger_timeout=0) as server:
        sock = server.connect()
        rec = book.record_for(sock)
        sock.sendall(b"first")
        time.sleep(0.1)
        sock.sendall(b"second")  # queued behind the slow first on_data
        book.wait_closed(rec, 5)
        sock.close()
    late = [t for t in rec.data_times if book.closed_at is not None and t > book.closed_at]
    assert not late, "{} on_data call(s) ran after close() returned on the loop's thread " \
        "(data: {!r})".format(len(late), bytes(rec.data))


# -- 9. pause_reading() from another thread is lost behind a queued resume -----------


def test_pause_resume_pause_from_another_thread_ends_paused() -> None:
    from lifecycle_support import loop_stalled
    book = Book()
    with ServerThread(book, linger_timeout=0) as server:
        sock = server.connect()
        rec = book.record_for(sock)
        conn = rec.conn
        loop = conn.loop
        with loop_stalled(loop):  # all three calls reach the loop in one later iteration
            conn.pause_reading()
            conn.resume_reading()
            conn.pause_reading()  # the last word: paused
        paused = on_loop(loop, lambda: conn.reading_paused)
        sock.sendall(b"must wait for resume_reading")
        time.sleep(0.3)
        delivered = bytes(rec.data)
        conn.resume_reading()  # a paused connection holds the FIN too: let it end
        sock.close()
        book.wait_closed(rec, 5)
    assert paused and not delivered, "pause/resume/pause from a thread left the connection " \
        "reading (reading_paused={}, on_data got {!r})".format(paused, delivered)


class SlowEofAfterOurEof(Book):
    """Thread mode: shut our side at once; on_eof (the peer's FIN) takes 0.6 s
    (a handler that blocks, which is what the thread mode is for)."""

    def on_open(self, conn: Any) -> None:
        super().on_open(conn)
        conn.write_eof()

    def on_eof(self, conn: Any) -> bool:
        self.note_eof(conn)
        time.sleep(0.6)
        return False


def test_level_hangup_while_a_worker_handles_on_eof_does_not_spin() -> None:
    book = SlowEofAfterOurEof()
    with ServerThread(book, trigger="level", task_type="thread") as server:
        sock = server.connect()
        rec = book.record_for(sock)
        data, how = read_to_end(sock, time.monotonic() + 5)
        assert how == "eof"
        sock.shutdown(socket.SHUT_WR)
        book.wait(lambda: rec.eofs, 5, "on_eof")
        loop = rec.conn.loop
        before = loop._iteration  # private: the loop's iteration counter
        time.sleep(0.4)
        spins = loop._iteration - before
        book.wait_closed(rec, 5)
        sock.close()
    assert spins < 50, "the loop ran {} iterations in 0.4 s while on_eof ran in its " \
        "thread".format(spins)
