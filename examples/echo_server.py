"""Echo server: every byte received is written back.

    python examples/echo_server.py --port 8080 [--host 127.0.0.1] [--trigger edge|level]
                                   [--workers N|auto]

With ``--workers`` it runs that many reactor processes on the port
(``pulse.serve``: SIGHUP replaces them one at a time, a dead one is
restarted); without it, one ``pulse.Server`` in this process.  With
``--certfile cert.pem --keyfile key.pem`` it echoes over TLS (``--alpn``
offers protocols, ``--ca-certs`` checks client certificates):

    openssl s_client -connect 127.0.0.1:8080 -CAfile ca.pem
"""

import example_cli
import pulse


class Echo(pulse.Handler):
    """Writes back whatever arrives."""

    def on_data(self, conn: pulse.Conn, data: bytes) -> None:
        conn.write(data)


def main() -> None:
    parser = example_cli.parser(__doc__, 8080)
    example_cli.run(Echo, parser.parse_args())


if __name__ == "__main__":
    main()
