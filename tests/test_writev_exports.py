"""A failed ``writev`` leaves no buffer export behind in its exception.

A ``Conn`` keeps the ``OSError`` that ended it (``on_close`` gets it), and the
error's traceback keeps the frames it was raised through.  When one of them
still held ``ffi.from_buffer`` exports of the memoryviews being written, the
garbage collector later met memoryviews it could not clear and CPython
crashed (a segfault at exit of a pool-mode server whose clients reset their
connections).
"""

import socket

import pytest

from pulse import _sys


@pytest.mark.skipif(_sys.BACKEND == "portable", reason="the portable writev exports nothing")
def test_a_failed_writev_keeps_no_export_of_its_buffers() -> None:
    ours, peer = socket.socketpair()
    peer.close()  # the peer is gone: writev fails with EPIPE
    views = [memoryview(b"x" * 100), memoryview(b"y" * 100)]
    try:
        with pytest.raises(OSError) as info:
            _sys.writev(ours.fileno(), views)
        assert info.value.__traceback__ is not None  # the frames are still alive here
        for view in views:
            view.release()  # BufferError while an export of it is alive
    finally:
        ours.close()
