"""TLS from the command line: ``pulse serve --certfile/--keyfile/--ca-certs/
--require-client-cert/--alpn``, ``pulse.serve(ssl=...)`` and ``pulse.server_context``.

The servers are real ``python -m pulse serve`` processes with two workers
(the launcher's test helpers), the clients Python's ``ssl`` module over
127.0.0.1.  Certificates come from the session's ``tls_files`` (made at test
time by the openssl CLI); the reload test makes a second set.  Every wait is
bounded in time.
"""

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Tuple

import pytest

import pulse
from pulse.launch import Supervisor
from support import free_port
from test_launcher import (APP, Launched, no_child_left, one_error_line,  # noqa: F401
                           run_cli, serving)
from tls_support import TLSFiles, certificates, client_context

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "launcher_app.py").write_text(APP)
    return tmp_path


def tls_greet(port: int, context: ssl.SSLContext, alpn: Optional[list] = None,
              timeout: float = 5.0) -> Tuple[int, ssl.SSLSocket, bytes]:
    """Connect over TLS, read the worker's greeting (its pid), check one echo;
    returns the pid, the still open socket and the server's certificate (DER)."""
    if alpn:
        context.set_alpn_protocols(alpn)
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock = context.wrap_socket(raw, server_hostname="localhost")
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(64)
        assert chunk, "closed before the greeting"
        line += chunk
    sock.sendall(b"ping over tls")
    got = b""
    while len(got) < 13:
        chunk = sock.recv(64)
        assert chunk, "closed before the echo"
        got += chunk
    assert got == b"ping over tls"
    cert = sock.getpeercert(binary_form=True)
    assert cert is not None
    return int(line), sock, cert


def serve_tls(app_dir: Path, port: int, *flags: str) -> Launched:
    return Launched.serve(app_dir, "launcher_app:PidEcho", "--bind", "127.0.0.1:{}".format(port),
                          "--workers", "2", *flags)


def test_certfile_and_keyfile_serve_tls_from_every_worker(app_dir: Path,
                                                         tls_files: TLSFiles) -> None:
    port = free_port()
    with serve_tls(app_dir, port, "--certfile", tls_files.server_cert,
                   "--keyfile", tls_files.server_key, "--alpn", "h2,http/1.1") as srv:
        pids = serving(srv, 2)
        seen = set()
        deadline = time.monotonic() + 10
        while seen != pids and time.monotonic() < deadline:
            pid, sock, _ = tls_greet(port, client_context(tls_files), alpn=["http/1.1"])
            assert sock.selected_alpn_protocol() == "http/1.1"
            sock.close()
            seen.add(pid)
        assert seen == pids, "not every worker served TLS"
        # The plain-TCP client of a TLS port is refused, the workers keep serving.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:
            plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
            try:
                reply = plain.recv(100)
            except ConnectionResetError:
                reply = b""
            assert reply == b"" or reply[0] == 0x15, reply  # closed, or a TLS alert record
        tls_greet(port, client_context(tls_files))[1].close()
        assert srv.stop() == 0, srv.log()


def test_require_client_cert_is_mutual_tls(app_dir: Path, tls_files: TLSFiles) -> None:
    port = free_port()
    with serve_tls(app_dir, port, "--certfile", tls_files.server_cert,
                   "--keyfile", tls_files.server_key, "--ca-certs", tls_files.ca_cert,
                   "--require-client-cert") as srv:
        serving(srv, 2)
        tls_greet(port, client_context(tls_files, cert=True))[1].close()
        with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):
            # TLS 1.3: the refusal may come at the first read, after the client's handshake.
            tls_greet(port, client_context(tls_files))[1].close()
        assert srv.stop() == 0, srv.log()


def test_certificates_reload_on_sighup(app_dir: Path, tls_files: TLSFiles,
                                       tmp_path: Path) -> None:
    """SIGHUP reads the files again: after the reload new connections get the
    renewed certificate; a broken file at a later SIGHUP keeps the last good
    one (the error is logged) and the service stays up."""
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    shutil.copy(tls_files.server_cert, cert)
    shutil.copy(tls_files.server_key, key)
    (tmp_path / "renewed").mkdir()
    renewed = certificates(str(tmp_path / "renewed"))  # another CA, another certificate
    port = free_port()
    with serve_tls(app_dir, port, "--certfile", cert, "--keyfile", key) as srv:
        old_pids = serving(srv, 2)
        _, sock, first = tls_greet(port, client_context(tls_files))
        sock.close()
        shutil.copy(renewed.server_cert, cert)
        shutil.copy(renewed.server_key, key)
        srv.signal(signal.SIGHUP)
        srv.wait_log("reload done", timeout=20)
        assert "TLS certificates reloaded" in srv.log()
        assert not srv.workers() & old_pids
        _, sock, second = tls_greet(port, client_context(renewed))
        sock.close()
        assert second != first
        with open(cert, "w") as broken:
            broken.write("not a certificate\n")
        srv.signal(signal.SIGHUP)
        srv.wait_log("reload done", timeout=20, count=2)
        assert "TLS certificates not reloaded, keeping the old ones: certfile" in srv.log()
        _, sock, third = tls_greet(port, client_context(renewed))
        sock.close()
        assert third == second
        assert srv.stop() == 0, srv.log()


