"""HealthMonitor against real local dependencies: HTTP, gRPC, TCP and Python checks.

Every dependency is real and local: an aiohttp server, an in-process PetSage gRPC server,
a TCP listener, Python callables. The monitor runs on the test's own event loop
(``asyncio.run``); the HTTP and gRPC upstreams run on their own threads' loops. Every wait
is a poll with a deadline; sleeps are never the assertion.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import check_targets
import pytest
from aiohttp import web
from conftest import InProcessServer, ServerProcess
from tcp_listener import TcpListener, free_port

from petsage_grpc import (
    LIVENESS,
    OVERALL,
    READINESS,
    SMOKE_TEST_SERVICE,
    STARTUP,
    Check,
    CheckState,
    HealthMonitor,
    ServingStatus,
    StatusBoard,
)

T = TypeVar("T")

SERVING: Final = ServingStatus.SERVING
NOT_SERVING: Final = ServingStatus.NOT_SERVING
SERVICE_UNKNOWN: Final = ServingStatus.SERVICE_UNKNOWN

FAST: Final = 0.02
"""Interval of the checks under test: many attempts in little time."""
TIMEOUT: Final = 1.0
"""Timeout of checks that are expected to answer."""
STEP: Final = 30.0
"""Deadline of one expected change; generous, still bounded."""
TEST_LIMIT: Final = 3 * STEP
AGGREGATES: Final = (READINESS, OVERALL, SMOKE_TEST_SERVICE)


def run(main: Callable[[], Coroutine[Any, Any, T]], limit: float = TEST_LIMIT) -> T:
    """Run *main* on a new event loop, bounded by *limit* seconds."""

    async def bounded() -> T:
        async with asyncio.timeout(limit):
            return await main()

    return asyncio.run(bounded())


async def eventually(predicate: Callable[[], bool], what: str, within: float = STEP) -> None:
    """Poll *predicate* until it holds; fail after *within* seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.005)


def make_check(name: str, **fields: Any) -> Check:
    """A check with a fast schedule unless *fields* say otherwise."""
    fields.setdefault("interval", FAST)
    fields.setdefault("timeout", TIMEOUT)
    fields.setdefault("failure_threshold", 1)
    return Check(name=name, **fields)


def state_of(monitor: HealthMonitor, name: str) -> CheckState:
    (state,) = (s for s in monitor.states if s.check.name == name)
    return state


async def first_outcome(check: Check) -> CheckState:
    """Run *check* alone until its first attempt is judged; return a copy of its state."""
    board = StatusBoard()
    async with HealthMonitor(board, [check]) as monitor:
        (state,) = monitor.states
        await eventually(lambda: state.completed_first_attempt, f"{check.name}'s first attempt")
        outcome = dataclasses.replace(state)
        reported = board.get(check.service_name)
    assert reported is (SERVING if outcome.serving else NOT_SERVING)
    assert (outcome.last_error is None) == outcome.serving
    return outcome


async def collect(board: StatusBoard, service: str, into: list[ServingStatus]) -> None:
    async for status in board.watch(service):
        into.append(status)


async def start_watching(
    board: StatusBoard, service: str
) -> tuple[list[ServingStatus], asyncio.Task[None]]:
    """Watch *service* on *board*; return once the watch has seen the current status."""
    seen: list[ServingStatus] = []
    task = asyncio.create_task(collect(board, service, seen))
    await eventually(lambda: bool(seen), f"the watch on {service!r} to start")
    return seen, task


class Script:
    """An async check that returns scripted outcomes in turn (the last one forever).

    Each call first notes what the board reports for the check: the verdict on the
    attempts before this one.
    """

    def __init__(self, board: StatusBoard, outcomes: Sequence[bool], *, cycle: bool = False):
        self.board = board
        self.outcomes = outcomes
        self.cycle = cycle
        self.service = ""
        self.seen: list[ServingStatus | None] = []

    async def call(self) -> bool:
        self.seen.append(self.board.get(self.service))
        index = len(self.seen) - 1
        if self.cycle:
            return self.outcomes[index % len(self.outcomes)]
        return self.outcomes[min(index, len(self.outcomes) - 1)]


