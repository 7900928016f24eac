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
from petsage_grpc.server._logging import WarningTally, set_component_state

__all__ = ["Connection", "ConnectionShedder", "Decision", "Policy", "decide"]

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
_COMPONENT: Final = "connection-shedder"
_DIAG_ABOVE: Final = 1_000
"""Descriptors above which the kernel lists the main port's sockets (sock_diag: ~3-7 ms a
look here, whatever the process holds) instead of /proc/self/fd (~5.5 µs a descriptor)."""


@dataclass
class Connection:
    """What the shedder keeps about one main-port connection (by socket inode)."""

    fd: int
    peer: str
    first_seen: float
    bytes_received: int = -1
    bytes_acked: int = -1
    flooding: int = 0
    """Looks in a row at which it received like a flood."""


@dataclass(frozen=True, kw_only=True)
class Policy:
    """What the shedder closes (the arguments of :class:`ConnectionShedder`)."""

    max_per_address: int
    max_connections: int | None = None
    """Main-port connections in all; beyond, the newest of the most crowded address go."""
    fast_bytes_per_second: int = 256 * 1024


@dataclass(frozen=True)
class Decision:
    """Connections (by socket inode) to close, by reason; whether the port is full."""

    over_cap: frozenset[int] = frozenset()
    over_total: frozenset[int] = frozenset()
    floods: frozenset[int] = frozenset()
    full: bool = False
    """The main port holds *max_connections* or more."""

    @property
    def shed(self) -> frozenset[int]:
        return self.over_cap | self.over_total | self.floods


def decide(
    connections: dict[int, Connection],
    counters: dict[int, tuple[int, int]] | None,
    policy: Policy,
    *,
    elapsed: float,
    any_fast: bool = False,
) -> Decision:
    """The shedder's policy, without I/O: which of *connections* to close.

    *connections* maps socket inodes to what the shedder keeps about each; *counters*
    holds each one's (bytes sent and acknowledged, bytes received) now, or is None when
    floods are not being sought. Updates each connection's byte counters and flood streak.
    """
    over_cap = _over_cap(connections, policy.max_per_address)
    over_total: set[int] = set()
    full = False
    if policy.max_connections is not None:
        left = {i: c for i, c in connections.items() if i not in over_cap}
        full = len(left) >= policy.max_connections
        over_total = _over_total(left, policy.max_connections)
    floods: set[int] = set()
    if counters is not None:
        floods = _floods(connections, counters, policy, elapsed=elapsed, any_fast=any_fast)
        floods -= over_cap | over_total
    return Decision(frozenset(over_cap), frozenset(over_total), frozenset(floods), full)


def _over_cap(connections: dict[int, Connection], cap: int) -> set[int]:
    """The newest connections of every peer address beyond *cap*."""
    counts = Counter(c.peer for c in connections.values())
    crowded = {peer for peer, count in counts.items() if count > cap}
    shed: set[int] = set()
    for peer in crowded:
        mine = sorted(
            (i for i, c in connections.items() if c.peer == peer),
            key=lambda i: (connections[i].first_seen, i),
        )
        shed.update(mine[cap:])
    return shed


def _over_total(connections: dict[int, Connection], cap: int) -> set[int]:
    """Beyond *cap* in all: the newest of whichever address holds the most, one at a time.

    A client with one connection (a probe) is the last ever chosen.
    """
    excess = len(connections) - cap
    if excess <= 0:
        return set()
    by_peer: dict[str, list[int]] = {}
    for inode in sorted(connections, key=lambda i: (connections[i].first_seen, i)):
        by_peer.setdefault(connections[inode].peer, []).append(inode)
    shed: set[int] = set()
    for _ in range(excess):
        peer = max(by_peer, key=lambda p: len(by_peer[p]))
        shed.add(by_peer[peer].pop())
    return shed


def _floods(
    connections: dict[int, Connection],
    counters: dict[int, tuple[int, int]],
    policy: Policy,
    *,
    elapsed: float,
    any_fast: bool,
) -> set[int]:
    """Connections receiving fast and answered little (any fast one if *any_fast*)."""
    limit = max(policy.fast_bytes_per_second * elapsed, _MIN_FLOOD_BYTES)
    fast: set[int] = set()
    for inode, connection in connections.items():
        if inode not in counters:
            continue
        acked, received = counters[inode]
        # At the first look, everything the connection ever received counts.
        sent_since = acked - max(connection.bytes_acked, 0)
        received_since = received - max(connection.bytes_received, 0)
        connection.bytes_acked, connection.bytes_received = acked, received
        # A client whose calls are answered gets about as much back as it sends; a flood
        # of headers that never end, or of streams reset at once, gets next to nothing.
        # Two looks in a row: a burst of new calls that the server has not answered yet
        # (watchers reconnecting after a deploy) is one look.
        if received_since > limit and (any_fast or sent_since * 8 < received_since):
            connection.flooding += 1
        else:
            connection.flooding = 0
        if connection.flooding >= _FLOOD_LOOKS:
            fast.add(inode)
    return fast


