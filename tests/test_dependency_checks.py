"""Dependency checks against real PostgreSQL and Redis servers, and a black hole.

Outages are real: the dependency's process is stopped (or frozen) and started again on
the same port, while the server under test is ``petsage-grpc serve --config FILE`` run as
a subprocess, or a :class:`HealthMonitor` in process where a test needs the monitor's
state. Every wait is a poll with a deadline derived from the check's schedule.
"""

from __future__ import annotations

import itertools
import json
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
import pytest
from conftest import ROOT, InProcessServer, ServerProcess
from dependency_servers import (  # noqa: F401 - the fixtures are used by name
    AUTH_ROLE,
    BlackHole,
    PostgresServer,
    RedisServer,
    black_hole_fixture,
    free_port,
    postgres_cluster_fixture,
    postgres_server_fixture,
    redis_server_fixture,
    start_redis_fixture,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from petsage_grpc import Check, HealthMonitor, ServingStatus
from petsage_grpc._generated.petsage.v1 import smoke_test_service_pb2, smoke_test_service_pb2_grpc
from petsage_grpc.board._check import CheckKind

SERVING: Final = ServingStatus.SERVING
NOT_SERVING: Final = ServingStatus.NOT_SERVING

# The schedule of the checks under test, and the bounds derived from it.
INTERVAL: Final = 0.2
TIMEOUT: Final = 0.5
FAILURE_THRESHOLD: Final = 2
SUCCESS_THRESHOLD: Final = 1
JITTER: Final = 1.1
"""The monitor waits the interval ± 10 %."""
SLACK: Final = 20.0
"""For scheduling, process start-up and a loaded, shared machine: generous, still bounded
(these bounds prove that a change arrives without waiting for anything else, not how fast:
the speed is the benchmark's)."""
DETECT_WITHIN: Final = INTERVAL * JITTER * FAILURE_THRESHOLD + TIMEOUT + SLACK
"""A stopped dependency (connections refused at once) turns its check NOT_SERVING within this."""
RECOVER_WITHIN: Final = INTERVAL * JITTER * SUCCESS_THRESHOLD + TIMEOUT + SLACK
"""A dependency that accepts connections again turns its check SERVING within this."""
HANG_TIMEOUT: Final = 2.0
"""The timeout of checks against a hanging dependency: each attempt hangs this long, well
beyond FAST_DEADLINE, so that a health call held up by an attempt would miss its deadline."""
HANG_DETECT_WITHIN: Final = INTERVAL * JITTER + FAILURE_THRESHOLD * HANG_TIMEOUT + SLACK
"""A hanging dependency: every failed attempt lasts the whole timeout."""

RPC_TIMEOUT: Final = 5.0
WATCH_TIMEOUT: Final = 60.0
FAST_DEADLINE: Final = 1.0
"""Health RPCs answer within this while a dependency hangs for HANG_TIMEOUT per attempt:
half the hang, so a call that waited for it fails; room for a loaded machine (how fast
they answer is the benchmark's hanging-dependency section)."""
FAST_CALLS: Final = 200

CheckRequest = health_pb2.HealthCheckRequest
CheckResponse = health_pb2.HealthCheckResponse


# -- configuration -----------------------------------------------------------------------


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    raise TypeError(f"no TOML for {value!r}")


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def check_entry(
    name: str, kind: str, target: str, *, env_var: str | None = None, **options: object
) -> dict[str, object]:
    """A ``[[checks]]`` table on the schedule under test (options override).

    *env_var* is the check's ``password_env``: the variable that holds the password.
    """
    if env_var is not None:
        options["password_env"] = env_var
    return {
        "name": name,
        "kind": kind,
        "target": target,
        "interval": _ms(INTERVAL),
        "timeout": _ms(TIMEOUT),
        "failure_threshold": FAILURE_THRESHOLD,
        "success_threshold": SUCCESS_THRESHOLD,
        **options,
    }


def write_config(directory: Path, checks: Sequence[dict[str, object]]) -> Path:
    lines: list[str] = []
    for entry in checks:
        lines.append("[[checks]]")
        lines += [f"{key} = {_toml(value)}" for key, value in entry.items()]
        lines.append("")
    path = directory / "petsage.toml"
    path.write_text("\n".join(lines))
    return path


# -- clients -------------------------------------------------------------------------------


class _End:
    """Marks the end of a Watch stream."""


class WatchRecorder:
    """A Watch stream whose messages a thread records, each with its arrival time."""

    def __init__(self, call: grpc._CallIterator[CheckResponse]) -> None:
        self.call = call
        self.received: list[ServingStatus] = []
        self._queue: queue.Queue[tuple[ServingStatus, float] | _End] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, name="watch-recorder", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            for response in self.call:
                status = ServingStatus(response.status)
                self.received.append(status)
                self._queue.put((status, time.monotonic()))
        except grpc.RpcError:
            pass  # cancelled, or the server went away: the test decides whether that is wrong
        finally:
            self._queue.put(_End())

    def next(self, timeout: float) -> tuple[ServingStatus, float]:
        """The next message's status and arrival time (monotonic); fail after *timeout*."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no Watch message within {timeout:.2f}s (so far: {self.received})")
        if isinstance(item, _End):
            pytest.fail(f"Watch ended: {self.call.code()} {self.call.details()}")
        return item

    def first(self, timeout: float = RPC_TIMEOUT) -> ServingStatus:
        """The initial status; a NOT_SERVING one must be followed by SERVING in *timeout*."""
        status, _ = self.next(timeout)
        if status is NOT_SERVING:
            status, _ = self.next(timeout)
        return status

    def cancel(self) -> list[ServingStatus]:
        """End the stream; return every status it carried."""
        self.call.cancel()
        self._thread.join(RPC_TIMEOUT)
        assert not self._thread.is_alive(), "the Watch reader did not stop"
        return list(self.received)


class Client:
    """A blocking grpcio channel to a PetSage server and its RPCs, typed."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(self.channel).result(timeout=RPC_TIMEOUT)
        health = health_pb2_grpc.HealthStub(self.channel)
        self._check: grpc.UnaryUnaryMultiCallable[CheckRequest, CheckResponse] = health.Check
        self._watch: grpc.UnaryStreamMultiCallable[CheckRequest, CheckResponse] = health.Watch
        self._list: grpc.UnaryUnaryMultiCallable[
            health_pb2.HealthListRequest, health_pb2.HealthListResponse
        ] = health.List
        smoke = smoke_test_service_pb2_grpc.SmokeTestServiceStub(self.channel)
        self._smoke_test: grpc.UnaryUnaryMultiCallable[
            smoke_test_service_pb2.SmokeTestRequest, smoke_test_service_pb2.SmokeTestResponse
        ] = smoke.SmokeTest
        self._watches: list[WatchRecorder] = []

    def check_response(self, service: str, timeout: float = RPC_TIMEOUT) -> CheckResponse:
        return self._check(CheckRequest(service=service), timeout=timeout)

    def check(self, service: str, timeout: float = RPC_TIMEOUT) -> ServingStatus:
        return ServingStatus(self.check_response(service, timeout).status)

    def list(self, timeout: float = RPC_TIMEOUT) -> health_pb2.HealthListResponse:
        return self._list(health_pb2.HealthListRequest(), timeout=timeout)

    def smoke_test(self, timeout: float = RPC_TIMEOUT) -> smoke_test_service_pb2.SmokeTestResponse:
        return self._smoke_test(smoke_test_service_pb2.SmokeTestRequest(), timeout=timeout)

    def smoke_test_refusal(self) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as failure:
            self.smoke_test()
        assert failure.value.code() is grpc.StatusCode.UNAVAILABLE
        return failure.value

    def watch(self, service: str) -> WatchRecorder:
        recorder = WatchRecorder(self._watch(CheckRequest(service=service), timeout=WATCH_TIMEOUT))
        self._watches.append(recorder)
        return recorder

    def wait_for(self, service: str, status: ServingStatus, within: float) -> float:
        """Poll Check until *service* reports *status*; return how long that took."""
        started = time.monotonic()
        while (current := self.check(service)) is not status:
            if time.monotonic() - started > within:
                pytest.fail(f"{service!r} still {current.name} after {within:.2f}s")
            time.sleep(0.01)
        return time.monotonic() - started

    def close(self) -> None:
        for recorder in self._watches:
            recorder.call.cancel()
        self.channel.close()


@pytest.fixture
def connect() -> Iterator[Callable[[str], Client]]:
    """Open clients to a server address; all are closed at teardown."""
    clients: list[Client] = []

    def open_client(address: str) -> Client:
        client = Client(address)
        clients.append(client)
        return client

    try:
        yield open_client
    finally:
        for client in clients:
            client.close()


def probe(address: str, service: str) -> subprocess.CompletedProcess[str]:
    """``petsage-grpc probe``, as a Kubernetes exec probe runs it (with timeouts that a
    loaded machine cannot miss: the answer is under test, not the kubelet's 1 s)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "petsage_grpc",
            "probe",
            f"-addr={address}",
            f"-service={service}",
            "-connect-timeout=10s",
            "-rpc-timeout=10s",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )


def wait_for_log(
    server: ServerProcess, pattern: str, within: float = WATCH_TIMEOUT
) -> re.Match[str]:
    """Wait until the server's log matches *pattern*; return the match."""
    compiled = re.compile(pattern)
    deadline = time.monotonic() + within
    while (match := compiled.search(server.log())) is None:
        if time.monotonic() > deadline:
            pytest.fail(f"{pattern!r} not logged within {within}s:\n{server.log()}")
        time.sleep(0.01)
    return match


def failure_reason(server: ServerProcess, name: str) -> str:
    """Wait for the server to log the check's failure; return the logged reason."""
    return wait_for_log(server, rf"check '{re.escape(name)}' failed: (.*)").group(1).strip()


def assert_refusal_discloses_nothing(error: grpc.RpcError, secrets: Sequence[str]) -> None:
    """SmokeTest's refusal names no host, port, URL, dependency or error."""
    details = error.details() or ""
    assert details, "a short reason is expected"
    for secret in (*secrets, "127.0.0.1", "localhost", "://", "errno", "refused", "timeout"):
        assert secret.lower() not in details.lower(), f"{secret!r} leaked in {details!r}"
    assert not re.search(r":\d{2,5}\b", details), f"a port-like string in {details!r}"
    extra = [m.key for m in error.trailing_metadata() or () if not m.key.startswith("grpc-")]
    assert not extra, f"unexpected trailing metadata {extra}"


def assert_no_repeats(statuses: Sequence[ServingStatus], what: str) -> None:
    repeats = [a for a, b in itertools.pairwise(statuses) if a is b]
    assert not repeats, f"{what}: the same status twice in a row in {statuses}"


def transitions(statuses: Sequence[ServingStatus]) -> list[ServingStatus]:
    """The statuses a stream carried, without the NOT_SERVING a check starts with."""
    return list(statuses[1:] if statuses[:1] == [NOT_SERVING] else statuses)


# -- outage and recovery, through the CLI server ------------------------------------------


@dataclass
class Dependency:
    """A real dependency that a test can take down and bring back on the same port."""

    kind: CheckKind
    target: str
    port: int
    stop: Callable[[], None]
    restart: Callable[[], None]


@pytest.fixture(params=["postgres", "redis"])
def dependency(request: pytest.FixtureRequest) -> Dependency:
    if request.param == "postgres":
        database: PostgresServer = request.getfixturevalue("postgres_server")
        return Dependency(
            "postgres", database.url(), database.port, database.stop, database.restart
        )
    cache: RedisServer = request.getfixturevalue("redis_server")
    return Dependency("redis", cache.url(), cache.port, cache.stop, cache.restart)


@pytest.mark.slow
def test_outage_and_recovery_through_the_cli_server(
    dependency: Dependency,
    spawn_server: Callable[..., ServerProcess],
    connect: Callable[[str], Client],
    tmp_path: Path,
) -> None:
    name = f"{dependency.kind}-main"
    check_name = f"check.{name}"
    config = write_config(tmp_path, [check_entry(name, dependency.kind, dependency.target)])
    server = spawn_server("--config", str(config))
    client = connect(server.address)
    readiness, check, liveness = (
        client.watch("readiness"),
        client.watch(check_name),
        client.watch("liveness"),
    )
    assert readiness.first() is SERVING
    assert check.first() is SERVING
    assert liveness.first() is SERVING
    serving = client.smoke_test()
    assert [(c.name, c.serving) for c in serving.checks] == [(name, True)]
    assert dependency.target not in str(serving)

    # Outage: the process is gone, its port refuses connections.
    dependency.stop()
    down = time.monotonic()
    status, arrived = readiness.next(DETECT_WITHIN)
    assert status is NOT_SERVING
    assert arrived - down <= DETECT_WITHIN
    status, arrived = check.next(DETECT_WITHIN)
    assert status is NOT_SERVING
    assert arrived - down <= DETECT_WITHIN

    assert client.check("liveness") is SERVING
    assert client.check("") is NOT_SERVING
    assert client.check("readiness") is NOT_SERVING
    outage_probe = probe(server.address, "readiness")
    assert outage_probe.returncode == 4, outage_probe.stderr
    assert probe(server.address, "liveness").returncode == 0
    reason = failure_reason(server, name)
    assert_refusal_discloses_nothing(
        client.smoke_test_refusal(),
        (dependency.target, str(dependency.port), dependency.kind, reason, "connect"),
    )
    assert client.check("liveness") is SERVING

    # Recovery on the same port, seen by the same streams.
    dependency.restart()
    up = time.monotonic()
    status, arrived = readiness.next(RECOVER_WITHIN)
    assert status is SERVING
    assert arrived - up <= RECOVER_WITHIN
    status, arrived = check.next(RECOVER_WITHIN)
    assert status is SERVING
    assert arrived - up <= RECOVER_WITHIN
    recovered_probe = probe(server.address, "readiness")
    assert recovered_probe.returncode == 0, recovered_probe.stderr
    assert [(c.name, c.serving) for c in client.smoke_test().checks] == [(name, True)]

    # One warning for the whole outage (not one per failed attempt), one line at its end.
    wait_for_log(server, rf"check '{re.escape(name)}' passes again")
    assert server.log().count(f"check '{name}' failed") == 1
    assert server.log().count(f"check '{name}' passes again") == 1

    # Each transition exactly once, on both names; liveness never moved.
    for recorder, what in ((readiness, "readiness"), (check, check_name)):
        statuses = recorder.cancel()
        assert_no_repeats(statuses, what)
        assert transitions(statuses) == [SERVING, NOT_SERVING, SERVING], what
    assert liveness.cancel() == [SERVING]


# -- passwords from the environment -------------------------------------------------------


def assert_password_from_environment(
    *,
    kind: str,
    target: str,
    password: str,
    spawn_server: Callable[..., ServerProcess],
    connect: Callable[[str], Client],
    tmp_path: Path,
    refused: str,
) -> None:
    """The check passes with the password from its variable; the password leaks nowhere.

    Two non-critical checks prove that the password is really required: one without a
    password, one with a wrong password (which must not leak either); *refused* is what
    the server's log says about the wrong one.
    """
    wrong = f"wrong-{password[::-1]}"
    config = write_config(
        tmp_path,
        [
            check_entry("secret", kind, target, env_var="PETSAGE_TEST_PASSWORD"),
            check_entry("no-password", kind, target, critical=False),
            check_entry(
                "wrong-password", kind, target, env_var="PETSAGE_TEST_WRONG", critical=False
            ),
        ],
    )
    http_port = free_port()
    server = spawn_server(
        "--config",
        str(config),
        "--log-level",
        "debug",
        "--http-port",
        str(http_port),
        env={"PETSAGE_TEST_PASSWORD": password, "PETSAGE_TEST_WRONG": wrong},
    )
    client = connect(server.address)
    client.wait_for("check.secret", SERVING, RECOVER_WITHIN)
    client.wait_for("readiness", SERVING, RPC_TIMEOUT)
    assert failure_reason(server, "no-password")
    assert refused in failure_reason(server, "wrong-password")
    assert client.check("check.no-password") is NOT_SERVING
    assert client.check("check.wrong-password") is NOT_SERVING

    responses: list[bytes] = [
        client.check_response(name).SerializeToString()
        for name in ("", "readiness", "liveness", "startup", "check.secret", "check.wrong-password")
    ]
    responses.append(client.list().SerializeToString())
    responses.append(client.smoke_test().SerializeToString())
    for path in ("/metrics", "/readyz?verbose", "/api/v1/health/smoke-test"):
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=5) as page:
            responses.append(page.read())
    outputs = [probe(server.address, "check.secret"), probe(server.address, "check.wrong-password")]
    assert [result.returncode for result in outputs] == [0, 4]
    log = server.log()
    for secret in (password, wrong):
        for response in responses:
            assert secret.encode() not in response
        for result in outputs:
            assert secret not in result.stdout + result.stderr
        assert secret not in log, "a password in the server's log"