class Toggle:
    """An async check whose health the test switches; counts its calls."""

    def __init__(self, *, healthy: bool) -> None:
        self.healthy = healthy
        self.calls = 0

    async def call(self) -> bool:
        self.calls += 1
        return self.healthy


class Blocking:
    """A synchronous check that blocks its thread until released (bounded, for safety)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        self.release.wait(TEST_LIMIT)
        return True


# -- Upstreams ----------------------------------------------------------------------


class HttpUpstream:
    """A real aiohttp server on 127.0.0.1, on its own thread's event loop.

    ``/ok`` answers 200, ``/unavailable`` 503, ``/hang`` never answers (until teardown).
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="http-upstream")
        self._thread.start()
        self._release = asyncio.Event()
        self.requests: dict[str, int] = {}
        self._runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=1.0)
        self.port: int = self._call(self._start())

    def _app(self) -> web.Application:
        async def ok(request: web.Request) -> web.Response:
            self._count(request)
            return web.Response(text="purring")

        async def unavailable(request: web.Request) -> web.Response:
            self._count(request)
            return web.Response(status=503, text="napping")

        async def hang(request: web.Request) -> web.Response:
            self._count(request)
            await self._release.wait()
            return web.Response(text="too late")

        app = web.Application()
        app.router.add_get("/ok", ok)
        app.router.add_get("/unavailable", unavailable)
        app.router.add_get("/hang", hang)
        return app

    def _count(self, request: web.Request) -> None:
        self.requests[request.path] = self.requests.get(request.path, 0) + 1

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(STEP)

    async def _start(self) -> int:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port: int = self._runner.addresses[0][1]
        return port

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def open_connections(self) -> int:
        async def count() -> int:
            server = self._runner.server
            return 0 if server is None else len(server.connections)

        return self._call(count())

    def close(self) -> None:
        async def stop() -> None:
            self._release.set()
            await self._runner.cleanup()

        self._call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(STEP)
        self.loop.close()


@pytest.fixture
def http_upstream() -> Iterator[HttpUpstream]:
    upstream = HttpUpstream()
    yield upstream
    upstream.close()


@pytest.fixture
def grpc_upstream(start_server: Callable[..., InProcessServer]) -> InProcessServer:
    """Another PetSage server, whose board the test sets; it serves "orders"."""
    upstream = start_server()
    upstream.board.set("orders", SERVING)
    return upstream


# -- http ---------------------------------------------------------------------------


def test_http_2xx_passes(http_upstream: HttpUpstream) -> None:
    outcome = run(
        lambda: first_outcome(make_check("web", kind="http", target=http_upstream.url("/ok")))
    )
    assert outcome.serving
    assert outcome.last_success_time is not None
    assert http_upstream.requests["/ok"] >= 1


def test_http_503_fails(http_upstream: HttpUpstream) -> None:
    check = make_check("web", kind="http", target=http_upstream.url("/unavailable"))
    outcome = run(lambda: first_outcome(check))
    assert not outcome.serving
    assert outcome.last_error == "CheckFailedError: HTTP status 503"
    assert outcome.last_success_time is None


def test_http_expected_503_passes_and_200_then_fails(http_upstream: HttpUpstream) -> None:
    expecting = make_check(
        "web", kind="http", target=http_upstream.url("/unavailable"), expect_status=(503,)
    )
    assert run(lambda: first_outcome(expecting)).serving
    unexpected = make_check(
        "web", kind="http", target=http_upstream.url("/ok"), expect_status=(503,)
    )
    assert run(lambda: first_outcome(unexpected)).last_error == "CheckFailedError: HTTP status 200"


def test_http_handler_that_never_answers_fails_by_timeout(http_upstream: HttpUpstream) -> None:
    check = make_check(
        "web", kind="http", target=http_upstream.url("/hang"), timeout=0.3, interval=5.0
    )
    outcome = run(lambda: first_outcome(check))
    assert not outcome.serving
    assert outcome.last_error == "no answer within 0.3s"
    assert outcome.last_duration is not None
    assert 0.25 <= outcome.last_duration < 0.3 + STEP
    assert http_upstream.requests["/hang"] == 1


