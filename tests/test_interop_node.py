"""Interop: grpc.health.v1 as Node's @grpc/grpc-js sees it (tests/interop/health_client.js).

A second gRPC implementation guards against behaviour that only grpcio clients accept.
The Node side comes from package.json (``npm ci``); without node or node_modules the
module is skipped.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import IO, Any, TypeVar

import grpc
import pytest
from conftest import ROOT, InProcessServer, ServerProcess

from petsage_grpc import (
    LIVENESS,
    OVERALL,
    READINESS,
    SMOKE_TEST_SERVICE,
    ServingStatus,
    add_to_server,
)

CLIENT = ROOT / "tests" / "interop" / "health_client.js"
NODE = shutil.which("node")
NODE_PACKAGES = ("@grpc/grpc-js", "@grpc/proto-loader", "grpc-health-check")
RUN_TIMEOUT = 30.0
LINE_TIMEOUT = 15.0
KUBE_PROBE = "kube-probe/1.31"


def _skip_reason() -> str | None:
    if NODE is None:
        return "node is not installed (the grpc-js interop client needs Node.js >= 18)"
    missing = [
        p for p in NODE_PACKAGES if not (ROOT / "node_modules" / p / "package.json").is_file()
    ]
    if missing:
        return f"node_modules lacks {', '.join(missing)}: run `npm ci` in {ROOT}"
    return None


SKIP_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


def _command(*args: str) -> list[str]:
    assert NODE is not None
    return [NODE, str(CLIENT), *args]


def run_client(*args: str, timeout: float = RUN_TIMEOUT) -> list[dict[str, Any]]:
    """Run one client command to completion and return its JSON lines."""
    completed = subprocess.run(
        _command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
    )
    assert completed.returncode == 0, (
        f"health_client.js {' '.join(args)} exited {completed.returncode}\n"
        f"stdout: {completed.stdout}\nstderr: {completed.stderr}"
    )
    return [json.loads(line) for line in completed.stdout.splitlines()]


def check(address: str, service: str) -> dict[str, Any]:
    (answer,) = run_client("check", address, service)
    return answer


class NodeWatch:
    """A running ``health_client.js watch``, read one JSON line at a time."""

    def __init__(self, address: str, service: str, count: int) -> None:
        self.process = subprocess.Popen(
            _command("watch", address, service, str(count)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._pump, args=(self.process.stdout,), daemon=True).start()
        threading.Thread(
            target=self._stderr.extend,
            args=(self.process.stderr,),
            daemon=True,
        ).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def next(self, timeout: float = LINE_TIMEOUT) -> dict[str, Any]:
        """The next JSON line; fails the test if none comes within *timeout* seconds."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"grpc-js watch printed nothing within {timeout}s; stderr: {self.stderr}")
        if line is None:
            pytest.fail(
                f"grpc-js watch exited early ({self.process.poll()}); stderr: {self.stderr}"
            )
        message: dict[str, Any] = json.loads(line)
        return message

    def status(self, timeout: float = LINE_TIMEOUT) -> str:
        """The next status the client received."""
        message = self.next(timeout)
        assert "status" in message, message
        status: str = message["status"]
        return status

    def end(self, exit_code: int = 0, timeout: float = LINE_TIMEOUT) -> dict[str, Any]:
        """How the call ended (its last line); the client must then exit with *exit_code*.

        The client exits 0 after receiving all the statuses it asked for, 1 otherwise.
        """
        message = self.next(timeout)
        assert "end" in message, message
        assert self.process.wait(timeout) == exit_code, self.stderr
        end: dict[str, Any] = message["end"]
        return end

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


@pytest.fixture
def node_watch() -> Iterator[Callable[[str, str, int], NodeWatch]]:
    """Start grpc-js Watch clients; every one still running at teardown is killed."""
    started: list[NodeWatch] = []

    def start(address: str, service: str, count: int) -> NodeWatch:
        watch = NodeWatch(address, service, count)
        started.append(watch)
        return watch

    yield start
    for watch in started:
        watch.close()


# -- Check ----------------------------------------------------------------------------


@pytest.mark.parametrize("service", [OVERALL, LIVENESS, READINESS])
def test_check_default_names_serving(server: InProcessServer, service: str) -> None:
    assert check(server.address, service) == {"code": 0, "status": "SERVING", "details": ""}


def test_check_readiness_not_serving(server: InProcessServer) -> None:
    server.board.set(READINESS, ServingStatus.NOT_SERVING)
    assert check(server.address, READINESS) == {
        "code": 0,
        "status": "NOT_SERVING",
        "details": "",
    }
    assert check(server.address, LIVENESS)["status"] == "SERVING"


def test_check_unknown_name_not_found(server: InProcessServer) -> None:
    answer = check(server.address, "petsage.v1.NoSuchService")
    assert answer["code"] == grpc.StatusCode.NOT_FOUND.value[0] == 5
    assert answer["status"] is None


