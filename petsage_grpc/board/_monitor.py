"""Runs the dependency checks on the event loop and keeps the status board truthful.

Each check is one task: attempt, judge, sleep, repeat. Nothing here is on the path of
an RPC: Check, Watch, List and SmokeTest read the board, which this writes.

Aggregation:
    - ``check.<name>`` follows its check's thresholds;
    - ``readiness``, ``""`` and ``petsage.v1.SmokeTestService`` are SERVING while every
      critical check that has a verdict is (see reconfigure for checks a reload adds);
    - ``startup`` is SERVING once every critical check has finished its first attempt
      (at most ``initial_delay + timeout`` after start, since every attempt is bounded),
      and stays SERVING, whatever a reload adds;
    - ``liveness`` is never touched: an outage of a dependency must not restart pods.

Reloads (:meth:`HealthMonitor.reconfigure`) never move a name that still exists:
    - an added check's own name starts NOT_SERVING, as every check does at start-up (only
      SERVING passes any probe, and a check nobody has run yet is not known to serve); it
      joins the aggregates only at its first verdict: SERVING after ``success_threshold``
      passes, or NOT_SERVING after ``failure_threshold`` failures, the same count that
      would take a serving check out. Until then a pod in service stays in service. A
      check added before ``startup`` is SERVING counts at once, like the others then;
    - a changed check keeps its status and its verdict (under its new ``critical``) until
      its own thresholds change them;
    - a removed check's name is cleared, and the aggregates are recomputed at once: a
      failing critical check that the file no longer lists no longer holds readiness down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from petsage_grpc.board._check import Check
from petsage_grpc.board._dependencies import Prober, make_prober
from petsage_grpc.board._status import (
    OVERALL,
    READINESS,
    SMOKE_TEST_SERVICE,
    STARTUP,
    ServingStatus,
    StatusBoard,
)

__all__ = ["Changes", "CheckState", "HealthMonitor"]

_log = logging.getLogger("petsage_grpc.checks")
_JITTER: Final = 0.1
"""Each wait is the interval ± 10 %, so that pods started together do not check in step."""
_AGGREGATES: Final = (READINESS, OVERALL, SMOKE_TEST_SERVICE)
_MAX_ERROR_TEXT: Final = 300


@dataclass(frozen=True)
class Changes:
    """What :meth:`HealthMonitor.reconfigure` did, by check name."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def __str__(self) -> str:
        parts = [
            f"{verb} {', '.join(names)}"
            for verb, names in (
                ("added", self.added),
                ("removed", self.removed),
                ("changed", self.changed),
            )
            if names
        ]
        return "; ".join(parts) or "no check changed"


def _unique(checks: Iterable[Check]) -> list[Check]:
    checks = list(checks)
    names = [check.name for check in checks]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate check names: {', '.join(duplicates)}")
    return checks


@dataclass
class CheckState:
    """What the monitor knows about one check (read by metrics)."""

    check: Check
    serving: bool = False
    completed_first_attempt: bool = False
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    last_duration: float | None = None
    last_success_time: float | None = None
    """Wall-clock time (seconds since the epoch) of the last passing attempt."""
    last_error: str | None = None
    has_verdict: bool = True
    """Whether the aggregates count this check. False only for a check that a reload added
    after start-up, until its first verdict (see the module's docstring)."""
    flips: int = 0
    """How often the check's status has changed (SERVING to NOT_SERVING or back)."""


