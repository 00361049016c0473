"""Loading the application: ``MODULE:ATTR`` to a handler factory, and the worker count.

The application is imported once, in the supervisor (like gunicorn's
``--preload``), so that a broken import fails at start, before any worker
exists; each worker then calls the factory made here, after its fork.
"""

import importlib
import os
from typing import Any, Callable, Union

from ..errors import LaunchError
from ..handler import CALLBACKS, check_handler


def cpu_count() -> int:
    """The number of cores this process may run on (psutil): the CPU affinity
    where the OS has one (it honours ``taskset`` and cpusets), else the
    logical core count."""
    import psutil
    try:
        count = len(psutil.Process().cpu_affinity())
    except (AttributeError, NotImplementedError, OSError):
        count = 0  # macOS has no affinity
    return count or psutil.cpu_count(logical=True) or os.cpu_count() or 1


def resolve_workers(workers: Union[int, str]) -> int:
    """The worker count for ``workers``: a positive int, its decimal string,
    or ``"auto"`` for one per core; anything else raises ``ValueError``."""
    if isinstance(workers, str):
        text = workers.strip().lower()
        if text == "auto":
            return cpu_count()
        if text.isdigit():
            workers = int(text)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError("workers must be a number >= 1 or 'auto', got {!r}".format(workers))
    return workers


def handler_factory(target: Any) -> Callable[[], Any]:
    """A function that makes one worker's handler from ``target``: a handler
    class (instantiated in each worker), a handler instance (each worker gets
    its forked copy) or a factory (called in each worker, after the fork, so
    that per-process resources such as database connections are not
    shared).  Raises ``TypeError`` for anything else."""
    if isinstance(target, type):
        check_handler(target)  # the callbacks are there, as functions of the class
        return target
    if all(callable(getattr(target, name, None)) for name in CALLBACKS):
        return lambda: target
    if callable(target):
        return target
    raise TypeError("the handler must be a handler class, a handler instance or a factory "
                    "that returns one, got {!r}".format(target))


def load_target(spec: str) -> Any:
    """Import ``"MODULE:ATTR"`` (``ATTR`` may be dotted) and return the object;
    ``LaunchError`` names what failed (the module, the attribute, or the
    exception the module raised while importing)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise LaunchError("the application must be given as MODULE:ATTR (e.g. myapp:Echo), "
                          "got {!r}".format(spec))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LaunchError("cannot import {!r}: {}".format(spec, exc)) from exc
    except Exception as exc:  # the module's own code failed
        raise LaunchError("cannot import {!r}: importing {} raised {}: {}".format(
            spec, module_name, type(exc).__name__, exc)) from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise LaunchError("cannot load {!r}: module {!r} has no attribute {!r}".format(
                spec, module_name, attr)) from None
    return obj
