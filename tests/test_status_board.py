"""StatusBoard unit tests, each on a real asyncio event loop (and real threads where it matters)."""

from __future__ import annotations

import asyncio
import gc
import itertools
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import pytest

from petsage_grpc import (
    LIVENESS,
    OVERALL,
    READINESS,
    SMOKE_TEST_SERVICE,
    STARTUP,
    ServingStatus,
    StatusBoard,
)
from petsage_grpc.board._status import HISTORY_LENGTH

T = TypeVar("T")

SERVING = ServingStatus.SERVING
NOT_SERVING = ServingStatus.NOT_SERVING
UNKNOWN = ServingStatus.UNKNOWN
SERVICE_UNKNOWN = ServingStatus.SERVICE_UNKNOWN

DEFAULT_NAMES = {OVERALL, LIVENESS, READINESS, STARTUP, SMOKE_TEST_SERVICE}
# Names that drain() leaves alone, so that probes gating restarts keep passing.
KEPT_WHILE_DRAINING = {LIVENESS, STARTUP}
STEP_TIMEOUT = 30.0
"""Bound on waiting for something asynchronous (generous: the machine is shared)."""


def draining(board: StatusBoard) -> bool:
    """board.draining, read through a call so that mypy does not narrow it between steps."""
    return board.draining