def test_postgres_password_from_environment(
    postgres_server: PostgresServer,
    spawn_server: Callable[..., ServerProcess],
    connect: Callable[[str], Client],
    tmp_path: Path,
) -> None:
    assert_password_from_environment(
        kind="postgres",
        target=postgres_server.url(AUTH_ROLE),
        password=postgres_server.cluster.password,
        spawn_server=spawn_server,
        connect=connect,
        tmp_path=tmp_path,
        refused="password authentication failed",
    )


def test_redis_password_from_environment(
    start_redis: Callable[..., RedisServer],
    spawn_server: Callable[..., ServerProcess],
    connect: Callable[[str], Client],
    tmp_path: Path,
) -> None:
    password = "redis-" + AUTH_ROLE + "-" + str(time.time_ns())
    cache = start_redis(password=password)
    assert_password_from_environment(
        kind="redis",
        target=cache.url(),
        password=password,
        spawn_server=spawn_server,
        connect=connect,
        tmp_path=tmp_path,
        refused="invalid username-password pair",
    )


# -- hanging dependencies -------------------------------------------------------------------


def assert_fast_answers_while(hanging: Callable[[], bool], client: Client) -> int:
    """Issue at least FAST_CALLS Checks (and some List and SmokeTest calls), each with a
    FAST_DEADLINE, until *hanging* says enough attempts overlapped them; none may fail.

    Returns how many Checks were made.
    """
    names = ("readiness", "liveness", "", "startup", "petsage.v1.SmokeTestService")
    failures: list[str] = []
    calls = 0
    deadline = time.monotonic() + WATCH_TIMEOUT
    while calls < FAST_CALLS or not hanging():
        assert time.monotonic() < deadline, "the dependency did not keep hanging"
        service = names[calls % len(names)]
        try:
            client.check(service, timeout=FAST_DEADLINE)
        except grpc.RpcError as error:
            failures.append(f"Check({service!r}): {error.code()}")
        if calls % 10 == 0:
            try:
                client.list(timeout=FAST_DEADLINE)
            except grpc.RpcError as error:
                failures.append(f"List: {error.code()}")
            try:
                client.smoke_test(timeout=FAST_DEADLINE)
            except grpc.RpcError as error:
                # NOT_SERVING is refused on purpose; anything else is a failure.
                if error.code() is not grpc.StatusCode.UNAVAILABLE:
                    failures.append(f"SmokeTest: {error.code()}")
        calls += 1
    assert not failures, f"{len(failures)} calls failed during the hang: {failures[:10]}"
    return calls


