"""The probe listener: answers off the application's loop; liveness means "the loop runs".

The backend is ``benchmarks/busy_app.py`` in a child process: a ``grpc.aio`` server
whose ``Busy/Work`` burns CPU and whose ``Busy/Block`` blocks the loop in ``time.sleep``,
with :func:`petsage_grpc.add_to_server` and a :class:`petsage_grpc.ProbeListener`. Nothing
here is timed: each test waits (with a generous bound) for an order of events.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO

import grpc
import hpack
import pytest
from conftest import ROOT, ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hardening import (
    STEP_TIMEOUT,
    call,
    check_request,
    check_status,
    plaintext,
    run_cli,
    wait_until,
)
from tcp_listener import free_port
from test_interop_node import SKIP_REASON as NODE_SKIP_REASON
from test_interop_node import check as node_check
from test_interop_node import run_client as run_node_client

from petsage_grpc import ServingStatus

SpawnServer = Callable[..., ServerProcess]
BUSY = "/petsage.bench.v1.Busy"
CHECK = "/grpc.health.v1.Health/Check"


@dataclass
class Backend:
    """A ``benchmarks.busy_app`` process with a probe listener."""

    process: subprocess.Popen[str]
    port: int
    probe_port: int
    lines: list[str] = field(default_factory=list)

    def log(self) -> str:
        return "".join(self.lines)

    def call(self, method: str, body: bytes, timeout: float) -> bytes:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                f"{BUSY}/{method}"
            )
            reply: bytes = call(body, timeout=timeout)
            return reply

    def stop(self) -> dict[str, float]:
        """SIGTERM; return the heartbeat's figures it prints on the way out."""
        self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=STEP_TIMEOUT)
        figures: dict[str, float] = json.loads(out.strip().splitlines()[-1])
        return figures


def _pump(stream: IO[str], lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


@pytest.fixture
def start_backend() -> Iterator[Callable[..., Backend]]:
    started: list[Backend] = []

    def start(*args: str) -> Backend:
        process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.busy_app", "--probe-listener", *args],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stderr is not None
        lines: list[str] = []
        ports: dict[str, int] = {}
        for line in process.stderr:
            lines.append(line)
            if line.startswith("serving on 127.0.0.1:"):
                ports["main"] = int(line.rsplit(":", 1)[1])
            elif line.startswith("probe port "):
                ports["probe"] = int(line.split()[-1])
                break
        assert set(ports) == {"main", "probe"}, "".join(lines)
        threading.Thread(target=_pump, args=(process.stderr, lines), daemon=True).start()
        backend = Backend(process, ports["main"], ports["probe"], lines)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        if backend.process.poll() is None:
            backend.process.kill()
            backend.process.wait(STEP_TIMEOUT)


def liveness(port: int, timeout: float = 5.0) -> ServingStatus:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="liveness"), timeout=timeout
        )
    return ServingStatus(answer.status)


def test_probe_listener_answers_while_the_loop_is_blocked(
    start_backend: Callable[..., Backend],
) -> None:
    backend = start_backend("--stall-seconds", "60")

    def main_port_blocked() -> bool:
        with grpc.insecure_channel(f"127.0.0.1:{backend.port}") as channel:
            check: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                "/grpc.health.v1.Health/Check"
            )
            try:
                check(check_request("liveness"), timeout=0.5)
            except grpc.RpcError as error:
                return error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            return False

    with ThreadPoolExecutor(1) as pool:
        # The loop sleeps for up to 30 s; the process is killed once the test has its answers.
        blocked: Future[bytes] = pool.submit(backend.call, "Block", b"30", 60.0)
        wait_until(main_port_blocked, "the main port to wait behind the blocked loop")
        answers = [liveness(backend.probe_port) for _ in range(3)]
        # Answered while the application's loop was still blocked.
        assert not blocked.done()
        assert answers == [ServingStatus.SERVING] * 3
        backend.process.kill()


