"""The one list of syscall backends: which exist, which this machine can run.

Everything that names a backend derives from ``BACKENDS``: ``Options``
validation, the command line's ``--backend`` choices, ``PULSE_BACKEND``, the
error messages, and the default.  A new backend (io_uring beside epoll, say)
is one module under ``pulse/_sys/`` that follows ``contract.Backend`` (and
says so for mypy, as ``linux.py`` does at its end) plus one ``BackendInfo``
line below; nothing else in pulse changes.

Backends are imported lazily, on first use, so that ``import pulse`` works on
a machine where the compiled module was never built (a pure-Python install,
a broken wheel, Windows): the default then falls back to the portable backend
with one warning that names the cause, while asking for a compiled backend by
name raises ``BackendUnavailableError`` saying why it cannot load.
"""

import importlib
import os
import sys
import warnings
from types import ModuleType
from typing import Callable, Dict, NamedTuple, Optional, Tuple


def _linux(platform: str) -> bool:
    return platform.startswith("linux")


def _bsd(platform: str) -> bool:
    return platform == "darwin" or "bsd" in platform or platform.startswith("dragonfly")


def _anywhere(platform: str) -> bool:
    return True


class BackendInfo(NamedTuple):
    """One registered backend: its name, its module (under ``pulse._sys``
    unless dotted), the platforms it runs on, and whether it needs the
    compiled module."""

    name: str
    module: str
    runs_on: Callable[[str], bool]
    compiled: bool
    summary: str


#: Every backend, in order of preference: the default is the first native one
#: (``compiled``) that runs on this platform, else ``portable``.
BACKENDS: Dict[str, BackendInfo] = {info.name: info for info in (
    BackendInfo("epoll", "linux", _linux, True, "epoll + eventfd (Linux)"),
    BackendInfo("kqueue", "darwin", _bsd, True, "kqueue + EVFILT_USER (macOS, BSD)"),
    BackendInfo("portable", "portable", _anywhere, False,
                "the selectors and socket modules, no C (anywhere)"),
)}

#: The module every compiled backend is built on (``build_ffi.py`` makes it).
COMPILED_MODULE = "pulse._sys._pulse_ffi"


class BackendUnavailableError(ImportError):
    """A backend asked for by name cannot run here (other OS, or the compiled
    module is missing); the message says which and what to do."""


def backend_names() -> Tuple[str, ...]:
    """Every registered backend name, in order of preference."""
    return tuple(BACKENDS)


def native_backend(platform: str = sys.platform) -> Optional[str]:
    """The preferred compiled backend for ``platform``, or None when it has none."""
    for info in BACKENDS.values():
        if info.compiled and info.runs_on(platform):
            return info.name
    return None


def check_backend_name(name: str) -> str:
    """Return ``name`` if it is a backend for this platform, else raise ``ValueError``.

    Checks the name and the platform only (cheap, no import): whether the
    compiled module loads is checked when the backend is loaded.
    """
    info = BACKENDS.get(name)
    if info is None:
        raise ValueError("backend must be one of {}, got {!r}".format(
            ", ".join(repr(n) for n in BACKENDS), name))
    if not info.runs_on(sys.platform):
        usable = [n for n, i in BACKENDS.items() if i.runs_on(sys.platform)]
        raise ValueError("backend {!r} is not available on {} (use {})".format(
            name, sys.platform, " or ".join(repr(n) for n in usable)))
    return name


_loaded: Dict[str, ModuleType] = {}
_import_errors: Dict[str, ImportError] = {}
_warned = False


def _import(name: str) -> ModuleType:
    """Import backend ``name``'s module, remembering the failure."""
    module = _loaded.get(name)
    if module is not None:
        return module
    if name in _import_errors:
        raise _import_errors[name]
    try:
        target = BACKENDS[name].module
        module = importlib.import_module(target if "." in target else "pulse._sys." + target)
    except ImportError as exc:
        _import_errors[name] = exc
        raise
    _loaded[name] = module
    return module


def available(name: str) -> bool:
    """True if backend ``name`` runs on this machine (imports it to find out)."""
    if name not in BACKENDS or not BACKENDS[name].runs_on(sys.platform):
        return False
    try:
        _import(name)
    except ImportError:
        return False
    return True


def load(name: Optional[str] = None) -> ModuleType:
    """The backend module for ``name``; by default ``PULSE_BACKEND`` or the native one.

    An explicit name (argument or ``PULSE_BACKEND``) that cannot load raises
    ``BackendUnavailableError``; the default falls back to ``portable`` with
    one ``RuntimeWarning`` when the native backend cannot load.
    """
    global _warned
    source = "backend"
    if name is None:
        name = os.environ.get("PULSE_BACKEND") or None
        source = "PULSE_BACKEND"
    if name is not None:
        try:
            check_backend_name(name)
        except ValueError as exc:
            raise ValueError("{}{}".format("PULSE_BACKEND: " if source != "backend" else "",
                                           exc)) from None
        try:
            return _import(name)
        except ImportError as exc:
            hint = ("it needs the compiled module {}: reinstall pulse where a C compiler and "
                    "the Python headers are present, or use 'portable'".format(COMPILED_MODULE)
                    if BACKENDS[name].compiled else "use another backend")
            raise BackendUnavailableError("{} {!r} cannot load ({}: {}); {}".format(
                source, name, type(exc).__name__, exc, hint)) from exc
    native = native_backend()
    if native is not None:
        try:
            return _import(native)
        except ImportError as exc:
            if not _warned:
                _warned = True
                warnings.warn("pulse: the {} backend cannot load ({}: {}); using the portable "
                              "backend, which is slower".format(native, type(exc).__name__, exc),
                              RuntimeWarning, stacklevel=2)
    return _import("portable")
