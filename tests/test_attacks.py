"""A short form of each attack of scripts/attack.py against ``petsage-grpc serve``.

Each runs for a few seconds against a fresh server with the default memory budget (the
manifest's 128 MiB) and asserts structure, not timing: the server stays up, answers a
probe afterwards, and closes or refuses what it should (calls held without a request
message end with RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED, in plaintext and over TLS;
Watch streams beyond the derived cap are refused; HTTP connections beyond the per-peer
cap are closed at once; gRPC connections beyond the per-address cap and flooding ones
are closed from the side; idle connections and half ClientHellos are closed; a
malformed request costs at most one log line; the probe listener answers while the main
port is attacked; after a rapid reset grpc core's threads have shared the budget's
malloc arenas). The full 30-second runs with their figures are in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import platform
import select
import shutil
import socket
import time
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Final

import h2.config
import h2.connection
import h2.events
import pytest
from conftest import ServerProcess, load_script
from hardening import wait_until
from prometheus_client.parser import text_string_to_metric_families
from tcp_listener import TcpListener, free_port

from petsage_grpc import HealthLimits
from petsage_grpc.server._budget import derive_bounds
from petsage_grpc.server._guard import HEAP_ARENAS
from petsage_grpc.server._http import HttpLimits

SpawnServer = Callable[..., ServerProcess]
pytestmark = pytest.mark.slow

ATTACK_SECONDS: Final = 3.0
IO_TIMEOUT: Final = 30.0
"""Bound on waiting for the server to end or refuse something (it may be busy)."""
BOUNDS: Final = derive_bounds(128)
PER_PEER: Final = HttpLimits().max_connections_per_peer
"""What the default budget allows (the same arithmetic the server runs)."""


attack = load_script("attack")


@pytest.fixture
def http_server(spawn_server: SpawnServer) -> tuple[ServerProcess, int]:
    port = free_port()
    return spawn_server("--http-port", str(port)), port


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The harness's throwaway certificate and key (``openssl``)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    return attack.make_certificate(tmp_path_factory.mktemp("attack-tls"))


def tls_args(transport: str, certificate: Any) -> list[str]:
    """The serve arguments for *transport* (plaintext: none)."""
    if transport == "plaintext":
        return []
    return ["--tls-cert", str(certificate.cert), "--tls-key", str(certificate.key)]


def probe_answers(server: ServerProcess, *, tls: bool = False) -> bool:
    """A kubelet-model probe (new connection, Check readiness, 1 s) answers SERVING."""
    return any(asyncio.run(attack.probe_once(server.port, tls=tls)) for _ in range(5))


def run_attack(
    name: str,
    port: int,
    connections: int,
    *,
    tls: bool = False,
    until: Callable[[Any], bool] | None = None,
) -> Any:
    """Run attack *name* against *port* from *connections* connections for a few seconds
    (over TLS when *tls*; with *until*, until it holds for the Tally, at most IO_TIMEOUT);
    return the harness's Tally."""
    return asyncio.run(attack_while(name, port, connections, tls=tls, until=until))


async def attack_while(
    name: str,
    port: int,
    connections: int,
    *,
    tls: bool = False,
    during: Callable[[], Coroutine[Any, Any, Any]] | None = None,
    until: Callable[[Any], bool] | None = None,
) -> Any:
    """Attack for ATTACK_SECONDS, or until *until* holds for the Tally (awaiting *during*
    meanwhile); return the Tally, or with *during*, the Tally and what *during* returned."""
    tally, stop = attack.Tally(), asyncio.Event()
    context = attack.client_tls() if tls else None
    tasks = [
        asyncio.create_task(
            attack.attacker(port, attack.ATTACK_FUNCTIONS[name], tally, index, stop, tls=context)
        )
        for index in range(connections)
    ]
    meanwhile = asyncio.create_task(during()) if during is not None else None
    if until is None:
        await asyncio.sleep(ATTACK_SECONDS)
    else:
        deadline = time.monotonic() + IO_TIMEOUT
        while not until(tally) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # the Tally is plain counters: nothing to await
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), IO_TIMEOUT)
    if meanwhile is None:
        return tally
    return tally, await asyncio.wait_for(meanwhile, IO_TIMEOUT)


