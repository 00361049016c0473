"""``import pulse`` never needs the launcher, nor the POSIX-only signals it handles.

Windows' ``signal`` module has no SIGHUP, SIGQUIT or SIGCHLD (nor
SIGUSR1/2).  Each test simulates that in a fresh interpreter by deleting them
from ``signal`` before importing pulse, and checks that the import works and
that the launcher is loaded only when ``pulse.serve`` is first touched.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HIDE_SIGNALS = """
import signal, sys
for name in ("SIGHUP", "SIGQUIT", "SIGCHLD", "SIGUSR1", "SIGUSR2"):
    if hasattr(signal, name):
        delattr(signal, name)
"""


def run_python(code: str, tmp_path: Path) -> None:
    """Run ``code`` (after HIDE_SIGNALS) in a new interpreter; it must exit 0."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", HIDE_SIGNALS + textwrap.dedent(code)],
                            cwd=str(tmp_path), env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_pulse_loads_the_launcher_only_for_serve(tmp_path: Path) -> None:
    run_python("""
        import pulse
        assert "pulse.launch" not in sys.modules, sorted(m for m in sys.modules if "pulse" in m)
        assert issubclass(pulse.LaunchError, pulse.PulseError)
        assert issubclass(pulse.LaunchError, RuntimeError)
        serve = pulse.serve
        assert "pulse.launch" in sys.modules
        import pulse.launch
        assert serve is pulse.launch.serve and pulse.serve is serve
        assert pulse.LaunchError is pulse.launch.LaunchError
        try:
            pulse.no_such_name
        except AttributeError as exc:
            assert "no_such_name" in str(exc)
        else:
            raise AssertionError("pulse.no_such_name did not raise")
    """, tmp_path)


def test_launcher_imports_without_the_posix_signals(tmp_path: Path) -> None:
    run_python("""
        import pulse.launch
        import pulse.cli
        from pulse.launch.supervisor import _signal_requests
        assert set(_signal_requests()) == {signal.SIGTERM, signal.SIGINT}
    """, tmp_path)