class HealthMonitor:
    """Schedules dependency checks and writes their results to a status board.

    Use it as an async context manager around the server's lifetime, or call
    :meth:`start` and :meth:`stop`. Starting it makes the aggregate names follow the
    critical checks (so set them through checks, not by hand, while it runs).

    Raises:
        ValueError: two checks share a name, or a ``python`` target cannot be imported.
        MissingExtraError: an ``ImportError`` naming the extra to install, for a check
            whose kind needs one that is missing (``postgres``, ``redis``, ``http``).
    """

    def __init__(self, board: StatusBoard, checks: Iterable[Check]) -> None:
        self._board = board
        checks = _unique(checks)
        self._states = {check.name: CheckState(check) for check in checks}
        self._probers: dict[str, Prober] = {check.name: make_prober(check) for check in checks}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._running = False
        self._started = False

    @property
    def states(self) -> Sequence[CheckState]:
        """Each check's current state, in configuration order."""
        return tuple(self._states.values())

    async def start(self) -> None:
        """Register every check as NOT_SERVING, derive the aggregates, start checking.

        With checks, the statuses this sets are logged as initial (``service
        'readiness': NOT_SERVING (initial)``), not as changes from the board's defaults:
        they are where start-up begins, not a flap.
        """
        initial = bool(self._states)
        for state in self._states.values():
            self._board.set(state.check.service_name, ServingStatus.NOT_SERVING, initial=True)
        self._update_aggregates(initial=initial)
        self._running = True
        for name in self._states:
            self._start_task(name)

    def _start_task(self, name: str) -> None:
        self._tasks[name] = asyncio.create_task(self._run(self._states[name]), name=f"check {name}")

    async def _stop_check(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        prober = self._probers.pop(name, None)
        if prober is not None:
            with contextlib.suppress(Exception):
                await prober.aclose()

    async def stop(self) -> None:
        """Stop checking and close every dependency connection."""
        self._running = False
        for name in list(self._states):
            await self._stop_check(name)

    async def reconfigure(self, checks: Iterable[Check]) -> Changes:
        """Replace the checks, keeping what did not change.

        An unchanged check keeps running undisturbed. A changed one restarts with its new
        settings but keeps its reported status and verdict until its thresholds change
        them. A removed one stops, and its name is cleared from the board (watchers see
        SERVICE_UNKNOWN); the aggregates no longer count it. An added one starts
        NOT_SERVING and, once the server has started, leaves the aggregates as they are
        until its first verdict, so that a reload never takes a serving pod out.

        Raises:
            ValueError: duplicate names, or a ``python`` target cannot be imported; then
                nothing has changed.
            MissingExtraError: a check's kind needs an extra that is missing; then
                nothing has changed.
        """
        wanted = {check.name: check for check in _unique(checks)}
        changes = Changes(
            added=tuple(n for n in wanted if n not in self._states),
            removed=tuple(n for n in self._states if n not in wanted),
            changed=tuple(
                n for n, c in wanted.items() if n in self._states and self._states[n].check != c
            ),
        )
        # Build every new prober first, so that a failure leaves everything as it was.
        probers = {name: make_prober(wanted[name]) for name in (*changes.added, *changes.changed)}
        for name in (*changes.removed, *changes.changed):
            await self._stop_check(name)
        for name in changes.removed:
            self._board.clear(self._states.pop(name).check.service_name)
        for name in changes.changed:
            state = self._states[name]
            self._states[name] = CheckState(
                wanted[name],
                serving=state.serving,
                completed_first_attempt=state.completed_first_attempt,
                has_verdict=state.has_verdict,
                flips=state.flips,  # a counter for Prometheus: it must not go back
            )
        for name in changes.added:
            # Before start-up has finished, a new check holds startup and readiness back
            # like every other; after it, it must not take a serving pod out untried.
            self._states[name] = CheckState(
                wanted[name], has_verdict=not (self._running and self._started)
            )
            self._board.set(wanted[name].service_name, ServingStatus.NOT_SERVING, initial=True)
        self._states = {name: self._states[name] for name in wanted}  # configuration order
        self._probers.update(probers)
        self._update_aggregates()
        if self._running:
            for name in (*changes.added, *changes.changed):
                self._start_task(name)
        return changes

    async def __aenter__(self) -> HealthMonitor:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _run(self, state: CheckState) -> None:
        # Here, not at the top: a server without checks never needs random (nor its memory).
        import random  # noqa: PLC0415

        check, prober = state.check, self._probers[state.check.name]
        loop = asyncio.get_running_loop()
        await asyncio.sleep(check.initial_delay)
        while True:
            started = loop.time()
            error = await self._attempt(prober, check.timeout)
            state.last_duration = loop.time() - started
            self._record(state, error)
            wait = check.interval * random.uniform(1 - _JITTER, 1 + _JITTER)  # noqa: S311
            await asyncio.sleep(max(0.0, wait - state.last_duration))

    @staticmethod
    async def _attempt(prober: Prober, limit: float) -> str | None:
        """Run one attempt; return None if it passed, else why it failed."""
        try:
            async with asyncio.timeout(limit):
                await prober()
        except TimeoutError:
            return f"no answer within {limit:g}s"
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the monitor is stopping this check
            return "CancelledError raised by the check"
        except BaseException as error:  # noqa: BLE001 - any failure of a check is a failed check
            # One line, bounded: some clients put multi-line debug text in their errors.
            text = " ".join(f"{type(error).__name__}: {error}".split()).rstrip(":")
            return text if len(text) <= _MAX_ERROR_TEXT else text[: _MAX_ERROR_TEXT - 1] + "…"
        return None

    def _record(self, state: CheckState, error: str | None) -> None:
        check = state.check
        was_serving = state.serving
        if error is None:
            state.consecutive_failures = 0
            state.consecutive_successes += 1
            state.last_success_time = time.time()
            if state.last_error is not None:
                _log.info(
                    "check %r passes again", check.name, extra={"service": check.service_name}
                )
                state.last_error = None
            if not state.serving and state.consecutive_successes >= check.success_threshold:
                state.serving = True
        else:
            state.consecutive_successes = 0
            state.consecutive_failures += 1
            if state.last_error is None:
                # Once per run of failures, not on every attempt.
                _log.warning(
                    "check %r failed: %s", check.name, error, extra={"service": check.service_name}
                )
            state.last_error = error
            if state.serving and state.consecutive_failures >= check.failure_threshold:
                state.serving = False
        if state.serving != was_serving:
            state.flips += 1
        first = not state.completed_first_attempt
        state.completed_first_attempt = True
        joined = not state.has_verdict and (
            state.serving or state.consecutive_failures >= check.failure_threshold
        )
        state.has_verdict = state.has_verdict or joined
        self._board.set(
            check.service_name,
            ServingStatus.SERVING if state.serving else ServingStatus.NOT_SERVING,
        )
        if first or joined or (check.critical and state.serving != was_serving):
            self._update_aggregates()

    def _update_aggregates(self, *, initial: bool = False) -> None:
        critical = [state for state in self._states.values() if state.check.critical]
        ready = all(state.serving for state in critical if state.has_verdict)
        for name in _AGGREGATES:
            self._board.set(
                name, ServingStatus.SERVING if ready else ServingStatus.NOT_SERVING, initial=initial
            )
        # Once started, always started: a check added by a reload must not send the pod
        # back through its startup probe.
        self._started = self._started or all(s.completed_first_attempt for s in critical)
        self._board.set(
            STARTUP,
            ServingStatus.SERVING if self._started else ServingStatus.NOT_SERVING,
            initial=initial,
        )
