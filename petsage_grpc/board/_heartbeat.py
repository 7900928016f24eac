"""A liveness that means "the event loop runs": a heartbeat on the loop, a watchdog off it.

A busy loop that still turns, however slowly, is alive; a loop blocked in a synchronous
call, a deadlock or an endless loop is not, and ``liveness`` then reports NOT_SERVING.
The watchdog runs on a thread of its own, so it judges the loop even while the loop
cannot run, and a probe listener on another thread (services/_probe_listener.py)
answers with what it decided.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from typing import Final

from petsage_grpc.board._status import LIVENESS, ServingStatus, StatusBoard

__all__ = ["DEFAULT_STALL_SECONDS", "LoopHeartbeat"]

_log = logging.getLogger("petsage_grpc.heartbeat")

DEFAULT_STALL_SECONDS: Final = 10.0
"""How long the loop may not run before ``liveness`` reports NOT_SERVING.

Far above any pause a healthy process makes (a full collection of a large heap, a slow
synchronous DNS lookup), and at most one default kubelet probe period (10 s): with the
kubelet's defaults (period 10 s, timeout 1 s, failureThreshold 3), a wedged loop is
restarted 30-40 s after it stopped, and a busy one never.
"""
_MAX_BEAT_SECONDS: Final = 1.0
"""The heartbeat's period at most: one wake a second on an idle loop."""
_WAKE_MARGIN_SECONDS: Final = 0.01
"""The watchdog wakes this long after the loop would be overdue, not before."""
_SHED_AFTER_BEATS: Final = 3
"""Beats in a row at least *shed_lag_seconds* late before readiness turns NOT_SERVING ..."""
_RECOVER_AFTER_BEATS: Final = 5
"""... and beats in a row under half of it before it is reported as set again."""


