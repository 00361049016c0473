"""A mini Redis on pulse: RESP2 strings that redis-cli and redis-benchmark can drive.

Commands: ``PING``, ``ECHO``, ``SET key value [EX s | PX ms | KEEPTTL] [NX | XX]``,
``GET``, ``DEL``, ``EXISTS``, ``INCR``, ``MGET``, ``MSET``, ``DBSIZE``, ``QUIT``, and
``CONFIG GET`` (only so that redis-benchmark can read ``save`` and
``appendonly`` at start).  Requests may be multibulk or inline
(``PING\\r\\n``, what ``redis-benchmark -t ping`` and telnet send) and may be
pipelined.  Replies and error texts are Redis 7's, byte for byte: an unknown
command or wrong arity gets ``-ERR ...`` and the connection stays open; a
protocol error (bad multibulk length, ...) answers the commands that came
before it, then ``-ERR Protocol error: ...``, then closes, as Redis does.

Design notes:

* Hot path: one ``feed()`` of the sans-I/O parser (``protocols/resp.py``)
  per read, a dict lookup per command, and *one* write with the replies of
  the whole pipelined batch.  No logging, no exceptions on the way.
* Expiry is Redis' two halves: a key is checked when it is touched (lazy),
  and a sweep on the event loop (``loop.call_later``, every 100 ms while
  keys with a TTL exist) deletes expired keys nobody reads, so memory stays
  bounded.  The sweep pops a heap of ``(deadline, key)`` instead of scanning
  every key; stale heap entries (a key overwritten or deleted) are skipped,
  and the heap is rebuilt when they outnumber the live ones.
* The store belongs to the process.  With ``--workers N`` each worker
  process has its *own* store (a key SET through one connection may be
  missing on another), which is fine for benchmarks and wrong for anything
  else.  In ``pool``/``thread`` mode several threads run commands at once:
  each batch runs under one lock (INCR and SET-with-TTL are read-modify-write
  over two dicts, which the GIL alone does not make atomic); in ``loop`` mode
  no lock is taken, since every batch and the sweep run on the loop's thread.

    python examples/redis_server.py --port 6380 [--workers N|auto] [--task-type ...]
    redis-cli -p 6380 set greeting hello
    redis-benchmark -p 6380 -q -t ping,set,get -P 16 -c 50

TLS takes the flags every example shares, not redis-server's: where Redis
has ``--tls-port`` beside ``--port`` and ``--tls-cert-file``/``--tls-key-file``,
here ``--certfile cert.pem --keyfile key.pem`` makes ``--port`` a TLS port
(no separate ``--tls`` switch, no second port; run two servers for both):

    redis-cli --tls --cacert ca.pem -p 6380 set greeting hello
"""

import fnmatch
import heapq
import logging
import re
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import example_cli
import pulse
from protocols import resp

#: Seconds between sweeps of expired keys (Redis' default hz is 10).
SWEEP_INTERVAL = 0.1
#: Expired keys one sweep deletes at most before it lets the loop serve
#: connections again (it comes back at once when there are more).
SWEEP_BUDGET = 10000

OK = b"+OK\r\n"
PONG = b"+PONG\r\n"
NULL = b"$-1\r\n"
ZERO = b":0\r\n"
ONE = b":1\r\n"
NOT_INTEGER = b"-ERR value is not an integer or out of range\r\n"
SYNTAX_ERROR = b"-ERR syntax error\r\n"
BAD_EXPIRE = b"-ERR invalid expire time in 'set' command\r\n"
OVERFLOW = b"-ERR increment or decrement would overflow\r\n"
INT64_MAX = (1 << 63) - 1
# Redis' string2ll: optional "-", no leading zeros, no "+", no spaces.
_INTEGER = re.compile(rb"0|-?[1-9][0-9]{0,18}").fullmatch
# What CONFIG GET reports (redis-benchmark asks for these two at start).
CONFIG = {b"save": b"", b"appendonly": b"no"}
# "$<n>\r\n" for the common bulk lengths: concatenating a precomputed header
# is cheaper than b"$%d\r\n%s\r\n" formatting (CPython 3.11: ~260 vs ~410 ns).
BULK_HEADERS = tuple(b"$%d\r\n" % n for n in range(1024))
CRLF = b"\r\n"