@pytest.mark.slow
def test_black_hole_fails_by_timeout_and_never_slows_the_health_rpcs(
    black_hole: BlackHole,
    spawn_server: Callable[..., ServerProcess],
    connect: Callable[[str], Client],
    tmp_path: Path,
) -> None:
    hole = black_hole.address
    checks = {
        "hole-postgres": ("postgres", f"postgresql://petsage@{hole}/petsage"),
        "hole-redis": ("redis", f"redis://{hole}/0"),
        "hole-http": ("http", f"http://{hole}/healthz"),
    }
    hang = {"timeout": _ms(HANG_TIMEOUT)}
    config = write_config(
        tmp_path,
        [check_entry(name, kind, target, **hang) for name, (kind, target) in checks.items()],
    )
    server = spawn_server("--config", str(config))
    started = time.monotonic()
    client = connect(server.address)
    # Every first attempt ends by its timeout: startup does not wait for the hang.
    client.wait_for("startup", SERVING, HANG_TIMEOUT + SLACK - (time.monotonic() - started))
    for name in checks:
        assert failure_reason(server, name) == f"no answer within {HANG_TIMEOUT:g}s"
        assert client.check(f"check.{name}") is NOT_SERVING
    assert client.check("readiness") is NOT_SERVING
    assert client.check("liveness") is SERVING

    before = black_hole.accepted
    assert before >= len(checks), "every check reached the black hole"
    # Overlap the calls with new attempts of every check: each hangs for the timeout.
    assert_fast_answers_while(lambda: black_hole.accepted >= before + 3 * len(checks), client)
    # Each attempt that timed out closed its connection: at most one per check is open
    # (the attempt in flight), however many attempts were made.
    assert black_hole.accepted >= 4 * len(checks)
    assert black_hole.open_connections() <= len(checks) + 1
    assert client.check("readiness") is NOT_SERVING
    refusal = client.smoke_test_refusal()
    assert_refusal_discloses_nothing(refusal, (hole, str(black_hole.port), "postgres", "redis"))
    assert probe(server.address, "readiness").returncode == 4
    assert probe(server.address, "liveness").returncode == 0


