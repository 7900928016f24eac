"""A loopback relay that speaks TLS to a server without verifying its certificate.

grpcio has no way to skip certificate verification, which grpc_health_probe's
``-tls-no-verify`` asks for. The probe therefore talks plaintext HTTP/2 to this relay on
127.0.0.1, and the relay makes the TLS connection (ALPN h2, client certificate if given)
with verification off. A failed handshake closes the relayed connection, which the probe
reports as a connection failure, as grpc_health_probe does.

The relay runs an asyncio loop on one daemon thread: an SSL socket must never be read
and written from two threads at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from concurrent.futures import Future

__all__ = ["start_unverified_tls_relay"]

_CHUNK = 65536


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ssl.SSLError):
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError, ssl.SSLError, RuntimeError):
        if writer.can_write_eof():
            writer.write_eof()


async def _serve(
    host: str, port: int, context: ssl.SSLContext, connect_limit: float, started: Future[int]
) -> None:
    async def relay(
        client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        try:
            server_reader, server_writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=context, server_hostname=host or None),
                connect_limit,
            )
        except (OSError, ssl.SSLError, TimeoutError):
            client_writer.close()
            return
        await asyncio.gather(
            _pump(client_reader, server_writer), _pump(server_reader, client_writer)
        )
        for writer in (client_writer, server_writer):
            writer.close()

    listener = await asyncio.start_server(relay, "127.0.0.1", 0)
    started.set_result(listener.sockets[0].getsockname()[1])
    async with listener:
        await listener.serve_forever()


def start_unverified_tls_relay(
    host: str, port: int, *, cert: str | None, key: str | None, timeout: float
) -> str:
    """Start relaying to *host*:*port* over unverified TLS; return the local ``host:port``.

    The relay runs on a daemon thread for the life of the process.

    Raises:
        OSError: the client certificate or key cannot be read (ssl.SSLError: they are
            not a usable pair).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    if cert and key:
        context.load_cert_chain(cert, key)
    started: Future[int] = Future()
    threading.Thread(
        target=asyncio.run,
        args=(_serve(host, port, context, timeout, started),),
        name="petsage-tls-relay",
        daemon=True,
    ).start()
    return f"127.0.0.1:{started.result(timeout=10)}"