def test_bad_tls_files_are_one_line_errors(app_dir: Path, tls_files: TLSFiles,
                                           tmp_path: Path) -> None:
    bind = ("--bind", "127.0.0.1:0")
    line = one_error_line(run_cli(app_dir, "launcher_app:PidEcho", *bind,
                                  "--certfile", str(tmp_path / "missing.pem")))
    assert line == "pulse: error: certfile {}: no such file".format(tmp_path / "missing.pem")
    # The key of another certificate.
    line = one_error_line(run_cli(app_dir, "launcher_app:PidEcho", *bind, "--certfile",
                                  tls_files.server_cert, "--keyfile", tls_files.client_key))
    assert line.startswith("pulse: error: certfile {} / keyfile {}: not a PEM certificate "
                           "with its private key".format(tls_files.server_cert,
                                                         tls_files.client_key)), line
    result = run_cli(app_dir, "launcher_app:PidEcho", *bind, "--keyfile", tls_files.server_key)
    assert result.returncode == 2
    assert one_error_line(result).startswith("pulse serve: error: --keyfile needs --certfile")
    result = run_cli(app_dir, "launcher_app:PidEcho", *bind, "--certfile",
                     tls_files.server_cert, "--keyfile", tls_files.server_key,
                     "--require-client-cert")
    assert result.returncode == 2
    assert "--require-client-cert needs --ca-certs" in one_error_line(result)
    result = run_cli(app_dir, "launcher_app:PidEcho", *bind, "--certfile",
                     tls_files.server_cert, "--keyfile", tls_files.server_key, "--alpn", "h2,")
    assert result.returncode == 2
    assert "--alpn: an ALPN protocol name is 1 to 255 bytes" in one_error_line(result)


def test_encrypted_key_without_password_is_an_error_not_a_prompt(tls_files: TLSFiles,
                                                                 tmp_path: Path) -> None:
    encrypted = str(tmp_path / "encrypted.key")
    subprocess.run(["openssl", "pkey", "-in", tls_files.server_key, "-aes256", "-passout",
                    "pass:secret", "-out", encrypted], check=True, timeout=30)
    with pytest.raises(ValueError, match="is encrypted and no password was given"):
        pulse.server_context(tls_files.server_cert, encrypted)
    context = pulse.server_context(tls_files.server_cert, encrypted, password="secret")
    assert isinstance(context, ssl.SSLContext)


def test_server_context_checks() -> None:
    with pytest.raises(ValueError, match="require_client_cert needs ca_certs"):
        pulse.server_context("cert.pem", require_client_cert=True)
    with pytest.raises(ValueError, match="ALPN protocol names are ASCII"):
        pulse.server_context("cert.pem", alpn="h\u00e9")
    with pytest.raises(ValueError, match="1 to 255 bytes"):
        pulse.server_context("cert.pem", alpn=["x" * 256])


def test_server_context_verify_modes(tls_files: TLSFiles) -> None:
    plain = pulse.server_context(tls_files.server_cert, tls_files.server_key)
    assert plain.verify_mode == ssl.CERT_NONE
    optional = pulse.server_context(tls_files.server_cert, tls_files.server_key,
                                    ca_certs=tls_files.ca_cert)
    assert optional.verify_mode == ssl.CERT_OPTIONAL
    required = pulse.server_context(tls_files.server_cert, tls_files.server_key,
                                    ca_certs=tls_files.ca_cert, require_client_cert=True)
    assert required.verify_mode == ssl.CERT_REQUIRED
    assert required.minimum_version.value >= ssl.TLSVersion.TLSv1_2.value


def test_serve_rejects_a_client_context_before_forking() -> None:
    with pytest.raises(ValueError, match="a server needs a server-side SSLContext"):
        Supervisor(pulse.Handler(), "127.0.0.1:0", ssl=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    with pytest.raises(TypeError, match="ssl must be an ssl.SSLContext"):
        Supervisor(pulse.Handler(), "127.0.0.1:0", ssl=lambda: "cert.pem")


SCRIPT = '''
import logging
import sys
logging.basicConfig(level="INFO")
sys.path.insert(0, {app_dir!r})
import pulse
from launcher_app import PidEcho
context = pulse.server_context({cert!r}, {key!r})
pulse.serve(PidEcho, "127.0.0.1:{port}", workers=2, ssl=context)
'''


def test_programmatic_serve_with_an_ssl_context(app_dir: Path, tls_files: TLSFiles) -> None:
    port = free_port()
    script = app_dir / "serve_tls.py"
    script.write_text(SCRIPT.format(app_dir=str(app_dir), cert=tls_files.server_cert,
                                    key=tls_files.server_key, port=port))
    env: Any = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    with Launched([sys.executable, str(script)], app_dir, env=env) as srv:
        serving(srv, 2)
        tls_greet(port, client_context(tls_files))[1].close()
        assert srv.stop() == 0, srv.log()
