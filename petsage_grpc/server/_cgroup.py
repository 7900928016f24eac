"""The memory limit of the container the process runs in, read from its own cgroup.

cgroup v1 (``memory.limit_in_bytes`` under the ``memory`` controller's mount) and v2
(``memory.max`` under the unified mount), for the cgroup named in ``/proc/self/cgroup``,
found through ``/proc/self/mountinfo`` as the JVM and Go's automemlimit find it. The
smallest limit from the process's own cgroup up to the mount's root counts (a parent's
limit binds its children). "No limit" (v2 ``max``, v1's huge page-rounded maximum, or a
limit above the machine's memory) is None.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["ContainerLimit", "container_memory_limit"]

_PROC: Final = Path("/proc/self")


@dataclass(frozen=True)
class ContainerLimit:
    """A memory limit in bytes and the file it was read from (as the container sees it)."""

    limit_bytes: int
    source: str


def _machine_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def _mounts(mountinfo: str) -> list[tuple[str, str, str, str]]:
    """(root within the hierarchy, mount point, file system type, super options)."""
    found = []
    for line in mountinfo.splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) >= 5 and len(tail) >= 3:
            found.append((fields[3], fields[4], tail[0], tail[2]))
    return found


def _own_cgroups(text: str) -> tuple[str | None, str | None]:
    """(the v1 memory controller's path, the v2 path) in ``/proc/self/cgroup``."""
    v1 = v2 = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    return v1, v2


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # v2 "max": none


def _smallest_limit(mount_root: str, mount_point: str, own: str, name: str) -> int | None:
    """The smallest limit from *own*'s directory up to the mount point, or None."""
    relative = own
    if mount_root != "/" and (own == mount_root or own.startswith(mount_root + "/")):
        relative = own[len(mount_root) :]  # the container sees its own cgroup as the root
    directory = Path(mount_point) / relative.lstrip("/")
    top = Path(mount_point)
    if top not in (directory, *directory.parents):
        return None
    limits = []
    while True:
        limit = _read_limit(directory / name)
        if limit is not None:
            limits.append(limit)
        if directory == top:
            break
        directory = directory.parent
    return min(limits, default=None)


def container_memory_limit(proc: Path = _PROC) -> ContainerLimit | None:
    """The memory limit of this process's cgroup, or None where there is none.

    None: no ``/proc``, no memory cgroup, or no limit below the machine's memory.
    Never raises.
    """
    try:
        v1, v2 = _own_cgroups((proc / "cgroup").read_text())
        mounts = _mounts((proc / "mountinfo").read_text())
    except (OSError, ValueError):
        return None
    found: int | None = None
    source = ""
    for root, point, kind, options in mounts:
        if kind == "cgroup" and v1 is not None and "memory" in options.split(","):
            found = _smallest_limit(root, point, v1, "memory.limit_in_bytes")
            source = "cgroup v1 memory.limit_in_bytes"
        elif kind == "cgroup2" and v2 is not None and v1 is None:
            found = _smallest_limit(root, point, v2, "memory.max")
            source = "cgroup v2 memory.max"
        else:
            continue
        break
    machine = _machine_bytes()
    if found is None or (machine is not None and found >= machine):
        return None
    return ContainerLimit(limit_bytes=found, source=source)