# -- in process: the monitor's own view ---------------------------------------------------


@dataclass
class Monitored:
    server: InProcessServer
    monitor: HealthMonitor

    def last_error(self, name: str) -> str | None:
        (state,) = [s for s in self.monitor.states if s.check.name == name]
        return state.last_error


@pytest.fixture
def monitored(
    start_server: Callable[..., InProcessServer],
) -> Iterator[Callable[..., Monitored]]:
    """An in-process server whose board a HealthMonitor drives; stopped at teardown."""
    running: list[Monitored] = []

    def start(*checks: Check) -> Monitored:
        server = start_server()

        async def begin() -> HealthMonitor:
            monitor = HealthMonitor(server.board, checks)
            await monitor.start()
            return monitor

        monitored = Monitored(server, server.run(begin()))
        running.append(monitored)
        return monitored

    try:
        yield start
    finally:
        for item in running:
            item.server.run(item.monitor.stop())


def schedule(**options: Any) -> dict[str, Any]:
    return {
        "interval": INTERVAL,
        "timeout": TIMEOUT,
        "failure_threshold": FAILURE_THRESHOLD,
        "success_threshold": SUCCESS_THRESHOLD,
        **options,
    }


def test_non_critical_check_failing_leaves_readiness_serving(
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    monitored: Callable[..., Monitored],
    connect: Callable[[str], Client],
) -> None:
    running = monitored(
        Check(name="cache", kind="redis", target=redis_server.url(), **schedule()),
        Check(name="db", kind="postgres", target=postgres_server.url(), **schedule(critical=False)),
    )
    client = connect(running.server.address)
    readiness = client.watch("readiness")
    assert readiness.first() is SERVING
    client.wait_for("check.db", SERVING, RECOVER_WITHIN)
    assert [(c.name, c.serving) for c in client.smoke_test().checks] == [
        ("cache", True),
        ("db", True),
    ]

    postgres_server.stop()
    client.wait_for("check.db", NOT_SERVING, DETECT_WITHIN)
    assert running.last_error("db") is not None
    assert running.last_error("cache") is None
    for name in ("readiness", "", "startup", "liveness", "check.cache"):
        assert client.check(name) is SERVING, name
    assert [(c.name, c.serving) for c in client.smoke_test().checks] == [
        ("cache", True),
        ("db", False),
    ]
    assert probe(running.server.address, "readiness").returncode == 0

    postgres_server.restart()
    client.wait_for("check.db", SERVING, RECOVER_WITHIN)
    assert running.last_error("db") is None
    # Readiness did not move once while the non-critical check failed and recovered.
    assert transitions(readiness.cancel()) == [SERVING]


