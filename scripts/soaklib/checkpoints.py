"""Checkpoints: with the flipper paused, every flipper watcher must hold the board's status."""

from __future__ import annotations

import asyncio
import math
import time

from soaklib.common import (
    CONVERGE_TIMEOUT,
)
from soaklib.server import SoakServer
from soaklib.watchers import FlipWatch, WatchLoad


class Checkpoints:
    """Pause the flipper; every flipper watcher must receive the board's status."""

    def __init__(self, server: SoakServer, watches: WatchLoad, steady: list[FlipWatch]) -> None:
        self.server = server
        self.watches = watches
        self.steady = steady
        self.done = 0
        self.checked = 0
        self.converge_seconds: list[float] = []
        self.coalesced_pairs = 0
        self.steady_flips = 0
        self.steady_transitions = 0

    async def run(self, *, resume: bool) -> None:
        flips, target = await self.server.pause()
        paused_at = time.monotonic()
        self.checked += len(self.watches.flip_watches)
        tally = self.watches.tally
        behind: list[FlipWatch] = []
        for _ in range(math.ceil(CONVERGE_TIMEOUT / 0.01) + 1):
            behind = [
                w
                for w in (*self.watches.flip_watches, *self.steady)
                if w.open and w.opened_at < paused_at and w.last is not target
            ]
            if not behind or time.monotonic() - paused_at > CONVERGE_TIMEOUT:
                break
            await asyncio.sleep(0.01)
        self.converge_seconds.append(time.monotonic() - paused_at)
        for watcher in behind:
            tally.lose(
                "checkpoint",
                f"flipper {target.name} after {flips} flips; a watcher still has "
                f"{watcher.last.name if watcher.last else None} after {CONVERGE_TIMEOUT}s",
            )
        for watcher in self.steady:
            if watcher in behind or not watcher.open:
                continue
            made = flips - watcher.mark_flips
            seen = watcher.messages - watcher.mark_messages
            if seen > made:
                tally.error("phantom transitions", f"steady watcher: {seen} seen, {made} flips")
            elif (made - seen) % 2:
                tally.lose("parity", f"steady watcher: {seen} seen of {made} flips")
            else:
                self.coalesced_pairs += (made - seen) // 2
            self.steady_flips += made
            self.steady_transitions += seen
            watcher.mark_flips, watcher.mark_messages = flips, watcher.messages
        self.done += 1
        if resume:
            await self.server.resume()

    async def every(self, seconds: float, load_end: float) -> None:
        for _ in range(math.ceil((load_end - time.monotonic()) / seconds) + 1):
            await asyncio.sleep(min(seconds, max(0.0, load_end - time.monotonic())))
            if time.monotonic() + 1 >= load_end:
                return
            await self.run(resume=True)