monotonic = time.monotonic
Command = List[bytes]


def parse_int(text: bytes) -> Optional[int]:
    """``text`` as a signed 64-bit integer written the way Redis accepts, else None."""
    if _INTEGER(text) is None:
        return None
    value = int(text)
    return value if -INT64_MAX - 1 <= value <= INT64_MAX else None


def wrong_arity(name: str) -> bytes:
    return b"-ERR wrong number of arguments for '%s' command\r\n" % name.encode()


def error_line(message: str) -> bytes:
    """An error reply; CR and LF become spaces (an error is one line), like Redis."""
    text = message.encode("utf-8", "replace")
    return b"-" + text.replace(b"\r", b" ").replace(b"\n", b" ") + b"\r\n"


def bulk(value: bytes) -> bytes:
    size = len(value)
    if size < 1024:
        return BULK_HEADERS[size] + value + CRLF
    return b"$%d\r\n%s\r\n" % (size, value)


class Store:
    """The key space of one process and the commands that act on it.

    ``execute(commands)`` runs a pipelined batch under the store's lock and
    returns the joined replies plus whether the client asked to ``QUIT``.
    Values are ``bytes``; TTLs are ``time.monotonic()`` deadlines.
    """

    def __init__(self) -> None:
        self.data: Dict[bytes, bytes] = {}
        self.expires: Dict[bytes, float] = {}  # key -> deadline; only keys with a TTL
        self._heap: List[Tuple[float, bytes]] = []  # (deadline, key), may hold stale entries
        self.lock = threading.Lock()
        self.loop: Optional[pulse.EventLoop] = None  # where the sweep runs (set by on_open)
        self._sweeping = False
        table: Dict[bytes, Callable[[Command], bytes]] = {
            b"PING": self.ping, b"ECHO": self.echo, b"SET": self.set, b"GET": self.get,
            b"DEL": self.delete, b"EXISTS": self.exists, b"INCR": self.incr,
            b"MGET": self.mget, b"MSET": self.mset, b"DBSIZE": self.dbsize,
            b"CONFIG": self.config,
        }
        # Clients send upper or lower case; both hit the table without .upper().
        table.update({name.lower(): fn for name, fn in list(table.items())})
        self._table = table

    def execute(self, commands: List[Command]) -> Tuple[bytes, bool]:
        """Replies to ``commands`` (one ``bytes``) and True when one was ``QUIT``."""
        with self.lock:
            return self.run(commands)

    def run(self, commands: List[Command]) -> Tuple[bytes, bool]:
        """``execute`` without the lock: for callers that all run on the loop's thread."""
        table = self._table
        out = []
        append = out.append
        for args in commands:
            fn = table.get(args[0])
            if fn is None:
                name = args[0].upper()
                fn = table.get(name)
                if fn is None:
                    if name == b"QUIT":
                        append(OK)
                        return b"".join(out), True  # later commands are not run
                    append(self.unknown(args))
                    continue
            append(fn(args))
        return out[0] if len(out) == 1 else b"".join(out), False

    # -- expiry ----------------------------------------------------------

    def _alive(self, key: bytes) -> bool:
        """Lazy expiry for a key that has a TTL: delete it if due; True if it lives."""
        if self.expires[key] > monotonic():
            return True
        del self.expires[key]
        self.data.pop(key, None)
        return False

    def _set_ttl(self, key: bytes, seconds: float) -> None:
        deadline = monotonic() + seconds
        self.expires[key] = deadline
        heap = self._heap
        heapq.heappush(heap, (deadline, key))
        if len(heap) > 2 * len(self.expires) + 1024:
            # Mostly stale entries (keys overwritten or deleted): start over.
            self._heap = [(when, k) for k, when in self.expires.items()]
            heapq.heapify(self._heap)
        if not self._sweeping and self.loop is not None:
            self._sweeping = True
            # loop.call_later belongs to the loop's thread; this may be a pool thread.
            self.loop.call_soon_threadsafe(self._schedule_sweep, SWEEP_INTERVAL)

    def _schedule_sweep(self, delay: float) -> None:
        self.loop.call_later(delay, self.sweep)

    def sweep(self) -> None:
        """Delete keys whose TTL passed (runs on the loop, re-arms while TTLs exist)."""
        now = monotonic()
        with self.lock:
            heap, expires, data = self._heap, self.expires, self.data
            budget = SWEEP_BUDGET
            while heap and heap[0][0] <= now and budget:
                deadline, key = heapq.heappop(heap)
                budget -= 1
                if expires.get(key) == deadline:  # else a stale entry
                    del expires[key]
                    data.pop(key, None)
            if not heap:
                self._sweeping = False
                return
        self._schedule_sweep(0 if not budget else SWEEP_INTERVAL)

    # -- commands ---------------------------------------------------------

    def unknown(self, args: Command) -> bytes:
        # Redis' wording, with its 128-character caps on the name and the arguments.
        quoted = ""
        for arg in args[1:]:
            if len(quoted) >= 128:
                break
            quoted += "'%s' " % arg.decode("utf-8", "replace")[:128 - len(quoted)]
        return error_line("ERR unknown command '%s', with args beginning with: %s"
                          % (args[0].decode("utf-8", "replace")[:128], quoted))

    def ping(self, args: Command) -> bytes:
        if len(args) == 1:
            return PONG
        if len(args) == 2:
            return bulk(args[1])
        return wrong_arity("ping")

    def echo(self, args: Command) -> bytes:
        return bulk(args[1]) if len(args) == 2 else wrong_arity("echo")

    def get(self, args: Command) -> bytes:
        if len(args) != 2:
            return wrong_arity("get")
        key = args[1]
        if key in self.expires and not self._alive(key):
            return NULL
        value = self.data.get(key)
        if value is None:
            return NULL
        return bulk(value)

    def set(self, args: Command) -> bytes:
        if len(args) == 3:  # the common case: no options
            key = args[1]
            self.data[key] = args[2]
            if key in self.expires:
                del self.expires[key]  # a plain SET drops the TTL, as in Redis
            return OK
        if len(args) < 3:
            return wrong_arity("set")
        return self._set_with_options(args)

    def _set_with_options(self, args: Command) -> bytes:
        condition = unit = None
        keep_ttl = False
        amount = b""
        i = 3
        while i < len(args):
            option = args[i].upper()
            if option in (b"NX", b"XX") and condition in (None, option):
                condition = option
            elif option == b"KEEPTTL" and unit is None:
                keep_ttl = True
            elif option in (b"EX", b"PX") and unit in (None, option) and not keep_ttl \
                    and i + 1 < len(args):
                unit = option
                i += 1
                amount = args[i]
            else:
                return SYNTAX_ERROR
            i += 1
        seconds = 0.0
        if unit is not None:
            count = parse_int(amount)
            if count is None:
                return NOT_INTEGER
            milliseconds = count * 1000 if unit == b"EX" else count
            # Redis refuses what would overflow its absolute time in ms.
            if count <= 0 or milliseconds > INT64_MAX - int(time.time() * 1000):
                return BAD_EXPIRE
            seconds = milliseconds / 1000.0
        key = args[1]
        exists = key in self.data and (key not in self.expires or self._alive(key))
        if (condition == b"NX" and exists) or (condition == b"XX" and not exists):
            return NULL
        self.data[key] = args[2]
        if unit is not None:
            self._set_ttl(key, seconds)
        elif not keep_ttl:
            self.expires.pop(key, None)
        return OK

    def delete(self, args: Command) -> bytes:
        if len(args) < 2:
            return wrong_arity("del")
        data, expires = self.data, self.expires
        removed = 0
        for key in args[1:]:
            if key in expires and not self._alive(key):
                continue
            if data.pop(key, None) is not None:
                expires.pop(key, None)
                removed += 1
        return b":%d\r\n" % removed

    def exists(self, args: Command) -> bytes:
        if len(args) < 2:
            return wrong_arity("exists")
        data, expires = self.data, self.expires
        found = 0
        for key in args[1:]:  # a key named twice counts twice, as in Redis
            if key in data and (key not in expires or self._alive(key)):
                found += 1
        return ONE if found == 1 else ZERO if not found else b":%d\r\n" % found

    def incr(self, args: Command) -> bytes:
        if len(args) != 2:
            return wrong_arity("incr")
        key = args[1]
        if key in self.expires:
            self._alive(key)
        value = self.data.get(key)
        if value is None:
            number = 0
        else:
            number = parse_int(value)
            if number is None:
                return NOT_INTEGER
            if number == INT64_MAX:
                return OVERFLOW
        number += 1
        self.data[key] = b"%d" % number  # INCR keeps the key's TTL, as in Redis
        return b":%d\r\n" % number

    def mget(self, args: Command) -> bytes:
        if len(args) < 2:
            return wrong_arity("mget")
        data, expires = self.data, self.expires
        out = [b"*%d\r\n" % (len(args) - 1)]
        for key in args[1:]:
            value = None
            if key not in expires or self._alive(key):
                value = data.get(key)
            out.append(NULL if value is None else bulk(value))
        return b"".join(out)

    def mset(self, args: Command) -> bytes:
        if len(args) < 3 or len(args) % 2 == 0:
            return wrong_arity("mset")
        data, expires = self.data, self.expires
        for i in range(1, len(args), 2):
            key = args[i]
            data[key] = args[i + 1]
            if key in expires:
                del expires[key]
        return OK

    def dbsize(self, args: Command) -> bytes:
        # Like Redis, this counts expired keys that no access or sweep removed yet.
        return b":%d\r\n" % len(self.data) if len(args) == 1 else wrong_arity("dbsize")

    def config(self, args: Command) -> bytes:
        if len(args) >= 2 and args[1].upper() == b"GET":
            if len(args) < 3:
                return wrong_arity("config|get")
            found: Dict[bytes, bytes] = {}
            for pattern in args[2:]:
                pattern = pattern.lower()
                for name, value in CONFIG.items():
                    if fnmatch.fnmatchcase(name.decode(), pattern.decode("latin-1")):
                        found[name] = value
            return resp.encode_array([item for pair in found.items() for item in pair])
        if len(args) < 2:
            return wrong_arity("config")
        return error_line("ERR unknown subcommand '%s'. Try CONFIG HELP."
                          % args[1].decode("utf-8", "replace")[:128])


