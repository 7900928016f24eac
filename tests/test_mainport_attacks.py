"""Short forms of the main- and HTTP-port attacks of issue #20 against ``petsage-grpc
serve`` with its default caps (scripts/attack.py's attacks, a few seconds each): what the
server refuses, closes and logs, not figures (docs/reliability.md has those)."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable
from typing import Any, Final

import pytest
from conftest import ServerProcess
from hardening import wait_until
from prometheus_client.parser import text_string_to_metric_families
from tcp_listener import free_port
from test_attacks import IO_TIMEOUT, attack, grpc_statuses, probe_answers

from petsage_grpc.server._budget import derive_bounds

pytestmark = pytest.mark.slow

SpawnServer = Callable[..., ServerProcess]
BOUNDS: Final = derive_bounds(128)


def metric(http_port: int, name: str, labels: dict[str, str]) -> float:
    """One sample of the server's /metrics (0 when absent)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=IO_TIMEOUT)
    for family in text_string_to_metric_families(text.read().decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def livez_verbose(http_port: int) -> str:
    url = f"http://127.0.0.1:{http_port}/livez?verbose"
    return str(urllib.request.urlopen(url, timeout=IO_TIMEOUT).read().decode())


async def attack_for(
    name: str, port: int, connections: int, seconds: float, *, sources: int = 1
) -> Any:
    """Run the harness's attack *name* from *connections* connections for *seconds*."""
    tally, stop = attack.Tally(), asyncio.Event()
    addresses = [attack.source_address(n) for n in range(sources)] if sources > 1 else [None]
    tasks = [
        asyncio.create_task(
            attack.attacker(
                port,
                attack.ATTACK_FUNCTIONS[name],
                tally,
                index,
                stop,
                source=addresses[index % len(addresses)],
                one_shot=name in attack.ONE_SHOT,
            )
        )
        for index in range(connections)
    ]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), IO_TIMEOUT)
    return tally


@pytest.fixture
def served(spawn_server: SpawnServer) -> tuple[ServerProcess, int]:
    http_port = free_port()
    return spawn_server("--http-port", str(http_port)), http_port


def test_a_reset_storm_writes_one_counted_warning_and_no_traceback(
    served: tuple[ServerProcess, int],
) -> None:
    server, http_port = served
    asyncio.run(attack_for("reset-storm", server.port, 8, 3.0))
    kind = {"kind": "answer to a client that had gone"}
    wait_until(
        lambda: metric(http_port, "petsage_grpc_warnings_total", kind) > 0,
        "the gone clients to be counted",
    )
    assert "Traceback" not in server.log()
    assert "ExecuteBatchError" not in server.log()
    assert server.log().count("client behaviour: answer to a client that had gone") == 1
    assert probe_answers(server)


def test_gzip_bombs_are_refused_without_a_traceback(served: tuple[ServerProcess, int]) -> None:
    server, _ = served
    tally = asyncio.run(attack_for("gzip-bomb", server.port, 2, 3.0))
    assert tally.bytes_sent > 0
    assert "Traceback" not in server.log()
    assert probe_answers(server)


def test_calls_held_by_zero_window_readers_are_capped_until_done(
    served: tuple[ServerProcess, int],
) -> None:
    """Beyond ``maximum_concurrent_rpcs`` a new call is refused at once (RESOURCE_EXHAUSTED,
    an answer that needs no window), while the held ones stay held."""
    server, _ = served
    per_connection = BOUNDS.max_streams_per_connection
    # Twice what fills the cap: grpc core admits a connection's streams at its own pace.
    connections = 2 * (BOUNDS.max_calls_in_flight // per_connection + 1)

    async def hold_then_ask() -> dict[int, str]:
        tally, stop = attack.Tally(), asyncio.Event()
        tasks = [
            asyncio.create_task(attack.attacker(server.port, attack.zero_window, tally, n, stop))
            for n in range(connections)
        ]
        try:
            await asyncio.sleep(2.0)  # the attack's own pace; the assertion below waits

            def refused(outcomes: dict[int, str]) -> bool:
                return "8" in outcomes.values()

            outcomes: dict[int, str] = {}
            for _ in range(30):
                outcomes = await asyncio.to_thread(
                    grpc_statuses,
                    server.port,
                    path=attack.CHECK,
                    count=1,
                    body=attack.health_request("readiness"),
                    until=bool,
                )
                if refused(outcomes):
                    break
                await asyncio.sleep(0.5)
            return outcomes
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), IO_TIMEOUT)

    outcomes = asyncio.run(hold_then_ask())
    assert "8" in outcomes.values(), f"a call beyond the cap was not refused: {outcomes}"
    assert "Traceback" not in server.log()
    wait_until(lambda: probe_answers(server), "the main port to answer once the readers went")


def test_a_full_main_port_is_a_warning_and_a_metric_and_a_new_probe_gets_in(
    spawn_server: SpawnServer,
) -> None:
    """700 idle connections from 10 addresses (70 each, within the per-address cap) fill the
    shedder's cap in all; grpc core's own cap is above it, so a probe is still accepted."""
    http_port = free_port()
    server = spawn_server("--http-port", str(http_port))

    async def fill_and_probe() -> list[bool]:
        tally, stop = attack.Tally(), asyncio.Event()
        tasks = [
            asyncio.create_task(
                attack.attacker(
                    server.port,
                    attack.idle_h2,
                    tally,
                    n,
                    stop,
                    source=attack.source_address(n % 10),
                )
            )
            for n in range(700)
        ]
        try:
            await asyncio.to_thread(
                wait_until, lambda: tally.connections >= 700, "700 connections open"
            )
            answers = [await attack.probe_once(server.port) for _ in range(10)]
            # Held until the shedder has seen the port full (it looks every 100 ms).
            await asyncio.to_thread(
                wait_until,
                lambda: metric(http_port, "petsage_grpc_warnings_total", full) > 0,
                "a full port",
            )
            return answers
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), IO_TIMEOUT)

    full = {"kind": "at its connection cap"}
    answers = asyncio.run(fill_and_probe())
    assert sum(answers) >= 8, answers
    assert metric(http_port, "petsage_grpc_connections_closed_total", {"reason": "total_cap"}) > 0
    assert "gRPC main port: at its connection cap" in server.log()
    assert "[+]connection-shedder ok" in livez_verbose(http_port)
