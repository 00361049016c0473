"""Loop iterations per CPU second: the fixed cost of one ``_run_once``.

A callback that queues itself keeps the loop polling with a zero timeout,
so each iteration is one empty ``poll_read`` plus the loop's own
bookkeeping (the per-iteration counters of ``pulse/stats.py`` among it).
Run it in two trees to compare::

    PYTHONPATH=/path/to/tree python3 bench/loop_iterations.py --seconds 3 --repeats 5

It prints the median of the repeats; the machines are shared, so compare
runs taken side by side, and quote ratios.
"""

import argparse
import statistics
import time

import pulse


def one_run(seconds: float) -> float:
    """Iterations per CPU second of a loop whose only work is one self-queueing callback."""
    loop = pulse.EventLoop()
    deadline = time.perf_counter() + seconds
    state = {"calls": 0}

    def again() -> None:
        state["calls"] += 1
        if state["calls"] & 1023 == 0 and time.perf_counter() > deadline:
            loop.stop()
            return
        loop.call_soon(again)

    loop.call_soon(again)
    # CPU time, not wall time: on a shared machine other processes' load
    # stretches the wall clock far more than this process's own CPU time.
    started = time.process_time()
    loop.run()
    return state["calls"] / (time.process_time() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    one_run(0.5)  # warm-up (PyPy's JIT)
    rates = [one_run(args.seconds) for _ in range(args.repeats)]
    print("{:.0f} iterations per CPU second (median of {}: {})".format(
        statistics.median(rates), len(rates), " ".join("{:.0f}".format(r) for r in rates)))


if __name__ == "__main__":
    main()