# -- grpc ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "upstream_status", "error"),
    [
        ("", SERVING, None),
        ("orders", SERVING, None),
        ("orders", NOT_SERVING, "CheckFailedError: upstream answered NOT_SERVING"),
        ("unheard-of", None, "NOT_FOUND"),
    ],
    ids=["overall-serving", "service-serving", "service-not-serving", "service-unknown"],
)
def test_grpc_check_follows_the_upstream_health_answer(
    grpc_upstream: InProcessServer,
    service: str,
    upstream_status: ServingStatus | None,
    error: str | None,
) -> None:
    if upstream_status is not None:
        grpc_upstream.board.set(service, upstream_status)
    check = make_check("orders", kind="grpc", target=grpc_upstream.address, service=service)
    outcome = run(lambda: first_outcome(check))
    assert outcome.serving is (error is None)
    if error is not None:
        assert outcome.last_error is not None
        assert error in outcome.last_error


def test_grpc_check_tracks_upstream_changes(grpc_upstream: InProcessServer) -> None:
    async def main() -> None:
        board = StatusBoard()
        check = make_check("orders", kind="grpc", target=grpc_upstream.address, service="orders")
        async with HealthMonitor(board, [check]) as monitor:
            state = state_of(monitor, "orders")
            await eventually(lambda: state.serving, "the check to pass")
            grpc_upstream.board.set("orders", NOT_SERVING)
            await eventually(lambda: board.get("check.orders") is NOT_SERVING, "NOT_SERVING")
            assert state.last_error == "CheckFailedError: upstream answered NOT_SERVING"
            grpc_upstream.board.set("orders", SERVING)
            await eventually(lambda: board.get("check.orders") is SERVING, "SERVING again")

    run(main)


def test_grpc_unreachable_upstream_fails() -> None:
    check = make_check("orders", kind="grpc", target=f"127.0.0.1:{free_port()}")
    outcome = run(lambda: first_outcome(check))
    assert not outcome.serving
    assert outcome.last_error is not None


def test_grpc_failure_is_reported_on_one_line() -> None:
    check = make_check("orders", kind="grpc", target=f"127.0.0.1:{free_port()}")
    outcome = run(lambda: first_outcome(check))
    assert outcome.last_error is not None
    assert "\n" not in outcome.last_error
    assert "UNAVAILABLE" in outcome.last_error


# -- tcp ----------------------------------------------------------------------------


def test_tcp_listening_socket_passes() -> None:
    with TcpListener() as listener:
        outcome = run(lambda: first_outcome(make_check("db", kind="tcp", target=listener.address)))
        assert outcome.serving
    assert listener.accepted >= 1


def test_tcp_closed_port_fails() -> None:
    check = make_check("db", kind="tcp", target=f"127.0.0.1:{free_port()}")
    outcome = run(lambda: first_outcome(check))
    assert not outcome.serving
    assert outcome.last_error is not None
    assert outcome.last_error.startswith("ConnectionRefusedError")


# -- python -------------------------------------------------------------------------


async def _never_returns() -> bool:
    await asyncio.sleep(3600)
    return True


