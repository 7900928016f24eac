"""A loopback relay that speaks TLS to a server without verifying its certificate.

grpcio has no way to skip certificate verification, which ``--tls-no-verify`` asks for.
``petsage-grpc status`` (a grpcio client) therefore talks plaintext HTTP/2 to this relay on
127.0.0.1, and the relay makes the TLS connection (ALPN h2, client certificate if given)
with verification off. A failed handshake closes the relayed connection, which the client
reports as a connection failure. (The probe needs no relay: it speaks HTTP/2 over ``ssl``.)

The relay runs an asyncio loop on one daemon thread: an SSL socket must never be read
and written from two threads at once.
"""

from __future__ import annotations

import asyncio
import atexit
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
    host: str,
    port: int,
    context: ssl.SSLContext,
    connect_limit: float,
    started: Future[tuple[int, asyncio.AbstractEventLoop, asyncio.Event]],
) -> None:
    async def relay(
        client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        # Cancelled only when the relay stops, here too (a server that never completes the
        # handshake): end quietly, as asyncio's stream callback would otherwise print the
        # cancellation as an error with its traceback (Python 3.11, streams.py).
        try:
            server_reader, server_writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=context, server_hostname=host or None),
                connect_limit,
            )
        except (OSError, ssl.SSLError, TimeoutError, asyncio.CancelledError):
            client_writer.close()
            return
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(
                _pump(client_reader, server_writer), _pump(server_reader, client_writer)
            )
        for writer in (client_writer, server_writer):
            writer.close()

    stop = asyncio.Event()
    listener = await asyncio.start_server(relay, "127.0.0.1", 0)
    started.set_result((listener.sockets[0].getsockname()[1], asyncio.get_running_loop(), stop))
    async with listener:
        await stop.wait()
    # End the relayed connections here, not in the interpreter's finalisation, which
    # would complain about tasks destroyed while pending. The process is exiting: a
    # connection cancelled before its task first ran has nothing to report (asyncio's
    # stream callback would print its CancelledError with a traceback).
    asyncio.get_running_loop().set_exception_handler(lambda _loop, _context: None)
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


def start_unverified_tls_relay(
    host: str, port: int, *, cert: str | None, key: str | None, timeout: float
) -> str:
    """Start relaying to *host*:*port* over unverified TLS; return the local ``host:port``.

    The relay runs on a daemon thread until the process exits.

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
    started: Future[tuple[int, asyncio.AbstractEventLoop, asyncio.Event]] = Future()
    thread = threading.Thread(
        target=asyncio.run,
        args=(_serve(host, port, context, timeout, started),),
        name="petsage-tls-relay",
        daemon=True,
    )
    thread.start()
    local_port, loop, stop = started.result(timeout=10)

    def close() -> None:
        with contextlib.suppress(RuntimeError):  # the loop has already ended
            loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=1)

    atexit.register(close)
    return f"127.0.0.1:{local_port}"