class LoopHeartbeat:
    """Measures how late the application's event loop runs, and turns a stall into liveness.

    :meth:`start` (on the loop to watch) starts a heartbeat task there and a watchdog
    thread. When the loop has not beaten for more than *stall_seconds*, the watchdog sets
    ``liveness`` NOT_SERVING (if it was SERVING); when the loop beats again, SERVING
    again, and the stall is logged once, with how long it lasted. A status someone else
    set in the meantime is left alone.

    With *shed_lag_seconds* (off by default), readiness follows the loop's lag too: after
    3 beats in a row at least that late, the board sheds load (``readiness`` and ``""``
    report NOT_SERVING, :meth:`StatusBoard.shed_load`); after 5 beats in a row under half
    of it, they report what was set again. The gap between the two keeps it from flapping.
    """

    def __init__(
        self,
        board: StatusBoard,
        *,
        stall_seconds: float = DEFAULT_STALL_SECONDS,
        shed_lag_seconds: float | None = None,
    ) -> None:
        """Watch for stalls longer than *stall_seconds*, and (optionally) shed load on lag.

        Raises:
            ValueError: *stall_seconds* or *shed_lag_seconds* is not a positive, finite
                number of seconds.
        """
        if not (math.isfinite(stall_seconds) and stall_seconds > 0):
            raise ValueError(f"stall_seconds must be greater than zero, not {stall_seconds!r}")
        if shed_lag_seconds is not None and not (
            math.isfinite(shed_lag_seconds) and shed_lag_seconds > 0
        ):
            raise ValueError(
                f"shed_lag_seconds must be greater than zero, not {shed_lag_seconds!r}"
            )
        self.shed_lag_seconds = shed_lag_seconds
        self._late_beats = 0
        self._prompt_beats = 0
        self._board = board
        self.stall_seconds = stall_seconds
        self._beat_seconds = min(_MAX_BEAT_SECONDS, stall_seconds / 4)
        self._next_beat = time.monotonic()  # when the loop is next due to beat
        self._last_lag = 0.0
        self._max_lag = 0.0
        self._stalls = 0
        self._stalled_since: float | None = None
        self._flipped = False
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Set by a beat while a stall is judged (the loop runs again), and by stop().
        self._beaten = threading.Event()

    @property
    def lag_seconds(self) -> float:
        """How late the loop runs: its last beat's lateness, or how overdue the next one is."""
        return max(self._last_lag, time.monotonic() - self._next_beat, 0.0)

    @property
    def max_lag_seconds(self) -> float:
        """The largest lateness of a beat since :meth:`start`."""
        return self._max_lag

    @property
    def stalls(self) -> int:
        """How many stalls the watchdog has seen (each counted when it begins)."""
        return self._stalls

    @property
    def stalled(self) -> bool:
        """Whether the loop is stalled now, as the watchdog last judged."""
        return self._stalled_since is not None

    def start(self) -> None:
        """Start the heartbeat on the running event loop, and the watchdog thread.

        Raises:
            RuntimeError: no event loop is running, or it is started already.
        """
        if self._task is not None:
            raise RuntimeError("the heartbeat is started already")
        self._next_beat = time.monotonic() + self._beat_seconds
        self._task = asyncio.get_running_loop().create_task(self._beat())
        self._stopping = False
        self._beaten.clear()
        self._thread = threading.Thread(
            target=self._watch, name="petsage-grpc-watchdog", daemon=True
        )
        self._thread.start()
        self._board.measure_loop_lag(lambda: self.lag_seconds)

    async def stop(self) -> None:
        """Stop both; ``liveness`` keeps whatever it reports."""
        self._board.measure_loop_lag(None)
        self._stopping = True
        self._beaten.set()
        if self.shed_lag_seconds is not None:
            self._board.shed_load(False)  # what it shed, it gives back
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.join)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self._beat_seconds)
            now = time.monotonic()
            self._last_lag = max(0.0, now - self._next_beat)
            self._max_lag = max(self._max_lag, self._last_lag)
            self._next_beat = now + self._beat_seconds
            if self._stalled_since is not None:
                self._beaten.set()  # the watchdog is waiting for this beat
            if self.shed_lag_seconds is not None:
                self._follow_load(self._last_lag, self.shed_lag_seconds)

    def _follow_load(self, lag: float, limit: float) -> None:
        if lag >= limit:
            self._late_beats, self._prompt_beats = self._late_beats + 1, 0
        elif lag < limit / 2:
            self._late_beats, self._prompt_beats = 0, self._prompt_beats + 1
        else:  # between the two: neither way
            self._late_beats = self._prompt_beats = 0
        if not self._board.shedding and self._late_beats >= _SHED_AFTER_BEATS:
            self._board.shed_load(True)
        elif self._board.shedding and self._prompt_beats >= _RECOVER_AFTER_BEATS:
            self._board.shed_load(False)

    def _watch(self) -> None:
        # Wakes only when the loop would be overdue, or (while stalled) when it beats again:
        # once per stall_seconds on a healthy loop, not on a timer of its own.
        while not self._stopping:
            if self._stalled_since is None:
                due = self._next_beat - self._beat_seconds + self.stall_seconds - time.monotonic()
                self._beaten.wait(max(due, 0.0) + _WAKE_MARGIN_SECONDS)
            else:
                self._beaten.wait()
            self._beaten.clear()
            if not self._stopping:
                self._judge()

    def _judge(self) -> None:
        # Silence since the loop last proved it ran: its last beat. The beat period counts
        # in, so a stall is seen at most stall_seconds after the loop stopped.
        last_beat = self._next_beat - self._beat_seconds
        silent = time.monotonic() - last_beat
        if self._stalled_since is None:
            if silent > self.stall_seconds:
                self._stalled_since = last_beat
                self._stalls += 1
                if self._board.get(LIVENESS) is ServingStatus.SERVING:
                    self._flipped = True
                    self._board.set(LIVENESS, ServingStatus.NOT_SERVING)
            return
        if last_beat > self._stalled_since:
            # The loop has beaten since: from one beat to the next, it did not run.
            lasted = last_beat - self._stalled_since
            self._stalled_since = None
            if self._flipped and self._board.get(LIVENESS) is ServingStatus.NOT_SERVING:
                self._board.set(LIVENESS, ServingStatus.SERVING)
            self._flipped = False
            _log.warning(
                "the event loop did not run for %.1fs",
                lasted,
                extra={"event": "loop_stall", "seconds": round(lasted, 3)},
            )
