"""The connection shedder's policy (``decide``) against a fake connection table, and its
thread's errors made visible."""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Final

import pytest
from hardening import wait_until

from petsage_grpc.server import _shedder as shedder_module
from petsage_grpc.server._logging import component_states, warning_counts
from petsage_grpc.server._shedder import (
    Connection,
    ConnectionShedder,
    Policy,
    _SockDiag,
    decide,
)

POLICY = Policy(max_per_address=3, max_connections=8, fast_bytes_per_second=256 * 1024)


def table(*peers: str) -> dict[int, Connection]:
    """Connections by inode 1, 2, ..., the first opened first."""
    return {
        n: Connection(fd=100 + n, peer=peer, first_seen=float(n)) for n, peer in enumerate(peers, 1)
    }


def test_an_address_over_its_cap_loses_its_newest() -> None:
    connections = table("a", "a", "b", "a", "a")
    decision = decide(connections, None, POLICY, elapsed=0.1)
    assert decision.over_cap == {5}
    assert decision.over_total == set()
    assert decision.floods == set()
    assert not decision.full


def test_over_the_total_the_most_crowded_address_goes_first_and_a_lone_probe_stays() -> None:
    # 3 each from a, b, c (within the per-address cap), then one probe from p: 10 > 8.
    connections = table("a", "a", "a", "b", "b", "b", "c", "c", "c", "p")
    decision = decide(connections, None, POLICY, elapsed=0.1)
    assert decision.full
    assert len(decision.over_total) == 2
    assert 10 not in decision.shed, "the probe's only connection is kept"
    # The newest of two of the crowded addresses: never two from one while others hold more.
    peers = sorted(connections[i].peer for i in decision.over_total)
    assert len(set(peers)) == 2
    assert all(i in {3, 6, 9} for i in decision.over_total)


def test_a_full_port_is_reported_even_when_nothing_is_over() -> None:
    decision = decide(table(*"abcdefgh"), None, POLICY, elapsed=0.1)
    assert decision.full
    assert decision.shed == set()
    assert not decide(table(*"abcdefg"), None, POLICY, elapsed=0.1).full


def test_no_total_cap_without_max_connections() -> None:
    policy = Policy(max_per_address=100)
    decision = decide(table(*("x" * 50)), None, policy, elapsed=0.1)
    assert not decision.full
    assert decision.shed == set()


def test_a_flood_is_two_fast_unanswered_looks_and_an_answered_client_is_not() -> None:
    connections = table("a", "b")
    fast = 256 * 1024 // 10 * 4  # four times the rate over a 0.1 s look
    # Look 1: both received fast; a was answered as much, b next to nothing.
    first = decide(connections, {1: (fast, fast), 2: (10, fast)}, POLICY, elapsed=0.1)
    assert first.floods == set(), "one look is a burst, not a flood"
    second = decide(connections, {1: (2 * fast, 2 * fast), 2: (20, 2 * fast)}, POLICY, elapsed=0.1)
    assert second.floods == {2}
    assert connections[1].flooding == 0


def test_above_the_high_mark_any_fast_connection_is_a_flood() -> None:
    connections = table("a")
    fast = 256 * 1024
    decide(connections, {1: (fast, fast)}, POLICY, elapsed=0.1, any_fast=True)
    decision = decide(connections, {1: (2 * fast, 2 * fast)}, POLICY, elapsed=0.1, any_fast=True)
    assert decision.floods == {1}


def test_a_slow_sender_is_never_a_flood() -> None:
    connections = table("a")
    for look in range(1, 6):
        decision = decide(connections, {1: (0, look * 10_000)}, POLICY, elapsed=0.1)
        assert decision.floods == set()


def test_a_connection_over_a_cap_is_not_also_counted_a_flood() -> None:
    connections = table("a", "a", "a", "a")
    fast = 1 << 20
    decide(connections, dict.fromkeys(connections, (0, fast)), POLICY, elapsed=0.1)
    decision = decide(connections, dict.fromkeys(connections, (0, 2 * fast)), POLICY, elapsed=0.1)
    assert decision.over_cap == {4}
    assert decision.floods == {1, 2, 3}


