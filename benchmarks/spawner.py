"""Runs commands for the exec probe section and reports each one's wall, CPU and peak RSS.

Run as ``python -I -S benchmarks/spawner.py``: one JSON argv per stdin line, one JSON
result per stdout line (``{"code", "wall_s", "cpu_s", "maxrss_kib"}``).

Why a separate, small process: Linux carries a process's peak RSS across ``exec``, and a
child forked (or vforked) from the benchmark starts with the benchmark's own tens of MiB
as its peak. Forked from this interpreter (no site, no imports beyond json: about 9 MiB,
less than any command measured), the peak is the command's own.
"""

import json
import os
import sys
import time


def main() -> None:
    """Serve requests until stdin ends."""
    null = os.open(os.devnull, os.O_RDWR)
    actions = [(os.POSIX_SPAWN_DUP2, null, fd) for fd in (0, 1, 2)]
    for line in sys.stdin:
        argv = json.loads(line)
        started = time.perf_counter()
        pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - started
        result = {
            "code": os.waitstatus_to_exitcode(status),
            "wall_s": wall,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "maxrss_kib": usage.ru_maxrss,
        }
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