def grpc_statuses(
    port: int,
    *,
    path: str,
    count: int,
    body: bytes | None,
    until: Callable[[dict[int, str]], bool],
    tls: bool = False,
) -> dict[int, str]:
    """Open *count* calls on one connection (with *body*, or HEADERS alone and held open;
    over TLS with ALPN h2 when *tls*); return each stream's outcome: its grpc-status, or
    "data" for a first message."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    outcomes: dict[int, str] = {}
    raw = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    if tls:
        raw = attack.client_tls().wrap_socket(raw, server_hostname="localhost")
    with raw as sock:
        headers = [
            (":method", "POST"),
            (":scheme", "https" if tls else "http"),
            (":path", path),
            (":authority", "127.0.0.1"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        for index in range(count):
            stream = 2 * index + 1
            conn.send_headers(stream, headers, end_stream=False)
            if body is not None:
                conn.send_data(stream, body, end_stream=False)
        sock.sendall(conn.data_to_send())
        deadline = time.monotonic() + IO_TIMEOUT
        while not until(outcomes) and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    outcomes.setdefault(event.stream_id, "data")
                elif isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    for key, value in event.headers:
                        if key in {b"grpc-status", "grpc-status"}:
                            status = value.decode() if isinstance(value, bytes) else value
                            outcomes[event.stream_id] = status
                elif isinstance(event, h2.events.StreamReset):
                    outcomes.setdefault(event.stream_id, "reset")
            sock.sendall(conn.data_to_send())
    return outcomes


# -- gRPC port --------------------------------------------------------------------------


def closed_connections(port: int, reason: str) -> float:
    """The server's count of connections it closed for *reason*, from /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=IO_TIMEOUT).read()
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name == "petsage_grpc_connections_closed_total" and sample.labels == {
                "reason": reason
            }:
                return float(sample.value)
    raise AssertionError("no petsage_grpc_connections_closed_total sample")


def test_continuation_flood_connections_are_closed_by_the_server(
    http_server: tuple[ServerProcess, int],
) -> None:
    """grpc core never closes them (docs/reliability.md); the connection shedder does."""
    server, http_port = http_server
    assert closed_connections(http_port, "flood") == 0
    tally = run_attack("continuation", server.port, 4, until=lambda t: t.closed_by_server >= 4)
    assert tally.closed_by_server >= 4
    assert server.process.poll() is None
    assert closed_connections(http_port, "flood") >= 4
    wait_until(lambda: probe_answers(server), "a probe answered after the flood")
    assert "flooding ones (receiving over 256 KiB/s" in server.log()


