#!/usr/bin/env bash
# Run the whole test suite under PyPy (Debian's pypy3, Python 3.9 language
# level) in its own venv, beside the CPython install.
#
# The editable install compiles the cffi module for PyPy too; the two builds
# coexist in pulse/_sys/ because each interpreter looks for its own suffix
# (_pulse_ffi.pypy39-pp73-<arch>-linux-gnu.so next to CPython's
# _pulse_ffi.abi3.so or _pulse_ffi.cpython-3XX-<arch>-linux-gnu.so).
# psutil is pinned below 7 on PyPy by pyproject.toml: psutil 7 does not import
# there (undefined symbol PyErr_FormatV).
#
# Usage: .ci/pypy.sh [pytest arguments]     (PYPY=/path/to/pypy3 to pick one)
set -euo pipefail
cd "$(dirname "$0")/.."

PYPY="${PYPY:-pypy3}"
VENV="${PULSE_PYPY_VENV:-.venv-pypy}"

if ! command -v "$PYPY" >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        export DEBIAN_FRONTEND=noninteractive
        $SUDO apt-get update -qq || true
        # pypy3-dev: the headers the cffi module is compiled against.
        $SUDO apt-get install -y -qq pypy3 pypy3-venv pypy3-dev gcc >/dev/null
    else
        echo "pypy.sh: $PYPY not found and no apt-get to install it" >&2
        exit 1
    fi
fi

"$PYPY" --version
if [ ! -x "$VENV/bin/python" ]; then
    "$PYPY" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# The venv's bundled pip predates PEP 660 editable installs.
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q -e ".[test]"
"$PY" -c "import pulse, platform; print('pulse', pulse.BACKEND, platform.python_implementation(), platform.python_version())"
# PyPy sizes its nursery from the CPU's last-level cache (half of it) and
# waits for 8 nurseries of heap before the first major collection: on a Xeon
# with a 260 MB L3 that is a 130 MB nursery, and the proxy test's RSS grew by
# 600 MB of garbage not yet collected (238 MB with 4 MB, inside the bound with
# 1 MB).  The suite's RSS bounds measure what pulse keeps alive, not the GC's
# appetite on one CPU, so every process the tests start gets the same small
# nursery.  Set PYPY_GC_NURSERY to override.
export PYPY_GC_NURSERY="${PYPY_GC_NURSERY:-1MB}"
exec "$PY" -m pytest -q "$@"
