"""Short forms of the probe-port attacks of scripts/attack.py, with the default caps.

Each attacks ``petsage-grpc serve --probe-port Q`` for a few seconds while probes (a new
connection each, Check ``readiness``, as the kubelet) keep asking on Q, and asserts
structure, not timing: every probe is answered SERVING during the attack, the server
closes the attacking connections and counts why (``petsage_grpc_probe_port_refused``
and one warning), and, where a memory cgroup can be made here, the kernel killed
nothing in a 128 MiB one (the manifest's limit). The 20-second runs with their figures,
before and after, are in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, Final

import grpc
import pytest
from conftest import ServerProcess, load_script
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hardening import wait_until
from prometheus_client.parser import text_string_to_metric_families
from tcp_listener import free_port

pytestmark = pytest.mark.slow

SpawnServer = Callable[..., ServerProcess]
ATTACK_SECONDS: Final = 3.0
IO_TIMEOUT: Final = 30.0
PROBES: Final = 5
PROBE_SOURCE: Final = "127.0.0.2"


attack = load_script("attack")
memcg = load_script("memcg")


class ProbePort:
    """A server with a probe port (and an HTTP port for its metrics), maybe in a cgroup."""

    def __init__(self, server: ServerProcess, probe_port: int, http_port: int) -> None:
        self.server = server
        self.probe_port = probe_port
        self.http_port = http_port
        self.cgroup: Any = None

    def refused(self, reason: str) -> float:
        """The probe port's count of refusals for *reason*, from /metrics."""
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        text = urllib.request.urlopen(url, timeout=IO_TIMEOUT).read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "petsage_grpc_probe_port_refused_total" and sample.labels == {
                    "reason": reason
                }:
                    return float(sample.value)
        return 0.0


@pytest.fixture
def probe_port(spawn_server: SpawnServer) -> Iterator[ProbePort]:
    port, http_port = free_port(), free_port()
    server = spawn_server("--probe-port", str(port), "--http-port", str(http_port))
    wait_until(lambda: "serving health probes" in server.log(), "the probe port to be logged")
    target = ProbePort(server, port, http_port)
    with contextlib.ExitStack() as stack:
        if memcg.unavailable_reason() is None:
            # Joined after start: what the attack makes the server hold is charged here.
            target.cgroup = stack.enter_context(
                memcg.memory_cgroup(128 * 2**20, prefix="petsage-probeport-test")
            )
            target.cgroup.add(server.process.pid)
        yield target
        if target.cgroup is not None:
            assert target.cgroup.oom_kills() == 0, target.cgroup.verdict()


def kubelet_probe(port: int) -> int:
    """A new connection from PROBE_SOURCE, Check readiness; the status (or -code)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    # grpcio has no source-address option: the harness's raw prober binds one; this
    # one checks that a grpc client (grpc core's HTTP/2) gets its answer.
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="readiness"), timeout=IO_TIMEOUT
            )
        except grpc.RpcError as error:
            return -int(error.code().value[0])
    return int(answer.status)


def raw_probe(port: int) -> bool:
    """The harness's kubelet-model probe from 127.0.0.2, with a generous deadline."""

    async def once() -> bool:
        return bool(await asyncio.wait_for(attack.probe_once(port), IO_TIMEOUT))

    return any(asyncio.run(once()) for _ in range(3))


async def attack_with_probes(
    name: str, port: int, connections: int, *, sources: list[str] | None = None
) -> tuple[Any, list[int], list[bool]]:
    """Attack *port* with *name* for ATTACK_SECONDS while probing it; the Tally, the grpcio
    probes' statuses and the raw probes' outcomes."""
    tally, stop = attack.Tally(), asyncio.Event()
    tasks = [
        asyncio.create_task(
            attack.attacker(
                port,
                attack.ATTACK_FUNCTIONS[name],
                tally,
                index,
                stop,
                source=None if sources is None else sources[index % len(sources)],
            )
        )
        for index in range(connections)
    ]
    await asyncio.sleep(ATTACK_SECONDS / 3)  # the attack under way first

    async def probes() -> tuple[list[int], list[bool]]:
        grpcio = [await asyncio.to_thread(kubelet_probe, port) for _ in range(PROBES)]
        raw = [await asyncio.to_thread(raw_probe, port) for _ in range(PROBES)]
        return grpcio, raw

    answered = await asyncio.gather(probes(), asyncio.sleep(ATTACK_SECONDS))
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), IO_TIMEOUT)
    grpcio, raw = answered[0]
    return tally, grpcio, raw


SERVING: Final = int(health_pb2.HealthCheckResponse.SERVING)


@pytest.mark.parametrize("connections", [1, 2])
def test_calls_without_a_message_do_not_hold_the_probe_port(
    probe_port: ProbePort, connections: int
) -> None:
    tally, grpcio, raw = asyncio.run(
        attack_with_probes("probe-no-message", probe_port.probe_port, connections)
    )
    assert grpcio == [SERVING] * PROBES
    assert all(raw), raw
    # Each attacking connection held its calls until the deadline, then was closed.
    assert tally.closed_by_server >= connections, tally
    assert probe_port.refused("deadline") >= connections
    # Streams beyond the per-connection cap were refused, not queued.
    assert probe_port.refused("streams") >= 1
    # One warning, however many refusals (at most one a minute).
    warnings = [line for line in probe_port.server.lines if "probe port refused" in line]
    assert len(warnings) == 1, warnings


def test_continuation_flood_on_the_probe_port_is_closed(probe_port: ProbePort) -> None:
    tally, grpcio, raw = asyncio.run(
        attack_with_probes("probe-continuation", probe_port.probe_port, 4)
    )
    assert grpcio == [SERVING] * PROBES
    assert all(raw), raw
    assert tally.closed_by_server >= 4, tally
    assert probe_port.refused("header_list") >= 4
    assert probe_port.server.process.poll() is None


def test_idle_connections_from_many_addresses_do_not_shut_probes_out(
    probe_port: ProbePort,
) -> None:
    # 400 connections without a preface from 200 addresses: past the cap in all (128).
    sources = [f"127.0.0.{10 + n}" for n in range(200)]
    tally, grpcio, raw = asyncio.run(
        attack_with_probes("probe-idle", probe_port.probe_port, 400, sources=sources)
    )
    assert grpcio == [SERVING] * PROBES
    assert all(raw), raw
    assert probe_port.refused("connection_cap") >= 1
    assert tally.closed_by_server >= 1, tally


def test_connections_beyond_the_per_address_cap_close_that_address_s_oldest(
    probe_port: ProbePort,
) -> None:
    tally, grpcio, raw = asyncio.run(
        attack_with_probes("probe-idle", probe_port.probe_port, 40, sources=["127.0.0.5"])
    )
    assert grpcio == [SERVING] * PROBES
    assert all(raw), raw
    assert probe_port.refused("address_cap") >= 40 - 16
    assert probe_port.refused("connection_cap") == 0
    assert tally.closed_by_server >= 40 - 16, tally