def peak_rss_bytes(pid: int) -> int:
    """The kernel's high-water mark of process *pid*'s resident set (VmHWM): the peak
    itself, not a sample that could miss it."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for process {pid}")


@pytest.mark.parametrize("transport", attack.TRANSPORTS)
def test_continuation_flood_is_closed_and_stays_within_the_budget(
    spawn_server: SpawnServer, certificate: Any, transport: str
) -> None:
    """The bound: the server closes the flooding connections (each attacker reconnects
    and floods again, twice over), its peak RSS stays under the default budget, and a
    probe is answered afterwards."""
    server = spawn_server("--http-port", str(free_port()), *tls_args(transport, certificate))
    tls = transport == "tls"
    tally = run_attack(
        "continuation", server.port, 4, tls=tls, until=lambda t: t.closed_by_server >= 8
    )
    assert tally.connections >= 4
    assert tally.bytes_sent > 0
    assert "SETTINGS" in tally.frames_seen, "the server spoke HTTP/2 to the attacker"
    assert tally.closed_by_server >= 8, "the server did not close the flooding connections"
    assert server.process.poll() is None
    peak = peak_rss_bytes(server.process.pid)
    budget = BOUNDS.budget_mib * 1024 * 1024
    assert peak < budget, f"peak RSS {peak / 2**20:.1f} MiB over the {BOUNDS.budget_mib} MiB budget"
    wait_until(lambda: probe_answers(server, tls=tls), "a probe answered after the flood")


def thread_heaps(pid: int) -> int:
    """glibc's per-thread malloc heaps in process *pid*: anonymous mappings of 64 MiB
    (HEAP_MAX_SIZE on 64-bit), aligned to it, the unused tail mapped without access."""
    heap = 64 << 20
    maps = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        start, end = (int(bound, 16) for bound in fields[0].split("-"))
        maps.append((start, end, fields[1], len(fields) > 5))
    heaps = 0
    for index, (start, end, perms, named) in enumerate(maps):
        if named or start % heap or not perms.startswith("rw"):
            continue
        tail = maps[index + 1] if index + 1 < len(maps) else None
        # Grown to 64 MiB, or its rest reserved right after it, without access.
        reserved = tail is not None and tail[0] == end and tail[1] == start + heap
        if end - start == heap or (reserved and tail is not None and tail[2].startswith("---")):
            heaps += 1
    return heaps


def test_rapid_reset_leaves_the_server_up_and_answering(
    http_server: tuple[ServerProcess, int],
) -> None:
    server, _ = http_server
    tally = run_attack("rapid-reset", server.port, 4)
    assert tally.bytes_sent > 0
    assert server.process.poll() is None
    wait_until(lambda: probe_answers(server), "a probe answered after the resets")
    if platform.libc_ver()[0] == "glibc":
        # grpc core's threads shared the arenas the budget allows (the main arena and
        # HEAP_ARENAS - 1 heaps), so what the resets freed can be given back; glibc's
        # default gave them a heap each (11 here).
        assert thread_heaps(server.process.pid) <= HEAP_ARENAS - 1


@pytest.mark.parametrize("transport", attack.TRANSPORTS)
def test_calls_held_without_a_message_end_with_a_clear_status(
    spawn_server: SpawnServer, certificate: Any, transport: str
) -> None:
    """Over the cap the oldest end with RESOURCE_EXHAUSTED, the rest after the timeout.

    The smallest budget (80 MiB) lets one connection open more calls (120) than may
    wait (100).
    """
    tls = transport == "tls"
    server = spawn_server("--memory-budget", "80", *tls_args(transport, certificate))
    bounds = derive_bounds(80)
    count = bounds.max_streams_per_connection
    assert count > bounds.max_calls_awaiting_request
    outcomes = grpc_statuses(
        server.port,
        path=attack.CHECK,
        count=count,
        body=None,
        until=lambda seen: len(seen) >= count,
        tls=tls,
    )
    assert len(outcomes) == count, f"{count - len(outcomes)} calls never answered"
    values = list(outcomes.values())
    assert values.count("8") == count - bounds.max_calls_awaiting_request  # RESOURCE_EXHAUSTED
    assert values.count("4") == bounds.max_calls_awaiting_request  # DEADLINE_EXCEEDED
    assert probe_answers(server, tls=tls)


def test_watch_cap_in_all_comes_from_the_budget(spawn_server: SpawnServer) -> None:
    """At the derived cap in all, one more Watch is RESOURCE_EXHAUSTED."""
    server = spawn_server("--max-watch-streams-per-connection", "100")
    body = attack.health_request("readiness")
    total = derive_bounds(128).max_watch_streams
    connections: list[socket.socket] = []
    try:
        opened = 0
        while opened < total:
            count = min(100, total - opened)
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=IO_TIMEOUT)
            connections.append(sock)
            frames = [attack.PREFACE, attack.SETTINGS]
            block = attack.request_headers(attack.WATCH)
            for index in range(count):
                frames.append(
                    attack.frame(attack.HEADERS, attack.END_HEADERS, 2 * index + 1, block)
                )
                frames.append(attack.frame(attack.DATA, 0, 2 * index + 1, body))
            sock.sendall(b"".join(frames))
            opened += count
        # Every place is taken (once the server has read them all): one more is refused.
        wait_until(
            lambda: (
                grpc_statuses(
                    server.port,
                    path=attack.WATCH,
                    count=1,
                    body=body,
                    until=bool,
                )
                == {1: "8"}
            ),
            "a Watch beyond the cap to be refused",
        )
    finally:
        for sock in connections:
            sock.close()
    assert probe_answers(server)


def open_grpc_connections(port: int, count: int) -> list[socket.socket]:
    """*count* connections that finished the HTTP/2 preface and then hold, idle."""
    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        sock.sendall(attack.PREFACE + attack.SETTINGS + attack.SETTINGS_ACK)
        held.append(sock)
    return held


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the server has closed *sock* (what it sent before is read and dropped)."""
    while select.select([sock], [], [], 0)[0]:
        try:
            if not sock.recv(65536):
                return True
        except OSError:
            return True
    return False