class MiniRedis(pulse.Handler):
    """One ``resp.RequestParser`` per connection (the session); one shared ``Store``."""

    def __init__(self, store: Optional[Store] = None, threaded: bool = True) -> None:
        self.store = store if store is not None else Store()
        # In loop mode every batch and the sweep run on the loop's thread: the
        # lock is never contended, yet taking it was ~4% of the CPU at -P 1.
        self.execute = self.store.execute if threaded else self.store.run

    def on_open(self, conn: pulse.Conn) -> None:
        # Every connection of a process shares one loop (one per process, also
        # under the launcher, whose workers each got a forked copy of this).
        self.store.loop = conn.loop
        conn.session = resp.RequestParser()

    def on_data(self, conn: pulse.Conn, data: bytes) -> None:
        try:
            commands = conn.session.feed(data)
        except resp.ProtocolError as exc:
            # As Redis: answer what came before the error, report it, close.
            out = self.execute(exc.completed)[0] if exc.completed else b""
            conn.write(out + error_line("ERR Protocol error: %s" % exc))
            conn.close()
            return
        if commands:
            out, quit_ = self.execute(commands)
            conn.write(out)
            if quit_:
                conn.close()

    def on_close(self, conn: pulse.Conn, err: Optional[BaseException]) -> None:
        if err is not None:
            logging.getLogger("redis").debug("%r closed: %s", conn, err)


def main() -> None:
    parser = example_cli.parser(__doc__, 6380)
    args = parser.parse_args()
    example_cli.run(MiniRedis(threaded=args.task_type != "loop"), args)


if __name__ == "__main__":
    main()
