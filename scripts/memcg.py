"""Run a process inside a memory cgroup of its own, and read the kernel's verdict.

The kernel is the judge of a memory bound: a process in a cgroup whose limit is the pod's
is OOM-killed exactly where the pod's container would be. This module makes such a
cgroup (as root), starts commands inside it from their first instruction, and reads the
OOM-kill count and the peak charge.

Both cgroup versions:

- **v1** (a ``memory`` hierarchy mounted on its own, e.g. ``/sys/fs/cgroup/memory``):
  ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes`` where swap accounting
  is on, so that swap does not stretch the limit), ``memory.max_usage_in_bytes``, and the
  ``oom_kill`` line of ``memory.oom_control``;
- **v2** (the unified hierarchy with the ``memory`` controller): ``memory.max``,
  ``memory.swap.max`` = 0, ``memory.peak``, and the ``oom_kill`` line of
  ``memory.events``. The controller is enabled in the parent's
  ``cgroup.subtree_control``.

Usage as a command (from the repository root, as root)::

    .venv/bin/python scripts/memcg.py --limit 128Mi -- .venv/bin/petsage-grpc serve

runs the command in a fresh cgroup, passes signals on, and prints one line with the
verdict when it exits (``oom_kills=0 peak_mib=61.2 limit_mib=128``). Exit status: the
command's, 2 on bad arguments, 3 when no memory cgroup can be made here.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["MemoryCgroup", "memory_cgroup", "parse_size", "unavailable_reason"]

_MOUNTINFO: Final = Path("/proc/self/mountinfo")
_UNITS: Final = {
    "": 1,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
}


def parse_size(text: str) -> int:
    """Bytes in a Kubernetes-style quantity: ``128Mi``, ``1Gi``, ``500M``, ``1048576``."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]i?)?\s*", text)
    if match is None:
        raise ValueError(f"not a memory size: {text!r} (e.g. 128Mi)")
    return int(match[1]) * _UNITS[match[2] or ""]


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, file system type, super options) of every mount."""
    found = []
    for line in _MOUNTINFO.read_text().splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) >= 5 and len(tail) >= 3:
            found.append((fields[4], tail[0], tail[2]))
    return found


def _hierarchy() -> tuple[int, Path] | None:
    """The memory controller's hierarchy: (version, mount point), v1 first."""
    mounts = _mounts()
    for point, kind, options in mounts:
        if kind == "cgroup" and "memory" in options.split(","):
            return 1, Path(point)
    for point, kind, _ in mounts:
        controllers = Path(point, "cgroup.controllers")
        if kind == "cgroup2" and controllers.exists() and "memory" in controllers.read_text():
            return 2, Path(point)
    return None


def unavailable_reason() -> str | None:
    """Why no memory cgroup can be made here, or None when one can."""
    if os.geteuid() != 0:
        return "making a memory cgroup needs root"
    if sys.platform != "linux" or not _MOUNTINFO.exists():
        return "memory cgroups need Linux with /proc"
    found = _hierarchy()
    if found is None:
        return "no memory cgroup controller is mounted"
    if not os.access(found[1], os.W_OK):
        return f"{found[1]} is not writable"
    return None


def _event_count(path: Path, key: str) -> int:
    for line in path.read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


@dataclass(frozen=True)
class MemoryCgroup:
    """One memory cgroup, made by :func:`memory_cgroup`."""

    path: Path
    version: int
    limit_bytes: int

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """*argv*, run so that the process joins this cgroup before it starts (exec)."""
        join = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
        return ["/bin/sh", "-c", join, str(self.path), *argv]

    def add(self, pid: int) -> None:
        """Move the process *pid* (one of its threads moves them all) into this cgroup."""
        (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def pids(self) -> list[int]:
        """The processes in this cgroup now."""
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def oom_kills(self) -> int:
        """How many processes the kernel has OOM-killed in this cgroup."""
        events = "memory.oom_control" if self.version == 1 else "memory.events"
        return _event_count(self.path / events, "oom_kill")

    def usage_bytes(self) -> int:
        """What the cgroup is charged now (page cache included, as for a container)."""
        name = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        return int((self.path / name).read_text())

    def peak_bytes(self) -> int:
        """The highest charge since the cgroup was made (v2 before 5.19: the current one)."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        peak = self.path / name
        return int(peak.read_text()) if peak.exists() else self.usage_bytes()

    def verdict(self) -> str:
        """One line: OOM kills, peak and limit."""
        return (
            f"oom_kills={self.oom_kills()} peak_mib={self.peak_bytes() / 2**20:.1f} "
            f"limit_mib={self.limit_bytes / 2**20:.0f}"
        )


def _configure(path: Path, version: int, limit: int) -> None:
    if version == 1:
        (path / "memory.limit_in_bytes").write_text(str(limit))
        with contextlib.suppress(OSError):  # swap accounting off: nothing to cap
            (path / "memory.memsw.limit_in_bytes").write_text(str(limit))
    else:
        (path / "memory.max").write_text(str(limit))
        with contextlib.suppress(OSError):
            (path / "memory.swap.max").write_text("0")


def _evict(path: Path) -> None:
    """Move what is left in *path* to the root, then remove it."""
    root = path.parent
    with contextlib.suppress(OSError):
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                os.kill(int(pid), signal.SIGKILL)
    with contextlib.suppress(OSError):
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (root / "cgroup.procs").write_text(pid)
    for _ in range(50):
        with contextlib.suppress(OSError):
            path.rmdir()
        if not path.exists():
            return
        time.sleep(0.1)


@contextlib.contextmanager
def memory_cgroup(limit_bytes: int, *, prefix: str = "petsage") -> Iterator[MemoryCgroup]:
    """A fresh memory cgroup with *limit_bytes*; what is left in it is killed at exit.

    Raises:
        OSError: no memory cgroup can be made here (:func:`unavailable_reason` says why).
    """
    reason = unavailable_reason()
    found = _hierarchy()
    if reason is not None or found is None:
        raise OSError(reason or "no memory cgroup controller")
    version, root = found
    if version == 2:
        with contextlib.suppress(OSError):
            (root / "cgroup.subtree_control").write_text("+memory")
    path = root / f"{prefix}-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    try:
        _configure(path, version, limit_bytes)
        yield MemoryCgroup(path=path, version=version, limit_bytes=limit_bytes)
    finally:
        _evict(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="memcg.py", description="Run a command in a memory cgroup of its own."
    )
    parser.add_argument("--limit", required=True, help="memory limit, e.g. 128Mi")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (after --)")
    try:
        limit = parse_size(args.limit)
    except ValueError as error:
        parser.error(str(error))
    reason = unavailable_reason()
    if reason is not None:
        print(f"memcg.py: error: {reason}", file=sys.stderr)
        return 3
    with memory_cgroup(limit) as cgroup:
        child = subprocess.Popen(cgroup.wrap(command))
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda number, _frame: child.send_signal(number))
        returncode = child.wait()
        print(cgroup.verdict(), file=sys.stderr)
    return returncode if returncode >= 0 else 128 - returncode


if __name__ == "__main__":
    sys.exit(main())
