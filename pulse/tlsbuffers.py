"""The memory between the socket and an ``ssl.SSLObject``, per interpreter.

``tls.TLS`` moves ciphertext into the incoming ``MemoryBIO``
(``bio_input``), plaintext out of the ``SSLObject`` (``read_buffer``) and
records out of the outgoing BIO (``drain``).  On CPython these are the
``ssl`` module's own calls.  PyPy's ``ssl`` is written in Python over cffi,
and three of its paths copy what CPython does not (16 KiB records, PyPy
3.9, us per call, CPython's in brackets): ``MemoryBIO.write`` turns a
memoryview into bytes and then moves those out of the nursery, 11.5 (1.1);
``MemoryBIO.read`` allocates a zeroed buffer and copies it into the bytes it
returns, 7.8 (0.7); ``SSLObject.read`` into a bytearray copies that
bytearray out of the GC heap, 16.5 against 11.4 into raw memory.  So on
PyPy the ciphertext is handed over as a cffi buffer, which PyPy passes to C
as it is, the plaintext buffer is raw memory, and the outgoing BIO is read
with ``BIO_read`` into a reused raw buffer (PyPy's own binding of OpenSSL,
``_pypy_openssl``; without it, or without ``MemoryBIO.bio``, the portable
``MemoryBIO.read``).  Each buffer is one per thread: TLS runs on a loop's
own thread only, and each loop has one.
"""

import ssl
import sys
import threading
from typing import Any, Callable, Union

# Plaintext read out of the SSLObject per call: a 16 KiB record at a time
# costs a call each, and a buffer allocated per call is the 256 KiB malloc
# per read that asyncio's users measured.
READ_BUFFER_SIZE = 256 * 1024

_local = threading.local()
_PYPY = sys.implementation.name == "pypy"


def _heap_buffer() -> memoryview:
    return memoryview(bytearray(READ_BUFFER_SIZE))


#: Makes a thread's plaintext buffer (raw memory on PyPy, below).
_new_buffer: Callable[[], memoryview] = _heap_buffer


def read_buffer() -> memoryview:
    """This thread's buffer that plaintext is decrypted into."""
    try:
        view: memoryview = _local.view
        return view
    except AttributeError:
        _local.view = view = _new_buffer()
        return view


def _same_input(data: Union[bytes, memoryview]) -> Any:
    return data


def _bio_read(bio: ssl.MemoryBIO) -> bytes:
    return bio.read()


#: ``bio_input(data)``: ``data`` as the incoming BIO takes it cheapest.
bio_input: Callable[[Union[bytes, memoryview]], Any] = _same_input
#: ``drain(bio)``: every byte the outgoing BIO holds, as bytes.
drain: Callable[[ssl.MemoryBIO], bytes] = _bio_read

if _PYPY:  # pragma: no cover - the PyPy run of the suite covers it
    from cffi import FFI  # type: ignore[import-untyped]  # (part of PyPy)

    _ffi = FFI()

    def _raw_buffer() -> memoryview:
        # (the cffi buffer keeps the memory it views alive)
        return memoryview(_ffi.buffer(_ffi.new("char[]", READ_BUFFER_SIZE)))

    def _cffi_input(data: Union[bytes, memoryview]) -> Any:
        # The loop feeds memoryviews of its read arena (raw memory: no copy
        # at all); bytes (what start_tls kept) go as they are.  The BIO
        # copies the bytes in during the call, so no pointer outlives it.
        if type(data) is memoryview:
            return _ffi.buffer(_ffi.from_buffer(data), len(data))
        return data

    _new_buffer, bio_input = _raw_buffer, _cffi_input

    try:
        from _pypy_openssl import ffi as _ossl_ffi, lib as _ossl_lib  # type: ignore
    except ImportError:
        _ossl_lib = None

    def _bio_drain(bio: ssl.MemoryBIO) -> bytes:
        size: int = bio.pending
        scratch = getattr(_local, "out", None)
        if scratch is None or len(scratch) < size:
            _local.out = scratch = _ossl_ffi.new("char[]", max(size, READ_BUFFER_SIZE))
        got = _ossl_lib.BIO_read(bio.bio, scratch, size)  # type: ignore[attr-defined]
        if got < size:  # (never: the BIO held size bytes) the portable path says why
            return (_ossl_ffi.unpack(scratch, got) if got > 0 else b"") + bio.read()
        return _ossl_ffi.unpack(scratch, got)

    if _ossl_lib is not None and hasattr(ssl.MemoryBIO(), "bio"):
        drain = _bio_drain