class _Broken(ConnectionShedder):
    """A shedder whose look fails until *fixed* is set: an unexpected error in its thread."""

    def __init__(self) -> None:
        super().__init__(max_per_address=1, memory_high_bytes=1 << 40)
        self.fixed = threading.Event()

    def _tick(self, now: float, elapsed: float) -> str:
        if not self.fixed.is_set():
            raise RuntimeError("a bug")
        return super()._tick(now, elapsed)


def test_an_unexpected_error_in_the_thread_is_logged_counted_and_shown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="petsage_grpc.server")
    shedder = _Broken()
    before = warning_counts().get("connection shedder error", 0)
    shedder.start(port=1)
    try:
        wait_until(
            lambda: component_states().get("connection-shedder") == "RuntimeError",
            "the shedder to report its error",
        )
        assert "the connection shedder failed (RuntimeError)" in caplog.text
        assert "Traceback" not in caplog.text
        assert warning_counts().get("connection shedder error", 0) > before
        shedder.fixed.set()
        wait_until(
            lambda: component_states().get("connection-shedder") is None,
            "the shedder to report it works again",
        )
        assert "the connection shedder works again" in caplog.text
    finally:
        shedder.stop()


SOURCE: Final = f"127.0.3.{os.getpid() % 250 + 1}"
"""The clients' own loopback address: the kernel's list is the whole network namespace's."""


@pytest.fixture
def accepted() -> Iterator[tuple[int, list[socket.socket], list[socket.socket]]]:
    """A loopback listener's port, three client sockets (from SOURCE) and their accepted ends."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        clients = [
            socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(SOURCE, 0))
            for _ in range(3)
        ]
        servers = [listener.accept()[0] for _ in range(3)]
        try:
            yield port, clients, servers
        finally:
            for sock in clients + servers:
                sock.close()


def test_the_kernel_lists_the_ports_sockets_with_peers_and_byte_counts(
    accepted: tuple[int, list[socket.socket], list[socket.socket]],
) -> None:
    port, clients, servers = accepted
    clients[0].sendall(b"x" * 1000)
    assert servers[0].recv(4096, socket.MSG_PEEK)
    try:
        diag = _SockDiag()
    except OSError as error:
        pytest.skip(f"no sock_diag netlink here: {error}")
    try:
        wait_until(
            lambda: diag.sockets(port).get(_inode(servers[0]), ("", 0, 0))[2] >= 1000, "bytes"
        )
        found = diag.sockets(port)
    finally:
        diag.close()
    # Another process's socket on the same port may be listed too (a shared namespace).
    assert {_inode(s) for s in servers} <= set(found)
    assert {found[_inode(s)][0] for s in servers} == {SOURCE}


def test_over_its_cap_an_address_loses_its_newest_through_the_kernels_list(
    accepted: tuple[int, list[socket.socket], list[socket.socket]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sock_diag path (used above 1,000 descriptors) finds the descriptor to shut down."""
    port, clients, _ = accepted
    monkeypatch.setattr(shedder_module, "_DIAG_ABOVE", 0)
    shedder = ConnectionShedder(max_per_address=1, memory_high_bytes=1 << 40)
    try:
        shedder._diag = _SockDiag()
    except OSError as error:
        pytest.skip(f"no sock_diag netlink here: {error}")
    shedder._port = port
    shedder._statm = os.open("/proc/self/statm", os.O_RDONLY)
    try:
        shedder._tick(time.monotonic(), 0.1)
    finally:
        os.close(shedder._statm)
        shedder._diag.close()
    assert shedder.counts()["address_cap"] == 2
    ended: set[int] = set()

    def two_ended() -> bool:
        readable, _, _ = select.select([c for c in clients if id(c) not in ended], [], [], 0.1)
        ended.update(id(c) for c in readable if c.recv(1) == b"")
        return len(ended) >= 2

    # Every connection is equally new at the first look: two of the three are shut down.
    wait_until(two_ended, "two connections shut down")
    assert len(ended) == 2


def _inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino
