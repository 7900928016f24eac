"""Watch load: slots that connect, stay a while and leave; what each flipper watcher saw."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from dataclasses import dataclass

import grpc

from petsage_grpc import LIVENESS, OVERALL, READINESS, STARTUP, ServingStatus
from soaklib.common import (
    FLIPPER,
    NOT_SERVING,
    REQUESTS,
    SERVICE_UNKNOWN,
    SERVING,
    STATUS_OF,
    STEADY_NAMES,
    UNKNOWN,
    Config,
    Tally,
)
from soaklib.load import (
    Conn,
    Pool,
    cancelled_by_recycle,
)


@dataclass(eq=False, slots=True)
class FlipWatch:
    """What one watcher of ``soak.flipper`` has received."""

    opened_at: float
    last: ServingStatus | None = None
    messages: int = 0
    last_at: float = 0.0
    open: bool = True
    # steady watchers: messages and flips at the last checkpoint
    mark_messages: int = 1
    mark_flips: int = 0


class WatchLoad:
    """Watch slots that connect, stay a random 1-5 s and leave, until the load ends."""

    def __init__(self, pool: Pool, config: Config, tally: Tally) -> None:
        self.pool = pool
        self.config = config
        self.tally = tally
        self.rng = random.Random(config.seed)  # noqa: S311 - load shape, not secrets
        self.flip_watches: set[FlipWatch] = set()
        self.opened: Counter[str] = Counter()
        self.left: Counter[str] = Counter()
        self.messages = 0
        self.flip_transitions = 0
        rest = 1 - config.flipper_share
        self.names = [READINESS, OVERALL, LIVENESS, STARTUP, UNKNOWN, FLIPPER]
        self.weights = [0.5 * rest, 0.15 * rest, 0.15 * rest, 0.1 * rest, 0.1 * rest]
        self.weights.append(config.flipper_share)

    async def slot(self, index: int, load_end: float) -> None:
        await asyncio.sleep(index / max(1, self.config.watchers))  # spread the first wave over 1 s
        for _ in range(math.ceil(self.config.seconds) + 2):  # each round stays >= 1 s
            now = time.monotonic()
            if now >= load_end - 0.05:
                return
            name = self.rng.choices(self.names, self.weights)[0]
            stay = min(self.rng.uniform(1.0, 5.0), load_end - now)
            await self.watch_once(self.pool.pick(), name, stay)

    async def watch_once(
        self, conn: Conn, name: str, stay: float, record: FlipWatch | None = None
    ) -> None:
        opened_at = time.monotonic()
        if name == FLIPPER and record is None:
            record = FlipWatch(opened_at)
            self.flip_watches.add(record)
        self.opened[name] += 1
        call = conn.watch(REQUESTS[name])
        reason = "stayed"
        previous: ServingStatus | None = None
        count = 0
        try:
            async with asyncio.timeout(stay):
                for _ in range(math.ceil(stay / self.config.flip_seconds) + 10):
                    raw = await call.read()
                    if not isinstance(raw, bytes):  # EOF: the server ended the stream
                        reason = f"ended by server: {(await call.code()).name}"
                        self.tally.error("Watch ended during the soak", f"{name!r}: {reason}")
                        break
                    now = time.monotonic()
                    count += 1
                    self.messages += 1
                    status = STATUS_OF.get(raw)
                    self._judge(
                        name, status, previous=previous, count=count, record=record, now=now
                    )
                    previous = status
                else:
                    self.tally.error("Watch sent too many messages", repr(name))
        except TimeoutError:
            pass
        except grpc.aio.AioRpcError as error:
            reason = error.code().name
            self.tally.error("Watch failed", f"{name!r}: {reason}: {error.details()}")
        except asyncio.CancelledError:
            if not cancelled_by_recycle(conn):
                raise
            reason = "channel closed (recycled)"
        finally:
            call.cancel()
            self.left[reason] += 1
            if record is not None:
                record.open = False
                self.flip_watches.discard(record)
                self._bound_transitions(record)

    def _judge(
        self,
        name: str,
        status: ServingStatus | None,
        *,
        previous: ServingStatus | None,
        count: int,
        record: FlipWatch | None,
        now: float,
    ) -> None:
        if status is None:
            self.tally.error("Watch sent an unparsable message", repr(name))
        elif name == FLIPPER:
            assert record is not None  # noqa: S101 - every flipper watch has one
            if status not in (SERVING, NOT_SERVING):
                self.tally.error("flipper watch got a wrong status", status.name)
            if status is previous:
                self.tally.lose("repeated status", f"{status.name} twice in a row")
            elif previous is not None:
                self.flip_transitions += 1
            record.last, record.messages, record.last_at = status, count, now
        elif count > 1:
            self.tally.error("Watch of a steady name changed", f"{name!r}: {status.name}")
        elif name == UNKNOWN and status is not SERVICE_UNKNOWN:
            self.tally.error("Watch of an unknown name", f"got {status.name}")
        elif name in STEADY_NAMES and status is not SERVING:
            self.tally.error("Watch of a serving name", f"{name!r}: got {status.name}")

    def _bound_transitions(self, record: FlipWatch) -> None:
        if record.messages < 2:
            return
        window = record.last_at - record.opened_at
        possible = math.floor(window / self.config.flip_seconds + 1e-6) + 1
        if record.messages - 1 > possible:
            self.tally.error(
                "phantom transitions",
                f"{record.messages - 1} transitions in {window:.3f}s (at most {possible} flips)",
            )
