"""Load generation: channels (one connection each), unary calls at steady rates."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from petsage_grpc import ServingStatus
from soaklib.common import (
    CALL_TIMEOUT,
    CHANNEL_OPTIONS,
    CHECK,
    LIST,
    REQUESTS,
    SMOKE_TEST,
    STATUS_OF,
    TICK,
    WATCH,
    Tally,
)


class Conn:
    """One channel (its own connection) and the raw-bytes callables on it."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.check: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary(CHECK)
        self.list: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary(LIST)
        self.smoke: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary(
            SMOKE_TEST
        )
        self.watch: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = self.channel.unary_stream(
            WATCH
        )
        self.closing = False

    def callable_for(self, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
        return {CHECK: self.check, LIST: self.list, SMOKE_TEST: self.smoke}[method]

    async def close(self) -> None:
        self.closing = True
        await self.channel.close()


class Pool:
    """Channels used round robin; one at a time can be replaced (closed abruptly)."""

    def __init__(self, target: str, size: int) -> None:
        self.target = target
        self.conns = [Conn(target) for _ in range(size)]
        self._next = 0
        self._recycle_next = 0
        self.recycled = 0

    def pick(self) -> Conn:
        self._next = (self._next + 1) % len(self.conns)
        return self.conns[self._next]

    async def recycle(self) -> None:
        index = self._recycle_next % len(self.conns)
        self._recycle_next += 1
        old, self.conns[index] = self.conns[index], Conn(self.target)
        await old.close()
        self.recycled += 1

    async def close(self) -> None:
        await asyncio.gather(*(conn.close() for conn in self.conns))


def cancelled_by_recycle(conn: Conn) -> bool:
    task = asyncio.current_task()
    return conn.closing and task is not None and not task.cancelling()


@dataclass(frozen=True, slots=True)
class Outcome:
    code: str
    """``OK``, a status code name, or ``RECYCLED`` (the client closed the channel)."""
    body: bytes
    details: str


async def call_unary(conn: Conn, method: str, request: bytes) -> Outcome:
    if conn.closing:  # picked just before the channel was recycled
        return Outcome("RECYCLED", b"", "")
    call = conn.callable_for(method)(request, timeout=CALL_TIMEOUT)
    try:
        body = await call
    except grpc.aio.AioRpcError as error:
        return Outcome(error.code().name, b"", error.details() or "")
    except asyncio.CancelledError:
        if cancelled_by_recycle(conn):
            return Outcome("RECYCLED", b"", "")
        raise
    return Outcome("OK", body, "")


Judge = Callable[[str, str, float, Outcome], None]


class UnaryLoad:
    """Check (over *names*), List and SmokeTest at steady rates, with bounded calls in flight."""

    def __init__(
        self,
        pool: Pool,
        rates: dict[str, float],
        names: Sequence[str],
        judge: Judge,
        max_in_flight: int,
    ) -> None:
        self.pool = pool
        self.rates = {method: rate for method, rate in rates.items() if rate > 0}
        self.names = names
        self.judge = judge
        self.max_in_flight = max_in_flight
        self.launched: Counter[str] = Counter()
        self.skipped = 0
        self.held = 0
        self.seconds = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._name_index = 0

    async def run(
        self,
        until: float,
        *,
        stop: asyncio.Event | None = None,
        may_launch: Callable[[float], bool] | None = None,
    ) -> None:
        """Launch calls until *until* (monotonic) or *stop*; *may_launch* false holds them."""
        start = time.monotonic()
        issued: Counter[str] = Counter()
        for tick in range(math.ceil(max(0.0, until - start) / TICK) + 1):
            delay = start + tick * TICK - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.monotonic()
            if now >= until or (stop is not None and stop.is_set()):
                break
            for method, rate in self.rates.items():
                due = int(rate * (now - start)) - issued[method]
                if due <= 0:
                    continue
                issued[method] += due
                if may_launch is not None and not may_launch(now):
                    self.held += due
                    continue
                for _ in range(due):
                    if len(self._tasks) >= self.max_in_flight:
                        self.skipped += 1
                    else:
                        self._launch(method)
        self.seconds += time.monotonic() - start

    def _launch(self, method: str) -> None:
        name = ""
        if method == CHECK:
            name = self.names[self._name_index % len(self.names)]
            self._name_index += 1
        self.launched[method] += 1
        task = asyncio.create_task(self._one(method, name, self.pool.pick()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _one(self, method: str, name: str, conn: Conn) -> None:
        request = REQUESTS[name] if method == CHECK else b""
        started = time.monotonic()  # when the call is really made, not when it was due
        self.judge(method, name, started, await call_unary(conn, method, request))

    async def finish(self, tally: Tally) -> None:
        """Wait for the calls in flight (each has a deadline); cancel any that outlive it."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=CALL_TIMEOUT + 5)
        for task in pending:
            task.cancel()
            tally.error("unary call outlived its deadline", repr(task))
        if pending:
            await asyncio.wait(pending, timeout=5)


def check_answer(body: bytes) -> ServingStatus | None:
    return STATUS_OF.get(body)  # UNKNOWN (0) is the empty message