@pytest.mark.parametrize(
    ("target", "error"),
    [
        pytest.param(check_targets.sync_ok, None, id="sync-callable"),
        pytest.param(check_targets.async_ok, None, id="async-callable"),
        pytest.param("check_targets:sync_ok", None, id="sync-string"),
        pytest.param("check_targets:async_ok", None, id="async-string"),
        pytest.param("check_targets:Nested.ok", None, id="dotted-string"),
        pytest.param(lambda: "yes", None, id="truthy-object"),
        pytest.param(check_targets.sync_falsy, "CheckFailedError: returned int 0", id="sync-falsy"),
        pytest.param(
            "check_targets:async_falsy", "CheckFailedError: returned str ''", id="async-falsy"
        ),
        pytest.param(lambda: None, "CheckFailedError: returned NoneType None", id="returns-none"),
        pytest.param(
            "check_targets:sync_raises", "RuntimeError: the litter box is full", id="sync-raises"
        ),
        pytest.param(
            check_targets.async_raises, "ConnectionResetError: the vet hung up", id="async-raises"
        ),
        pytest.param(
            check_targets.garbage, "TypeError: this result refuses to be judged", id="garbage"
        ),
        pytest.param(_never_returns, "no answer within 0.2s", id="async-never-returns"),
    ],
)
def test_python_check_outcome(target: str | Callable[[], object], error: str | None) -> None:
    check = make_check("py", kind="python", target=target, timeout=0.2)
    outcome = run(lambda: first_outcome(check))
    assert outcome.serving is (error is None)
    assert outcome.last_error == error


def test_python_target_that_cannot_be_imported_is_refused_by_the_monitor() -> None:
    check = make_check("py", kind="python", target="no_such_module_petsage:check")
    with pytest.raises(ValueError, match="no_such_module_petsage"):
        HealthMonitor(StatusBoard(), [check])


