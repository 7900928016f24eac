"""Dependency checks for the benchmark: ``target = "benchmarks.hang:forever"`` never answers."""

from __future__ import annotations

import asyncio


async def forever() -> bool:
    """Sleep until cancelled (the monitor's timeout cancels it)."""
    await asyncio.Event().wait()
    return True  # pragma: no cover - never reached


def ok() -> bool:
    """Pass at once (a configured check that costs a thread hop per attempt)."""
    return True