def test_grpc_connections_beyond_the_per_address_cap_are_closed(
    spawn_server: SpawnServer,
) -> None:
    http_port = free_port()
    server = spawn_server("--http-port", str(http_port), "--max-connections-per-address", "8")
    held = open_grpc_connections(server.port, 8 + 6)
    try:
        wait_until(
            lambda: sum(closed_by_peer(sock) for sock in held) >= 6,
            "the connections over the cap to be closed",
        )
        # Another address (as the kubelet's would be) still gets its answer, and the
        # connections within the cap are still open after it (no fixed pause: a wrongful
        # close at any look before this is caught).
        assert asyncio.run(attack.probe_once(server.port))
        assert sum(closed_by_peer(sock) for sock in held) == 6
    finally:
        for sock in held:
            sock.close()
    assert closed_connections(http_port, "address_cap") == 6
    assert "closed 6 gRPC connections over the 8-per-address cap" in server.log()


def test_half_preface_connections_are_closed_after_the_handshake_timeout(
    http_server: tuple[ServerProcess, int],
) -> None:
    server, _ = http_server
    with socket.create_connection(("127.0.0.1", server.port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(attack.PREFACE[:10])
        # The server's SETTINGS come first; then it closes the connection.
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        assert len(received) < 1000
    assert probe_answers(server)


def test_half_client_hello_connections_are_closed_after_the_handshake_timeout(
    spawn_server: SpawnServer, certificate: Any
) -> None:
    server = spawn_server(*tls_args("tls", certificate))
    with socket.create_connection(("127.0.0.1", server.port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(attack.partial_client_hello())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        # Nothing to answer half a ClientHello with: closed without a word (or an alert).
        assert len(received) < 100
    assert probe_answers(server, tls=True)


def test_probe_port_answers_during_an_attack_on_the_main_port(spawn_server: SpawnServer) -> None:
    """The kubelet's port keeps answering while rapid resets keep the main port busy."""
    probe_port = free_port()
    server = spawn_server("--probe-port", str(probe_port))

    async def probe_port_prober() -> Any:
        # Its own process, as in the harness: the attack's loop does not delay it.
        process = await attack.start_prober(probe_port, ATTACK_SECONDS, tls=False)
        return await attack.prober_result(process)

    tally, probes = asyncio.run(
        attack_while("rapid-reset", server.port, 4, during=probe_port_prober)
    )
    assert tally.bytes_sent > 0
    assert probes.ok > 0, f"no probe answered on the probe port ({probes.failed} failed)"
    assert server.process.poll() is None


# -- HTTP port --------------------------------------------------------------------------


def http_get(port: int, path: str = "/readyz", *, source: str = "127.0.0.1") -> int:
    with socket.create_connection(
        ("127.0.0.1", port), timeout=IO_TIMEOUT, source_address=(source, 0)
    ) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]) if answer else 0


def test_http_connections_beyond_the_per_peer_cap_are_closed_at_once(
    http_server: tuple[ServerProcess, int],
) -> None:
    server, port = http_server
    held = [
        socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        for _ in range(PER_PEER + 8)
    ]
    try:
        for sock in held:
            sock.sendall(b"GET /readyz HTTP/1.1\r\n")  # half a request, held
        # Refused ones are closed at once (readable: EOF or reset); the others wait for
        # the rest of their request until the 10 s idle timeout.
        wait_until(
            lambda: len(select.select(held, [], [], 0)[0]) >= 8,
            "the connections over the cap to be closed",
        )
        closed = len(select.select(held, [], [], 0)[0])
        assert closed == 8, f"the cap per peer address is {PER_PEER}"
        # Another address (as the kubelet's would be) still gets its answer.
        assert http_get(port, source="127.0.0.2") == 200
    finally:
        for sock in held:
            sock.close()
    assert "HTTP connections refused" in server.log()


def test_idle_http_connection_is_closed(http_server: tuple[ServerProcess, int]) -> None:
    _, port = http_server
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        assert sock.recv(100) == b"", "closed after the header-read timeout"


def test_malformed_http_requests_cost_one_line_and_no_traceback(
    http_server: tuple[ServerProcess, int],
) -> None:
    server, port = http_server
    for _ in range(30):
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
            sock.sendall(b"\x16\x03\x01garbage\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.0 400 "), answer[:40]
    assert http_get(port) == 200
    wait_until(lambda: "malformed HTTP requests" in server.log(), "the warning line")
    log = server.log()
    assert "Traceback" not in log
    assert log.count("malformed HTTP requests") == 1
    assert "aiohttp.access" not in log


def test_access_log_is_off_by_default_and_on_when_asked(spawn_server: SpawnServer) -> None:
    port = free_port()
    server = spawn_server("--http-port", str(port), "--http-access-log", "true")
    assert http_get(port) == 200
    wait_until(lambda: "aiohttp.access" in server.log(), "one access line")


# -- /metrics names checks as SmokeTest does ---------------------------------------------


def scrape_text(port: int, token: str | None = None) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=IO_TIMEOUT) as response:  # noqa: S310 - http URL
        return str(response.read().decode())


@pytest.mark.parametrize("report_checks", [True, False])
def test_metrics_obey_report_checks_and_the_token(
    tmp_path: Path, spawn_server: SpawnServer, report_checks: bool
) -> None:
    with TcpListener() as listener:
        config = tmp_path / "petsage.toml"
        config.write_text(
            f"[smoke_test]\nreport_checks = {str(report_checks).lower()}\n"
            '[[checks]]\nname = "secret-db-primary"\nkind = "tcp"\n'
            f'target = "{listener.address}"\ninterval = "100ms"\ntimeout = "500ms"\n',
            encoding="utf-8",
        )
        token_file = tmp_path / "token"
        token_file.write_text("s3cret-token\n", encoding="utf-8")
        port = free_port()
        spawn_server(
            "--config", str(config), "--http-port", str(port), "--auth-token-file", str(token_file)
        )
        wait_until(
            lambda: "petsage_grpc_service_serving" in scrape_text(port, "s3cret-token"),
            "a scrape",
        )
        if report_checks:
            wait_until(
                lambda: "secret-db-primary" in scrape_text(port, "s3cret-token"),
                "the check's name for the token holder",
            )
        else:
            assert "secret-db-primary" not in scrape_text(port, "s3cret-token")
        anonymous = scrape_text(port)
        assert "secret-db-primary" not in anonymous
        assert "petsage_grpc_check_" not in anonymous
        assert 'service="readiness"' in anonymous
        assert "secret-db-primary" not in scrape_text(port, "wrong-token")


# -- embedded: the gate's limits are HealthLimits ----------------------------------------


def test_embedded_request_timeout_and_cap_come_from_health_limits(
    start_server: Callable[..., Any],
) -> None:
    server = start_server(
        limits=HealthLimits(max_calls_awaiting_request=5, request_timeout_seconds=1.0)
    )
    outcomes = grpc_statuses(
        server.port, path=attack.CHECK, count=8, body=None, until=lambda seen: len(seen) >= 8
    )
    assert sorted(outcomes.values()) == ["4"] * 5 + ["8"] * 3


def test_streams_beyond_the_budget_per_connection_are_refused_by_http2(
    http_server: tuple[ServerProcess, int],
) -> None:
    """Over MAX_CONCURRENT_STREAMS a stream is reset before grpc core makes a call of it
    (the budget's value, not SERVER_OPTIONS' 1,100: the options are merged, not appended)."""
    server, _ = http_server
    count = BOUNDS.max_streams_per_connection + 100
    outcomes = grpc_statuses(
        server.port,
        path=attack.WATCH,
        count=count,
        body=attack.health_request("readiness"),
        until=lambda seen: len(seen) >= count,
    )
    values = list(outcomes.values())
    assert values.count("reset") >= 100
    assert values.count("data") == BOUNDS.max_watch_streams_per_connection
    assert probe_answers(server)
