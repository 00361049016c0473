"""``pulse serve --metrics ADDR``: the workers' counters in the Prometheus text format.

How the numbers travel, and why this way: every ``REPORT_INTERVAL`` (1 s)
each worker sends its ``Stats`` as one JSON line on the status pipe it
already has (``status.py``), and once more as it exits; the supervisor keeps
the latest report of every worker process here (``MetricsBoard``), and a
scrape renders what is kept.  So a scrape never waits for a worker: a busy
or wedged worker's numbers are at most a report old, and
``pulse_worker_report_age_seconds`` says how old.  The workers need no
listener, thread or lock of their own (a report is one ``stats()`` and one
non-blocking write a second, dropped when the pipe is full), and the
supervisor stays one thread: its HTTP endpoint (``endpoint.py``) is one
more thing its select loop watches.  Not taken: asking the workers at
scrape time (a scrape would wait for the slowest worker, over a request
channel that does not exist yet), and shared memory the workers write (no
copy, but torn reads and a fixed layout, for a dozen numbers a second).

Counters do not go back when a worker is replaced: its last report is
folded into its slot's retired counts, so ``worker="N"`` counts everything
the processes of slot N did, and the series without a ``worker`` label is
the sum over the slots.  Gauges (open connections, backlog, ...) are those
of the live processes.
"""

import json
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

from ..stats import Stats

#: Seconds between a worker's reports: how stale a scrape can be.
REPORT_INTERVAL = 1.0

#: The exposition format's media type (Prometheus text format 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Counters: (metric name, ``Stats`` field, help).  Prometheus names a
#: counter ``..._total`` and a time ``..._seconds``.
COUNTERS: Tuple[Tuple[str, str, str], ...] = (
    ("pulse_connections_accepted_total", "accepted", "Connections accepted from the listeners."),
    ("pulse_connections_closed_total", "closed", "Connections closed."),
    ("pulse_bytes_received_total", "bytes_in", "Bytes read from the sockets."),
    ("pulse_bytes_sent_total", "bytes_out", "Bytes written to the sockets."),
    ("pulse_loop_iterations_total", "iterations", "Event loop iterations (polls)."),
    ("pulse_loop_poll_seconds_total", "poll_seconds",
     "Time in the poller call: waiting for events, and reading the ready sockets."),
    ("pulse_loop_busy_seconds_total", "busy_seconds",
     "Event loop time outside the poller: callbacks, writes, timers."),
    ("pulse_callback_errors_total", "callback_errors", "Exceptions raised by callbacks."),
    ("pulse_accept_errors_total", "accept_errors", "Failed accepts."),
)
#: The parking episodes, one counter with a ``reason`` label.
PARKS: Tuple[Tuple[str, str], ...] = (
    ("out_of_fds", "parks_out_of_fds"), ("max_connections", "parks_max_connections"))
PARKS_NAME = "pulse_listener_parks_total"
PARKS_HELP = "Times the listeners stopped accepting: out of file descriptors, max_connections."
#: Gauges of the live processes: (metric name, ``Stats`` field, help).
GAUGES: Tuple[Tuple[str, str, str], ...] = (
    ("pulse_connections", "connections", "Open connections."),
    ("pulse_write_backlog_bytes", "write_backlog",
     "Bytes written by the handlers and not yet taken by the kernel."),
    ("pulse_connections_paused", "paused", "Connections not being read (backpressure, paused)."),
    ("pulse_listeners_parked", "listeners_parked", "Workers whose listeners are parked now."),
)
_RETIRED_FIELDS = tuple(field for _, field, _ in COUNTERS) + tuple(field for _, field in PARKS)


class Report(NamedTuple):
    """A worker process's latest report, the one before, when it came, and
    when the process's first report came."""

    stats: Stats
    previous: Optional[Stats]
    received: float
    first: float


