"""Flags of the ``(fd, flags, offset, length)`` records that ``Poller.poll_read`` returns.

Pure Python so that every backend (the compiled ones and the portable one)
shares them; ``_common`` checks they match the C helpers in ``build_ffi.py``.
"""

READ = 1       # offset/length name bytes read into the arena
EOF = 2        # the peer closed its write side
ERROR = 4      # length is -errno of a failed read or of SO_ERROR
WRITABLE = 8   # the socket accepts writes again
MORE = 16      # the per-call read cap was reached: more data may wait
SPECIAL = 32   # a listener or waker: reported, not read
UNREAD = 64    # the arena was full: the socket was not read
HUP = 128      # the kernel reported hang-up
READY = 256    # readable, not read: ReadArena.direct[fd] asks the caller to read it

#: ``ReadArena.direct`` covers fds below this; higher ones are always read into the arena.
DIRECT_FDS = 65536