STALE_INTERVAL: Final = 6.0
"""Long enough to restart a dependency between two attempts, with a wide margin (a restart
takes well under a second on a quiet machine, a few on a loaded one)."""


@pytest.mark.slow
@pytest.mark.parametrize(
    "dependency",
    ["postgres", "redis"],
    indirect=True,
)
def test_dependency_restarted_between_attempts_is_not_reported_down(
    dependency: Dependency,
    monitored: Callable[..., Monitored],
    connect: Callable[[str], Client],
) -> None:
    """A dependency that restarted while the check slept is up: the next attempt passes.

    The kept connection died with the old process; the prober must notice that (or retry
    on a fresh connection) instead of failing an attempt against a healthy dependency.
    """
    running = monitored(
        Check(
            name="dep",
            kind=dependency.kind,
            target=dependency.target,
            **schedule(interval=STALE_INTERVAL, failure_threshold=1),
        )
    )
    (state,) = running.monitor.states

    async def counts() -> tuple[int, int, float | None]:
        # Read on the monitor's loop, between two of its steps: a consistent view.
        return state.consecutive_successes, state.consecutive_failures, state.last_success_time

    client = connect(running.server.address)
    readiness = client.watch("readiness")
    assert readiness.first() is SERVING  # an attempt has just passed
    successes, failures, last_success = running.server.run(counts())
    assert successes >= 1
    assert failures == 0
    assert last_success is not None

    dependency.restart()
    restarted = time.time()
    assert restarted - last_success < STALE_INTERVAL * 0.9 - 0.1, (
        "the restart took longer than the pause between two attempts: nothing to test"
    )
    assert running.server.run(counts())[:2] == (successes, 0), "an attempt during the restart"

    # The next attempt, made against the restarted dependency.
    deadline = time.monotonic() + 2 * STALE_INTERVAL * JITTER + TIMEOUT + SLACK
    while (now := running.server.run(counts()))[2] == last_success:
        assert time.monotonic() < deadline, "no attempt after the restart"
        time.sleep(0.01)
    assert now[:2] == (successes + 1, 0), f"an attempt failed against the restarted server: {now}"
    assert running.last_error("dep") is None
    assert transitions(readiness.cancel()) == [SERVING]