class MetricsBoard:
    """The latest reports of the workers of one supervisor (supervisor thread only)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._live: Dict[int, Tuple[int, Report]] = {}  # pid -> (slot, report)
        self._retired: List[Dict[str, float]] = [
            dict.fromkeys(_RETIRED_FIELDS, 0) for _ in range(workers)]

    def report(self, slot: int, pid: int, text: str) -> None:
        """A worker's ``STATS`` line arrived; a line that does not parse is ignored."""
        try:
            stats = Stats.from_dict(json.loads(text))
        except (ValueError, TypeError):
            return
        if not all(isinstance(v, (int, float)) for v in stats.as_dict().values()):
            return  # rendered as numbers: nothing else gets in
        now = time.monotonic()
        known = self._live.get(pid)
        if known is None:
            self._live[pid] = (slot, Report(stats, None, now, now))
        else:
            self._live[pid] = (slot, Report(stats, known[1].stats, now, known[1].first))

    def exited(self, pid: int) -> None:
        """A worker process was reaped: its counts become its slot's retired ones."""
        known = self._live.pop(pid, None)
        if known is None:
            return
        slot, report = known
        retired = self._retired[slot]
        for field in _RETIRED_FIELDS:
            retired[field] += getattr(report.stats, field)

    def render(self) -> str:
        """The exposition text (Prometheus text format 0.0.4)."""
        now = time.monotonic()
        slots: List[List[Report]] = [[] for _ in range(self.workers)]
        for slot, report in self._live.values():
            slots[slot].append(report)
        out: List[str] = []

        def family(name: str, kind: str, text: str,
                   samples: List[Tuple[str, float]]) -> None:
            out.append("# HELP {} {}".format(name, text))
            out.append("# TYPE {} {}".format(name, kind))
            out.extend("{}{} {}".format(name, labels, _number(value)) for labels, value in samples)

        for name, field, text in COUNTERS:
            family(name, "counter", text, self._with_total(slots, field))
        samples: List[Tuple[str, float]] = []
        for reason, field in PARKS:
            for labels, value in self._with_total(slots, field):
                inner = labels[1:-1] + "," if labels else ""
                samples.append(('{{{}reason="{}"}}'.format(inner, reason), value))
        family(PARKS_NAME, "counter", PARKS_HELP, samples)
        for name, field, text in GAUGES:
            family(name, "gauge", text, self._with_total(slots, field, live_only=True))
        family("pulse_loop_utilisation", "gauge",
               "Busy share of the event loop's time over the last report interval.",
               [(_worker(slot), _utilisation(reports)) for slot, reports in enumerate(slots)
                if reports])
        family("pulse_worker_report_age_seconds", "gauge",
               "Seconds since the worker's last report.",
               [(_worker(slot), now - max(r.received for r in reports))
                for slot, reports in enumerate(slots) if reports])
        family("pulse_workers", "gauge", "Worker processes reporting.", [("", len(self._live))])
        return "\n".join(out) + "\n"

    def _with_total(self, slots: List[List[Report]], field: str,
                    live_only: bool = False) -> List[Tuple[str, float]]:
        """One sample per slot (``worker="N"``, 1-based as in the logs) and their total."""
        samples: List[Tuple[str, float]] = []
        total = 0.0
        for slot, reports in enumerate(slots):
            value = 0.0 if live_only else float(self._retired[slot][field])
            value += sum(float(getattr(r.stats, field)) for r in reports)
            if reports or value:
                samples.append((_worker(slot), value))
            total += value
        samples.append(("", total))
        return samples


def _worker(slot: int) -> str:
    return '{{worker="{}"}}'.format(slot + 1)


def _utilisation(reports: List[Report]) -> float:
    """The busy share of the newest process of a slot (a reload overlaps two)."""
    newest = max(reports, key=lambda r: r.first)
    if newest.previous is None:
        return newest.stats.utilisation
    return newest.stats.utilisation_since(newest.previous)


def _number(value: float) -> str:
    """A sample value: integers without a fraction, others as Python writes them."""
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))