# -- Watch ----------------------------------------------------------------------------


def test_watch_readiness_follows_the_board(
    server: InProcessServer, node_watch: Callable[[str, str, int], NodeWatch]
) -> None:
    watch = node_watch(server.address, READINESS, 3)
    assert watch.status() == "SERVING"
    server.board.set(READINESS, ServingStatus.NOT_SERVING)
    assert watch.status() == "NOT_SERVING"
    server.board.set(READINESS, ServingStatus.SERVING)
    assert watch.status() == "SERVING"
    end = watch.end()
    assert end == {
        "code": grpc.StatusCode.CANCELLED.value[0],
        "details": "Cancelled on client",
        "received": 3,
        "cancelled_by": "client",
    }


def test_watch_unknown_name_until_it_is_set(
    server: InProcessServer, node_watch: Callable[[str, str, int], NodeWatch]
) -> None:
    name = "petsage.v1.LateService"
    watch = node_watch(server.address, name, 2)
    assert watch.status() == "SERVICE_UNKNOWN"
    server.board.set(name, ServingStatus.SERVING)
    assert watch.status() == "SERVING"
    assert watch.end()["cancelled_by"] == "client"


def test_watch_ended_by_the_server_ends_ok_for_grpc_js(
    server: InProcessServer, node_watch: Callable[[str, str, int], NodeWatch]
) -> None:
    # close_watches() is what a stopping server calls; grpc-js must see a clean OK end
    # (A17 clients then retry with backoff), not an error or a hang.
    watch = node_watch(server.address, READINESS, 2)
    assert watch.status() == "SERVING"
    server.board.close_watches()
    end = watch.end(exit_code=1)
    assert end["code"] == grpc.StatusCode.OK.value[0]
    assert end["received"] == 1
    assert "cancelled_by" not in end


# -- List -----------------------------------------------------------------------------


def test_list_returns_the_default_names(server: InProcessServer) -> None:
    (answer,) = run_client("list", server.address)
    assert answer["code"] == 0
    statuses: dict[str, str] = answer["statuses"]
    assert {OVERALL, LIVENESS, READINESS, SMOKE_TEST_SERVICE} <= statuses.keys()
    assert statuses == {name: status.name for name, status in server.board.snapshot().items()}
    assert set(statuses.values()) == {"SERVING"}


# -- Kubernetes gRPC probes -----------------------------------------------------------

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


class _UserAgents(grpc.aio.ServerInterceptor):
    """Records (method, user-agent) of every call the server receives."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Req, _Resp] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        metadata = dict(handler_call_details.invocation_metadata or ())
        self.seen.append((handler_call_details.method, str(metadata.get("user-agent"))))
        return await continuation(handler_call_details)


@pytest.fixture
def recording_server(server: InProcessServer) -> Iterator[tuple[str, _UserAgents]]:
    """A second server on the in-process server's loop and board, recording user agents."""
    user_agents = _UserAgents()

    async def build() -> tuple[grpc.aio.Server, int]:
        recording = grpc.aio.server(interceptors=[user_agents], options=(("grpc.so_reuseport", 0),))
        add_to_server(recording, board=server.board)
        port = recording.add_insecure_port("127.0.0.1:0")
        await recording.start()
        return recording, port

    recording, port = server.run(build())
    yield f"127.0.0.1:{port}", user_agents
    server.run(recording.stop(None))


def test_kubelet_model_fifty_probes(recording_server: tuple[str, _UserAgents]) -> None:
    address, user_agents = recording_server
    (summary,) = run_client("kubelet", address, READINESS, "50", timeout=60)
    assert summary["ok"] == 50, summary
    assert summary["failed"] == 0, summary
    # One TCP connection per probe, as the kubelet does (not grpc-js's shared pool).
    assert summary["connections"] == 50, summary
    checks = [agent for method, agent in user_agents.seen if method.endswith("/Check")]
    assert len(checks) == 50
    assert all(agent.startswith(f"{KUBE_PROBE} grpc-node-js/") for agent in checks), checks[:3]


def test_kubelet_model_fails_when_not_serving(server: InProcessServer) -> None:
    server.board.set(READINESS, ServingStatus.NOT_SERVING)
    (summary,) = run_client("kubelet", server.address, READINESS, "3")
    assert summary["ok"] == 0
    assert summary["failed"] == 3
    assert summary["reasons"] == {"NOT_SERVING": 3}


# -- The standalone server ------------------------------------------------------------


def test_cli_server_answers_grpc_js(spawn_server: Callable[..., ServerProcess]) -> None:
    served = spawn_server()
    for service in (OVERALL, LIVENESS, READINESS):
        assert check(served.address, service) == {
            "code": 0,
            "status": "SERVING",
            "details": "",
        }, served.log()
    assert check(served.address, "petsage.v1.NoSuchService")["code"] == 5
    (summary,) = run_client("kubelet", served.address, LIVENESS, "5")
    assert summary["ok"] == 5, (summary, served.log())