@pytest.mark.slow
def test_frozen_redis_fails_by_timeout_without_slowing_the_health_rpcs(
    redis_server: RedisServer,
    monitored: Callable[..., Monitored],
    connect: Callable[[str], Client],
) -> None:
    running = monitored(
        Check(
            name="cache",
            kind="redis",
            target=redis_server.url(),
            **schedule(timeout=HANG_TIMEOUT),
        )
    )
    client = connect(running.server.address)
    readiness = client.watch("readiness")
    assert readiness.first() is SERVING

    # SIGSTOP: the kernel still accepts connections; the kept one just never gets a reply.
    redis_server.freeze()
    frozen = time.monotonic()
    status, arrived = readiness.next(HANG_DETECT_WITHIN)
    assert status is NOT_SERVING
    assert arrived - frozen <= HANG_DETECT_WITHIN
    assert running.last_error("cache") == f"no answer within {HANG_TIMEOUT:g}s"
    (state,) = running.monitor.states
    attempts = state.consecutive_failures
    # The calls overlap at least two more hanging attempts.
    assert_fast_answers_while(lambda: state.consecutive_failures >= attempts + 2, client)
    assert client.check("liveness") is SERVING

    redis_server.thaw()
    thawed = time.monotonic()
    status, arrived = readiness.next(RECOVER_WITHIN)
    assert status is SERVING
    assert arrived - thawed <= RECOVER_WITHIN
    statuses = readiness.cancel()
    assert_no_repeats(statuses, "readiness")
    assert transitions(statuses) == [SERVING, NOT_SERVING, SERVING]
