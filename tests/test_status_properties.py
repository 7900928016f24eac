"""Property-based tests of the StatusBoard against a model a few lines long.

Hypothesis drives random sequences of set, clear, drain, shutdown and resume. After every
step, ``get()`` and ``snapshot()`` must equal the model, and watchers (one per name, each
reading after every step) must never see the same status twice in a row and must always
have seen the model's status last.

The model: a name reports NOT_SERVING while the board is shut down, or while it drains
and the name is not ``liveness`` or ``startup``; otherwise it reports what was set. A
name that was never set, or was cleared, is unknown (Watch: SERVICE_UNKNOWN).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Final

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from petsage_grpc import (
    LIVENESS,
    OVERALL,
    READINESS,
    SMOKE_TEST_SERVICE,
    STARTUP,
    ServingStatus,
    StatusBoard,
)

STANDARD: Final = (OVERALL, LIVENESS, READINESS, STARTUP, SMOKE_TEST_SERVICE)
NAMES: Final = (*STANDARD, "check.db", "petsage.orders.v1.OrderService")
"""Every name the rules touch: the standard ones, which start SERVING, and two new ones."""
KEPT_WHILE_DRAINING: Final = frozenset({LIVENESS, STARTUP})
SETTABLE: Final = (ServingStatus.UNKNOWN, ServingStatus.SERVING, ServingStatus.NOT_SERVING)
LOOP_SPINS: Final = 12
"""Event loop iterations that let woken watchers run after each step."""

names = st.sampled_from(NAMES)
statuses = st.sampled_from(SETTABLE)


class Model:
    """What the board should report, written as plainly as possible."""

    def __init__(self) -> None:
        self.set: dict[str, ServingStatus] = dict.fromkeys(STANDARD, ServingStatus.SERVING)
        self.draining = False
        self.shut_down = False

    def reported(self, name: str) -> ServingStatus | None:
        if name not in self.set:
            return None
        if self.shut_down or (self.draining and name not in KEPT_WHILE_DRAINING):
            return ServingStatus.NOT_SERVING
        return self.set[name]

    def snapshot(self) -> dict[str, ServingStatus]:
        return {name: status for name in self.set if (status := self.reported(name)) is not None}


class Watcher:
    """``board.watch(name)`` read on a private event loop; records everything it yields."""

    def __init__(self, board: StatusBoard, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self.seen: list[ServingStatus] = []
        self._loop = loop
        self._stream: AsyncIterator[ServingStatus] = aiter(board.watch(name))
        self._next: asyncio.Task[ServingStatus] | None = None

    def ask(self) -> None:
        """Have a read pending (the watcher waits for its next status)."""
        if self._next is None:
            self._next = self._loop.create_task(_next(self._stream))

    def take(self) -> None:
        """Record the pending read's status if it has come."""
        if self._next is not None and self._next.done():
            self.seen.append(self._next.result())
            self._next = None

    def close(self) -> None:
        if self._next is not None:
            self._next.cancel()
            self._loop.run_until_complete(asyncio.gather(self._next, return_exceptions=True))
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            self._loop.run_until_complete(aclose())


async def _next(stream: AsyncIterator[ServingStatus]) -> ServingStatus:
    return await anext(stream)


class StatusBoardMachine(RuleBasedStateMachine):
    """Random operations on a real StatusBoard, checked against Model after each one."""

    def __init__(self) -> None:
        super().__init__()
        self.board = StatusBoard()
        self.model = Model()
        self.loop = asyncio.new_event_loop()
        self.watchers = [Watcher(self.board, name, self.loop) for name in NAMES]
        self._read_watchers()

    # -- rules ----------------------------------------------------------------------

    @rule(name=names, status=statuses)
    def set_status(self, name: str, status: ServingStatus) -> None:
        self.board.set(name, status)
        self.model.set[name] = status

    @rule(name=names)
    def clear(self, name: str) -> None:
        self.board.clear(name)
        self.model.set.pop(name, None)

    @rule()
    def drain(self) -> None:
        self.board.drain()
        self.model.draining = True

    @rule()
    def shutdown(self) -> None:
        self.board.shutdown()
        self.model.shut_down = True

    @precondition(lambda self: self.model.draining or self.model.shut_down)
    @rule()
    def resume(self) -> None:
        self.board.resume()
        self.model.draining = self.model.shut_down = False

    @rule()
    def resume_anyway(self) -> None:
        """resume() while neither draining nor shut down changes nothing."""
        self.board.resume()
        self.model.draining = self.model.shut_down = False

    # -- invariants -----------------------------------------------------------------

    @invariant()
    def get_matches_the_model(self) -> None:
        for name in NAMES:
            assert self.board.get(name) == self.model.reported(name), name

    @invariant()
    def snapshot_matches_the_model(self) -> None:
        assert self.board.snapshot() == self.model.snapshot()
        assert len(self.board) == len(self.model.snapshot())

    @invariant()
    def draining_property_matches_the_model(self) -> None:
        assert self.board.draining == (self.model.draining or self.model.shut_down)

    @invariant()
    def watchers_end_on_the_model_and_never_repeat(self) -> None:
        self._read_watchers()
        for watcher in self.watchers:
            reported = self.model.reported(watcher.name)
            expected = ServingStatus.SERVICE_UNKNOWN if reported is None else reported
            assert watcher.seen, watcher.name
            assert watcher.seen[-1] == expected, (watcher.name, watcher.seen)
            repeats = [
                (a, b) for a, b in zip(watcher.seen, watcher.seen[1:], strict=False) if a == b
            ]
            assert not repeats, (watcher.name, watcher.seen)
        assert self.board.watcher_count == len(self.watchers)

    def _read_watchers(self) -> None:
        """Run the watchers' loop until each has taken what it was given.

        A status change reaches a watcher in a fixed, small number of loop iterations
        (the thread-safe wake-up, the event, the generator's yield); LOOP_SPINS is far more.
        """
        for _ in range(LOOP_SPINS):
            for watcher in self.watchers:
                watcher.ask()
            self.loop.run_until_complete(asyncio.sleep(0))
            for watcher in self.watchers:
                watcher.take()

    def teardown(self) -> None:
        for watcher in self.watchers:
            watcher.close()
        assert self.board.watcher_count == 0
        self.loop.close()


StatusBoardMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,  # a loaded machine must not turn slowness into a failure
    database=None,  # leave nothing behind in the work tree
    suppress_health_check=[HealthCheck.too_slow],
)
TestStatusBoard = StatusBoardMachine.TestCase
