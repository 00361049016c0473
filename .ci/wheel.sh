#!/usr/bin/env bash
# Packaging check: what a user gets from `pip install`, not from the tree.
#
# `python -m build` makes the sdist, then the wheel from that sdist (so a file
# the sdist lacks, such as a C source, fails the build).  The wheel and then
# the sdist are installed each in a fresh venv, and an echo round trip runs
# against the installed copy from a directory where the source tree is not
# importable, checking that the compiled backend loads from the venv.
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

cat >"$TMP/smoke.py" <<'EOF'
"""Echo one message through a pulse.Server of the installed package."""
import os
import socket
import sys
import threading

import pulse
from pulse._sys import _pulse_ffi

source_tree = sys.argv[1]
for module in (pulse, _pulse_ffi):
    path = os.path.realpath(module.__file__)
    assert not path.startswith(source_tree + os.sep), "imported from the source tree: " + path
assert pulse.BACKEND in ("epoll", "kqueue"), "not the compiled backend: " + pulse.BACKEND


class Echo(pulse.Handler):
    def on_data(self, conn, data):
        conn.write(data)


server = pulse.Server(Echo())
server.listen("127.0.0.1:0")
thread = threading.Thread(target=server.serve, daemon=True)
thread.start()
try:
    assert server.wait_started(10), "the server did not start"
    with socket.create_connection(server.address[:2], timeout=10) as client:
        client.sendall(b"ping")
        reply = b""
        while len(reply) < 4:
            chunk = client.recv(4 - len(reply))
            if not chunk:
                break
            reply += chunk
finally:
    server.stop()
    thread.join(10)
assert reply == b"ping", reply
assert not thread.is_alive(), "serve() did not return after stop()"
print("smoke: pulse {} ({} backend) from {}: echo ok".format(
    pulse.__version__, pulse.BACKEND, os.path.dirname(os.path.realpath(pulse.__file__))))
EOF

# install NAME ARTIFACT: a fresh venv with ARTIFACT installed, then the smoke test
# in it, from $TMP (-I: neither the current directory nor PYTHON* variables
# reach sys.path; PULSE_BACKEND could force the portable backend).
install() {
    "$PYTHON" -m venv "$TMP/$1"
    "$TMP/$1/bin/python" -m pip install -q "$2"
    (cd "$TMP" && env -u PULSE_BACKEND "$TMP/$1/bin/python" -I "$TMP/smoke.py" "$SRC")
}

install venv-wheel "$(ls "$TMP"/dist/*.whl)"
install venv-sdist "$(ls "$TMP"/dist/*.tar.gz)"
echo "wheel.sh: sdist and wheel install and echo"