# sock_diag (linux/inet_diag.h, linux/netlink.h): the kernel lists the main port's TCP
# sockets, with their peers and TCP_INFO, filtered by port in the kernel; what it costs
# does not grow with the process's other descriptors (15,000 idle probe-port ones).
_NETLINK_SOCK_DIAG: Final = 4
_SOCK_DIAG_BY_FAMILY: Final = 20
_NLM_F_DUMP_REQUEST: Final = 0x1 | 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_INET_DIAG_REQ_BYTECODE, _INET_DIAG_INFO = 1, 2
_BC_S_GE, _BC_S_LE = 2, 3
# Accepted connections' states: not SYN_SENT (2), TIME_WAIT (6), CLOSE (7) or LISTEN (10).
_ACCEPTED: Final = 0xFFF & ~(1 << 2 | 1 << 6 | 1 << 7 | 1 << 10)
_NLMSG: Final = struct.Struct("=IHHII")
_DIAG_MSG: Final = struct.Struct("=BBBBHH16s16sI8sIIIII")
_NLATTR: Final = struct.Struct("=HH")


class _SockDiag:
    """The TCP sockets on one local port, from the kernel (Linux sock_diag netlink)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def sockets(self, port: int) -> dict[int, tuple[str, int, int]]:
        """Socket inode -> (peer host, bytes sent and acknowledged, bytes received)."""
        found: dict[int, tuple[str, int, int]] = {}
        for family in (socket.AF_INET, socket.AF_INET6):
            self._dump(family, port, found)
        return found

    def _dump(self, family: int, port: int, found: dict[int, tuple[str, int, int]]) -> None:
        # Bytecode: sport >= port, then sport <= port; a "no" jumps past the end (reject).
        code = struct.pack(
            "=BBHBBHBBHBBH", _BC_S_GE, 8, 20, 0, 0, port, _BC_S_LE, 8, 12, 0, 0, port
        )
        # The port in the socket id too: the kernel skips other ports before the bytecode.
        request = struct.pack(
            "=BBBxI", family, socket.IPPROTO_TCP, 1 << (_INET_DIAG_INFO - 1), _ACCEPTED
        )
        request += struct.pack(">H46x", port)
        request += _NLATTR.pack(_NLATTR.size + len(code), _INET_DIAG_REQ_BYTECODE) + code
        self._seq += 1
        self._sock.send(
            _NLMSG.pack(
                _NLMSG.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_DUMP_REQUEST, self._seq, 0
            )
            + request
        )
        while True:
            data = self._sock.recv(1 << 16)
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, kind, _, seq, _ = _NLMSG.unpack_from(data, offset)
                if length < _NLMSG.size:
                    return
                body = offset + _NLMSG.size
                if seq == self._seq:
                    if kind == _NLMSG_DONE:
                        return
                    if kind == _NLMSG_ERROR:
                        error = -struct.unpack_from("=i", data, body)[0]
                        raise OSError(error, os.strerror(error))
                    if kind == _SOCK_DIAG_BY_FAMILY:
                        self._parse(data, body, offset + length, found)
                offset += (length + 3) & ~3

    @staticmethod
    def _parse(data: bytes, start: int, end: int, found: dict[int, tuple[str, int, int]]) -> None:
        fields = _DIAG_MSG.unpack_from(data, start)
        family, dst, inode = fields[0], fields[7], fields[14]
        raw = dst[:4] if family == socket.AF_INET else dst
        peer = socket.inet_ntop(family, raw).removeprefix("::ffff:")
        acked = received = -1
        offset = start + _DIAG_MSG.size
        while offset + _NLATTR.size <= end:
            length, kind = _NLATTR.unpack_from(data, offset)
            if length < _NLATTR.size:
                break
            if kind == _INET_DIAG_INFO and length - _NLATTR.size >= _TCP_INFO_SIZE:
                acked, received = _BYTES.unpack_from(data, offset + _NLATTR.size + 120)
            offset += (length + 3) & ~3
        if inode:  # 0: no longer any process's (orphaned)
            found[inode] = (peer, acked, received)


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
        max_connections: the port's connections in all; beyond, the newest of the
            address holding the most are closed, and a full port is a counted warning.
            Set it below grpc core's own cap so that a new probe is still accepted.

    An unexpected error in its thread is logged (its type, no traceback), counted
    (``petsage_grpc_warnings_total``), shown by ``/livez?verbose`` as
    ``[-]connection-shedder failing``, and the thread tries again every second.
    """

    def __init__(
        self,
        *,
        max_per_address: int,
        memory_high_bytes: int,
        memory_rising_ratio: float = 1.15,
        fast_bytes_per_second: int = 256 * 1024,
        max_connections: int | None = None,
    ) -> None:
        self._port = 0
        self._policy = Policy(
            max_per_address=max_per_address,
            max_connections=max_connections,
            fast_bytes_per_second=fast_bytes_per_second,
        )
        self._max_per_address = max_per_address
        self._memory_high = memory_high_bytes
        self._rising_ratio = memory_rising_ratio
        self._memory_rising = memory_high_bytes
        self._fast = fast_bytes_per_second
        self._closed_over_total = 0
        self._tally = WarningTally(_log, "gRPC main port")
        self._diag: _SockDiag | None = None
        self._known: dict[int, Connection | None] = {}  # socket inode -> connection
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed_over_cap = 0
        self._closed_floods = 0
        self._failed = False
        self._statm = -1
        self._cpu_seen = 0.0
        self._reported = (0, 0, 0)
        self._reported_at = 0.0

    def start(self, *, port: int) -> None:
        """Start watching the connections accepted on *port*, on a daemon thread."""
        self._port = port
        self._memory_rising = min(self._memory_high, int(rss_bytes() * self._rising_ratio))
        set_component_state(_COMPONENT, None)
        self._thread = threading.Thread(target=self._run, name="petsage-shedder", daemon=True)
        self._thread.start()

    def counts(self) -> dict[str, int]:
        """Connections closed since start, by reason: address_cap, total_cap, flood."""
        return {
            "address_cap": self._closed_over_cap,
            "total_cap": self._closed_over_total,
            "flood": self._closed_floods,
        }

    def stop(self) -> None:
        """Stop watching (returns once the thread has ended)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        self._statm = os.open("/proc/self/statm", os.O_RDONLY)
        try:
            self._diag = _SockDiag()
        except OSError:  # no netlink here (seccomp, not Linux): /proc/self/fd alone
            _log.info(
                "sock_diag is unavailable: the connection shedder lists /proc/self/fd",
                extra={"event": "shedder_proc"},
            )
        try:
            self._watch()
        finally:
            os.close(self._statm)
            if self._diag is not None:
                self._diag.close()

    def _watch(self) -> None:
        last, self._cpu_seen = time.monotonic(), time.process_time()
        tick = _TICKS["quiet"]
        while not self._stop.wait(tick):
            now = time.monotonic()
            elapsed, last = now - last, now
            try:
                state = self._tick(now, elapsed)
            except Exception as error:  # noqa: BLE001 - never silent, never fatal: retried
                self._tally.add("connection shedder error")
                if not self._failed:
                    self._failed = True
                    set_component_state(_COMPONENT, type(error).__name__)
                    _log.warning(
                        "the connection shedder failed (%s); trying again every second",
                        type(error).__name__,
                        extra={"event": "shedder_error"},
                    )
                tick = 1.0
                continue
            if self._failed:
                self._failed = False
                set_component_state(_COMPONENT, None)
                _log.info("the connection shedder works again", extra={"event": "shedder_ok"})
            tick = _TICKS[state]

    def _tick(self, now: float, elapsed: float) -> str:
        """Look once; say how soon to look again (``quiet``, ``watching``, ``shedding``)."""
        rss = int(os.pread(self._statm, 64, 0).split()[1]) * PAGE_SIZE
        high, rising = rss > self._memory_high, rss > self._memory_rising
        # A flood grpc core parses as fast as it comes need not grow memory: it takes CPU.
        cpu, self._cpu_seen = self._cpu_seen, time.process_time()
        busy = self._cpu_seen - cpu > _BUSY_CORES * elapsed
        watching = rising or busy
        # Linux 6.2+ counts descriptors in the directory's size, without listing them.
        count = os.stat(_FDS).st_size or len(os.listdir(_FDS))
        if not watching and count <= self._max_per_address:
            self._known.clear()
            return "quiet"
        connections, counters = self._look(now, watching=watching, descriptors=count)
        decision = decide(connections, counters, self._policy, elapsed=elapsed, any_fast=high)
        if decision.full:
            # grpc core closes a connection beyond its own cap unseen and unlogged.
            self._tally.add("at its connection cap")
        shed = decision.shed
        if any(connections[inode].fd < 0 for inode in shed):
            self._find_descriptors({i: connections[i] for i in shed})
        # Counted when shut down: a socket the kernel listed may be gone meanwhile, or
        # (in a network namespace shared with other processes) not this process's.
        done = {inode for inode in shed if self._shutdown(inode, connections[inode].fd)}
        self._closed_over_cap += len(decision.over_cap & done)
        self._closed_over_total += len(decision.over_total & done)
        self._closed_floods += len(decision.floods & done)
        self._report(now)
        suspects = any(c.flooding for c in connections.values())
        return "shedding" if shed or suspects else "watching"

    def _look(
        self, now: float, *, watching: bool, descriptors: int
    ) -> tuple[dict[int, Connection], dict[int, tuple[int, int]] | None]:
        """The main port's connections, and their byte counters when *watching*."""
        if self._diag is not None and descriptors > _DIAG_ABOVE:
            try:
                return self._look_diag(now, watching=watching)
            except OSError as error:
                self._diag.close()
                self._diag = None
                _log.info(
                    "sock_diag failed (%s): the connection shedder lists /proc/self/fd",
                    type(error).__name__,
                    extra={"event": "shedder_proc"},
                )
        connections = self._connections(os.listdir(_FDS), now)
        if not watching:
            return connections, None
        counters = {}
        for inode, connection in connections.items():
            counts = self._byte_counts(connection.fd, inode)
            if counts is not None:
                counters[inode] = counts
        return connections, counters

    def _look_diag(
        self, now: float, *, watching: bool
    ) -> tuple[dict[int, Connection], dict[int, tuple[int, int]] | None]:
        """As :meth:`_look`, from the kernel's list (descriptors found only when needed)."""
        assert self._diag is not None  # noqa: S101 - the caller checked
        found = self._diag.sockets(self._port)
        connections: dict[int, Connection] = {}
        for inode, (peer, _, _) in found.items():
            connection = self._known.get(inode)
            if connection is None:
                connection = Connection(fd=-1, peer=peer, first_seen=now)
                self._known[inode] = connection
            connections[inode] = connection
        for inode in self._known.keys() - found.keys():
            del self._known[inode]
        if not watching:
            return connections, None
        return connections, {i: (a, r) for i, (_, a, r) in found.items() if r >= 0}

    @staticmethod
    def _find_descriptors(wanted: dict[int, Connection]) -> None:
        """Set the descriptor of each of *wanted* (by inode) from /proc/self/fd."""
        for name in os.listdir(_FDS):
            try:
                link = os.readlink(f"{_FDS}/{name}")
            except OSError:
                continue
            if link.startswith("socket:[") and (found := wanted.get(int(link[8:-1]))):
                found.fd = int(name)

    def _connections(self, names: list[str], now: float) -> dict[int, Connection]:
        """The main port's connections, by socket inode (new ones looked at once)."""
        found: dict[int, Connection] = {}
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

    def _identify(self, fd: int, inode: int, now: float) -> Connection | None:
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
            return Connection(fd=fd, peer=peer, first_seen=now)

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
    def _shutdown(inode: int, fd: int) -> bool:
        """Shut the socket *inode* down through a duplicate of *fd*; whether it was."""
        if fd < 0:
            return False  # not found among this process's descriptors
        with _duplicate(fd, inode) as sock:
            if sock is None:
                return False
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                return False
            return True

    def _report(self, now: float) -> None:
        """One warning when shedding starts, then one a minute while it goes on, with counts."""
        counts = (self._closed_over_cap, self._closed_over_total, self._closed_floods)
        if counts == self._reported:
            return
        if any(self._reported) and now - self._reported_at < _REPORT_EVERY:
            return
        over_cap, over_total, floods = (n - m for n, m in zip(counts, self._reported, strict=True))
        self._reported, self._reported_at = counts, now
        _log.warning(
            "closed %d gRPC connections over the %d-per-address cap, %d over the %s in all and "
            "%d flooding ones (receiving over %d KiB/s, answered next to nothing, while memory "
            "grew)",
            over_cap,
            self._max_per_address,
            over_total,
            self._policy.max_connections or "no cap",
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