def run(coro: Coroutine[Any, Any, T], timeout: float = 3 * STEP_TIMEOUT) -> T:
    """Run *coro* on a fresh event loop, failing instead of hanging after *timeout* seconds."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def next_status(watch: AsyncIterator[ServingStatus]) -> ServingStatus:
    """The next status from *watch*, within a bounded time."""
    return await asyncio.wait_for(anext(watch), STEP_TIMEOUT)


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Let the loop run until *predicate* holds (bounded); the assertion is on the predicate."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STEP_TIMEOUT
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


async def expect_end(watch: AsyncIterator[ServingStatus]) -> None:
    """*watch* must end (StopAsyncIteration) rather than yield or hang."""
    with pytest.raises(StopAsyncIteration):
        await next_status(watch)


# -- names, set, clear, get, snapshot ---------------------------------------------


def test_default_names_all_serving() -> None:
    board = StatusBoard()
    assert board.snapshot() == dict.fromkeys(DEFAULT_NAMES, SERVING)
    assert len(board) == len(DEFAULT_NAMES) == 5
    assert OVERALL == ""
    assert SMOKE_TEST_SERVICE == "petsage.v1.SmokeTestService"
    assert not draining(board)
    assert board.watcher_count == 0


def test_initial_overrides_and_extends_defaults() -> None:
    board = StatusBoard({READINESS: NOT_SERVING, "petsage.v1.Extra": SERVING})
    assert board.get(READINESS) is NOT_SERVING
    assert board.get("petsage.v1.Extra") is SERVING
    assert board.get(LIVENESS) is SERVING
    assert len(board) == len(DEFAULT_NAMES) + 1


def test_set_get_clear_snapshot() -> None:
    board = StatusBoard()
    assert board.get("petsage.v1.Orders") is None
    board.set("petsage.v1.Orders", NOT_SERVING)
    assert board.get("petsage.v1.Orders") is NOT_SERVING
    board.set("petsage.v1.Orders", SERVING)
    assert board.get("petsage.v1.Orders") is SERVING
    board.set(READINESS, UNKNOWN)
    assert board.get(READINESS) is UNKNOWN

    snapshot = board.snapshot()
    assert snapshot == {**dict.fromkeys(DEFAULT_NAMES, SERVING), READINESS: UNKNOWN,
                        "petsage.v1.Orders": SERVING}  # fmt: skip
    # A snapshot is a copy: later changes do not show up in it, nor it in the board.
    snapshot["injected"] = SERVING
    board.set("petsage.v1.Orders", NOT_SERVING)
    assert snapshot["petsage.v1.Orders"] is SERVING
    assert board.get("injected") is None

    board.clear("petsage.v1.Orders")
    assert board.get("petsage.v1.Orders") is None
    assert "petsage.v1.Orders" not in board.snapshot()
    board.clear("petsage.v1.Orders")  # clearing an unknown name is a no-op
    board.clear("never-known")
    assert len(board) == len(DEFAULT_NAMES)


def test_set_accepts_plain_ints_as_statuses() -> None:
    board = StatusBoard()
    board.set("x", 2)  # type: ignore[arg-type]  # callers outside typed code pass ints
    assert board.get("x") is NOT_SERVING


@pytest.mark.parametrize("status", [SERVICE_UNKNOWN, 3])
def test_set_refuses_service_unknown(status: int) -> None:
    board = StatusBoard()
    with pytest.raises(ValueError, match="SERVICE_UNKNOWN"):
        board.set(READINESS, status)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="SERVICE_UNKNOWN"):
        board.set("brand-new", status)  # type: ignore[arg-type]
    assert board.get(READINESS) is SERVING
    assert board.get("brand-new") is None


def test_set_refuses_values_outside_the_enum() -> None:
    board = StatusBoard()
    with pytest.raises(ValueError, match="42"):
        board.set(READINESS, 42)  # type: ignore[arg-type]
    assert board.get(READINESS) is SERVING


def test_initial_refuses_service_unknown() -> None:
    with pytest.raises(ValueError, match="SERVICE_UNKNOWN"):
        StatusBoard({"petsage.v1.Orders": SERVICE_UNKNOWN})


# -- drain, shutdown, resume --------------------------------------------------------


def test_drain_keeps_only_liveness_and_resume_restores() -> None:
    board = StatusBoard()
    board.set("petsage.v1.Orders", SERVING)
    board.set("petsage.v1.Broken", NOT_SERVING)
    board.drain()
    assert draining(board)
    assert board.snapshot() == {
        OVERALL: NOT_SERVING,
        LIVENESS: SERVING,
        READINESS: NOT_SERVING,
        STARTUP: SERVING,
        SMOKE_TEST_SERVICE: NOT_SERVING,
        "petsage.v1.Orders": NOT_SERVING,
        "petsage.v1.Broken": NOT_SERVING,
    }
    board.drain()  # idempotent
    assert {n for n, s in board.snapshot().items() if s is SERVING} == KEPT_WHILE_DRAINING

    board.resume()
    assert not draining(board)
    assert board.snapshot() == {
        **dict.fromkeys(DEFAULT_NAMES, SERVING),
        "petsage.v1.Orders": SERVING,
        "petsage.v1.Broken": NOT_SERVING,
    }


def test_sets_while_draining_are_remembered_and_reported_after_resume() -> None:
    board = StatusBoard()
    board.drain()
    board.set(READINESS, NOT_SERVING)
    board.set("petsage.v1.New", SERVING)
    board.set(OVERALL, UNKNOWN)
    board.clear(SMOKE_TEST_SERVICE)
    # Still reported as draining...
    assert board.get("petsage.v1.New") is NOT_SERVING
    assert board.get(OVERALL) is NOT_SERVING
    assert board.get(SMOKE_TEST_SERVICE) is None
    # ...but liveness reports what is set, even while draining.
    board.set(LIVENESS, NOT_SERVING)
    assert board.get(LIVENESS) is NOT_SERVING
    board.set(LIVENESS, SERVING)

    board.resume()
    assert board.snapshot() == {
        OVERALL: UNKNOWN,
        LIVENESS: SERVING,
        READINESS: NOT_SERVING,
        STARTUP: SERVING,
        "petsage.v1.New": SERVING,
    }


def test_shutdown_is_terminal_until_resume() -> None:
    board = StatusBoard()
    board.shutdown()
    assert draining(board)
    assert board.snapshot() == dict.fromkeys(DEFAULT_NAMES, NOT_SERVING)
    board.set(LIVENESS, SERVING)
    board.set(STARTUP, SERVING)
    board.set(READINESS, SERVING)
    board.set("petsage.v1.New", SERVING)
    board.drain()  # entering drain does not undo shutdown
    assert set(board.snapshot().values()) == {NOT_SERVING}
    assert board.get(LIVENESS) is NOT_SERVING
    assert board.get(STARTUP) is NOT_SERVING

    board.resume()
    assert not draining(board)
    assert board.snapshot() == {**dict.fromkeys(DEFAULT_NAMES, SERVING), "petsage.v1.New": SERVING}


def test_resume_without_drain_changes_nothing() -> None:
    board = StatusBoard()
    board.set(READINESS, NOT_SERVING)
    before = board.snapshot()
    board.resume()
    assert board.snapshot() == before


# -- watch --------------------------------------------------------------------------


def test_watch_current_then_only_changes_never_a_repeat() -> None:
    async def scenario() -> None:
        board = StatusBoard()
        watch = board.watch(READINESS)
        assert await next_status(watch) is SERVING
        assert board.watcher_count == 1

        board.set(READINESS, SERVING)  # no change: nothing to send
        board.set(READINESS, NOT_SERVING)
        assert await next_status(watch) is NOT_SERVING  # not a second SERVING

        board.set(READINESS, NOT_SERVING)  # again no change
        board.set("petsage.v1.Other", SERVING)  # other names do not reach this watcher
        board.set(READINESS, UNKNOWN)
        assert await next_status(watch) is UNKNOWN

        board.drain()
        assert await next_status(watch) is NOT_SERVING
        board.set(READINESS, SERVING)  # remembered, still reported NOT_SERVING: no message
        board.resume()
        assert await next_status(watch) is SERVING

        board.close_watches()
        await expect_end(watch)
        assert board.watcher_count == 0

    run(scenario())


@pytest.mark.parametrize("name", sorted(KEPT_WHILE_DRAINING))
def test_watch_of_a_name_kept_while_draining_is_quiet_through_drain(name: str) -> None:
    async def scenario() -> None:
        board = StatusBoard()
        watch = board.watch(name)
        assert await next_status(watch) is SERVING
        board.drain()
        board.resume()
        board.shutdown()
        assert await next_status(watch) is NOT_SERVING  # drain did not touch it
        board.resume()
        assert await next_status(watch) is SERVING
        board.close_watches()
        await expect_end(watch)

    run(scenario())


def test_watch_slow_reader_gets_the_latest_not_a_backlog() -> None:
    async def scenario() -> None:
        board = StatusBoard()
        watch = board.watch(READINESS)
        assert await next_status(watch) is SERVING
        for _ in range(1000):  # the reader does not read while these happen
            board.set(READINESS, NOT_SERVING)
            board.set(READINESS, SERVING)
        board.set(READINESS, NOT_SERVING)
        assert await next_status(watch) is NOT_SERVING  # the latest, straight away
        board.set(READINESS, UNKNOWN)
        # Had a backlog been queued, an intermediate SERVING would come first.
        assert await next_status(watch) is UNKNOWN

        # Flips that end where the reader already is produce nothing at all.
        for _ in range(100):
            board.set(READINESS, SERVING)
            board.set(READINESS, UNKNOWN)
        board.set(READINESS, NOT_SERVING)
        assert await next_status(watch) is NOT_SERVING
        board.close_watches()
        await expect_end(watch)

    run(scenario())


def test_watch_unknown_name_then_known_then_cleared() -> None:
    async def scenario() -> None:
        board = StatusBoard()
        watch = board.watch("petsage.v1.Later")
        assert await next_status(watch) is SERVICE_UNKNOWN
        assert board.watcher_count == 1  # the watch stays open

        board.set("petsage.v1.Later", NOT_SERVING)
        assert await next_status(watch) is NOT_SERVING
        board.set("petsage.v1.Later", SERVING)
        assert await next_status(watch) is SERVING
        board.clear("petsage.v1.Later")
        assert await next_status(watch) is SERVICE_UNKNOWN
        board.set("petsage.v1.Later", SERVING)
        assert await next_status(watch) is SERVING

        board.close_watches()
        await expect_end(watch)

    run(scenario())


def test_watch_registers_on_first_read_and_sees_the_status_then() -> None:
    async def scenario() -> None:
        board = StatusBoard()
        watch = board.watch(READINESS)
        board.set(READINESS, NOT_SERVING)
        assert await next_status(watch) is NOT_SERVING
        board.close_watches()
        await expect_end(watch)

    run(scenario())


async def _collect(watch: AsyncIterator[ServingStatus], seen: list[ServingStatus]) -> None:
    async for status in watch:
        seen.append(status)


def test_two_watchers_one_breaks_out_the_other_keeps_getting_updates() -> None:
    async def scenario() -> None:
        board = StatusBoard()
        stay: list[ServingStatus] = []
        staying = asyncio.create_task(_collect(board.watch(READINESS), stay))

        async def leave_after_first() -> ServingStatus:
            async for status in board.watch(READINESS):
                return status  # breaks out of the watch
            raise AssertionError("watch ended without a status")

        leaving = asyncio.create_task(leave_after_first())
        assert await asyncio.wait_for(leaving, STEP_TIMEOUT) is SERVING
        await wait_until(lambda: stay == [SERVING], "the staying watcher's first status")
        # The abandoned generator is closed by the loop's async-generator finaliser.
        await wait_until(lambda: board.watcher_count == 1, "the leaving watcher to unsubscribe")

        board.set(READINESS, NOT_SERVING)
        await wait_until(lambda: stay == [SERVING, NOT_SERVING], "the update after one left")
        board.set(READINESS, SERVING)
        await wait_until(lambda: stay == [SERVING, NOT_SERVING, SERVING], "a second update")

        board.close_watches()
        await asyncio.wait_for(staying, STEP_TIMEOUT)
        assert board.watcher_count == 0

    run(scenario())


def test_two_watchers_one_cancelled_the_other_keeps_getting_updates() -> None:
    async def scenario() -> None:
        board = StatusBoard()
        first: list[ServingStatus] = []
        second: list[ServingStatus] = []
        cancelled = asyncio.create_task(_collect(board.watch(READINESS), first))
        staying = asyncio.create_task(_collect(board.watch(READINESS), second))
        await wait_until(lambda: first == second == [SERVING], "both first statuses")
        assert board.watcher_count == 2

        board.set(READINESS, NOT_SERVING)
        await wait_until(lambda: first == second == [SERVING, NOT_SERVING], "both updates")

        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert board.watcher_count == 1  # the finally ran when the task was cancelled

        board.set(READINESS, SERVING)
        board.set("petsage.v1.Other", NOT_SERVING)
        await wait_until(lambda: second == [SERVING, NOT_SERVING, SERVING], "the update after")
        assert first == [SERVING, NOT_SERVING]

        # An explicit aclose() unsubscribes at once as well.
        watch = board.watch(READINESS)
        assert await next_status(watch) is SERVING
        assert board.watcher_count == 2
        assert isinstance(watch, AsyncGenerator)
        await watch.aclose()
        assert board.watcher_count == 1

        staying.cancel()
        with pytest.raises(asyncio.CancelledError):
            await staying
        assert board.watcher_count == 0

    run(scenario())


def test_close_watches_ends_every_watch_and_refuses_new_ones_until_resume() -> None:
    async def scenario() -> None:
        board = StatusBoard()
        watches = [board.watch(name) for name in (READINESS, READINESS, LIVENESS, "unknown")]
        for watch in watches:
            assert await next_status(watch) in {SERVING, SERVICE_UNKNOWN}
        assert board.watcher_count == 4

        board.close_watches()
        for watch in watches:
            await expect_end(watch)
        assert board.watcher_count == 0

        refused = board.watch(READINESS)
        await expect_end(refused)  # ends at once, without a status
        assert board.watcher_count == 0
        board.close_watches()  # idempotent, with nothing to end

        board.resume()
        again = board.watch(READINESS)
        assert await next_status(again) is SERVING
        board.set(READINESS, NOT_SERVING)
        assert await next_status(again) is NOT_SERVING
        board.close_watches()
        await expect_end(again)

    run(scenario())


def test_close_watches_ends_a_watch_that_is_waiting() -> None:
    async def scenario() -> None:
        board = StatusBoard()
        seen: list[ServingStatus] = []
        task = asyncio.create_task(_collect(board.watch(READINESS), seen))
        await wait_until(lambda: seen == [SERVING], "the first status")
        board.close_watches()
        await asyncio.wait_for(task, STEP_TIMEOUT)  # ended normally, no exception
        assert seen == [SERVING]
        assert board.watcher_count == 0

    run(scenario())


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda b: b.set(READINESS, NOT_SERVING), id="set"),
        pytest.param(lambda b: b.clear(READINESS), id="clear"),
        pytest.param(lambda b: b.drain(), id="drain"),
    ],
)
def test_close_watches_is_not_undone_by_a_later_change(
    change: Callable[[StatusBoard], None],
) -> None:
    async def scenario() -> None:
        board = StatusBoard()
        watch = board.watch(READINESS)
        assert await next_status(watch) is SERVING
        board.close_watches()
        change(board)  # e.g. a dependency check on another thread, before the watcher runs
        await expect_end(watch)

    run(scenario())


def test_watchers_on_two_loops_are_each_woken_on_their_own_loop() -> None:
    board = StatusBoard()
    results: dict[str, list[ServingStatus]] = {"a": [], "b": []}
    started = threading.Barrier(3, timeout=STEP_TIMEOUT)
    changed = threading.Barrier(3, timeout=STEP_TIMEOUT)
    errors: list[BaseException] = []

    def watch_on_own_loop(name: str) -> None:
        async def body() -> None:
            seen = results[name]
            watch = board.watch(READINESS)
            seen.append(await next_status(watch))
            await asyncio.to_thread(started.wait)
            seen.append(await next_status(watch))
            await asyncio.to_thread(changed.wait)
            await expect_end(watch)

        try:
            run(body())
        except BaseException as error:  # noqa: BLE001 - reported on the test thread
            errors.append(error)
            started.abort()
            changed.abort()

    threads = [threading.Thread(target=watch_on_own_loop, args=(n,)) for n in results]
    for thread in threads:
        thread.start()
    try:
        started.wait()  # both loops have their first status
        board.set(READINESS, NOT_SERVING)  # from a third thread, with no loop of its own
        changed.wait()  # both loops saw the change
        board.close_watches()
    finally:
        for thread in threads:
            thread.join(STEP_TIMEOUT * 3)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors
    assert results == {"a": [SERVING, NOT_SERVING], "b": [SERVING, NOT_SERVING]}
    assert board.watcher_count == 0


def test_concurrent_sets_from_many_threads_while_watchers_observe() -> None:
    writers = 8
    rounds = 400
    shared = "petsage.v1.Contended"
    owned = [f"petsage.v1.Owned{i}" for i in range(writers)]
    # Each writer ends its own name on a status chosen per writer, so the end state is known.
    final_owned = {name: (SERVING if i % 2 else NOT_SERVING) for i, name in enumerate(owned)}

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        loop_errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
        board = StatusBoard({shared: SERVING, **dict.fromkeys(owned, UNKNOWN)})

        watched = [shared, shared, shared, *owned]
        seen: list[list[ServingStatus]] = [[] for _ in watched]
        tasks = [
            asyncio.create_task(_collect(board.watch(name), log))
            for name, log in zip(watched, seen, strict=True)
        ]
        await wait_until(lambda: all(seen), "every watcher's first status")

        thread_errors: list[BaseException] = []
        start = threading.Barrier(writers, timeout=STEP_TIMEOUT)

        def writer(index: int) -> None:
            try:
                start.wait()
                mine = owned[index]
                for i in range(rounds):
                    flip = SERVING if (i + index) % 2 else NOT_SERVING
                    board.set(shared, flip)
                    board.set(mine, flip)
                    if i % 50 == 0:
                        board.set(f"petsage.v1.Scratch{index}", flip)
                        board.clear(f"petsage.v1.Scratch{index}")
                board.set(mine, final_owned[mine])
            except BaseException as error:  # noqa: BLE001 - reported on the loop
                thread_errors.append(error)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
        for thread in threads:
            thread.start()

        async def join_all() -> None:
            for thread in threads:
                await asyncio.to_thread(thread.join, STEP_TIMEOUT * 4)

        await asyncio.wait_for(join_all(), STEP_TIMEOUT * 5)
        assert not any(thread.is_alive() for thread in threads)
        assert not thread_errors

        final_shared = board.get(shared)
        assert final_shared in {SERVING, NOT_SERVING}
        snapshot = board.snapshot()
        assert snapshot == {
            **dict.fromkeys(DEFAULT_NAMES, SERVING),
            shared: final_shared,
            **final_owned,
        }
        expected = [final_shared, final_shared, final_shared, *final_owned.values()]
        # Every watcher converges on the board's final status...
        await wait_until(
            lambda: [log[-1] for log in seen] == expected, "watchers to reach the final status"
        )
        board.close_watches()
        await asyncio.wait_for(asyncio.gather(*tasks), STEP_TIMEOUT)
        for log in seen:
            # ...and never saw the same status twice in a row.
            assert all(a is not b for a, b in itertools.pairwise(log)), log
        assert board.watcher_count == 0
        assert not loop_errors

    run(scenario(), timeout=60)


def test_a_set_from_another_task_wakes_a_waiting_watcher() -> None:
    async def scenario() -> None:
        board = StatusBoard()
        watch = board.watch(READINESS)
        assert await next_status(watch) is SERVING

        async def set_later() -> None:
            await asyncio.sleep(0)
            board.set(READINESS, NOT_SERVING)

        setter = asyncio.create_task(set_later())
        assert await next_status(watch) is NOT_SERVING
        await setter
        board.close_watches()
        await expect_end(watch)

    run(scenario())


# -- subscribe: watch() without the generator, as the Watch handler uses it -------


def test_subscribe_next_returns_each_change_then_none_when_watches_close() -> None:
    async def scenario() -> None:
        board = StatusBoard()
        watcher = board.subscribe(READINESS)
        assert watcher is not None
        assert board.watcher_count == 1
        first = await asyncio.wait_for(watcher.next(None), STEP_TIMEOUT)
        assert first is SERVING
        waiting = asyncio.create_task(watcher.next(first))
        await asyncio.sleep(0)
        assert not waiting.done(), "next() returned without a change"
        board.set(READINESS, NOT_SERVING)
        assert await asyncio.wait_for(waiting, STEP_TIMEOUT) is NOT_SERVING
        board.close_watches()
        assert await asyncio.wait_for(watcher.next(NOT_SERVING), STEP_TIMEOUT) is None
        board.unsubscribe(READINESS, watcher)
        assert board.watcher_count == 0
        assert board.subscribe(READINESS) is None, "subscribed after close_watches()"

    run(scenario())


def test_a_cancelled_next_leaves_the_watcher_usable() -> None:
    async def scenario() -> None:
        board = StatusBoard()
        watcher = board.subscribe(LIVENESS)
        assert watcher is not None
        waiting = asyncio.create_task(watcher.next(SERVING))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        board.set(LIVENESS, NOT_SERVING)
        assert await asyncio.wait_for(watcher.next(SERVING), STEP_TIMEOUT) is NOT_SERVING
        board.unsubscribe(LIVENESS, watcher)
        board.unsubscribe(LIVENESS, watcher)  # a second time is harmless
        assert board.watcher_count == 0

    run(scenario())


# -- garbage collection during a large wake -------------------------------------


async def _waiting_streams(
    board: StatusBoard, count: int, thresholds: list[tuple[int, int, int]]
) -> list[asyncio.Task[ServingStatus | None]]:
    """*count* tasks waiting on READINESS as Watch handlers do, noting gc thresholds on waking."""

    async def stream() -> ServingStatus | None:
        watcher = board.subscribe(READINESS)
        assert watcher is not None
        try:
            status = await watcher.next(SERVING)
            thresholds.append(gc.get_threshold())
            return status
        finally:
            board.unsubscribe(READINESS, watcher)

    tasks = [asyncio.create_task(stream()) for _ in range(count)]
    await wait_until(lambda: board.watcher_count == count, "every stream to subscribe")
    await asyncio.sleep(0)  # and to wait on its watcher
    return tasks


@pytest.mark.parametrize(("count", "deferred"), [(10, False), (1_000, True)])
def test_a_large_wake_runs_the_woken_streams_with_full_collections_deferred(
    count: int, deferred: bool
) -> None:
    async def scenario() -> None:
        board = StatusBoard()
        before = gc.get_threshold()
        when_woken: list[tuple[int, int, int]] = []
        tasks = await _waiting_streams(board, count, when_woken)
        board.set(READINESS, NOT_SERVING)
        results = await asyncio.wait_for(asyncio.gather(*tasks), STEP_TIMEOUT)
        assert results == [NOT_SERVING] * count
        assert len(when_woken) == count
        for young, middle, oldest in when_woken:
            # Young collections go on as usual; a full one waits (or, few, is not held).
            assert (young, middle) == before[:2]
            assert (oldest > 1_000_000) is deferred
        assert gc.get_threshold() == before, "the thresholds were not restored"
        assert gc.isenabled()

    run(scenario())


def test_a_large_wake_restores_the_applications_thresholds_and_disabled_collector() -> None:
    async def scenario() -> None:
        board = StatusBoard()
        tasks = await _waiting_streams(board, 1_000, [])
        gc.set_threshold(500, 5, 7)
        gc.disable()
        board.set(READINESS, NOT_SERVING)
        board.set(READINESS, UNKNOWN)  # a second burst in the same iteration
        await asyncio.wait_for(asyncio.gather(*tasks), STEP_TIMEOUT)
        for _ in range(3):
            await asyncio.sleep(0)
        assert gc.get_threshold() == (500, 5, 7)
        assert not gc.isenabled(), "the board enabled a collector the application disabled"

    original = gc.get_threshold()
    try:
        run(scenario())
    finally:
        gc.set_threshold(*original)
        gc.enable()


# --- transition history ---------------------------------------------------------------


def test_history_records_reported_changes_with_times_and_is_bounded() -> None:
    before = time.time()
    board = StatusBoard()
    (registered,) = board.history(READINESS)
    assert registered.status is ServingStatus.SERVING
    assert before <= registered.at <= time.time()
    board.set("db", ServingStatus.NOT_SERVING)
    board.set("db", ServingStatus.NOT_SERVING)  # no change, no entry
    board.set("db", ServingStatus.SERVING)
    assert [t.status for t in board.history("db")] == [
        ServingStatus.NOT_SERVING,
        ServingStatus.SERVING,
    ]
    board.drain()  # what is reported changes, so the history shows it
    assert board.history("db")[-1].status is ServingStatus.NOT_SERVING
    board.resume()
    for flip in range(HISTORY_LENGTH * 2):
        board.set("db", ServingStatus.SERVING if flip % 2 else ServingStatus.NOT_SERVING)
    history = board.history("db")
    assert len(history) == HISTORY_LENGTH
    assert history[-1].status is ServingStatus.SERVING
    assert all(a.at <= b.at for a, b in itertools.pairwise(history))
    board.clear("db")
    assert board.history("db") == ()
    assert board.history("never-set") == ()


# -- shedding load and thread watchers ---------------------------------------------------


def test_shed_load_reports_readiness_and_overall_only_and_remembers_sets() -> None:
    board = StatusBoard({"check.db": SERVING, "petsage.v1.Orders": SERVING})
    board.shed_load(True)
    assert board.shedding
    assert board.get(READINESS) is NOT_SERVING
    assert board.get(OVERALL) is NOT_SERVING
    for name in (LIVENESS, STARTUP, SMOKE_TEST_SERVICE, "check.db", "petsage.v1.Orders"):
        assert board.get(name) is SERVING, name
    board.set(READINESS, NOT_SERVING)  # e.g. a check failed meanwhile
    board.shed_load(False)
    assert board.get(READINESS) is NOT_SERVING
    assert board.get(OVERALL) is SERVING


def test_shed_load_and_drain_are_independent() -> None:
    board = StatusBoard()
    board.shed_load(True)
    board.drain()
    board.shed_load(False)
    assert board.get(READINESS) is NOT_SERVING  # still draining
    board.shed_load(True)
    board.resume()
    assert board.get(READINESS) is NOT_SERVING  # still shedding
    board.shed_load(False)
    assert board.get(READINESS) is SERVING


def test_thread_watcher_sees_changes_made_on_another_thread_and_stops() -> None:
    board = StatusBoard()
    watcher = board.subscribe_thread(READINESS)
    assert watcher is not None
    seen: list[ServingStatus | None] = []

    def follow() -> None:
        status: ServingStatus | None = None
        while (status := watcher.next(status)) is not None:
            seen.append(status)
        seen.append(None)

    reader = threading.Thread(target=follow)
    reader.start()

    async def writer() -> None:  # a change made on an event loop's thread
        board.set(READINESS, NOT_SERVING)

    run(writer())
    for _ in range(500):  # bounded wait for the reader to see it
        if len(seen) >= 2:
            break
        threading.Event().wait(0.01)
    watcher.stop()
    reader.join(STEP_TIMEOUT)
    board.unsubscribe(READINESS, watcher)
    assert seen == [SERVING, NOT_SERVING, None]
    assert board.watcher_count == 0


# --- initial statuses -------------------------------------------------------------------


def test_an_initial_status_is_logged_as_where_the_name_starts_not_as_a_change(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        board = StatusBoard()
        watch = board.watch(READINESS)
        assert await next_status(watch) is SERVING
        with caplog.at_level("INFO", logger="petsage_grpc.status"):
            board.set(READINESS, NOT_SERVING, initial=True)
            # Watchers hear what is reported, initial or not.
            assert await next_status(watch) is NOT_SERVING
            board.set("check.db", NOT_SERVING, initial=True)  # a new name
            board.set(LIVENESS, SERVING, initial=True)  # the same status: still stated
            board.set(READINESS, SERVING)  # then a real change
            assert await next_status(watch) is SERVING
        # The history starts again from the initial status.
        assert [t.status for t in board.history(READINESS)] == [NOT_SERVING, SERVING]
        assert [t.status for t in board.history(LIVENESS)] == [SERVING]
        assert isinstance(watch, AsyncGenerator)
        await watch.aclose()

    run(scenario())
    records = [r for r in caplog.records if r.name == "petsage_grpc.status"]
    assert [r.getMessage() for r in records] == [
        "service 'readiness': NOT_SERVING (initial)",
        "service 'check.db': NOT_SERVING (initial)",
        "service 'liveness': SERVING (initial)",
        "service 'readiness': NOT_SERVING -> SERVING",
    ]
    fields = [
        {k: getattr(r, k) for k in ("event", "service", "status", "previous") if hasattr(r, k)}
        for r in records
    ]
    assert fields[0] == {"event": "initial_status", "service": READINESS, "status": "NOT_SERVING"}
    assert fields[-1] == {
        "event": "status_change",
        "service": READINESS,
        "status": "SERVING",
        "previous": "NOT_SERVING",
    }


def test_an_initial_status_while_draining_is_remembered_and_logged_as_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    board = StatusBoard()
    board.drain()
    with caplog.at_level("INFO", logger="petsage_grpc.status"):
        board.set(READINESS, SERVING, initial=True)
    assert board.get(READINESS) is NOT_SERVING
    assert [r.getMessage() for r in caplog.records] == [
        "service 'readiness': NOT_SERVING (initial)"
    ]
    board.resume()
    assert board.get(READINESS) is SERVING
