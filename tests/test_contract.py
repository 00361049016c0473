"""The backend contract and registry, and an import that never fails.

- every backend that loads here provides what ``pulse._sys.contract`` lists,
  with its capabilities declared;
- the registry is the one list of backends: ``Options`` validation, the
  command line's ``--backend`` choices and the error messages follow it, so
  a backend registered at run time (a wrapper around the native one, as an
  io_uring module would be) is served with no other change;
- ``import pulse`` works with the compiled module hidden (simulated in a
  subprocess): the default falls back to ``portable`` with one warning, and
  asking for a compiled backend by name fails with a clear error.
"""

import inspect
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path
from typing import Iterator

import pytest

import pulse
from pulse import _sys
from pulse._sys import contract, registry
from support import ServerThread, recv_exactly

ROOT = Path(__file__).resolve().parent.parent
LOADABLE = [name for name in _sys.backend_names() if _sys.available(name)]


def run_python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with the source tree importable."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)


@pytest.mark.parametrize("name", LOADABLE)
def test_every_loadable_backend_follows_the_contract(name: str) -> None:
    module = _sys.load(name)
    assert module.NAME == name
    assert isinstance(module.CAPABILITIES, frozenset)
    assert module.CAPABILITIES <= {contract.DIRECT_READS}
    for attr in contract.CLASS_NAMES + contract.FUNCTION_NAMES:
        assert callable(getattr(module, attr, None)), (name, attr)
    for attr in contract.FUNCTION_NAMES:
        want = list(inspect.signature(getattr(contract.Backend, attr)).parameters)[1:]
        got = list(inspect.signature(getattr(module, attr)).parameters)
        assert got == want, (name, attr, got, want)
    poller = module.Poller(8)
    waker = module.Waker()
    try:
        for method in contract.POLLER_METHODS:
            assert callable(getattr(poller, method, None)), (name, method)
        for method in contract.WAKER_METHODS:
            assert callable(getattr(waker, method, None)), (name, method)
        waker.attach(poller)
        assert isinstance(waker.ident, int)
        arena = module.ReadArena(1 << 16, 64)
        assert (arena.direct is not None) == (contract.DIRECT_READS in module.CAPABILITIES)
        if contract.DIRECT_READS in module.CAPABILITIES:
            assert callable(getattr(arena, "read", None)), name
        batch = module.WriteBatch(1 << 16, 16)
        assert batch.send(0) == 0
    finally:
        waker.close()
        poller.close()


def test_waker_ident_is_what_poll_records_carry() -> None:
    """The loop recognises the waker by ``ident``: the poller reports exactly that."""
    for name in LOADABLE:
        module = _sys.load(name)
        poller, waker = module.Poller(8), module.Waker()
        try:
            waker.attach(poller)
            waker.wake()
            arena = module.ReadArena(1 << 16, 64)
            count = poller.poll_read(1000, arena, [], 4096, 1)
            records = arena.records[:4 * count].tolist()
            assert [records[k] for k in range(0, len(records), 4)] == [waker.ident], name
            assert records[1] & _sys.SPECIAL
        finally:
            waker.close()
            poller.close()


def test_the_registry_derives_names_choices_and_messages() -> None:
    from pulse import cli
    assert _sys.backend_names() == tuple(registry.BACKENDS)
    parser = cli.build_parser()
    serve = next(a for a in parser._subparsers._group_actions[0].choices.values())  # type: ignore
    choices = next(a.choices for a in serve._actions if a.dest == "backend")
    assert tuple(choices) == _sys.backend_names()
    with pytest.raises(ValueError) as info:
        pulse.Options(backend="nope")
    for name in _sys.backend_names():
        assert repr(name) in str(info.value)


@pytest.fixture
def extra_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A backend registered at run time: a module that re-exports the native one."""
    native = _sys.native_backend()
    if native is None or not _sys.available(native):
        pytest.skip("no native backend here")
    base = _sys.load(native)
    module = types.ModuleType("pulse_tests.extra_backend")
    for attr in dir(base):
        if not attr.startswith("__"):
            setattr(module, attr, getattr(base, attr))
    module.NAME = "extra"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    info = registry.BackendInfo("extra", module.__name__, lambda platform: True, True, "test")
    monkeypatch.setitem(registry.BACKENDS, "extra", info)
    yield "extra"
    registry._loaded.pop("extra", None)


def test_a_new_backend_is_one_module_plus_one_registry_line(extra_backend: str) -> None:
    handler = pulse.callbacks(on_data=lambda conn, data: conn.write(data))
    with ServerThread(handler, backend=extra_backend) as srv:
        assert srv.server.loop.backend.NAME == "extra"
        sock = srv.connect()
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4, time.monotonic() + 10) == b"ping"
        sock.close()
    from pulse import cli
    assert "extra" in cli.backend_choices()


HIDE_COMPILED = """
    import importlib.abc, sys, warnings
    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "pulse._sys._pulse_ffi":
                raise ImportError("simulated: no compiled module")
            return None
    sys.meta_path.insert(0, Hide())
    warnings.simplefilter("always")
"""


def test_import_pulse_without_the_compiled_module_falls_back_with_one_warning() -> None:
    proc = run_python(HIDE_COMPILED + """
    import socket, threading, warnings
    with warnings.catch_warnings(record=True) as caught:
        import pulse
        print("imported")
        print(pulse.BACKEND)
        server = pulse.Server(pulse.callbacks(on_data=lambda c, d: c.write(d)))
        address = server.listen("127.0.0.1:0")
        thread = threading.Thread(target=server.serve)
        thread.start()
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(b"ping")
            print(sock.recv(4).decode())
        server.stop()
        thread.join(10)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    print(len(messages))
    print(messages[0])
    """)
    out = proc.stdout.decode().splitlines()
    assert proc.returncode == 0, proc.stderr.decode()
    native = _sys.native_backend()
    assert out[:3] == ["imported", "portable", "ping"], out
    if native:
        assert out[3] == "1", out
        assert "simulated: no compiled module" in out[4] and native in out[4], out


def test_explicit_compiled_backend_without_the_module_is_a_clear_error() -> None:
    native = _sys.native_backend()
    if native is None:
        pytest.skip("no compiled backend on this platform")
    proc = run_python(HIDE_COMPILED + """
    import pulse
    try:
        pulse.Server(pulse.callbacks(), backend=%r).serve("127.0.0.1:0")
    except pulse.BackendUnavailableError as exc:
        print(type(exc).__name__, isinstance(exc, ImportError))
        print(exc)
    """ % native)
    assert proc.returncode == 0, proc.stderr.decode()
    first, message = proc.stdout.decode().splitlines()[:2]
    assert first == "BackendUnavailableError True"
    assert native in message and "_pulse_ffi" in message and "portable" in message


def test_every_backend_module_declares_the_contract_for_mypy() -> None:
    """Each registered module assigns itself to ``contract.Backend`` under
    TYPE_CHECKING, so mypy (run by .ci/run) compares it with the Protocol."""
    for info in registry.BACKENDS.values():
        source = (ROOT / "pulse" / "_sys" / (info.module + ".py")).read_text()
        assert "_contract_check: Backend = _this_module" in source, info.module
        assert "from . import {} as _this_module".format(info.module) in source, info.module


def test_import_pulse_does_not_load_a_backend() -> None:
    proc = run_python("""
    import sys, pulse
    print(sorted(m for m in sys.modules if m.startswith("pulse._sys.")
                 and m.rsplit(".", 1)[1] in ("linux", "darwin", "portable", "_pulse_ffi")))
    """)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() == "[]"
