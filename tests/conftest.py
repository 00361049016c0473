"""Session-wide fixtures: the TLS test certificates (made once per session)."""

import pytest

from tls_support import TLSFiles, certificates


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A CA, a server certificate (localhost, 127.0.0.1) and a client certificate."""
    return certificates(str(tmp_path_factory.mktemp("tls")))
