"""The states of a connection and the reasons its reading may be paused.

``Conn`` owns every transition (one method each); other modules read these
values, never set them.  A connection goes::

    OPENING --> OPEN --> CLOSING --> [LINGERING] --> CLOSED
       \\___________________/^

``OPENING``: a dial or ``register`` not yet on the loop; writes wait in the
backlog.  ``OPEN``: reading (unless paused) and writing; the peer's FIN
(``Conn.peer_eof``) and our own ``write_eof`` are flags of this state, not
states: a half-closed connection is open.  ``CLOSING``: ``close()`` was
called or the connection failed; a graceful close first sends its backlog.
``LINGERING``: the backlog is sent and our write side shut down; the peer's
late data is read and discarded until its EOF or ``linger_timeout``, so that
unread input cannot make the kernel answer ``close()`` with a reset that
destroys the reply.  ``CLOSED``: the fd is closed and ``on_close`` was
scheduled.  Plain ints: the loop compares them on every record.
"""

OPENING = 3
OPEN = 0
CLOSING = 1
LINGERING = 4
CLOSED = 2

NAMES = {OPENING: "opening", OPEN: "open", CLOSING: "closing", LINGERING: "lingering",
         CLOSED: "closed"}

# Why a connection is not read: a bit each, so that one reason ending does
# not resume a connection another reason still holds.  (pause_reading() is
# a flag of its own, Lifecycle._user_pause: it is set from worker threads,
# under the runner's lock, where these bits belong to the loop's thread.)
PAUSE_BACKPRESSURE = 2  # its write backlog passed the high-water mark
PAUSE_INPUT = 4         # its queued input waits for the task-mode workers
PAUSE_STOP = 8          # the server is stopping: no new requests
