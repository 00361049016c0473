"""Sizes and thresholds of the reactor's read path, each with its reason.

Kept apart from ``loop.py`` so that the numbers a benchmark may lead us to
change sit in one short file (the write batch's own sizes are in
``writes.py``).
"""

# The read arena holds at least 4 MiB, and at least 4 full reads: one poll
# then fits a read of max_reads_per_event (4 by default) from one socket, and
# many sockets' short reads, without reporting them UNREAD.
ARENA_MIN = 4 * 1024 * 1024
ARENA_READS = 4
# Records per poll: a ready socket yields up to max_reads_per_event (4 by
# default) READ records and an EOF; 4 per event records a poll of busy
# sockets without cutting their drains short (the C helper keeps 2 slots for
# each later event, and a socket that finds the records full is reported
# UNREAD and carried, never lost), and 64 more hold the carried fds' reads.
RECORDS_PER_EVENT = 4
RECORDS_SPARE = 64
# A connection whose arena read reaches DIRECT_READ_ON bytes and lands past
# the first DIRECT_AFTER bytes of the arena (which stay in cache) is read by
# _read_direct from then on, until one of those reads is under
# DIRECT_READ_OFF: large messages in busy batches skip a copy out of cold
# memory; small ones, and a lone connection, keep the one-call batch.
DIRECT_READ_ON = 16 * 1024
DIRECT_READ_OFF = 4 * 1024
DIRECT_AFTER = 256 * 1024
