"""A loopback relay that speaks TLS to a server without verifying its certificate.

grpcio has no way to skip certificate verification, which grpc_health_probe's
``-tls-no-verify`` asks for. The probe therefore talks plaintext HTTP/2 to this relay on
127.0.0.1, and the relay makes the TLS connection (ALPN h2, client certificate if given)
with verification off. A failed handshake closes the relayed connection, which the probe
reports as a connection failure, as grpc_health_probe does.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading

__all__ = ["start_unverified_tls_relay"]

_CHUNK = 65536


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(_CHUNK):
            sink.sendall(data)
    for sock in (source, sink):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _relay(
    client: socket.socket, host: str, port: int, context: ssl.SSLContext, timeout: float
) -> None:
    with client:
        try:
            raw = socket.create_connection((host, port), timeout=timeout)
            server = context.wrap_socket(raw, server_hostname=host)
            server.settimeout(None)
        except (OSError, ssl.SSLError):
            return
        with server:
            upstream = threading.Thread(target=_pump, args=(client, server), daemon=True)
            upstream.start()
            _pump(server, client)
            upstream.join()


def start_unverified_tls_relay(
    host: str, port: int, *, cert: str | None, key: str | None, timeout: float
) -> str:
    """Start relaying to *host*:*port* over unverified TLS; return the local ``host:port``.

    The relay runs on daemon threads for the life of the process.

    Raises:
        OSError: the client certificate or key cannot be read.
        ssl.SSLError: they are not a usable pair.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    if cert and key:
        context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        while True:
            client, _ = listener.accept()
            threading.Thread(
                target=_relay, args=(client, host, port, context, timeout), daemon=True
            ).start()

    threading.Thread(target=accept, daemon=True).start()
    return f"127.0.0.1:{listener.getsockname()[1]}"
