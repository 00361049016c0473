"""Certificates for the TLS tests, made at test time with the openssl CLI.

``certificates(directory)`` writes a CA, a server certificate for
``localhost`` and ``127.0.0.1`` signed by it, and a client certificate for
mutual TLS, and returns their paths.  No key is ever committed: each test
session makes its own (``tls_files`` in ``conftest.py`` caches them for the
session).  ``server_context`` and ``client_context`` build the
``ssl.SSLContext`` objects most tests need.
"""

import dataclasses
import os
import ssl
import socket
import subprocess
from typing import List, Optional, Tuple

DAYS = "2"


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    """Paths of one set of test certificates (PEM)."""

    ca_cert: str
    ca_key: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca_cert: str  # a CA that signed nothing of the above


def _openssl(args: List[str], cwd: str) -> None:
    subprocess.run(["openssl"] + args, cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, timeout=60)


def _ca(directory: str, name: str) -> None:
    _openssl(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", DAYS,
              "-keyout", name + ".key", "-out", name + ".pem", "-subj", "/CN=pulse test " + name,
              "-addext", "basicConstraints=critical,CA:TRUE",
              "-addext", "keyUsage=critical,keyCertSign,cRLSign"], directory)


def _leaf(directory: str, name: str, subject: str, extensions: str) -> None:
    _openssl(["req", "-newkey", "rsa:2048", "-nodes", "-keyout", name + ".key",
              "-out", name + ".csr", "-subj", subject], directory)
    with open(os.path.join(directory, name + ".ext"), "w") as ext:
        ext.write(extensions)
    _openssl(["x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key",
              "-CAcreateserial", "-days", DAYS, "-out", name + ".pem",
              "-extfile", name + ".ext"], directory)


def certificates(directory: str) -> TLSFiles:
    """Make a CA, a server and a client certificate in ``directory``."""
    _ca(directory, "ca")
    _ca(directory, "other-ca")
    _leaf(directory, "server", "/CN=localhost",
          "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _leaf(directory, "client", "/CN=pulse test client", "extendedKeyUsage=clientAuth\n")
    path = lambda name: os.path.join(directory, name)  # noqa: E731
    return TLSFiles(path("ca.pem"), path("ca.key"), path("server.pem"), path("server.key"),
                    path("client.pem"), path("client.key"), path("other-ca.pem"))


def server_context(files: TLSFiles, client_ca: Optional[str] = None,
                   alpn: Optional[List[str]] = None) -> ssl.SSLContext:
    """A server context with the test certificate; ``client_ca``: require client certs."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.server_cert, files.server_key)
    if client_ca is not None:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def client_context(files: TLSFiles, cert: bool = False) -> ssl.SSLContext:
    """A client context trusting the test CA (with the client certificate if ``cert``)."""
    context = ssl.create_default_context(cafile=files.ca_cert)
    if cert:
        context.load_cert_chain(files.client_cert, files.client_key)
    return context


def bio_handshake(sock: socket.socket, files: TLSFiles
                  ) -> Tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """A client handshake over memory BIOs on a blocking socket, for tests
    that need the records in hand (to cut one, or to send close_notify and
    keep the connection): ``(obj, incoming, outgoing)``."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_context(files).wrap_bio(incoming, outgoing, server_hostname="localhost")
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            incoming.write(sock.recv(65536))
    sock.sendall(outgoing.read())
    return obj, incoming, outgoing