def test_sync_check_that_hangs_fails_by_timeout_without_piling_up_threads(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stuck = Blocking()
    steady = Toggle(healthy=True)

    async def main() -> None:
        board = StatusBoard()
        checks = [
            make_check("stuck", kind="python", target=stuck, timeout=0.3),
            make_check("steady", kind="python", target=steady.call),
        ]
        loop = asyncio.get_running_loop()
        try:
            async with HealthMonitor(board, checks) as monitor:
                started = loop.time()
                state = state_of(monitor, "stuck")
                await eventually(lambda: state.completed_first_attempt, "the first attempt")
                assert loop.time() - started >= 0.25, "the first attempt waits for its timeout"
                steady_before = steady.calls
                await eventually(lambda: state.consecutive_failures >= 5, "five failed attempts")
                # Later attempts fail at once, and never start another blocked call.
                assert (
                    state.last_error == "CheckFailedError: the previous call has not returned yet"
                )
                assert state.last_duration is not None
                assert state.last_duration < 0.15
                assert stuck.calls == 1
                # Meanwhile the other check kept running and passing.
                await eventually(lambda: steady.calls >= steady_before + 3, "the other check")
                assert board.get("check.steady") is SERVING
                assert board.get("check.stuck") is NOT_SERVING
                # Once the call returns, the check runs (and passes) again.
                stuck.release.set()
                await eventually(lambda: state.serving, "the released check to pass")
                assert stuck.calls == 2
        finally:
            stuck.release.set()

    with caplog.at_level("WARNING", logger="petsage_grpc.checks"):
        run(main)
    # The first failure was the timeout, and a run of failures is logged once.
    warnings = [r.getMessage() for r in caplog.records if "'stuck'" in r.getMessage()]
    assert warnings[0] == "check 'stuck' failed: no answer within 0.3s"
    assert [w for w in warnings if "failed" in w] == [warnings[0]]


# -- thresholds and transitions -----------------------------------------------------


def test_flapping_dependency_below_failure_threshold_never_turns_not_serving() -> None:
    async def main() -> None:
        board = StatusBoard()
        script = Script(board, [True, False], cycle=True)
        check = make_check(
            "flappy", kind="python", target=script.call, failure_threshold=3, success_threshold=1
        )
        script.service = check.service_name
        transitions, watch = await start_watching(board, check.service_name)
        readiness, readiness_watch = await start_watching(board, READINESS)
        async with HealthMonitor(board, [check]):
            await eventually(lambda: len(script.seen) >= 21, "twenty attempts")
        watch.cancel()
        readiness_watch.cancel()
        assert script.seen[0] is NOT_SERVING
        assert set(script.seen[1:21]) == {SERVING}
        assert transitions == [SERVICE_UNKNOWN, NOT_SERVING, SERVING]
        assert readiness == [SERVING, NOT_SERVING, SERVING]

    run(main)


def test_thresholds_and_each_transition_seen_exactly_once() -> None:
    # success_threshold 2, failure_threshold 3; the board's verdict before each call:
    outcomes = [True, True, False, False, True, False, False, False, True, True]
    expected_seen = [
        NOT_SERVING,  # before any attempt
        NOT_SERVING,  # one pass is not enough
        SERVING,  # two passes
        SERVING,  # one failure
        SERVING,  # two failures
        SERVING,  # a pass resets the count
        SERVING,  # one failure
        SERVING,  # two failures
        NOT_SERVING,  # three failures
        NOT_SERVING,  # one pass
        SERVING,  # two passes
    ]

    async def main() -> None:
        board = StatusBoard()
        script = Script(board, outcomes)
        check = make_check(
            "db", kind="python", target=script.call, failure_threshold=3, success_threshold=2
        )
        script.service = check.service_name
        transitions, watch = await start_watching(board, check.service_name)
        async with HealthMonitor(board, [check]) as monitor:
            await eventually(lambda: len(script.seen) >= 14, "fourteen attempts")
            state = state_of(monitor, "db")
            assert state.consecutive_failures == 0
            assert state.consecutive_successes >= 4
        watch.cancel()
        assert script.seen[: len(expected_seen)] == expected_seen
        assert set(script.seen[len(expected_seen) :]) == {SERVING}
        assert transitions == [SERVICE_UNKNOWN, NOT_SERVING, SERVING, NOT_SERVING, SERVING]

    run(main)


# -- aggregation --------------------------------------------------------------------


def test_non_critical_failure_leaves_readiness_serving() -> None:
    async def main() -> None:
        board = StatusBoard()
        db, cache = Toggle(healthy=True), Toggle(healthy=False)
        checks = [
            make_check("db", kind="python", target=db.call),
            make_check("cache", kind="python", target=cache.call, critical=False),
        ]
        async with HealthMonitor(board, checks) as monitor:
            await eventually(
                lambda: all(s.completed_first_attempt for s in monitor.states), "first attempts"
            )
            await eventually(lambda: board.get(READINESS) is SERVING, "readiness")
            readiness, watch = await start_watching(board, READINESS)
            calls = cache.calls
            await eventually(lambda: cache.calls >= calls + 5, "more failed attempts")
            watch.cancel()
            assert readiness == [SERVING]
            assert board.get("check.cache") is NOT_SERVING
            for name in (*AGGREGATES, LIVENESS, STARTUP, "check.db"):
                assert board.get(name) is SERVING, name

    run(main)


def test_critical_failure_turns_aggregates_not_serving_but_never_liveness() -> None:
    async def main() -> None:
        board = StatusBoard()
        db, cache = Toggle(healthy=False), Toggle(healthy=True)
        checks = [
            make_check("db", kind="python", target=db.call),
            make_check("cache", kind="python", target=cache.call, critical=False),
        ]
        liveness, watch = await start_watching(board, LIVENESS)
        async with HealthMonitor(board, checks) as monitor:
            await eventually(
                lambda: all(s.completed_first_attempt for s in monitor.states), "first attempts"
            )
            for name in AGGREGATES:
                assert board.get(name) is NOT_SERVING, name
            assert board.get(STARTUP) is SERVING
            assert board.get("check.cache") is SERVING
            db.healthy = True
            await eventually(lambda: all(board.get(n) is SERVING for n in AGGREGATES), "recovery")
            db.healthy = False
            await eventually(
                lambda: all(board.get(n) is NOT_SERVING for n in AGGREGATES), "a new failure"
            )
            assert board.get(LIVENESS) is SERVING
        watch.cancel()
        assert liveness == [SERVING]

    run(main)


def test_startup_waits_for_every_critical_first_attempt_then_serves_even_if_it_failed() -> None:
    async def main() -> None:
        board = StatusBoard()
        db, cache, extra = Toggle(healthy=False), Toggle(healthy=True), Toggle(healthy=True)
        checks = [
            make_check("db", kind="python", target=db.call, initial_delay=0.2),
            make_check("cache", kind="python", target=cache.call, initial_delay=0.5),
            # Not critical: its first attempt (a minute away) does not hold startup back.
            make_check("extra", kind="python", target=extra.call, initial_delay=60, critical=False),
        ]
        loop = asyncio.get_running_loop()
        async with HealthMonitor(board, checks) as monitor:
            started = loop.time()
            assert board.get(STARTUP) is NOT_SERVING
            critical = [s for s in monitor.states if s.check.critical]
            deadline = started + STEP
            while board.get(STARTUP) is not SERVING:
                # Startup is NOT_SERVING exactly while a critical check has not been tried.
                assert not all(s.completed_first_attempt for s in critical)
                assert loop.time() < deadline, "startup never turned SERVING"
                await asyncio.sleep(0.005)
            assert loop.time() - started >= 0.45
            assert all(s.completed_first_attempt for s in critical)
            assert state_of(monitor, "db").last_error is not None
            assert not state_of(monitor, "extra").completed_first_attempt
            assert extra.calls == 0
            assert board.get(READINESS) is NOT_SERVING

    run(main)


# -- reconfigure --------------------------------------------------------------------


class ReadinessSeen:
    """An async check that notes, at each call, what readiness reports (then answers *healthy*).

    Call k therefore sees readiness as judged on attempts 1 .. k-1, exactly.
    """

    def __init__(self, board: StatusBoard, *, healthy: bool) -> None:
        self.board = board
        self.healthy = healthy
        self.seen: list[ServingStatus | None] = []

    async def call(self) -> bool:
        self.seen.append(self.board.get(READINESS))
        return self.healthy


async def serving_monitor(board: StatusBoard, checks: Sequence[Check]) -> HealthMonitor:
    monitor = HealthMonitor(board, checks)
    await monitor.start()
    await eventually(
        lambda: all(board.get(n) is SERVING for n in (*AGGREGATES, STARTUP)), "a serving pod"
    )
    return monitor


def test_reload_adding_a_healthy_critical_check_moves_no_aggregate() -> None:
    async def main() -> None:
        board = StatusBoard()
        db, late = Toggle(healthy=True), Toggle(healthy=True)
        base = make_check("db", kind="python", target=db.call)
        monitor = await serving_monitor(board, [base])
        try:
            watched = [await start_watching(board, n) for n in (*AGGREGATES, STARTUP)]
            added = make_check("late", kind="python", target=late.call, initial_delay=0.3)
            changes = await monitor.reconfigure([base, added])
            assert changes.added == ("late",)
            # Its own name is registered at once, NOT_SERVING as at start-up.
            assert board.get("check.late") is NOT_SERVING
            await eventually(lambda: board.get("check.late") is SERVING, "the new check")
            for seen, task in watched:
                task.cancel()
                assert seen == [SERVING]
            assert late.calls >= 1
        finally:
            await monitor.stop()

    run(main)


def test_reload_added_failing_check_counts_after_its_failure_threshold() -> None:
    async def main() -> None:
        board = StatusBoard()
        db = Toggle(healthy=True)
        base = make_check("db", kind="python", target=db.call)
        monitor = await serving_monitor(board, [base])
        try:
            broken = ReadinessSeen(board, healthy=False)
            added = make_check("broken", kind="python", target=broken.call, failure_threshold=3)
            await monitor.reconfigure([base, added])
            await eventually(lambda: len(broken.seen) >= 4, "four attempts")
            # Attempts 1-3 failed; only the third makes a verdict that readiness follows.
            assert broken.seen[:4] == [SERVING, SERVING, SERVING, NOT_SERVING]
            assert board.get("check.broken") is NOT_SERVING
            assert all(board.get(n) is NOT_SERVING for n in AGGREGATES)
            assert board.get(STARTUP) is SERVING
        finally:
            await monitor.stop()

    run(main)


def test_reload_removing_a_failing_critical_check_restores_readiness_at_once() -> None:
    async def main() -> None:
        board = StatusBoard()
        db, bad = Toggle(healthy=True), Toggle(healthy=False)
        base = make_check("db", kind="python", target=db.call)
        failing = make_check("bad", kind="python", target=bad.call)
        async with HealthMonitor(board, [base, failing]) as monitor:
            await eventually(lambda: board.get(READINESS) is NOT_SERVING and bad.calls > 0, "bad")
            await eventually(lambda: board.get(STARTUP) is SERVING, "startup")
            changes = await monitor.reconfigure([base])
            assert changes.removed == ("bad",)
            # No attempt of any check is needed: the file no longer asks for "bad".
            assert board.get("check.bad") is None
            for name in AGGREGATES:
                assert board.get(name) is SERVING, name

    run(main)


def test_reload_changing_a_check_keeps_its_status_until_its_thresholds_move_it() -> None:
    async def main() -> None:
        board = StatusBoard()
        up, down = ReadinessSeen(board, healthy=True), ReadinessSeen(board, healthy=False)
        before = make_check("db", kind="python", target=up.call)
        monitor = await serving_monitor(board, [before])
        try:
            after = make_check("db", kind="python", target=down.call, failure_threshold=2)
            changes = await monitor.reconfigure([after])
            assert changes.changed == ("db",)
            assert board.get("check.db") is SERVING
            await eventually(lambda: len(down.seen) >= 3, "three attempts on the new target")
            assert down.seen[:3] == [SERVING, SERVING, NOT_SERVING]
            assert board.get("check.db") is NOT_SERVING
        finally:
            await monitor.stop()

    run(main)


def test_reload_before_startup_adds_a_check_that_holds_startup_back() -> None:
    async def main() -> None:
        board = StatusBoard()
        db, new = Toggle(healthy=True), Toggle(healthy=True)
        base = make_check("db", kind="python", target=db.call, initial_delay=60)
        async with HealthMonitor(board, [base]) as monitor:
            assert board.get(STARTUP) is NOT_SERVING
            added = make_check("new", kind="python", target=new.call, initial_delay=60)
            await monitor.reconfigure([base, added])
            assert board.get(STARTUP) is NOT_SERVING
            assert all(board.get(n) is NOT_SERVING for n in AGGREGATES)

    run(main)


# -- lifecycle ----------------------------------------------------------------------


def test_stop_cancels_every_task_and_closes_connections(
    http_upstream: HttpUpstream, grpc_upstream: InProcessServer
) -> None:
    async_check = Toggle(healthy=True)

    async def main() -> None:
        board = StatusBoard()
        with TcpListener() as listener:
            checks = [
                make_check("web", kind="http", target=http_upstream.url("/ok")),
                make_check("orders", kind="grpc", target=grpc_upstream.address),
                make_check("db", kind="tcp", target=listener.address),
                make_check("sync", kind="python", target=check_targets.sync_ok),
                make_check("async", kind="python", target=async_check.call),
            ]
            before = asyncio.all_tasks()
            monitor = HealthMonitor(board, checks)
            await monitor.start()
            try:
                await eventually(
                    lambda: all(s.consecutive_successes >= 3 for s in monitor.states),
                    "every check to pass three times",
                )
                # The HTTP prober keeps its connection between attempts...
                assert http_upstream.open_connections() == 1
            finally:
                await monitor.stop()
            assert asyncio.all_tasks() - before == set()
            # ...and stop() closes it.
            await eventually(lambda: http_upstream.open_connections() == 0, "the HTTP close")

    run(main)


def test_async_context_manager_starts_and_stops() -> None:
    async def main() -> None:
        board = StatusBoard()
        toggle = Toggle(healthy=True)
        before = asyncio.all_tasks()
        async with HealthMonitor(board, [make_check("db", kind="python", target=toggle.call)]):
            assert len(asyncio.all_tasks() - before) == 1
            await eventually(lambda: board.get("check.db") is SERVING, "the check to pass")
        assert asyncio.all_tasks() - before == set()

    run(main)


def test_duplicate_check_names_raise_value_error() -> None:
    checks = [
        make_check("db", kind="tcp", target="127.0.0.1:5432"),
        make_check("cache", kind="tcp", target="127.0.0.1:6379"),
        make_check("db", kind="python", target=check_targets.sync_ok),
    ]
    with pytest.raises(ValueError, match="duplicate check names: db"):
        HealthMonitor(StatusBoard(), checks)


# -- bugs ---------------------------------------------------------------------------


def test_check_raising_cancelled_error_is_a_failure_and_keeps_running() -> None:
    calls = 0

    async def cancelled() -> bool:
        nonlocal calls
        calls += 1
        raise asyncio.CancelledError

    async def main() -> None:
        board = StatusBoard()
        async with HealthMonitor(board, [make_check("db", kind="python", target=cancelled)]) as m:
            state = state_of(m, "db")
            await eventually(lambda: state.consecutive_failures >= 3, "three failures")
            assert calls >= 3
            assert board.get(STARTUP) is SERVING

    run(main)


def test_sync_check_raising_system_exit_is_a_failure() -> None:
    def exits() -> bool:
        raise SystemExit(3)

    async def main() -> None:
        board = StatusBoard()
        async with HealthMonitor(board, [make_check("db", kind="python", target=exits)]) as m:
            state = state_of(m, "db")
            await eventually(lambda: state.consecutive_failures >= 3, "three failed attempts")
            assert state.last_error is not None

    try:
        run(main)
    except SystemExit:
        pytest.fail("SystemExit escaped the event loop")


def test_stop_leaves_no_pending_task_when_a_sync_check_hangs() -> None:
    stuck = Blocking()

    async def main() -> None:
        board = StatusBoard()
        before = asyncio.all_tasks()
        monitor = HealthMonitor(
            board, [make_check("stuck", kind="python", target=stuck, timeout=0.1)]
        )
        await monitor.start()
        try:
            await eventually(lambda: monitor.states[0].consecutive_failures >= 1, "a timeout")
            await monitor.stop()
            assert asyncio.all_tasks() - before == set()
        finally:
            stuck.release.set()

    run(main)


def test_server_exits_after_sigterm_while_a_sync_check_hangs(
    tmp_path: Path, spawn_server: Callable[..., ServerProcess]
) -> None:
    config = tmp_path / "hang.toml"
    config.write_text(
        '[[checks]]\nname = "stuck"\nkind = "python"\n'
        'target = "tests.check_targets:hang_forever"\ntimeout = "100ms"\ninterval = "100ms"\n',
        encoding="utf-8",
    )
    server = spawn_server("--config", str(config), "--drain-seconds", "0", "--grace-seconds", "0")
    deadline = time.monotonic() + STEP
    while "check 'stuck' failed" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.01)
    server.signal(signal.SIGTERM)
    assert server.wait(timeout=STEP) == 0


