"""Server-side ``ssl.SSLContext`` from certificate files, as ``pulse serve`` builds it.

``server_context`` is what ``--certfile/--keyfile/--ca-certs/
--require-client-cert/--alpn`` mean, usable from Python as well.  Every bad
input (a missing file, a key that does not match the certificate, an empty
ALPN name) is a ``ValueError`` of one line naming the file or the flag, so
the command line can print it as is; the ``ssl`` module's own messages
(``[SSL] PEM lib (_ssl.c:3900)``) name neither.

The context starts from ``ssl.create_default_context(Purpose.CLIENT_AUTH)``:
the ``ssl`` module's vetted defaults (its cipher list, no compression),
nothing of our own to keep up to date, plus TLS 1.2 at least (RFC 8996
deprecates 1.0 and 1.1; Python 3.10 makes that the default, 3.9 and
Debian's PyPy do not).
"""

import os
import ssl
from typing import List, Optional, Sequence, Union

__all__ = ["server_context", "parse_alpn"]


def parse_alpn(text: Union[str, Sequence[str], None]) -> Optional[List[str]]:
    """ALPN protocol names from ``"h2,http/1.1"`` (or a list); ``None`` for none.

    Each name is 1 to 255 bytes of ASCII (RFC 7301); anything else is a
    ``ValueError``.
    """
    if text is None:
        return None
    names = [part.strip() for part in text.split(",")] if isinstance(text, str) else \
        [str(part) for part in text]
    for name in names:
        try:
            size = len(name.encode("ascii"))
        except UnicodeEncodeError:
            raise ValueError("ALPN protocol names are ASCII, got {!r}".format(name)) from None
        if not 0 < size < 256:
            raise ValueError("an ALPN protocol name is 1 to 255 bytes, got {!r} in {!r}".format(
                name, text))
    return names


def _readable(what: str, path: str) -> str:
    if not os.path.isfile(path):
        raise ValueError("{} {}: no such file".format(what, path))
    if not os.access(path, os.R_OK):
        raise ValueError("{} {}: not readable".format(what, path))
    return path


def server_context(certfile: str, keyfile: Optional[str] = None, *,
                   ca_certs: Optional[str] = None, require_client_cert: bool = False,
                   alpn: Union[str, Sequence[str], None] = None,
                   password: Optional[str] = None) -> ssl.SSLContext:
    """A server-side ``ssl.SSLContext`` serving ``certfile`` (PEM; the key in
    it or in ``keyfile``).

    ``ca_certs`` (PEM) is the CA that client certificates are checked
    against: with it a client may present one (``CERT_OPTIONAL``), with
    ``require_client_cert`` too it must (``CERT_REQUIRED``, mutual TLS).
    ``alpn`` offers protocols in order of preference (``"h2,http/1.1"``).
    ``password`` decrypts an encrypted key; without it such a key is an
    error, never a prompt on the terminal (a server has nobody to answer).
    Raises ``ValueError`` with one line naming the file for anything wrong.
    """
    if require_client_cert and not ca_certs:
        raise ValueError("require_client_cert needs ca_certs (the CA that signs client "
                         "certificates)")
    protocols = parse_alpn(alpn)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if context.minimum_version.value < ssl.TLSVersion.TLSv1_2.value:
        # .value: MINIMUM_SUPPORTED (-2 on 3.9) is an alias, not an order.
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    _readable("certfile", certfile)
    if keyfile is not None:
        _readable("keyfile", keyfile)
    key = keyfile or certfile

    def no_password() -> str:
        raise ValueError("the private key in {} is encrypted and no password was "
                         "given".format(key))
    try:
        context.load_cert_chain(certfile, keyfile, password if password is not None
                                else no_password)
    except ssl.SSLError as exc:
        raise ValueError("certfile {}{}: not a PEM certificate with its private key ({})".format(
            certfile, "" if keyfile is None else " / keyfile " + keyfile,
            exc.reason or exc)) from None
    if ca_certs is not None:
        _readable("ca_certs", ca_certs)
        try:
            context.load_verify_locations(cafile=ca_certs)
        except ssl.SSLError as exc:
            raise ValueError("ca_certs {}: not a PEM certificate ({})".format(
                ca_certs, exc.reason or exc)) from None
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    if protocols:
        context.set_alpn_protocols(protocols)
    return context