@pytest.mark.slow
def test_a_stall_turns_liveness_not_serving_and_back(start_backend: Callable[..., Backend]) -> None:
    backend = start_backend("--stall-seconds", "0.5")
    with grpc.insecure_channel(f"127.0.0.1:{backend.probe_port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="liveness"), timeout=60
        )
        seen = [ServingStatus(next(watch).status)]
        with ThreadPoolExecutor(1) as pool:
            blocked = pool.submit(backend.call, "Block", b"4", 60.0)
            seen.append(ServingStatus(next(watch).status))
            still_blocked = not blocked.done()
            blocked.result()
            seen.append(ServingStatus(next(watch).status))
        watch.cancel()
    assert seen == [ServingStatus.SERVING, ServingStatus.NOT_SERVING, ServingStatus.SERVING]
    assert still_blocked, "liveness turned NOT_SERVING only after the loop ran again"
    assert liveness(backend.port) is ServingStatus.SERVING  # the main port agrees
    figures = backend.stop()
    assert figures["stalls"] == 1
    stall_lines = [line for line in backend.lines if "did not run for" in line]
    assert len(stall_lines) == 1, backend.log()
    lasted = float(stall_lines[0].split("did not run for ")[1].split("s")[0])
    assert lasted >= 0.5  # at least the threshold: the loop slept for 4 s


@pytest.mark.slow
def test_a_busy_loop_is_not_a_stall(start_backend: Callable[..., Backend]) -> None:
    backend = start_backend("--stall-seconds", "5", "--work-ms", "20")
    with grpc.insecure_channel(f"127.0.0.1:{backend.probe_port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="liveness"), timeout=120
        )
        assert ServingStatus(next(watch).status) is ServingStatus.SERVING
        statuses: list[int] = []

        def read() -> None:
            with contextlib.suppress(grpc.RpcError):  # cancelled at the end
                statuses.extend(answer.status for answer in watch)

        reader = threading.Thread(target=read)
        reader.start()
        # 32 callers, 20 ms of CPU each per call: the loop is saturated, and still turns.
        with ThreadPoolExecutor(32) as pool:
            calls = [pool.submit(backend.call, "Work", b"x", 120.0) for _ in range(32 * 8)]
            assert all(call.result() == b"x" for call in calls)
        assert liveness(backend.probe_port) is ServingStatus.SERVING
        watch.cancel()
        reader.join(STEP_TIMEOUT)
    assert statuses == [], "liveness changed while the loop was only busy"
    figures = backend.stop()
    assert figures["stalls"] == 0
    assert figures["max_lag_seconds"] > 0  # the heartbeat did see the loop run late


@pytest.mark.slow
def test_readiness_follows_loop_lag_when_asked(start_backend: Callable[..., Backend]) -> None:
    backend = start_backend("--stall-seconds", "30", "--shed-lag-seconds", "0.05")
    stop_load = threading.Event()

    def caller() -> None:
        while not stop_load.is_set():
            backend.call("Work", b"400", 120.0)

    with grpc.insecure_channel(f"127.0.0.1:{backend.probe_port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="readiness"), timeout=120
        )
        seen = [ServingStatus(next(watch).status)]
        with ThreadPoolExecutor(2) as pool:
            # Calls that hold the loop for 400 ms each: its timers run up to 0.4 s late.
            # (Many short calls do not: grpc.aio queues them, and the loop keeps turning.)
            callers = [pool.submit(caller) for _ in range(2)]
            seen.append(ServingStatus(next(watch).status))
            assert liveness(backend.probe_port) is ServingStatus.SERVING  # busy, not wedged
            stop_load.set()
            for each in callers:
                each.result()
        seen.append(ServingStatus(next(watch).status))  # after 5 prompt beats in a row
        watch.cancel()
    assert seen == [ServingStatus.SERVING, ServingStatus.NOT_SERVING, ServingStatus.SERVING]
    assert liveness(backend.probe_port) is ServingStatus.SERVING


