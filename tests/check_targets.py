"""Targets for ``python`` checks, named as ``"module:function"`` strings.

In-process tests name them ``check_targets:<name>`` (pytest puts tests/ on sys.path);
a server started from the repository root names them ``tests.check_targets:<name>``.
"""

from __future__ import annotations

import asyncio
import threading


def sync_ok() -> bool:
    return True


async def async_ok() -> bool:
    await asyncio.sleep(0)
    return True


def sync_falsy() -> int:
    return 0


async def async_falsy() -> str:
    await asyncio.sleep(0)
    return ""


def sync_raises() -> bool:
    raise RuntimeError("the litter box is full")


async def async_raises() -> bool:
    await asyncio.sleep(0)
    raise ConnectionResetError("the vet hung up")


class Unjudgeable:
    """A result that cannot be judged: asking whether it is truthy raises."""

    def __bool__(self) -> bool:
        raise TypeError("this result refuses to be judged")


def garbage() -> object:
    return Unjudgeable()


class Nested:
    """Holds a check function, reached as ``check_targets:Nested.ok``."""

    @staticmethod
    def ok() -> bool:
        return True


NOT_CALLABLE = 42

_never = threading.Event()


def hang_forever() -> bool:
    """Block the calling thread until the process ends (for a server in a subprocess)."""
    _never.wait()
    return True
