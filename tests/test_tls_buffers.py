"""``pulse/tlsbuffers.py``: the memory between the socket and the SSLObject.

The same checks run on CPython (the ``ssl`` module's own calls) and on PyPy
(cffi buffers and ``BIO_read`` into a reused buffer): every byte comes out
once and in order, whatever the input type and size, and each thread has
its own buffers.  End-to-end TLS is in ``test_tls*.py``.
"""

import ssl
import sys
import threading
from typing import List

import pytest

from pulse import tlsbuffers
from support import pattern

PYPY = sys.implementation.name == "pypy"


def test_pypy_takes_its_fast_paths() -> None:
    """On PyPy the three replacements are in use (a PyPy whose ``ssl`` lost
    ``MemoryBIO.bio`` or ``_pypy_openssl`` fails here, not silently slower)."""
    if not PYPY:
        assert tlsbuffers.drain is tlsbuffers._bio_read
        assert tlsbuffers.bio_input is tlsbuffers._same_input
        return
    assert tlsbuffers.drain is not tlsbuffers._bio_read
    assert tlsbuffers.bio_input is not tlsbuffers._same_input
    assert tlsbuffers._new_buffer is not tlsbuffers._heap_buffer


@pytest.mark.parametrize("size", [1, 5, 16 * 1024 + 22, tlsbuffers.READ_BUFFER_SIZE,
                                  tlsbuffers.READ_BUFFER_SIZE + 4097, 1 << 20])
def test_drain_returns_every_pending_byte_once(size: int) -> None:
    """``drain`` empties the BIO into one bytes object, past the reused
    buffer's size too (it grows), and leaves nothing behind."""
    bio = ssl.MemoryBIO()
    payload = pattern(size, seed=size)
    bio.write(payload[:size // 2])
    bio.write(payload[size // 2:])
    got = tlsbuffers.drain(bio)
    assert type(got) is bytes and got == payload
    assert bio.pending == 0
    bio.write(b"next")  # the reused buffer does not leak the last payload's tail
    assert tlsbuffers.drain(bio) == b"next"


def test_bio_input_takes_every_buffer_type() -> None:
    """bytes, a memoryview of bytes, of a bytearray and a slice at an offset
    all reach the BIO byte for byte."""
    payload = pattern(70000, seed=3)
    inputs = [payload, memoryview(payload), memoryview(bytearray(payload)),
              memoryview(b"xx" + payload)[2:]]
    for data in inputs:
        bio = ssl.MemoryBIO()
        assert bio.write(tlsbuffers.bio_input(data)) == len(payload)
        assert bio.read() == payload


def test_read_buffer_is_one_per_thread() -> None:
    """Two loop threads never share the plaintext buffer."""
    views: List[memoryview] = []
    mine = tlsbuffers.read_buffer()
    assert tlsbuffers.read_buffer() is mine and len(mine) == tlsbuffers.READ_BUFFER_SIZE
    worker = threading.Thread(target=lambda: views.append(tlsbuffers.read_buffer()))
    worker.start()
    worker.join(10)
    assert views and views[0] is not mine
    mine[:4] = b"mine"
    assert bytes(views[0][:4]) != b"mine"
