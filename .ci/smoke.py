"""Echo one message through a pulse.Server of the installed package.

    python -I .ci/smoke.py SOURCE_TREE

Fails unless ``pulse`` and its compiled module are imported from outside
SOURCE_TREE (an installed wheel or sdist) and the compiled backend is the
one in use.  ``.ci/wheel.sh`` and cibuildwheel's test command run it.
"""
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
