"""A real TCP listener on a loopback port, for ``tcp`` checks, and a port nothing listens on."""

from __future__ import annotations

import socket
import threading
from types import TracebackType


def free_port() -> int:
    """Return a loopback port that nothing listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def refuses_connections(port: int) -> bool:
    """Whether a connection to 127.0.0.1:*port* is refused (nothing listens there)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


class TcpListener:
    """Accepts connections on 127.0.0.1 on a background thread and closes each at once.

    Counts accepted connections. Listens from creation until :meth:`close` (or the end
    of a ``with`` block).
    """

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(64)
        self._socket.settimeout(0.05)
        self.port: int = self._socket.getsockname()[1]
        self.accepted = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="tcp-listener", daemon=True)
        self._thread.start()
        self._closed = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            connection.close()
            self.accepted += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        self._thread.join(10)
        self._socket.close()

    def __enter__(self) -> TcpListener:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