def test_standalone_probe_port_drains_with_the_main_port_and_stops_last(
    spawn_server: SpawnServer,
) -> None:
    probe_port = free_port()
    server = spawn_server("--probe-port", str(probe_port), "--drain-seconds", "30")
    wait_until(lambda: "serving health probes" in server.log(), "the probe port to be logged")
    with grpc.insecure_channel(f"127.0.0.1:{probe_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="readiness"), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        server.signal(signal.SIGTERM)
        # Readiness turns at once on the probe port (the drain lasts 30 s)...
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING

        def status(port: int, name: str) -> int:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as each:
                reply = health_pb2_grpc.HealthStub(each).Check(
                    health_pb2.HealthCheckRequest(service=name), timeout=5
                )
            return int(reply.status)

        # ... and on the main port, while liveness is kept on both.
        serving, not_serving = (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        assert status(server.port, "readiness") == not_serving
        assert status(server.port, "liveness") == serving
        assert status(probe_port, "liveness") == serving
        watch.cancel()
    server.signal(signal.SIGTERM)  # a second signal cuts the drain short
    assert server.wait() == 0
    log = server.log()
    # The server stopped first, then the probe listener, then the process.
    assert log.index("draining") < log.index("server stopped; stopping the probe listener")
    assert log.index("server stopped; stopping the probe listener") < log.index("stopped\n")


# -- real clients on the probe port ---------------------------------------------------


@pytest.fixture
def probe_server(spawn_server: SpawnServer) -> tuple[ServerProcess, int]:
    probe_port = free_port()
    server = spawn_server("--probe-port", str(probe_port))
    wait_until(lambda: "serving health probes" in server.log(), "the probe port to be logged")
    return server, probe_port


def test_grpcio_clients_check_and_watch_on_the_probe_port(
    probe_server: tuple[ServerProcess, int],
) -> None:
    _, port = probe_server
    with plaintext(f"127.0.0.1:{port}") as channel:
        for name in ("", "liveness", "readiness", "startup"):
            assert check_status(channel, name) is ServingStatus.SERVING
        unknown = call(channel, CHECK, check_request("petsage.v1.NoSuchService"))
        assert unknown.code is grpc.StatusCode.NOT_FOUND
        assert unknown.details == "unknown service"
        too_long = call(channel, CHECK, check_request("x" * 257))
        assert too_long.code is grpc.StatusCode.INVALID_ARGUMENT
        assert call(channel, CHECK, b"\xff\xff").code is grpc.StatusCode.INVALID_ARGUMENT
        # A gzip-compressed request (grpc_health_probe -gzip) is read as any other.
        stub = health_pb2_grpc.HealthStub(channel)
        answer = stub.Check(
            health_pb2.HealthCheckRequest(service="readiness"),
            compression=grpc.Compression.Gzip,
            timeout=STEP_TIMEOUT,
        )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        # As many calls at once as the port's streams per connection.
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: check_status(channel, "readiness"), range(64)))
        assert answers == [ServingStatus.SERVING] * 64
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="readiness"), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_watch_streams_beyond_the_cap_are_refused(
    probe_server: tuple[ServerProcess, int],
) -> None:
    _, port = probe_server
    with plaintext(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        open_streams = []
        for _ in range(8):  # ProbeListener's default max_watch_streams
            watch = stub.Watch(health_pb2.HealthCheckRequest(service="liveness"), timeout=60)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            open_streams.append(watch)
        with plaintext(f"127.0.0.1:{port}") as other:
            extra = health_pb2_grpc.HealthStub(other).Watch(
                health_pb2.HealthCheckRequest(service="liveness"), timeout=60
            )
            with pytest.raises(grpc.RpcError) as refused:
                next(extra)
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            # Check is still answered beside them.
            assert check_status(other, "liveness") is ServingStatus.SERVING
        for watch in open_streams:
            watch.cancel()
    # The places come back once the streams end.
    with plaintext(f"127.0.0.1:{port}") as channel:

        def watch_opens() -> bool:
            stream = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="liveness"), timeout=10
            )
            try:
                return bool(next(stream).status == health_pb2.HealthCheckResponse.SERVING)
            except grpc.RpcError:
                return False
            finally:
                stream.cancel()

        wait_until(watch_opens, "a Watch place to come back")