def test_start_logs_the_initial_statuses_as_initial_and_the_first_verdict_as_a_change(
    caplog: pytest.LogCaptureFixture,
) -> None:
    healthy = Toggle(healthy=True)

    async def main() -> None:
        board = StatusBoard()
        async with HealthMonitor(board, [make_check("db", kind="python", target=healthy.call)]):
            await eventually(lambda: board.get(READINESS) is SERVING, "readiness to follow db")

    with caplog.at_level("INFO", logger="petsage_grpc.status"):
        run(main)
    lines = [r.getMessage() for r in caplog.records if r.name == "petsage_grpc.status"]
    starting = [f"service {name!r}: NOT_SERVING (initial)" for name in ("check.db", *AGGREGATES)]
    assert lines[:5] == [*starting, "service 'startup': NOT_SERVING (initial)"]
    # No start-up state reads as a flap: the only changes are the first verdict's.
    changes = [line for line in lines if "->" in line]
    assert "service 'readiness': NOT_SERVING -> SERVING" in changes
    assert not [line for line in changes if "SERVING -> NOT_SERVING" in line], changes


def test_a_monitor_without_checks_logs_nothing_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with HealthMonitor(StatusBoard(), []):
            pass

    with caplog.at_level("INFO", logger="petsage_grpc.status"):
        run(main)
    assert [r.getMessage() for r in caplog.records if r.name == "petsage_grpc.status"] == []
