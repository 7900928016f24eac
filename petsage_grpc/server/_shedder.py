"""Closes the main port's connections that grpc core gives no way to close.

grpc.aio cannot close one connection from the server side, and grpc core bounds neither
a CONTINUATION flood nor connections per peer. The kernel can: ``shutdown()`` on the
connection's socket makes grpc core read end of file and tear the transport down itself,
freeing everything it held for it. The shedder finds the main port's connections among
the process's descriptors, on a thread of its own (so it acts however busy the event
loop is), and sheds:

- **per address**: connections from one peer address beyond ``max_per_address``, the
  newest first, so that one client cannot fill ``grpc.max_allowed_incoming_connections``
  and lock probes out;
- **floods, once memory grows or the process is busy**: a connection that, at two looks
  in a row, received more than ``fast_bytes_per_second`` since the last look while the
  server sent it less than an eighth of that (headers that never end, streams reset as
  soon as they open; a health client gets about as much back as it sends). Above
  ``memory_high_bytes``, any connection receiving that fast.

It never closes a descriptor: it shuts down a duplicate of one, checked to be the same
socket, so that a descriptor grpc core has meanwhile closed and reused is never touched.
Linux only (``/proc``, ``TCP_INFO``); ``serve`` leaves it off elsewhere. Its rules, cost
and the figures behind them: docs/reliability.md, "Closing connections grpc core keeps".
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from petsage_grpc.server._guard import PAGE_SIZE, rss_bytes

__all__ = ["ConnectionShedder"]

_log = logging.getLogger("petsage_grpc.server")
_FDS: Final = "/proc/self/fd"
# struct tcp_info (linux/tcp.h), up to tcpi_bytes_received (Linux 4.1+).
_TCP_INFO_SIZE: Final = 136
_BYTES: Final = struct.Struct("=QQ")  # tcpi_bytes_acked, tcpi_bytes_received at 120
# Seconds between looks: RSS and a descriptor count only; every connection's counters
# (a few microseconds each) while memory is up or descriptors many; again soon after
# closing some (a flood reconnects at once) or seeing a flood once.
_TICKS: Final = {"quiet": 0.1, "watching": 0.1, "shedding": 0.02}
_BUSY_CORES: Final = 0.5
"""CPU the whole process used since the last look, in cores, above which floods are sought."""
_MIN_FLOOD_BYTES: Final = 64 * 1024
"""Bytes a connection must have received since the last look to be a flood at all."""
_FLOOD_LOOKS: Final = 2
_REPORT_EVERY: Final = 60.0


@dataclass
class _Connection:
    fd: int
    peer: str
    first_seen: float
    bytes_received: int = -1
    bytes_acked: int = -1
    flooding: int = 0
    """Looks in a row at which it received like a flood."""


def _peer_host(address: Any) -> str:
    host = str(address[0]) if isinstance(address, tuple) else str(address)
    return host.removeprefix("::ffff:")


class ConnectionShedder:
    """Closes connections to one port beyond a per-address cap, and floods once memory grows.

    Args:
        max_per_address: connections one peer address may hold; beyond, its newest are
            closed.
        memory_high_bytes: RSS above which every connection receiving faster than
            *fast_bytes_per_second* is closed, whether or not it is answered.
        memory_rising_ratio: RSS, as a multiple of the RSS at :meth:`start`, above which
            (or while the process uses over half a core) connections receiving that fast
            but sent next to nothing are closed.
    """

    def __init__(
        self,
        *,
        max_per_address: int,
        memory_high_bytes: int,
        memory_rising_ratio: float = 1.15,
        fast_bytes_per_second: int = 256 * 1024,
    ) -> None:
        self._port = 0
        self._max_per_address = max_per_address
        self._memory_high = memory_high_bytes
        self._rising_ratio = memory_rising_ratio
        self._memory_rising = memory_high_bytes
        self._fast = fast_bytes_per_second
        self._known: dict[int, _Connection | None] = {}  # socket inode -> connection
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed_over_cap = 0
        self._closed_floods = 0
        self._failed = False
        self._statm = -1
        self._cpu_seen = 0.0
        self._reported = (0, 0)
        self._reported_at = 0.0

    def start(self, *, port: int) -> None:
        """Start watching the connections accepted on *port*, on a daemon thread."""
        self._port = port
        self._memory_rising = min(self._memory_high, int(rss_bytes() * self._rising_ratio))
        self._thread = threading.Thread(target=self._run, name="petsage-shedder", daemon=True)
        self._thread.start()

    def counts(self) -> dict[str, int]:
        """Connections closed since start, by reason (``address_cap``, ``flood``)."""
        return {"address_cap": self._closed_over_cap, "flood": self._closed_floods}

    def stop(self) -> None:
        """Stop watching (returns once the thread has ended)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        self._statm = os.open("/proc/self/statm", os.O_RDONLY)
        try:
            self._watch()
        finally:
            os.close(self._statm)

    def _watch(self) -> None:
        last, self._cpu_seen = time.monotonic(), time.process_time()
        tick = _TICKS["quiet"]
        while not self._stop.wait(tick):
            now = time.monotonic()
            elapsed, last = now - last, now
            try:
                state = self._tick(now, elapsed)
            except (OSError, ValueError) as error:  # /proc unreadable: try again later
                if not self._failed:
                    self._failed = True
                    _log.warning(
                        "cannot look at connections (%s); trying again every second",
                        type(error).__name__,
                        extra={"event": "shedder_error"},
                    )
                tick = 1.0
                continue
            tick = _TICKS[state]

    def _tick(self, now: float, elapsed: float) -> str:
        """Look once; say how soon to look again (``quiet``, ``watching``, ``shedding``)."""
        rss = int(os.pread(self._statm, 64, 0).split()[1]) * PAGE_SIZE
        high, rising = rss > self._memory_high, rss > self._memory_rising
        # A flood grpc core parses as fast as it comes need not grow memory: it takes CPU.
        cpu, self._cpu_seen = self._cpu_seen, time.process_time()
        busy = self._cpu_seen - cpu > _BUSY_CORES * elapsed
        watching = rising or busy
        if not watching:
            # Linux 6.2+ counts descriptors in the directory's size, without listing them.
            count = os.stat(_FDS).st_size or len(os.listdir(_FDS))
            if count <= self._max_per_address:
                self._known.clear()
                return "quiet"
        connections = self._connections(os.listdir(_FDS), now)
        shed = self._over_cap(connections)
        if watching:
            floods = self._floods(connections, elapsed, any_fast=high) - shed
            self._closed_floods += len(floods)
            shed |= floods
        for inode in shed:
            self._shutdown(inode, connections[inode].fd)
        self._report(now)
        suspects = any(c.flooding for c in connections.values())
        return "shedding" if shed or suspects else "watching"

    def _connections(self, names: list[str], now: float) -> dict[int, _Connection]:
        """The main port's connections, by socket inode (new ones looked at once)."""
        found: dict[int, _Connection] = {}
        seen: set[int] = set()
        known = self._known
        for name in names:
            try:
                link = os.readlink(f"{_FDS}/{name}")
            except OSError:
                continue
            if not link.startswith("socket:["):
                continue
            inode = int(link[8:-1])
            seen.add(inode)
            if inode not in known:
                known[inode] = self._identify(int(name), inode, now)
            connection = known[inode]
            if connection is not None:
                connection.fd = int(name)
                found[inode] = connection
        for inode in known.keys() - seen:
            del known[inode]
        return found

    def _identify(self, fd: int, inode: int, now: float) -> _Connection | None:
        """A connection accepted on the main port, or None for any other socket."""
        with _duplicate(fd, inode) as sock:
            if sock is None:
                return None
            try:
                if sock.type != socket.SOCK_STREAM or sock.family not in (
                    socket.AF_INET,
                    socket.AF_INET6,
                ):
                    return None
                if sock.getsockname()[1] != self._port:
                    return None
                peer = _peer_host(sock.getpeername())
            except OSError:  # the listener (no peer), or gone meanwhile
                return None
            return _Connection(fd=fd, peer=peer, first_seen=now)

    def _over_cap(self, connections: dict[int, _Connection]) -> set[int]:
        counts = Counter(c.peer for c in connections.values())
        crowded = {peer for peer, count in counts.items() if count > self._max_per_address}
        shed: set[int] = set()
        for peer in crowded:
            mine = sorted(
                (i for i, c in connections.items() if c.peer == peer),
                key=lambda i: (connections[i].first_seen, i),
            )
            shed.update(mine[self._max_per_address :])
        self._closed_over_cap += len(shed)
        return shed

    def _floods(
        self, connections: dict[int, _Connection], elapsed: float, *, any_fast: bool
    ) -> set[int]:
        """Connections receiving fast and answered little (any fast one if *any_fast*)."""
        limit = max(self._fast * elapsed, _MIN_FLOOD_BYTES)
        fast: set[int] = set()
        for inode, connection in connections.items():
            counts = self._byte_counts(connection.fd, inode)
            if counts is None:
                continue
            acked, received = counts
            # At the first look, everything the connection ever received counts.
            sent_since = acked - max(connection.bytes_acked, 0)
            received_since = received - max(connection.bytes_received, 0)
            connection.bytes_acked, connection.bytes_received = acked, received
            # A client whose calls are answered gets about as much back as it sends;
            # a flood of headers that never end, or of streams reset at once, gets
            # next to nothing. Two looks in a row: a burst of new calls that the server
            # has not answered yet (watchers reconnecting after a deploy) is one look.
            if received_since > limit and (any_fast or sent_since * 8 < received_since):
                connection.flooding += 1
            else:
                connection.flooding = 0
            if connection.flooding >= _FLOOD_LOOKS:
                fast.add(inode)
        return fast

    @staticmethod
    def _byte_counts(fd: int, inode: int) -> tuple[int, int] | None:
        """(bytes sent and acknowledged, bytes received) on the socket, or None."""
        with _duplicate(fd, inode) as sock:
            if sock is None:
                return None
            try:
                info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
            except OSError:
                return None
        if len(info) < _TCP_INFO_SIZE:
            return None  # a kernel older than 4.1
        acked, received = _BYTES.unpack_from(info, 120)
        return int(acked), int(received)

    @staticmethod
    def _shutdown(inode: int, fd: int) -> None:
        with _duplicate(fd, inode) as sock:
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _report(self, now: float) -> None:
        """One warning when shedding starts, then one a minute while it goes on, with counts."""
        counts = (self._closed_over_cap, self._closed_floods)
        if counts == self._reported:
            return
        if any(self._reported) and now - self._reported_at < _REPORT_EVERY:
            return
        over_cap = counts[0] - self._reported[0]
        floods = counts[1] - self._reported[1]
        self._reported, self._reported_at = counts, now
        _log.warning(
            "closed %d gRPC connections over the %d-per-address cap and %d flooding ones "
            "(receiving over %d KiB/s, answered next to nothing, while memory grew)",
            over_cap,
            self._max_per_address,
            floods,
            self._fast >> 10,
            extra={"event": "connections_shed"},
        )


@contextlib.contextmanager
def _duplicate(fd: int, inode: int) -> Iterator[socket.socket | None]:
    """A socket on a duplicate of *fd*, if *fd* is still the socket *inode*; else None."""
    try:
        copy = os.dup(fd)
    except OSError:
        yield None
        return
    try:
        same = os.fstat(copy).st_ino == inode
        sock = socket.socket(fileno=copy) if same else None
    except OSError:
        sock = None
    if sock is None:
        os.close(copy)
        yield None
        return
    try:
        yield sock
    finally:
        sock.close()
