"""Process-wide set-up for a server that owns its process, in one place, each step logged.

``serve()`` runs it (``ServeOptions(tune_process=True)``, the default, and the command
line); an application that embeds the services gets none of it unless it calls
:func:`tune_process`. What each step is for: docs/reliability.md ("The memory budget",
"Memory given back") and docs/operations.md ("grpc core's own log lines").
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import re
import resource
import socket
import sys
from dataclasses import dataclass
from typing import IO, BinaryIO, Final

__all__ = ["NativeStderr", "Platform", "platform", "tune_process"]

_log = logging.getLogger("petsage_grpc.server")
_GRPC_LINE: Final = re.compile(r"^[EWIF]\d{4} [\d:.]+\s+\d+ \S+:\d+\] ?(.*)$")
"""absl's prefix (severity, date, time, thread, file:line): the message is kept alone."""


@dataclass(frozen=True)
class Platform:
    """What the defences that reach below Python find on this machine."""

    proc: bool
    """``/proc/self/statm`` and ``/proc/self/fd`` (the memory guard, the shedder)."""
    tcp_info: bool
    """``TCP_INFO`` with byte counters (the shedder's flood test)."""
    glibc: bool
    """glibc's ``mallopt`` and ``malloc_trim`` (the arena cap, memory given back)."""

    def missing(self) -> list[str]:
        """One phrase per defence that is off, with the reason."""
        gaps = []
        if not self.proc:
            gaps.append("memory watermark and connection shedder (no /proc)")
        elif not self.tcp_info:
            gaps.append("connection shedder (no TCP_INFO)")
        if not self.glibc:
            gaps.append("malloc arena cap and memory given back (no glibc)")
        return gaps


def platform() -> Platform:
    """Look once at what the defences need (Linux ``/proc``, ``TCP_INFO``, glibc)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            statm.read()
        os.listdir("/proc/self/fd")
        proc = True
    except OSError:
        proc = False
    from petsage_grpc.server._guard import glibc_function  # noqa: PLC0415

    return Platform(
        proc=proc,
        tcp_info=hasattr(socket, "TCP_INFO"),
        glibc=glibc_function("malloc_trim") is not None,
    )


def _raise_open_files() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (no privilege needed); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def tune_process(*, arenas: bool = True) -> list[str]:
    """The process-wide changes a server that owns its process makes, before it starts.

    Raises the open-files limit to its hard limit, and (with *arenas*, where glibc runs)
    caps malloc's arenas unless ``MALLOC_ARENA_MAX`` already did. Call it before grpc
    core starts its threads. Returns what was done, as the start-up log line says it.
    """
    done = [f"open files {_raise_open_files()}"]
    if arenas:
        from petsage_grpc.server._guard import HEAP_ARENAS, limit_heap_arenas  # noqa: PLC0415

        if os.environ.get("MALLOC_ARENA_MAX"):
            done.append(f"malloc arenas {os.environ['MALLOC_ARENA_MAX']} (MALLOC_ARENA_MAX)")
        elif limit_heap_arenas():
            done.append(f"malloc arenas {HEAP_ARENAS}")
    return done


def _scratch_file() -> int:
    """An anonymous file (memfd on Linux, else an unlinked one in TMPDIR), or -1.

    Not ``tempfile``: it loads ``random``, which a default server does not otherwise need.
    """
    if hasattr(os, "memfd_create"):
        with contextlib.suppress(OSError):
            return os.memfd_create("petsage-grpc-stderr", 0)
    path = os.path.join(os.environ.get("TMPDIR") or "/tmp", f".petsage-grpc-{os.getpid()}")  # noqa: S108
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return -1  # a read-only file system, say
    os.unlink(path)
    return fd


class NativeStderr:
    """grpc core's own lines: kept during start-up, re-logged in the server's format, then off.

    grpc core (absl) writes to file descriptor 2, in its own format, and a client can make
    it write a line per connection. From :meth:`capture` until :meth:`release`, descriptor
    2 is a temporary file and Python's ``sys.stderr`` (and every log handler on it) a
    duplicate of the real one; :meth:`release` logs what grpc core wrote (bind and TLS
    problems) as WARNING lines, message only, then points descriptor 2 at ``/dev/null``
    unless *keep_after_start* (an operator who set ``GRPC_VERBOSITY`` or ``GRPC_TRACE``).
    A fatal signal's dump (:mod:`faulthandler`) still goes to the real stderr.
    :meth:`restore` puts everything back. Linux and macOS (``dup2``).
    """

    def __init__(self, *, keep_after_start: bool) -> None:
        self._keep = keep_after_start
        self._saved = -1
        self._file: BinaryIO | None = None
        self._old: IO[str] | None = None
        self._new: IO[str] | None = None
        self._faulthandler = False

    def capture(self) -> None:
        """Send descriptor 2 to a temporary file; Python's stderr keeps the real one."""
        try:
            sys.stderr.flush()
            scratch = _scratch_file()
            if scratch < 0:
                return  # nowhere to keep them: grpc core's start-up lines go to stderr as they are
            self._file = open(scratch, "w+b")  # noqa: SIM115 - closed by _relog()
            self._saved = os.dup(2)
            self._new = open(  # noqa: SIM115 - closed by restore()
                self._saved,
                "w",
                buffering=1,
                encoding="utf-8",
                errors="backslashreplace",
                closefd=False,
            )
            self._swap(sys.stderr, self._new)
            os.dup2(self._file.fileno(), 2)
        except (OSError, ValueError, AttributeError):
            self.restore()

    def release(self) -> None:
        """Log what grpc core wrote so far; then descriptor 2 to /dev/null, or back."""
        if self._file is None:
            return
        if self._keep:
            os.dup2(self._saved, 2)
        else:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)
            os.close(null)
            # A crash must still say where it happened: the fatal-signal dump (every
            # thread's stack) goes to the real stderr, which descriptor 2 no longer is.
            if self._new is not None and not faulthandler.is_enabled():
                faulthandler.enable(file=self._new)
                self._faulthandler = True
        self._relog()

    def restore(self) -> None:
        """Descriptor 2 and Python's stderr as they were before :meth:`capture`."""
        if self._faulthandler:
            faulthandler.disable()
            self._faulthandler = False
        if self._saved >= 0:
            os.dup2(self._saved, 2)
        self._relog()
        if self._new is not None and self._old is not None:
            self._swap(self._new, self._old)
            self._new.close()
        if self._saved >= 0:
            os.close(self._saved)
        self._saved, self._new = -1, None

    def _relog(self) -> None:
        if self._file is None:
            return
        self._file.seek(0)
        text = self._file.read().decode("utf-8", "backslashreplace")
        self._file.close()
        self._file = None
        for line in text.splitlines():
            match = _GRPC_LINE.match(line)
            message = (match[1] if match else line).strip()
            if message:
                _log.warning("grpc core: %s", message, extra={"event": "grpc_core"})

    def _swap(self, old: IO[str], new: IO[str]) -> None:
        """Point sys.stderr and every log handler writing to *old* at *new*."""
        self._old = self._old or old
        handlers = list(logging.getLogger().handlers)
        for each in logging.Logger.manager.loggerDict.values():
            if isinstance(each, logging.Logger):
                handlers.extend(each.handlers)
        for handler in handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is old:
                handler.setStream(new)
        if sys.stderr is old:
            sys.stderr = new
