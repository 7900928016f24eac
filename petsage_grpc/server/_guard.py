"""The standalone server's memory watermark, and memory given back after a peak.

grpc core does not bound everything a client can make it hold (docs/reliability.md:
the CONTINUATION flood), and glibc keeps freed heap memory, so RSS after an attack
would stay near its peak. Once a second the guard reads the process's RSS:

- above the watermark, new Watch streams on the main server are refused with
  RESOURCE_EXHAUSTED (one warning line), until RSS is back under 80 % of the budget:
  the health service asks :meth:`MemoryGuard.admits_watch` (no interceptor, so no
  cost on any other call);
- when RSS is more than 1.3 times what it was once started, ``malloc_trim(0)`` returns
  free heap pages to the system (at most every 5 s; a call took 0.04 ms on a 100 MB heap
  here).

glibc gives each thread that allocates while its arenas are busy an arena of its own
(up to 8 per core), and what a flood frees in one stays there, spread over pages that
one live allocation keeps resident, where ``malloc_trim`` cannot give it back. Under a
rapid reset grpc core's threads allocate and free hundreds of MiB a second: with
glibc's default (11 heaps here) RSS stayed at 2.3-2.4 times its baseline 30 s after,
with :data:`HEAP_ARENAS` (:func:`limit_heap_arenas`) at 1.24-1.56 (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any, Final

__all__ = ["HEAP_ARENAS", "PAGE_SIZE", "MemoryGuard", "limit_heap_arenas", "rss_bytes"]

_log = logging.getLogger("petsage_grpc.server")
PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")
HEAP_ARENAS: Final = 2
"""glibc malloc arenas that every thread of the process shares (glibc's default: up to 8
per core, so grpc core's threads each got one)."""
_M_ARENA_MAX: Final = -8
"""mallopt's parameter number for the arena cap (glibc's malloc.h)."""
_TRIM_RATIO: Final = 1.3
_TRIM_EVERY: Final = 5.0


def rss_bytes() -> int:
    """The process's resident set size, in bytes (Linux ``/proc``)."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


def _glibc(name: str, *argtypes: Any) -> Callable[..., int] | None:
    """The C library's function *name*, or None where it has none (musl, macOS)."""
    # ctypes (0.2 MiB) only when asked: an embedding application never loads it.
    import ctypes  # noqa: PLC0415

    try:
        function = getattr(ctypes.CDLL(None), name)  # the process's own symbols: libc's
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = list(argtypes), ctypes.c_int
    return function  # type: ignore[no-any-return]


def limit_heap_arenas() -> bool:
    """Cap glibc's malloc arenas at :data:`HEAP_ARENAS` for the rest of the process's life.

    Call it before grpc core starts its threads: arenas that exist stay, new threads
    share them. Returns False where the C library has no such setting (musl, macOS).
    """
    import ctypes  # noqa: PLC0415

    mallopt = _glibc("mallopt", ctypes.c_int, ctypes.c_int)
    return mallopt is not None and bool(mallopt(_M_ARENA_MAX, HEAP_ARENAS))


def _malloc_trim() -> Callable[[], Any] | None:
    """The C library's malloc_trim(0) (glibc), or None where there is none (musl, macOS)."""
    import ctypes  # noqa: PLC0415

    trim = _glibc("malloc_trim", ctypes.c_size_t)
    return None if trim is None else lambda: trim(0)


class MemoryGuard:
    """Watches RSS against *watermark_mib* of *budget_mib*; the main server's Watch asks it."""

    def __init__(self, *, budget_mib: int, watermark_mib: int) -> None:
        self._watermark = watermark_mib * 2**20
        self._release = budget_mib * 2**20 * 8 // 10
        self._budget_mib = budget_mib
        self.shedding = False
        self._trim: Callable[[], Any] | None = None
        self._trim_missing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start reading RSS once a second (on the running loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop reading RSS."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        started_at = rss_bytes()
        trimmed_at = 0.0
        while True:
            await asyncio.sleep(1.0)
            rss = rss_bytes()
            if not self.shedding and rss > self._watermark:
                self.shedding = True
                _log.warning(
                    "memory at %d MiB, above 90 %% of the %d MiB budget: refusing new Watch "
                    "streams until it is back under 80 %%",
                    rss >> 20,
                    self._budget_mib,
                    extra={"event": "memory_high"},
                )
            elif self.shedding and rss < self._release:
                self.shedding = False
                _log.warning(
                    "memory back at %d MiB: accepting Watch streams again",
                    rss >> 20,
                    extra={"event": "memory_ok"},
                )
            now = loop.time()
            if rss > started_at * _TRIM_RATIO and now - trimmed_at > _TRIM_EVERY:
                trimmed_at = now
                self._give_back()

    def _give_back(self) -> None:
        if self._trim is None and not self._trim_missing:
            self._trim = _malloc_trim()
            self._trim_missing = self._trim is None
        if self._trim is not None:
            self._trim()

    def admits_watch(self) -> bool:
        """Whether a new Watch stream may open: False while memory is above the watermark."""
        return not self.shedding