def test_petsage_probe_and_grpc_js_on_the_probe_port(
    probe_server: tuple[ServerProcess, int],
) -> None:
    _, port = probe_server
    served = run_cli("probe", f"-addr=127.0.0.1:{port}", "-service=readiness")
    assert (served.code, served.stderr.strip()) == (0, "status: SERVING"), served
    gzip = run_cli("probe", f"-addr=127.0.0.1:{port}", "-service=liveness", "-gzip")
    assert gzip.code == 0, gzip
    unknown = run_cli("probe", f"-addr=127.0.0.1:{port}", "-service=petsage.v1.Nothing")
    assert unknown.code == 3, unknown  # grpc_health_probe: the RPC failed (NOT_FOUND)
    assert "NotFound" in unknown.stderr + unknown.stdout, unknown
    if NODE_SKIP_REASON is not None:
        pytest.skip(NODE_SKIP_REASON)
    address = f"127.0.0.1:{port}"
    assert node_check(address, "readiness") == {"code": 0, "status": "SERVING", "details": ""}
    assert node_check(address, "petsage.v1.NoSuchService")["code"] == 5
    (summary,) = run_node_client("kubelet", address, "liveness", "20", timeout=60)
    assert (summary["ok"], summary["failed"], summary["connections"]) == (20, 0, 20), summary


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload
    )


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(0x4, 0, 0)
MALFORMED = {
    "not HTTP/2": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "a frame over 16 KiB": PREFACE + (1 << 20).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01",
    "PUSH_PROMISE": PREFACE + _frame(0x5, 0x4, 1, b"\x00\x00\x00\x02"),
    "HPACK garbage": PREFACE + _frame(0x1, 0x5, 1, b"\xff\xff\xff\xff\xff"),
    "SETTINGS of 5 bytes": PREFACE + _frame(0x4, 0, 0, b"\x00" * 5),
    "DATA on stream 0": PREFACE + _frame(0x0, 0, 0, b"x"),
    "an even stream": PREFACE + _frame(0x1, 0x5, 2, b"\x83"),
    "CONTINUATION alone": PREFACE + _frame(0x9, 0x4, 1, b"\x83"),
    "a window overflow": PREFACE + _frame(0x8, 0, 0, b"\x7f\xff\xff\xff"),
}


def _closed_by_server(port: int, data: bytes) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=STEP_TIMEOUT) as sock:
        sock.sendall(data)
        while sock.recv(65536):
            pass
    return True


def test_malformed_http2_closes_the_connection_without_a_traceback(
    probe_server: tuple[ServerProcess, int],
) -> None:
    server, port = probe_server
    for name, data in MALFORMED.items():
        assert _closed_by_server(port, data), name
    # A client that never opens its window (SETTINGS_INITIAL_WINDOW_SIZE 0) gets no
    # answer, and its connection goes at the deadline rather than being held.
    zero_window = PREFACE[:-9] + _frame(0x4, 0, 0, b"\x00\x04\x00\x00\x00\x00")
    block = hpack.Encoder().encode(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", CHECK),
            (":authority", "x"),
            ("content-type", "application/grpc"),
        ]
    )
    body = b"\x00\x00\x00\x00\x0b\x0a\x09readiness"
    held = zero_window + _frame(0x1, 0x4, 1, block) + _frame(0x0, 0x1, 1, body)
    assert _closed_by_server(port, held)
    with plaintext(f"127.0.0.1:{port}") as channel:
        assert check_status(channel, "readiness") is ServingStatus.SERVING
    wait_until(lambda: "refused or closed" in server.log(), "the refusals to be warned about")
    assert "Traceback" not in server.log(), server.log()
