"""Sizes of the write batch, shared by the loop and the connection's fast path."""

# Writes up to this size are copied into the write arena (a memcpy is cheaper
# than pinning the object for cffi); larger ones are passed by pointer.
SMALL_WRITE = 16 * 1024
# One iteration's copied writes; when full, the batch is sent early.
WRITE_ARENA_SIZE = 1024 * 1024
WRITE_MAX_ITEMS = 4096
