"""The README's examples are what a user gets: its embedding program runs as written, and
its ``grpcurl list`` output is what the server lists.

The embedding program is taken from the README, its two listening addresses moved to
free loopback ports (nothing else changes), and run as a process of its own; real
clients probe it (``petsage-grpc probe``, grpcio Check, Watch and reflection), then
SIGTERM drains and stops it. tests/test_packaging.py runs the same program in a clean
virtual environment with the wheel installed without extras.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final

import grpc
import pytest
from conftest import ROOT, ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hardening import wait_until
from tcp_listener import free_port
from test_reflection import (
    EXPECTED_SERVICES,
    REFLECTION_V1,
    files_for,
    list_services,
    pool_from,
    reflect,
)

README: Final = ROOT / "README.md"
RPC_TIMEOUT: Final = 5.0
START_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 30.0
"""The program drains 5 s and gives calls in flight 5 s more: generous beyond both."""
MAIN_ADDRESS: Final = '"[::]:50051"'
PROBE_PORT: Final = "ProbeListener(board, port=8081)"
SERVING: Final = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: Final = health_pb2.HealthCheckResponse.NOT_SERVING


def readme_section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def embedding_program() -> str:
    """The README's embedding program, exactly as printed."""
    blocks = re.findall(r"```python\n(.*?)```", readme_section("Embed it"), flags=re.DOTALL)
    assert len(blocks) == 1, "one Python program under 'Embed it'"
    program: str = blocks[0]
    return program


def status(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
    value: int = answer.status
    return value


def answers(channel: grpc.Channel, service: str, expected: int) -> bool:
    try:
        return status(channel, service) == expected
    except grpc.RpcError:
        return False


class Watch:
    """A Watch stream on a thread of its own, recording every status it is sent."""

    def __init__(self, channel: grpc.Channel, service: str) -> None:
        self.statuses: list[int] = []
        self.ended: grpc.StatusCode | None = None
        stub = health_pb2_grpc.HealthStub(channel)
        self._call = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=60)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self._call:
                self.statuses.append(response.status)
            self.ended = grpc.StatusCode.OK
        except grpc.RpcError as error:
            self.ended = error.code()


def run_embedding_program(python: str, tmp_path: Path) -> None:
    """Run the README's program with *python*, probe it with real clients, SIGTERM it.

    *python* is any interpreter with petsage-grpc installed; the program runs in
    *tmp_path*, away from the checkout, so it imports the installed package.
    """
    program = embedding_program()
    assert program.count(MAIN_ADDRESS) == 1, MAIN_ADDRESS
    assert program.count(PROBE_PORT) == 1, PROBE_PORT
    port, probe_port = free_port(), free_port()
    program = program.replace(MAIN_ADDRESS, f'"127.0.0.1:{port}"').replace(
        PROBE_PORT, f'ProbeListener(board, host="127.0.0.1", port={probe_port})'
    )
    path = tmp_path / "embedded.py"
    path.write_text(program, encoding="utf-8")
    stderr = tmp_path / "embedded.stderr"
    with stderr.open("w") as errors:
        process = subprocess.Popen(
            [python, str(path)],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=errors,
            stderr=errors,
            env={"PATH": "/usr/bin:/bin", "GRPC_VERBOSITY": "NONE"},
        )
    try:
        with (
            grpc.insecure_channel(f"127.0.0.1:{port}") as main,
            grpc.insecure_channel(f"127.0.0.1:{probe_port}") as probes,
        ):
            for channel, what in ((main, "the main port"), (probes, "the probe port")):
                wait_until(
                    lambda channel=channel: (
                        process.poll() is not None  # type: ignore[misc]
                        or answers(channel, "readiness", SERVING)
                    ),
                    f"readiness SERVING on {what}",
                    timeout=START_TIMEOUT,
                )
                assert process.poll() is None, stderr.read_text()
            # grpc_health_probe's drop-in, as the kubelet's exec probe would run it.
            for address, name in ((port, "readiness"), (probe_port, "liveness")):
                command = ["-m", "petsage_grpc", "probe", f"-addr=127.0.0.1:{address}"]
                probe = subprocess.run(
                    [sys.executable, *command, f"-service={name}"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                )
                assert (probe.returncode, probe.stderr) == (0, "status: SERVING\n"), probe
            # grpcurl list and describe: exactly what the program has, every one describable.
            method = reflect(main, REFLECTION_V1)
            listed = list_services(method)
            assert sorted(listed) == sorted(EXPECTED_SERVICES)
            for service in listed:
                pool = pool_from(files_for(method, service))
                assert pool.FindServiceByName(service).methods, service

            watch = Watch(main, "readiness")
            wait_until(lambda: watch.statuses == [SERVING], "the Watch stream's first status")
            process.send_signal(signal.SIGTERM)
            wait_until(lambda: NOT_SERVING in watch.statuses, "Watch to see NOT_SERVING")
            # Draining: out of rotation, but not restarted.
            assert status(probes, "readiness") == NOT_SERVING
            assert status(probes, "liveness") == SERVING
            assert process.wait(STOP_TIMEOUT) == 0, stderr.read_text()
            wait_until(lambda: watch.ended is not None, "the Watch stream to end")
            assert watch.statuses == [SERVING, NOT_SERVING]
            assert watch.ended is grpc.StatusCode.OK
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(STOP_TIMEOUT)
    assert "Traceback" not in stderr.read_text(), stderr.read_text()


def test_the_readme_embedding_program_is_complete_python() -> None:
    program = embedding_program()
    # Compiles as a module: no top-level await (that needs an asyncio REPL).
    compile(program, "README.md", "exec")
    assert 'if __name__ == "__main__":\n    asyncio.run(main())' in program
    assert "signal.SIGTERM" in program
    assert "probe_server" not in program


def test_docs_embedding_shows_the_same_program_and_list() -> None:
    embedding = (ROOT / "docs" / "embedding.md").read_text(encoding="utf-8")
    assert f"```python\n{embedding_program()}```" in embedding
    listing = re.search(r"\$ grpcurl -plaintext localhost:50051 list\n.*?```", embedding, re.DOTALL)
    assert listing
    assert listing.group(0) in readme_section("Call it")


@pytest.mark.slow
def test_the_readme_embedding_program_serves_drains_and_exits_0(tmp_path: Path) -> None:
    run_embedding_program(sys.executable, tmp_path)


def test_the_readme_list_example_is_what_the_server_lists(
    spawn_server: Callable[..., ServerProcess],
) -> None:
    readme_server = spawn_server()
    section = readme_section("Call it")
    match = re.search(r"\$ grpcurl -plaintext localhost:50051 list\n(.*?)```", section, re.DOTALL)
    assert match, "a grpcurl list example with its output"
    printed = match.group(1).split()
    with grpc.insecure_channel(readme_server.address) as channel:
        listed = list_services(reflect(channel, REFLECTION_V1))
    assert printed == sorted(listed)  # grpcurl prints them sorted
