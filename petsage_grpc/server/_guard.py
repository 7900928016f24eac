"""The server's memory watermark, and memory given back after a peak.

Once a second the guard reads the process's RSS (Linux ``/proc``): above the watermark
new Watch streams on the main server are refused (the health service asks
:meth:`MemoryGuard.admits_watch`; no interceptor, so no cost on other calls) until RSS is
back under the release mark; once a peak has passed (RSS well above what it was at start
and no longer growing), ``malloc_trim(0)`` gives glibc's free heap pages back, on a
thread of its own. Why and the figures: docs/reliability.md, "Memory given back".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, Final

__all__ = [
    "HEAP_ARENAS",
    "PAGE_SIZE",
    "MemoryGuard",
    "glibc_function",
    "limit_heap_arenas",
    "rss_bytes",
]

_log = logging.getLogger("petsage_grpc.server")
PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")
HEAP_ARENAS: Final = 2
"""glibc malloc arenas that every thread of the process shares (glibc's default: up to 8
per core); the image sets ``MALLOC_ARENA_MAX`` to the same."""
_M_ARENA_MAX: Final = -8
"""mallopt's parameter number for the arena cap (glibc's malloc.h)."""
_TRIM_RATIO: Final = 1.3
_TRIM_EVERY: Final = 5.0


def rss_bytes() -> int:
    """The process's resident set size, in bytes (Linux ``/proc``)."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


def glibc_function(name: str, *argtypes: Any) -> Callable[..., int] | None:
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

    mallopt = glibc_function("mallopt", ctypes.c_int, ctypes.c_int)
    return mallopt is not None and bool(mallopt(_M_ARENA_MAX, HEAP_ARENAS))


def _malloc_trim() -> Callable[[], Any] | None:
    """The C library's malloc_trim(0) (glibc), or None where there is none (musl, macOS)."""
    import ctypes  # noqa: PLC0415

    trim = glibc_function("malloc_trim", ctypes.c_size_t)
    return None if trim is None else lambda: trim(0)


class MemoryGuard:
    """Watches RSS against *watermark_mib* of *budget_mib*; the main server's Watch asks it."""

    def __init__(
        self, *, budget_mib: int, watermark_mib: int, release_mib: int, give_back: bool = True
    ) -> None:
        self._watermark = watermark_mib * 2**20
        self._release = release_mib * 2**20
        self._budget_mib = budget_mib
        self._percents = (watermark_mib * 100 // budget_mib, release_mib * 100 // budget_mib)
        self.shedding = False
        self._trim: Callable[[], Any] | None = None
        self._trim_missing = not give_back
        self._trimming: threading.Thread | None = None
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
        started_at = previous = rss_bytes()
        trimmed_at = 0.0
        while True:
            await asyncio.sleep(1.0)
            rss = rss_bytes()
            if not self.shedding and rss > self._watermark:
                self.shedding = True
                _log.warning(
                    "memory at %d MiB, above %d %% of the %d MiB budget: refusing new Watch "
                    "streams until it is back under %d %%",
                    rss >> 20,
                    self._percents[0],
                    self._budget_mib,
                    self._percents[1],
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
            # Only once the peak has passed: trimming while memory still grows frees
            # pages that are taken again at once, and holds malloc's lock meanwhile.
            peak_passed = rss <= previous
            previous = rss
            if peak_passed and rss > started_at * _TRIM_RATIO and now - trimmed_at > _TRIM_EVERY:
                trimmed_at = now
                self._give_back()

    def _give_back(self) -> None:
        """malloc_trim(0) on a thread of its own (it walks the whole heap), one at a time."""
        if self._trim is None and not self._trim_missing:
            self._trim = _malloc_trim()
            self._trim_missing = self._trim is None
        if self._trim is None or (self._trimming is not None and self._trimming.is_alive()):
            return
        self._trimming = threading.Thread(target=self._trim, name="petsage-trim", daemon=True)
        self._trimming.start()

    def admits_watch(self) -> bool:
        """Whether a new Watch stream may open: False while memory is above the watermark."""
        return not self.shedding
